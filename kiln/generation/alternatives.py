"""return_alternatives, as CTranslate2 computes it, in two rounds of engine requests.

The first generated position is expanded into the `num_hypotheses` most likely tokens (end
tokens excluded, a token below `min_alternative_expansion_prob` ends the list); each is then
continued by the regular search as a request of its own. As in CTranslate2, the
continuation gets max_length - len(prompt) tokens (the prompt counts against max_length
whether or not it is returned), and a score is the expansion log-prob plus the
continuation's own score.
"""

from __future__ import annotations

from dataclasses import replace

from .engine import Submission
from .search import Expansion, TokenSearch


def expand_alternatives(engine, batch, options, call, end_ids, processors,
                        row_offset: int) -> list[list[tuple[list[int], float]]]:
    """Per request: [(tokens after the prompt, score), ...], best expansion first."""
    usable = engine.spec.usable_vocab_size
    firsts = engine.submit_batch([
        Submission(request, Expansion(request, call.alternatives,
                                      call.min_alternative_expansion_prob, end_ids,
                                      processors, usable),
                   cache_static_prompt=options.cache_static_prompt) for request in batch])
    expansions = [(index, token, value)
                  for index, output in enumerate(engine.wait(firsts))
                  for token, value in output.result]
    children, submissions = [], []
    for number, (index, token, _) in enumerate(expansions):
        request = batch[index]
        remaining = options.max_length - len(request.prompt_ids)
        child = None if remaining <= 0 else replace(
            request, prompt_ids=request.prompt_ids + [token], max_new_tokens=remaining,
            min_new_tokens=max(0, options.min_length - len(request.prompt_ids)),
            returned_prompt=[], counted_prompt=0, static_length=0)
        children.append(child)
        if child is not None:
            search = engine.search_for(child, options, end_ids, processors, row_offset + number)
            submissions.append(Submission(child, search))
    outputs = iter(engine.wait(engine.submit_batch(submissions)))
    found: list[list[tuple[list[int], float]]] = [[] for _ in batch]
    for (index, token, value), child in zip(expansions, children, strict=True):
        tokens, score = [], 0.0
        if child is not None:
            output = next(outputs)
            if isinstance(output.search, TokenSearch):
                tokens, score = output.result.tokens, output.result.score
            else:
                tokens, score = output.result[0]
        found[index].append(([token, *tokens], value + score))
    return found
