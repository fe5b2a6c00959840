"""CTranslate2's token-level API on the engine: generate_batch, generate_tokens,
score_batch and forward_batch. Each prompt of a call is one engine request, so concurrent
calls from several threads run batched together."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import RequestError
from .alternatives import expand_alternatives
from .batching import batches
from .engine import Submission
from .options import CallOptions, GenerationOptions
from .requests import Request
from .results import GenerationResult, GenerationStepResult, ScoringResult
from .search import Scoring, TokenSearch
from .text_stream import TextStream

STREAM_OPTIONS = ("max_length", "min_length", "sampling_topk", "sampling_topp",
                  "sampling_temperature", "end_token", "return_end_token", "repetition_penalty",
                  "no_repeat_ngram_size", "disable_unk", "suppress_sequences", "seed")


def generate_batch(engine, start_tokens: Sequence[Sequence[str | int]],
                   options: GenerationOptions, call: CallOptions | None = None,
                   text_streams: bool = False,
                   skip_special_tokens: bool = True) -> list[GenerationResult]:
    """Every check first (no request starts unless all are valid), then the prompts run as
    engine requests (each with `options`), `max_batch_size` prompts (or tokens) of them at a
    time, as the call's options say."""
    call = call or CallOptions()
    builder = engine.builder
    end_ids = builder.end_ids(options.end_token)
    static = builder.static_ids(options)
    prompts = builder.check_batch(start_tokens)
    requests = [builder.request(prompt, options, static, engine.max_length) for prompt in prompts]
    processors = builder.processors(options)
    results: list[GenerationResult] = []
    for start, stop in batches([len(r.prompt_ids) for r in requests], call.max_batch_size,
                               call.batch_type):
        batch = requests[start:stop]
        if call.return_alternatives:
            found = expand_alternatives(engine, batch, options, call, end_ids, processors, start)
            results.extend(hypotheses_result(engine, r, hypotheses, options.return_scores)
                           for r, hypotheses in zip(batch, found, strict=True))
            continue
        submissions = []
        for row, request in enumerate(batch, start):
            stream = None
            if text_streams:
                stream = TextStream(engine.loaded.tokenizer, prompts[row], options.stop_strings,
                                    skip_special_tokens)
            search = engine.search_for(request, options, end_ids, processors, row)
            submissions.append(Submission(request, search, stream,
                                          cache_static_prompt=options.cache_static_prompt))
        ids = engine.submit_batch(submissions)  # together: one step admits them all
        stopped = {}
        if call.callback:
            try:
                stopped = _run_callbacks(engine, ids, call.callback, start)
            except BaseException:  # the callback raised: the call's requests stop too
                for request_id in ids:
                    engine.abort(request_id)
                raise
        for output in engine.wait(ids):
            if output.request_id in stopped:
                output.result.truncate(stopped[output.request_id])
            results.append(sequence_result(engine, output, options.return_scores))
    return results


def _run_callbacks(engine, ids: list[int], callback, offset: int) -> dict[int, int]:
    """Call `callback` for each token of each request, in this thread, step by step; a True
    answer stops that request at that token. Returns {request id: tokens kept} for the
    stopped ones (the engine may have made more before it saw the stop)."""
    vocabulary = engine.loaded.vocabulary
    rows = {request_id: offset + index for index, request_id in enumerate(ids)}
    stopped: dict[int, int] = {}
    active = list(ids)
    while active:
        for event in engine.poll(active):
            if event.finish_reason is not None or event.error is not None:
                active.remove(event.request_id)
            if event.token_id is None or event.request_id in stopped:
                continue
            result = GenerationStepResult(
                step=event.index, batch_id=rows[event.request_id], token_id=event.token_id,
                hypothesis_id=0, log_prob=event.log_prob, is_last=event.finish_reason is not None,
                token=vocabulary.id_to_token(event.token_id) if vocabulary else None)
            if callback(result):
                stopped[event.request_id] = event.index + 1
                if event.request_id in active:
                    active.remove(event.request_id)
                    engine.abort(event.request_id)
    return stopped


def sequence_result(engine, output, return_scores: bool) -> GenerationResult:
    if not isinstance(output.search, TokenSearch):
        return hypotheses_result(engine, output.request, output.result, return_scores)
    row = output.result
    ids = output.request.returned_prompt + row.tokens
    vocabulary = engine.loaded.vocabulary
    return GenerationResult(sequences=[vocabulary.ids_to_tokens(ids)] if vocabulary else [],
                            sequences_ids=[ids], scores=[row.score] if return_scores else [],
                            logits=[torch.stack(row.logits)] if row.logits else [])


