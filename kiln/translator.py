"""`kiln.Translator`: encoder-decoders (BART, mBART, Marian/OPUS-MT, M2M100/NLLB, T5, mT5,
Flan-T5) with CTranslate2's `translate_batch` and `score_batch`.

    translator = kiln.Translator("Helsinki-NLP/opus-mt-en-de", compute_type="int8")
    results = translator.translate_batch([["▁Hello", "▁world", "</s>"]], beam_size=4)
    results[0].hypotheses[0]   # target token strings

Source and target are token strings (or ids), as CTranslate2 takes them: tokenize with the
model's own tokenizer. Beam search is the decoders' (kiln/generation/beam.py), with
CTranslate2's rules: 2 x beam_size candidates per step, `patience`, `num_hypotheses`, scores
divided by length ** length_penalty. Each source sentence is searched on its own, so a
sentence's translation never depends on the rest of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .encoder import _folder
from .errors import RequestError
from .generation.options import BeamOptions
from .generation.processors import Processors
from .generation.requests import Request
from .generation.results import GenerationStepResult
from .generation.sampling import SamplingParams
from .model.loading import resolve_device
from .model.seq2seq import Seq2Seq
from .quant.compute_types import resolve
from .seq_folder import assemble
from .translation_decoding import Decoding
from .translation_engine import TranslationEngine
from .translation_search import (
    Job,
    OneBest,
    ScoringResult,
    TranslationBeam,
    TranslationResult,
    Vocabulary,
)
from .translator_files import open_translator, unknown_token

ASYNC_WORKERS = 64  # sentences of asynchronous calls in flight at once


class Translator:
    """A BART-family translation model on CPU or CUDA, in any compute type kiln runs."""

    def __init__(self, model_path: str | Path, device: str = "cpu", *, device_index: int = 0,
                 compute_type: str = "default", revision: str | None = None,
                 hub_cache_dir: str | Path | None = None, local_files_only: bool = False,
                 token: str | bool | None = None) -> None:
        folder = _folder(model_path, revision, hub_cache_dir, local_files_only, token)
        self.path = folder
        self.device = resolve_device(device, device_index)
        self.spec, saved, pairs, target, source = open_translator(folder)
        self.compute_type = resolve(compute_type, saved, self.device)
        self._check_compute()
        self.model = assemble(Seq2Seq(self.spec, self.compute_type.weights,
                                      self.compute_type.torch_dtype),
                              pairs, self.compute_type, self.device)
        self.vocabulary = Vocabulary(folder) if target is None else Vocabulary(tokens=target)
        self.source_vocabulary = (self.vocabulary if source is None or source == target
                                  else Vocabulary(tokens=source))
        self._finish()

    def _check_compute(self) -> None:
        if self.compute_type.weights == "int4":
            raise ValueError("int4 is not offered for translation models yet; use int8")

    def _finish(self) -> None:
        self.decoding = Decoding(self.model, self.device)
        self.engine = TranslationEngine(self.model, self.device, self.compute_type.torch_dtype)
        self.unk_token = unknown_token(self.path)
        self.unk_id = self.vocabulary.ids.get(self.unk_token)
        # Marian starts the decoder from <pad> (a zero embedding): it is never generated.
        spec = self.spec
        self._never = ((spec.pad_token_id,) if spec.family == "marian" else ())

    # ------------------------------------------------------------ CTranslate2's API

    def translate_batch(self, source: list[list[str]], target_prefix: list[list[str]] | None = None,
                        *, max_batch_size: int = 0, batch_type: str = "examples",
                        beam_size: int = 2, patience: float = 1, num_hypotheses: int = 1,
                        length_penalty: float = 1, coverage_penalty: float = 0,
                        repetition_penalty: float = 1, no_repeat_ngram_size: int = 0,
                        disable_unk: bool = False,
                        suppress_sequences: list[list[str]] | None = None,
                        end_token: str | list[str] | list[int] | None = None,
                        return_end_token: bool = False, prefix_bias_beta: float = 0,
                        max_input_length: int = 1024, max_decoding_length: int = 256,
                        min_decoding_length: int = 1, use_vmap: bool = False,
                        return_scores: bool = False, return_attention: bool = False,
                        return_alternatives: bool = False,
                        min_alternative_expansion_prob: float = 0,
                        replace_unknowns: bool = False,
                        sampling_topk: int = 1, sampling_topp: float = 1,
                        sampling_temperature: float = 1, seed: int | None = None,
                        asynchronous: bool = False,
                        callback=None) -> list[TranslationResult]:
        """CTranslate2's translate_batch. `asynchronous=True` returns one future per sentence
        (`.result()`, `.done()`), decoded together on the engine; `callback`
        (beam_size 1) sees each token as a GenerationStepResult and stops its sentence by
        returning True."""
        _check_options(beam_size, callback, batch_type, max_decoding_length, prefix_bias_beta,
                       return_alternatives, min_alternative_expansion_prob)
        if asynchronous:
            options = {name: value for name, value in locals().items()
                       if name not in ("self", "source", "target_prefix", "asynchronous",
                                       "options")}
            prefixes = target_prefix or [None] * len(source)
            return [self._executor().submit(
                lambda s=sentence, p=prefix: self.translate_batch(
                    [s], None if p is None else [p], **options)[0])
                for sentence, prefix in zip(source, prefixes, strict=True)]
        sources = self._sources(source, max_input_length)
        prefixes = self._prefixes(target_prefix, len(sources))
        beam = BeamOptions(beam_size, patience, 1 if return_alternatives else num_hypotheses,
                           length_penalty)
        sampling = SamplingParams(sampling_topk, sampling_topp, sampling_temperature)
        end_ids = self._end_ids(end_token)
        processors = self._processors(repetition_penalty, no_repeat_ngram_size, disable_unk,
                                      suppress_sequences)
        traced = return_attention or coverage_penalty != 0 or replace_unknowns
        biased = prefix_bias_beta > 0

        def search(request, index: int, bias_prefix=()):
            generator = torch.Generator(device="cpu")
            if seed is not None:
                generator.manual_seed((seed + index) % 2**63)
            else:
                generator.seed()
            if beam.beam_size == 1 and not biased:  # as CTranslate2: a bias needs the beam
                return OneBest(request, sampling, generator, end_ids, return_end_token,
                               processors, beam.length_penalty, self.spec.vocab_size, callback,
                               index, self.vocabulary, coverage_penalty)
            return TranslationBeam(request, beam, sampling, generator, end_ids,
                                   return_end_token, processors, self.spec.vocab_size,
                                   coverage_penalty=coverage_penalty,
                                   bias_beta=prefix_bias_beta, bias_prefix=bias_prefix)

        jobs, firsts = [], []  # firsts: each job's (sentence, expansion score) with alternatives
        for index, (ids, prefix) in enumerate(zip(sources, prefixes, strict=True)):
            if return_alternatives:
                for request, score in self._alternatives(
                        ids, prefix, num_hypotheses, max_decoding_length, min_decoding_length,
                        processors, end_ids, min_alternative_expansion_prob):
                    jobs.append(Job(index, ids, request, search(request, index)))
                    firsts.append((index, score))
                continue
            request = self._request([] if biased else prefix, max_decoding_length,
                                    min_decoding_length)
            jobs.append(Job(index, ids, request, search(request, index, prefix)))
            firsts.append((index, 0.0))
        # On the engine: with every other call's sentences, admitted as slots allow
        # (max_batch_size and batch_type need no splitting there).
        self.engine.run([job for job in jobs if job.request.max_new_tokens > 0],
                        attention=traced)
        results = [TranslationResult(hypotheses=[]) for _ in sources]
        for job, (index, first_score) in zip(jobs, firsts, strict=True):
            found = (job.search.result() if job.request.max_new_tokens > 0
                     else [(job.request.returned_prompt, 0.0, None)])
            if isinstance(job.search, TranslationBeam):  # its hypotheses start after the prefix
                found = [(job.request.returned_prompt + tokens, score, trace)
                         for tokens, score, trace in found]
            result = results[index]
            for tokens, score, trace in found:
                words = self.vocabulary.to_tokens(tokens)
                if replace_unknowns:
                    words = self._replace_unknowns(words, trace, job.source)
                result.hypotheses.append(words)
                if return_scores:
                    result.scores.append(first_score + score)
                if return_attention:
                    result.attention.append(trace or [])
        return results

    def _replace_unknowns(self, words: list[str], trace, source_ids: list[int]) -> list[str]:
        """Each <unk> becomes the source token its attention row weighs most."""
        if not trace or self.unk_token not in words:
            return words
        source_words = self.source_vocabulary.to_tokens(source_ids)
        return [source_words[max(range(len(row)), key=row.__getitem__)]
                if word == self.unk_token and row else word
                for word, row in zip(words, trace + [[]] * (len(words) - len(trace)), strict=True)]

    def _alternatives(self, ids, prefix, count, max_decoding_length, min_decoding_length,
                      processors, end_ids, min_probability):
        """return_alternatives, as CTranslate2: the `count` likeliest tokens after the prefix,
        each continued on its own; yields (request, the token's log-prob)."""
        start = [self.spec.decoder_start_token_id, *prefix]
        if len(prefix) >= max_decoding_length:
            raise RequestError(f"the target prefix has {len(prefix)} tokens; max_decoding_length "
                               f"({max_decoding_length}) leaves no room for alternatives")
        for token, score in self.decoding.expand(ids, start, count, processors, prefix, end_ids):
            if math.exp(score) < min_probability:
                return
            taken = len(prefix) + 1
            yield Request(prompt_ids=[*start, token], max_new_tokens=max_decoding_length - taken,
                          min_new_tokens=max(0, min_decoding_length - taken),
                          returned_prompt=[*prefix, token], counted_prompt=0), score

    def translate_iterable(self, source, target_prefix=None, max_batch_size: int = 32,
                           batch_type: str = "examples", **options):
        """Translate an iterable of sentences lazily, `max_batch_size` at a time; the
        results in order."""
        prefixes = iter(target_prefix) if target_prefix is not None else None
        batch: list = []
        for sentence in source:
            batch.append((sentence, next(prefixes) if prefixes is not None else None))
            if len(batch) == max_batch_size:
                yield from self._translate_pairs(batch, options)
                batch = []
        if batch:
            yield from self._translate_pairs(batch, options)

    def _translate_pairs(self, pairs, options):
        sentences = [sentence for sentence, _ in pairs]
        prefixes = None if pairs[0][1] is None else [prefix for _, prefix in pairs]
        return self.translate_batch(sentences, prefixes, **options)

    def score_iterable(self, source, target, max_batch_size: int = 64,
                       batch_type: str = "examples", **options):
        """score_batch over iterables, lazily; the results in order."""
        batch: list = []
        for pair in zip(source, target, strict=True):
            batch.append(pair)
            if len(batch) == max_batch_size:
                yield from self.score_batch([s for s, _ in batch], [t for _, t in batch],
                                            **options)
                batch = []
        if batch:
            yield from self.score_batch([s for s, _ in batch], [t for _, t in batch], **options)

    def generate_tokens(self, source: list[str], target_prefix: list[str] | None = None, *,
                        max_decoding_length: int = 256, min_decoding_length: int = 1,
                        sampling_topk: int = 1, sampling_topp: float = 1,
                        sampling_temperature: float = 1, return_log_prob: bool = False,
                        repetition_penalty: float = 1, no_repeat_ngram_size: int = 0,
                        disable_unk: bool = False, suppress_sequences=None, end_token=None,
                        max_input_length: int = 1024, use_vmap: bool = False,
                        seed: int | None = None):
        """One sentence's tokens as they are decoded (GenerationStepResult), greedy or
        sampled. Leaving the loop stops the decoding."""
        ids = self._sources([source], max_input_length)[0]
        prefix = self._prefixes(None if target_prefix is None else [target_prefix], 1)[0]
        sampling = SamplingParams(sampling_topk, sampling_topp, sampling_temperature)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed) if seed is not None else generator.seed()
        processors = self._processors(repetition_penalty, no_repeat_ngram_size, disable_unk,
                                      suppress_sequences)
        end_ids = self._end_ids(end_token)
        with torch.inference_mode():
            request = self._request(prefix, max_decoding_length, min_decoding_length)
            cross, mask, caches, logits = self.decoding.start(request, ids)
            steps = self.decoding.stream(request, logits, caches, cross, mask, sampling,
                                         generator, end_ids, processors,
                                         len(request.prompt_ids))
            for step, (token, log_prob, _, is_last) in enumerate(steps):
                yield GenerationStepResult(step=step, batch_id=0, token_id=token,
                                           hypothesis_id=0,
                                           token=self.vocabulary.tokens.get(token),
                                           log_prob=log_prob if return_log_prob else None,
                                           is_last=is_last)

    def _processors(self, repetition_penalty, no_repeat_ngram_size, disable_unk,
                    suppress_sequences) -> Processors:
        unk = (self.unk_id,) if disable_unk and self.unk_id is not None else ()
        return Processors(
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            suppressed_ids=self._never + unk,
            suppressed_sequences=tuple(tuple(self.vocabulary.to_ids(s, "suppress_sequences"))
                                       for s in (suppress_sequences or [])))

    def _executor(self):
        if getattr(self, "_pool", None) is None:
            from concurrent.futures import ThreadPoolExecutor

            # Each future waits on the engine, which decodes the waiting sentences together.
            self._pool = ThreadPoolExecutor(ASYNC_WORKERS, thread_name_prefix="kiln-translator")
        return self._pool

    def score_batch(self, source: list[list[str]], target: list[list[str]], *,
                    max_batch_size: int = 0, batch_type: str = "examples",
                    max_input_length: int = 1024, offset: int = 0) -> list[ScoringResult]:
        """Log-probability of each target token (its end token appended), given the source."""
        sources = self._sources(source, max_input_length)
        if len(target) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(target)} targets")
        results = []
        for ids, target_tokens in zip(sources, target, strict=True):
            target_ids = self.vocabulary.to_ids(target_tokens, "target") + [self.spec.eos_token_id]
            inputs = [self.spec.decoder_start_token_id, *target_ids[:-1]]
            log_probs = self.decoding.target_log_probs(ids, inputs, target_ids)[offset:]
            results.append(ScoringResult(self.vocabulary.to_tokens(target_ids[offset:]),
                                         log_probs))
        return results

    # ------------------------------------------------------------ helpers

    def _sources(self, source, max_input_length: int) -> list[list[int]]:
        if isinstance(source, str) or not isinstance(source, Sequence) or not source:
            raise TypeError("source must be a non-empty list of sentences, each a list of "
                            "token strings or ids")
        sources = []
        for index, sentence in enumerate(source):
            if isinstance(sentence, str):
                raise TypeError(f"source {index} is a str; give its tokens (e.g. "
                                "tokenizer.convert_ids_to_tokens(tokenizer.encode(text)))")
            ids = self.source_vocabulary.to_ids(sentence, f"source {index}")
            if not ids:
                raise RequestError(f"source {index} is empty")
            if max_input_length and len(ids) > max_input_length:
                ids = ids[:max_input_length]  # as CTranslate2: the source is truncated
            if len(ids) > self.spec.max_position_embeddings:
                raise RequestError(f"source {index} has {len(ids)} tokens; the model takes at "
                                   f"most {self.spec.max_position_embeddings}")
            sources.append(ids)
        return sources

    def _prefixes(self, target_prefix, count: int) -> list[list[int]]:
        if target_prefix is None:
            return [[] for _ in range(count)]
        if len(target_prefix) != count:
            raise ValueError(f"{count} sources but {len(target_prefix)} target prefixes")
        return [self.vocabulary.to_ids(prefix or [], f"target_prefix {index}")
                for index, prefix in enumerate(target_prefix)]

    def _end_ids(self, end_token) -> frozenset[int]:
        if end_token is None:
            return frozenset({self.spec.eos_token_id})
        tokens = [end_token] if isinstance(end_token, (str, int)) else list(end_token)
        return frozenset(self.vocabulary.to_ids(tokens, "end_token"))

    def _request(self, prefix, max_decoding_length, min_decoding_length) -> Request:
        start = [self.spec.decoder_start_token_id, *prefix]
        new_tokens = max_decoding_length - len(prefix)
        if new_tokens < 1:
            raise RequestError(f"the target prefix has {len(prefix)} tokens; max_decoding_length "
                               f"({max_decoding_length}) leaves no room to decode")
        if len(start) + new_tokens > self.spec.max_position_embeddings + 1:
            new_tokens = self.spec.max_position_embeddings + 1 - len(start)
        return Request(prompt_ids=start, max_new_tokens=new_tokens,
                       min_new_tokens=max(0, min_decoding_length - len(prefix)),
                       returned_prompt=prefix, counted_prompt=len(prefix))


def _check_options(beam_size, callback, batch_type, max_decoding_length, prefix_bias_beta,
                   return_alternatives, min_alternative_expansion_prob) -> None:
    """CTranslate2's rules for combining options."""
    if callback is not None and (beam_size != 1 or prefix_bias_beta > 0):
        raise ValueError("callback needs beam_size=1 and no prefix_bias_beta (as in CTranslate2)")
    if batch_type not in ("examples", "tokens"):
        raise ValueError(f"batch_type must be 'examples' or 'tokens', got {batch_type!r}")
    if not isinstance(max_decoding_length, int) or max_decoding_length < 1:
        raise ValueError(f"max_decoding_length must be an int >= 1, got "
                         f"{max_decoding_length!r}")
    if not 0 <= prefix_bias_beta < 1:
        raise ValueError(f"prefix_bias_beta must be in [0, 1), got {prefix_bias_beta}")
    if prefix_bias_beta > 0 and return_alternatives:
        raise ValueError("prefix_bias_beta cannot be combined with return_alternatives")
    if not 0 <= min_alternative_expansion_prob <= 1:
        raise ValueError("min_alternative_expansion_prob must be between 0 and 1")
