"""How a request turns logits into tokens: one search object per request, driven by the
engine's single decode loop.

- `TokenSearch`: greedy or sampled decoding of one row (the engine picks the tokens of all
  such rows of a step together, see `choose_for`).
- `BeamSearch` (beam.py): beam_size rows, reordered after each step.
- `Expansion`: the first step of return_alternatives: the most likely first tokens.
- `Scoring`: no generation; the logits (or target log-probs) of every prompt position.

Each answers the engine with a `Decision`: the next input token of each of its rows (and
which old row each continues, for beams), the tokens to report, and whether it finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .processors import Processors
from .requests import Request, RowState
from .sampling import SamplingParams, choose_tokens


@dataclass
class Decision:
    inputs: list[int] = field(default_factory=list)  # next decode input of each row
    sources: list[int] | None = None  # row k continues old row sources[k] (beams)
    tokens: list[tuple[int, float]] = field(default_factory=list)  # (token, log_prob) to report
    finish_reason: str | None = None  # "length" | "stop" once the request is done
    tops: list[list[tuple[int, float]]] | None = None  # top_logprobs of each reported token


class Search:
    rows = 1  # cache slots the request needs
    all_logits = False  # True: the prompt's logits at every position (scoring)

    def __init__(self, request: Request) -> None:
        self.request = request

    def advance(self, logits: torch.Tensor) -> Decision:
        """Logits [rows, V] of the request's rows (after the prompt: its last position)."""
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


class TokenSearch(Search):
    """Greedy or sampled decoding of one row with CTranslate2's rules: processors, then
    min_length, then the choice (top-k, temperature, top-p)."""

    def __init__(self, request: Request, sampling: SamplingParams, generator: torch.Generator,
                 end_ids: frozenset[int], return_end_token: bool, processors: Processors,
                 keep_logits: bool, length_penalty: float, top_logprobs: int = 0,
                 speculative_tokens: int = 0, adaptive_speculation: bool = False,
                 drafted: bool = False) -> None:
        super().__init__(request)
        self.top_logprobs = top_logprobs
        self.speculative_tokens = speculative_tokens  # proposals per step (0: none)
        self.adaptive_speculation = adaptive_speculation
        self.drafted = drafted  # proposals from the draft model, else from prompt lookup
        self.sampling, self.generator = sampling, generator
        self.end_ids, self.return_end_token = end_ids, return_end_token
        self.processors, self.keep_logits = processors, keep_logits
        self.row = RowState(scored=request.counted_prompt, length_penalty=length_penalty)
        self.end_list = sorted(end_ids)
        self._end_tensor: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        """Tokens chosen so far (end token included)."""
        return self.row.scored - self.request.counted_prompt

    def processed(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's logits [1, V] after the logits processors."""
        return self.processors.apply(logits, [self.request.history_prefix + self.row.tokens])

    def end_tensor(self, device: torch.device) -> torch.Tensor:
        if self._end_tensor is None:
            self._end_tensor = torch.tensor(self.end_list, dtype=torch.long, device=device)
        return self._end_tensor

    @property
    def ends_masked(self) -> bool:
        """End tokens are forbidden this step (min_length not reached)."""
        return bool(self.end_list) and self.steps < self.request.min_new_tokens

    def accept(self, token: int, log_prob: float, logits: torch.Tensor) -> Decision:
        if self.keep_logits:
            self.row.logits.append(logits[0].float().cpu())
        is_end = token in self.end_ids
        self.row.add(token, log_prob, is_end, self.return_end_token,
                     self.steps + 1 >= self.request.max_new_tokens)
        shown = [(token, log_prob)] if not is_end or self.return_end_token else []
        reason = ("stop" if is_end else "length") if self.row.done else None
        tops = None
        if self.top_logprobs and shown:  # under the same distribution as log_prob
            values, ids = logits[0].float().log_softmax(dim=-1).topk(self.top_logprobs)
            tops = [list(zip(ids.tolist(), values.tolist(), strict=True))]
        return Decision(inputs=[token], tokens=shown, finish_reason=reason, tops=tops)

    def advance(self, logits: torch.Tensor) -> Decision:
        return choose_for([self], logits)[0]

    def result(self) -> RowState:
        return self.row


def choose_for(searches: list[TokenSearch], logits: torch.Tensor,
               usable_vocab_size: int | None = None) -> list[Decision]:
    """One token for each search from its row of logits [N, V] (changed in place), picked
    together: each row with its own options and random stream, so a row's token never
    depends on the others. Processors first, then the min_length end mask, then the choice."""
    for index, search in enumerate(searches):
        if search.processors.active:
            logits[index:index + 1] = search.processed(logits[index:index + 1])
    for index, search in enumerate(searches):
        if search.ends_masked:
            logits[index].index_fill_(0, search.end_tensor(logits.device), float("-inf"))
    ids, log_probs = choose_tokens(logits, [(s.sampling, s.generator) for s in searches],
                                   usable_vocab_size)
    return [search.accept(token, log_prob, logits[index:index + 1])
            for index, (search, token, log_prob) in enumerate(zip(
                searches, ids.tolist(), log_probs.tolist(), strict=True))]


class Expansion(Search):
    """return_alternatives' first step: the `count` most likely first tokens (end tokens
    excluded; a token below `min_probability` ends the list), as CTranslate2 computes them."""

    def __init__(self, request: Request, count: int, min_probability: float,
                 end_ids: frozenset[int], processors: Processors, usable_vocab_size: int) -> None:
        super().__init__(request)
        self.count, self.min_probability = count, min_probability
        self.end_ids, self.processors, self.usable = end_ids, processors, usable_vocab_size
        self.expansions: list[tuple[int, float]] = []

    def advance(self, logits: torch.Tensor) -> Decision:
        if self.processors.active:  # the expansion step has no history yet
            logits = self.processors.apply(logits, [[]])
        if self.end_ids:
            logits[:, sorted(self.end_ids)] = float("-inf")
        log_probs = logits.log_softmax(dim=-1)
        log_probs[:, self.usable:] = float("-inf")
        values, ids = log_probs[0].topk(self.count)
        for value, token in zip(values.tolist(), ids.tolist(), strict=True):
            if torch.tensor(value).exp().item() < self.min_probability:
                break
            self.expansions.append((token, value))
        return Decision(finish_reason="length")

    def result(self) -> list[tuple[int, float]]:
        return self.expansions


class Scoring(Search):
    """No generation: every prompt position's float32 logits (`log_probs=False`) or the
    log-probability of each next prompt token (`log_probs=True`), gathered chunk by chunk."""

    all_logits = True

    def __init__(self, request: Request, log_probs: bool) -> None:
        super().__init__(request)
        self.log_probs = log_probs
        self.parts: list[torch.Tensor] = []

    def add_chunk(self, start: int, logits: torch.Tensor) -> None:
        """Logits [T, V] of prompt positions start..start+T-1."""
        if not self.log_probs:
            self.parts.append(logits.float())
            return
        prompt = self.request.prompt_ids
        targets = prompt[start + 1:start + 1 + logits.shape[0]]
        if targets:
            scores = logits[: len(targets)].float().log_softmax(dim=-1)
            index = torch.tensor(targets, device=logits.device).unsqueeze(1)
            self.parts.append(scores.gather(1, index).squeeze(1))

    def advance(self, logits: torch.Tensor) -> Decision:
        return Decision(finish_reason="length")

    def result(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.empty(0)