def hypotheses_result(engine, request: Request, hypotheses, return_scores: bool) -> GenerationResult:
    ids = [request.returned_prompt + tokens for tokens, _ in hypotheses]
    vocabulary = engine.loaded.vocabulary
    return GenerationResult(sequences=[vocabulary.ids_to_tokens(seq) for seq in ids] if vocabulary else [],
                            sequences_ids=ids,
                            scores=[score for _, score in hypotheses] if return_scores else [])


def generate_tokens(engine, prompt: Sequence[str | int], options: dict) -> Iterator[GenerationStepResult]:
    """Each new token of one prompt as it is generated (`max_length` new tokens at most).
    Checked now; the request starts on the first `next()`. Leaving the loop stops it."""
    unknown = sorted(set(options) - set(STREAM_OPTIONS))
    if unknown:
        raise TypeError(f"generate_tokens() got unexpected option(s) {', '.join(unknown)}; it "
                        f"takes {', '.join(STREAM_OPTIONS)}")
    settings = GenerationOptions.from_kwargs(include_prompt_in_result=False, **options)
    prompt_ids = engine.builder.check_batch([prompt])[0]
    request = engine.builder.request(prompt_ids, settings, None, engine.max_length)
    search = engine.search_for(request, settings)
    return _token_steps(engine, request, search)


def _token_steps(engine, request, search) -> Iterator[GenerationStepResult]:
    vocabulary = engine.loaded.vocabulary
    for event in engine.stream(engine.submit(request, search)):
        if event.token_id is None:
            continue
        yield GenerationStepResult(
            step=event.index, batch_id=0, token_id=event.token_id, hypothesis_id=0,
            token=vocabulary.id_to_token(event.token_id) if vocabulary else None,
            log_prob=event.log_prob, is_last=event.finish_reason is not None)


def score_requests(engine, prompts: list[list[int]], log_probs: bool) -> list[torch.Tensor]:
    """Run prompts through the model without generating: per prompt, the logits [T, V] of
    every position, or the log-probability of each next token."""
    for index, prompt in enumerate(prompts):
        if len(prompt) > engine.spec.max_position_embeddings:
            raise RequestError(f"prompt {index} has {len(prompt)} tokens; the model's context "
                               f"is {engine.spec.max_position_embeddings}")
        if len(prompt) > engine.max_length:
            raise RequestError(f"prompt {index} has {len(prompt)} tokens; the engine holds "
                               f"{engine.max_length} positions per sequence (its max_length)")
    requests = [Request(prompt, 0, 0, [], 0) for prompt in prompts]
    ids = engine.submit_batch([Submission(request, Scoring(request, log_probs))
                               for request in requests])
    return [output.result for output in engine.wait(ids)]


def score_batch(engine, tokens, max_batch_size: int, max_input_length: int | None) -> list[ScoringResult]:
    if max_input_length is not None and (not isinstance(max_input_length, int)
                                         or max_input_length < 2):
        raise RequestError(f"max_input_length must be an int >= 2 (or None), got "
                           f"{max_input_length!r}")
    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise RequestError(f"max_batch_size must be an int >= 0, got {max_batch_size!r}")
    prompts = engine.builder.check_batch(tokens)
    truncated = [max_input_length is not None and len(p) > max_input_length for p in prompts]
    prompts = [p[:max_input_length] if cut else p for p, cut in zip(prompts, truncated, strict=True)]
    for index, prompt in enumerate(prompts):
        if len(prompt) < 2:
            raise RequestError(f"input {index} has {len(prompt)} token; scoring needs at least 2")
    vocabulary = engine.loaded.vocabulary
    results = []
    chunk = max_batch_size or len(prompts)
    for start in range(0, len(prompts), chunk):
        batch = prompts[start:start + chunk]
        for offset, (prompt, scores) in enumerate(zip(batch, score_requests(engine, batch, True),
                                                      strict=True)):
            names = vocabulary.ids_to_tokens(prompt[1:]) if vocabulary else []
            results.append(ScoringResult(names, scores.tolist(), truncated[start + offset]))
    return results


def forward_batch(engine, inputs) -> torch.Tensor:
    """Float32 logits [batch, time, vocab]; prompts are right-padded, padding logits are 0."""
    prompts = engine.builder.check_batch(inputs)
    rows = score_requests(engine, prompts, False)
    width = max(len(prompt) for prompt in prompts)
    logits = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    for index, row in enumerate(rows):
        logits[index, : row.shape[0]] = row
    return logits

