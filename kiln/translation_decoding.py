"""How a Translator runs its model: sentences decoded in lockstep (one encoder pass for all
their sources, then one decoder pass per step over every row still searching, beams
included), one sentence streamed token by token, targets scored, and the first step of
`return_alternatives`. With `attention=True` the searches also receive each step's
alignment-layer attention over the source."""

from __future__ import annotations

import torch

from .generation.sampling import choose_tokens
from .translation_search import Job


class Decoding:
    def __init__(self, model, device: torch.device) -> None:
        self.model, self.device, self.spec = model, device, model.spec

    def encode(self, ids: list[int]):
        """One source: (cross keys/values per decoder layer, source mask)."""
        tensor = torch.tensor([ids], device=self.device)
        lengths = torch.tensor([len(ids)], device=self.device)
        states, mask = self.model.encode(tensor, lengths)
        return self.model.cross_keys_values(states), mask

    @torch.inference_mode()
    def run(self, jobs: list[Job], attention: bool = False) -> None:
        """Decode `jobs` in lockstep, grouped by target prefix length so that each group's
        rows share their positions."""
        width = max(len(job.source) for job in jobs)
        ids = torch.full((len(jobs), width), self.spec.pad_token_id, dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, :len(job.source)] = torch.tensor(job.source)
        lengths = torch.tensor([len(job.source) for job in jobs])
        states, mask = self.model.encode(ids.to(self.device), lengths.to(self.device))
        cross = self.model.cross_keys_values(states)
        groups: dict[int, list[int]] = {}
        for row, job in enumerate(jobs):
            groups.setdefault(len(job.request.prompt_ids), []).append(row)
        for members in groups.values():
            self._lockstep([jobs[m] for m in members], [(k[members], v[members]) for k, v in cross],
                           mask[members], attention)

    def _lockstep(self, jobs: list[Job], cross, mask, attention: bool) -> None:
        starts = torch.tensor([job.request.prompt_ids for job in jobs], device=self.device)
        caches = [{} for _ in self.model.decoder_layers]
        weights: list | None = [] if attention else None
        logits = self.model.decode(starts, 0, caches, cross, mask, weights)
        if weights:  # the prefix's rows, then the row that goes with the first new token
            for row, job in enumerate(jobs):
                job.search.start_attention(weights[0][row, :-1, :len(job.source)].tolist())
        position = starts.shape[1]
        # row r of the decoder batch belongs to jobs[owner[r]]; each job's rows are contiguous
        owner = list(range(len(jobs)))
        rows_cross = rows_mask = None
        while True:
            step_weights = weights.pop()[:, -1] if weights else None
            take, inputs, new_owner = [], [], []
            row = 0
            while row < len(owner):
                index = owner[row]
                end = row
                while end < len(owner) and owner[end] == index:
                    end += 1
                job = jobs[index]
                if step_weights is None:
                    decision = job.search.advance(logits[row:end])
                else:
                    decision = job.search.advance(logits[row:end],
                                                  step_weights[row:end, :len(job.source)])
                if decision.finish_reason is None:
                    sources = decision.sources or [0] * len(decision.inputs)
                    take += [row + source for source in sources]
                    inputs += decision.inputs
                    new_owner += [index] * len(decision.inputs)
                row = end
            if not take:
                return
            if take != list(range(len(owner))):  # beams reordered, or sentences finished
                picked = torch.tensor(take, device=self.device)
                for cache in caches:
                    cache["k"], cache["v"] = cache["k"][picked], cache["v"][picked]
            if new_owner != owner or rows_cross is None:  # the rows' sources, once per layout
                sentence = torch.tensor(new_owner, device=self.device)
                rows_cross = [(k[sentence], v[sentence]) for k, v in cross]
                rows_mask = mask[sentence]
            owner = new_owner
            logits = self.model.decode(torch.tensor(inputs, device=self.device)[:, None],
                                       position, caches, rows_cross, rows_mask, weights)
            position += 1

    @torch.inference_mode()
    def expand(self, source_ids: list[int], start: list[int], count: int, processors,
               history: list[int], end_ids: frozenset[int]) -> list[tuple[int, float]]:
        """return_alternatives' first free step: the `count` likeliest next tokens after the
        start and prefix (end tokens barred, as CTranslate2 does), with their log-probs."""
        cross, mask = self.encode(source_ids)
        caches = [{} for _ in self.model.decoder_layers]
        logits = self.model.decode(torch.tensor([start], device=self.device), 0, caches,
                                   cross, mask)
        if processors.active:
            logits = processors.apply(logits, [history])
        logits[:, sorted(end_ids)] = float("-inf")
        log_probs = logits.log_softmax(-1)[0, :self.spec.vocab_size]
        scores, ids = log_probs.topk(min(count, log_probs.shape[0]))
        return list(zip(ids.tolist(), scores.tolist(), strict=True))

    def start(self, request, source_ids):
        """Encode one source and run the decoder over its start token and target prefix:
        (cross keys/values, source mask, self-attention caches, next logits)."""
        cross, mask = self.encode(source_ids)
        caches = [{} for _ in self.model.decoder_layers]
        logits = self.model.decode(torch.tensor([request.prompt_ids], device=self.device), 0,
                                   caches, cross, mask)
        return cross, mask, caches, logits

    def stream(self, request, logits, caches, cross, mask, sampling, generator, end_ids,
               processors, position):
        """beam_size 1: one token per step (greedy, or a draw after top-k, temperature and
        top-p); yields (token, log_prob, is_end, is_last)."""
        tokens: list[int] = []
        for step in range(request.max_new_tokens):
            if processors.active:
                logits = processors.apply(logits, [request.returned_prompt + tokens])
            if step < request.min_new_tokens and end_ids:
                logits[:, sorted(end_ids)] = float("-inf")
            ids, log_probs = choose_tokens(logits, [(sampling, generator)],
                                           self.spec.vocab_size)
            token, log_prob = int(ids[0]), float(log_probs[0])
            is_end = token in end_ids
            is_last = is_end or step + 1 == request.max_new_tokens
            yield token, log_prob, is_end, is_last
            if is_last:
                return
            tokens.append(token)
            logits = self.model.decode(ids[:, None], position, caches, cross, mask)
            position += 1

    @torch.inference_mode()
    def target_log_probs(self, source_ids, inputs, targets) -> list[float]:
        cross, mask = self.encode(source_ids)
        caches = [{} for _ in self.model.decoder_layers]
        log_probs = []
        for position, token in enumerate(inputs):  # one position at a time, as decoding does
            logits = self.model.decode(torch.tensor([[token]], device=self.device), position,
                                       caches, cross, mask)
            log_probs.append(float(logits.log_softmax(-1)[0, targets[position]]))
        return log_probs
