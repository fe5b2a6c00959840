"""The decode loop for plain greedy or sampled generation, kept on the device.

Tokens, log-probs and "finished" flags stay in device tensors; the host looks at them only
every SYNC_EVERY steps (to stop early) and once at the end. On CUDA that removes the
per-token host synchronisation; on CPU it removes per-row Python work. With
`Generator.static_decode` (on by default) each step is captured once and replayed: a CUDA
graph on GPU, a trace on CPU (kiln/generation/static_step.py). The general loop in
Generator._decode_steps (processors, callbacks, logits) gives the same tokens.
"""

from __future__ import annotations

import torch

from .processors import mask_early_end
from .sampling import choose_tokens

SYNC_EVERY = 8


def decode_on_device(generator, batch, rows, options) -> None:
    """Fill `rows` (generator._RowState) for `batch`, as generator._decode_steps would."""
    device = generator._device
    lengths = [len(request.prompt_ids) for request in batch]
    steps = max(request.max_new_tokens for request in batch)
    static = generator._static_decode_step()  # None: eager steps at the batch's own shape
    cache = generator._kv_cache(static.slots_for(len(batch)) if static else len(batch),
                                max(n + r.max_new_tokens for n, r in zip(lengths, batch, strict=True)))
    logits = generator._prefill(batch, cache, options.cache_static_prompt)
    max_new = torch.tensor([r.max_new_tokens for r in batch], device=device)
    end_ids, min_new = generator._end_tensors(batch, options)
    longest_min = max(r.min_new_tokens for r in batch)
    base = torch.tensor(lengths, device=device)
    tokens = torch.zeros(len(batch), steps, dtype=torch.long, device=device)
    log_probs = torch.zeros(len(batch), steps, device=device)
    produced = torch.zeros(len(batch), dtype=torch.long, device=device)
    done = torch.zeros(len(batch), dtype=torch.bool, device=device)
    for step in range(steps):
        logits = mask_early_end(logits, end_ids, min_new, step, longest_min)
        ids, step_log_probs = choose_tokens(logits, options.sampling, options.generator,
                                            generator.spec.usable_vocab_size)
        tokens[:, step], log_probs[:, step] = ids, step_log_probs
        produced += (~done).long()
        is_end = torch.isin(ids, end_ids) if end_ids.numel() else torch.zeros_like(done)
        done |= is_end | (step + 1 >= max_new)
        if step + 1 == steps or ((step + 1) % SYNC_EVERY == 0 and bool(done.all())):
            break
        positions = torch.where(done, cache.scratch_position, base + step).unsqueeze(1)
        # A bound known on the host: every unfinished row's position is below both.
        kv_length = min(max(lengths) + step + 1, cache.max_length)
        if static is not None:
            logits = static.step(ids, positions, cache, kv_length)
        else:
            logits = generator.model(ids.unsqueeze(1), positions, cache, kv_length=kv_length)[:, -1]
    _fill_rows(rows, tokens.tolist(), log_probs.tolist(), produced.tolist(), options)


def _fill_rows(rows, tokens, log_probs, produced, options) -> None:
    for row, row_tokens, row_log_probs, count in zip(rows, tokens, log_probs, produced,
                                                     strict=True):
        for index in range(count):
            is_end = row_tokens[index] in options.end_ids
            row.add(row_tokens[index], row_log_probs[index], is_end, options.return_end_token,
                    at_limit=index + 1 == count)
