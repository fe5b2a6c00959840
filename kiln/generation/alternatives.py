"""return_alternatives, as CTranslate2 computes it.

The first generated position is expanded into the `num_hypotheses` most likely tokens (end
tokens excluded, a token below `min_alternative_expansion_prob` ends the list); each is then
continued by the regular search. As in CTranslate2, the continuation gets
max_length - len(prompt) tokens (the prompt counts against max_length whether or not it is
returned), and a score is the expansion log-prob plus the continuation's own score.
"""

from __future__ import annotations

from dataclasses import replace

import torch


def alternatives(generator, batch, options, num_hypotheses: int, min_probability: float,
                 max_length: int, min_length: int, beam, run_search) -> list[list[tuple]]:
    """Per prompt: [(tokens after the prompt, score), ...], best expansion first.
    `run_search(requests)` runs the usual search and returns (tokens, score) per request."""
    cache = generator._kv_cache(len(batch), max(len(r.prompt_ids) for r in batch) + 1)
    logits = generator._prefill(batch, cache, options.cache_static_prompt)
    if options.processors.active:  # the expansion step has no history yet
        logits = options.processors.apply(logits, [[] for _ in batch])
    if options.end_ids:
        logits[:, sorted(options.end_ids)] = float("-inf")
    log_probs = logits.log_softmax(dim=-1)
    log_probs[:, generator.spec.usable_vocab_size:] = float("-inf")
    top_log_probs, top_ids = log_probs.topk(num_hypotheses, dim=-1)

    expansions = []  # (prompt index, token, log_prob)
    for index, (values, ids) in enumerate(zip(top_log_probs.tolist(), top_ids.tolist(),
                                              strict=True)):
        for value, token in zip(values, ids, strict=True):
            if torch.tensor(value).exp().item() < min_probability:
                break
            expansions.append((index, token, value))

    suffixes = []
    for index, token, _ in expansions:
        request = batch[index]
        remaining = max_length - len(request.prompt_ids)
        suffixes.append(None if remaining <= 0 else replace(
            request, prompt_ids=request.prompt_ids + [token], max_new_tokens=remaining,
            min_new_tokens=max(0, min_length - len(request.prompt_ids)), returned_prompt=[],
            counted_prompt=0, static_length=0))
    runnable = [request for request in suffixes if request is not None]
    results = iter(run_search(runnable) if runnable else [])
    found: list[list[tuple]] = [[] for _ in batch]
    for (index, token, value), suffix in zip(expansions, suffixes, strict=True):
        tokens, score = next(results) if suffix is not None else ([], 0.0)
        found[index].append(([token, *tokens], value + score))
    return found
