"""A draft model for speculative decoding: a smaller model with the target's vocabulary
proposes k tokens per step, which the target verifies in one pass (speculation.py).

Its KV cache mirrors the target's slots (same slot indices, moved together when the engine
compacts its slots). Each step it first catches up on the tokens the target accepted since
its last proposals (one chunk per sequence, from the first position it does not hold), then
runs k-1 decode steps; rejected proposals are undone, as for the target, by not counting the
positions that hold them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelFileError
from .loaded_model import LoadedModel
from .runner import ModelRunner
from .sampling import SamplingParams, sampling_probabilities
from .slots import SlotPool
from .speculation import sample

SHORT_CATCH_UP = 16  # tokens the draft catches up on with one decode-style pass


@dataclass
class DraftRequest:
    slot: int
    catch_up: list[int]  # tokens from `start` up to and including the last accepted one
    start: int  # cache position of catch_up[0]
    count: int  # proposals wanted
    sampling: SamplingParams
    generator: torch.Generator | None


class DraftModel:
    def __init__(self, loaded: LoadedModel, target: LoadedModel, num_slots: int,
                 slot_length: int, kv_dtype: torch.dtype, static_decode: bool = True) -> None:
        check_same_vocabulary(target, loaded)
        if loaded.spec.max_position_embeddings < slot_length:
            raise ValueError(f"the draft model {loaded.path} has a context of "
                             f"{loaded.spec.max_position_embeddings} positions, less than the "
                             f"engine's max_length {slot_length}; lower max_length")
        self.loaded = loaded
        self.pool = SlotPool(loaded.model.spec, num_slots, slot_length, kv_dtype, loaded.device)
        self.runner = ModelRunner(loaded.model, self.pool.cache, loaded.device, static_decode)
        self.usable = min(target.spec.usable_vocab_size, loaded.spec.usable_vocab_size)

    def move(self, source: int, destination: int, length: int) -> None:
        """Follow the target's slot compaction."""
        if length > 0:
            self.pool.cache.copy_slots(torch.tensor([source]), torch.tensor([destination]),
                                       length)

    def propose(self, requests: list[DraftRequest]
                ) -> list[tuple[list[int], torch.Tensor | None]]:
        """For each request, `count` proposals and the distributions they were drawn from
        ([count, V], None for greedy requests, whose proposals are the draft's argmax)."""
        logits = self._catch_up(requests)
        proposals: list[list[int]] = [[] for _ in requests]
        dists: list[list[torch.Tensor]] = [[] for _ in requests]
        active = list(range(len(requests)))
        rows_logits = {index: logits[index:index + 1] for index in active}
        while active:
            rows = []
            for index in active:
                request = requests[index]
                row = rows_logits[index].float().clone()
                row[:, self.usable:] = float("-inf")
                if request.sampling.greedy:
                    token = int(row.max(dim=-1).indices)
                else:
                    q = sampling_probabilities(row, request.sampling)[0]
                    dists[index].append(q)
                    token = sample(q, request.generator)
                proposals[index].append(token)
                if len(proposals[index]) < request.count:
                    position = request.start + len(request.catch_up) - 1 + len(proposals[index])
                    rows.append((index, (request.slot, token, position)))
            active = [index for index, _ in rows]
            if rows:
                decoded = self.runner.decode([row for _, row in rows])
                rows_logits = {index: decoded[n:n + 1] for n, (index, _) in enumerate(rows)}
        return [(tokens, torch.stack(dist) if dist else None)
                for tokens, dist in zip(proposals, dists, strict=True)]


    def _catch_up(self, requests: list[DraftRequest]) -> torch.Tensor:
        """The draft's logits after each request's last accepted token [len(requests), V].
        A few tokens (the usual case: the target's own token, perhaps the proposals accepted
        last step) run as one captured decode-style pass; a prompt runs as a chunk."""
        short = [i for i, r in enumerate(requests) if len(r.catch_up) <= SHORT_CATCH_UP]
        long = [i for i, r in enumerate(requests) if len(r.catch_up) > SHORT_CATCH_UP]
        results: list[torch.Tensor | None] = [None] * len(requests)
        if short:
            rows = [(requests[i].slot, token, requests[i].start + offset) for i in short
                    for offset, token in enumerate(requests[i].catch_up)]
            logits = self.runner.verify(rows)
            last = -1
            for i in short:
                last += len(requests[i].catch_up)
                results[i] = logits[last:last + 1]
        if long:
            chunks = [(requests[i].slot, requests[i].catch_up, requests[i].start, True)
                      for i in long]
            for i, output in zip(long, self.runner.prefill(chunks), strict=True):
                results[i] = output
        return torch.cat(results)


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """The draft must map ids to the same tokens as the target (padding rows of either
    embedding beyond its tokenizer do not matter)."""
    size = target.spec.usable_vocab_size
    if draft.spec.usable_vocab_size != size:
        raise ModelFileError(
            f"the draft model {draft.path} has {draft.spec.usable_vocab_size} tokens and the "
            f"target {target.path} has {size}: a draft must share the target's tokenizer")
    ours, theirs = target.vocabulary, draft.vocabulary
    if ours is None or theirs is None:
        return
    mine = ours.ids_to_tokens(range(size))
    other = theirs.ids_to_tokens(range(size))
    for index, (a, b) in enumerate(zip(mine, other, strict=True)):
        if a != b:
            raise ModelFileError(
                f"the draft model {draft.path} maps id {index} to {b!r} where the target "
                f"{target.path} has {a!r}: a draft must share the target's tokenizer")


def open_draft(config, target: LoadedModel, num_slots: int, slot_length: int,
               kv_dtype: torch.dtype) -> DraftModel:
    """The engine's draft model (EngineConfig.draft_model: a folder, hub id or LoadedModel),
    on the target's device, with a KV cache shaped like the target's pool."""
    from .loaded_model import open_model

    device = target.device
    loaded = config.draft_model if isinstance(config.draft_model, LoadedModel) else open_model(
        config.draft_model, device.type, config.draft_compute_type,
        device_index=device.index or 0, cache_dir=config.cache_dir)
    return DraftModel(loaded, target, num_slots, slot_length, kv_dtype, config.static_decode)
