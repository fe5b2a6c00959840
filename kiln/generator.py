"""Generator: load a kiln folder and generate, with CTranslate2's names and semantics."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import OutOfMemory
from .generation.alternatives import alternatives
from .generation.batching import batches
from .generation.beam import BeamOptions, beam_search
from .generation.chat import ChatTemplate, Message
from .generation.device_loop import decode_on_device
from .generation.processors import Processors, mask_early_end
from .generation.results import AsyncGenerationResult, GenerationResult, GenerationStepResult, ScoringResult
from .generation.sampling import SamplingParams, choose_tokens
from .generation.static_step import StaticDecodeStep, default_capture
from .generation.tokenizer import StreamingDetokenizer, Tokenizer, Vocabulary
from .model.kv_cache import KVCache
from .model.loading import check_folder, load_decoder, resolve_device
from .model.loading import verify_checksums as verify_folder_checksums
from .model.spec import is_kiln_folder
from .quant.compute_types import COMPUTE_TYPES, ComputeType
from .quant.compute_types import resolve as resolve_compute_type
from .quant.kernels import BACKENDS

STATIC_PROMPT_CACHE_SIZE = 8  # static prompts whose keys/values are kept (CTranslate2: unbounded)
# Prompt tokens per forward pass (batch x columns), at most. Measured on Pythia-410m int8,
# 8 x 512 tokens: one pass 16.7 s and 2131 MiB peak; chunks of 512 rows 13.7 s and 1577 MiB.
PREFILL_CHUNK_ROWS = 512


@dataclass
class _Request:
    """One prompt after validation: ids to run, how many to generate, what to return."""

    prompt_ids: list[int]
    max_new_tokens: int
    min_new_tokens: int
    returned_prompt: list[int]  # prompt part of the result (empty unless include_prompt)
    counted_prompt: int  # prompt tokens counted in max_length and in the score's length
    static_length: int = 0  # leading prompt_ids that are the (shared) static prompt


@dataclass
class _DecodeOptions:
    sampling: SamplingParams
    end_ids: set[int]
    return_end_token: bool
    generator: torch.Generator
    callback: Callable[[GenerationStepResult], bool] | None = None
    processors: Processors = field(default_factory=Processors)
    keep_logits: bool = False
    cache_static_prompt: bool = False


@dataclass
class _RowState:
    """A row's generated tokens and the log-probs behind its score."""

    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # kept for return_logits_vocab
    log_prob_sum: float = 0.0
    scored: int = 0  # decoded length the score is normalised by
    length_penalty: float = 1.0
    done: bool = False

    def add(self, token: int, log_prob: float, is_end: bool, return_end_token: bool,
            at_limit: bool) -> None:
        self.log_prob_sum += log_prob
        self.scored += 1  # the end token counts in the score even when not returned
        if not is_end or return_end_token:
            self.tokens.append(token)
        self.done = is_end or at_limit

    @property
    def score(self) -> float:
        """CTranslate2's score with length_penalty 1: the log-prob sum over the decoded length
        (prompt tokens that count in max_length add 0 to the sum but count in the length)."""
        return self.log_prob_sum / max(1, self.scored) ** self.length_penalty


class Generator:
    """Loads a kiln folder; generates with `generate_batch` (tokens) or `generate` (text).

    One Generator may be shared by threads: calls run one at a time under a lock.
    """

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu",
                 compute_type: str = "default", *, device_index: int = 0,
                 intra_threads: int = 0, seed: int | None = None,
                 verify_checksums: bool = False, cache_dir: str | Path | None = None,
                 int8_backend: str = "auto") -> None:
        """Load a kiln folder. Anything else `from_pretrained` takes (a Hugging Face, GGUF or
        CTranslate2 checkpoint, a hub id) is converted once into the cache (`cache_dir`) in its
        own type. With no `model_path`: kiln's default model, SmolLM2-135M-Instruct."""
        # Options first: a bad one must fail before any conversion or loading.
        self._device = resolve_device(device, device_index)
        if compute_type not in COMPUTE_TYPES:
            resolve_compute_type(compute_type, ComputeType(None, "float32"), self._device)
        if int8_backend == "auto" and os.environ.get("KILN_INT8_BACKEND"):
            int8_backend = os.environ["KILN_INT8_BACKEND"]
        if int8_backend not in ("auto", None, *BACKENDS):
            raise ValueError(f"unknown int8 backend {int8_backend!r}; known: auto, "
                             f"{', '.join(BACKENDS)}, None (dequantize per call)")
        if model_path is None:
            from .sources.default_model import default_model_path

            model_path = default_model_path(cache_dir)
        elif not is_kiln_folder(Path(model_path)):
            from .sources.hub import resolve

            model_path = resolve(model_path, cache_dir=cache_dir).folder
        self.model_path = Path(model_path)
        self.config = check_folder(self.model_path)
        if verify_checksums:
            verify_folder_checksums(self.model_path, self.config)
        saved = ComputeType(self.config.weights, self.config.dtype)
        self._compute = resolve_compute_type(compute_type, saved, self._device)
        if intra_threads < 0:
            raise ValueError(f"intra_threads must be >= 0 (0: all cores), got {intra_threads}")
        if intra_threads:
            torch.set_num_threads(intra_threads)
        self.dtype = self._compute.torch_dtype
        if self._device.type == "cuda" and self.dtype == torch.float16:
            # Pythia's activations overflow float16 sums: keep cuBLAS accumulating in float32.
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        try:
            self.model = load_decoder(self.model_path, self.config, self._compute, self._device,
                                      int8_backend)
        except torch.OutOfMemoryError as error:
            needed = sum(info.get("bytes", 0) for info in self.config.files.values())
            raise OutOfMemory(
                f"out of memory loading {self.model_path} on {self._device}: its weights take "
                f"{needed / 2**30:.1f} GiB as stored ({self.config.weights or self.config.dtype}); "
                "free memory, use an int8 compute type, or load on another device") from error
        self.spec = self.config.spec
        self.tokenizer = Tokenizer.from_folder(self.model_path)
        # Token strings <-> ids: the tokenizer, or a bare vocabulary (CTranslate2 folders).
        self.vocabulary = self.tokenizer or Vocabulary.from_folder(self.model_path)
        self.chat_template = ChatTemplate.from_folder(self.model_path)
        self._lock = threading.Lock()
        self.device_loop = True  # plain generation keeps its loop on the device (generation/device_loop.py)
        # Decode steps at static shapes, captured once and replayed (generation/static_step.py).
        self.static_decode = True
        self._static_step: StaticDecodeStep | None = None
        self._executor = None
        self._static_states: OrderedDict = OrderedDict()  # static prompt -> (keys, values)
        self._cache: KVCache | None = None
        self._rng = torch.Generator(device=self._device)
        self._rng.manual_seed(seed if seed is not None else torch.seed())

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, revision: str | None = None,
                        device: str = "auto", compute_type: str = "auto",
                        cache_dir: str | Path | None = None,
                        hub_cache_dir: str | Path | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, progress: bool | None = None,
                        **kwargs) -> Generator:
        """Load a kiln folder, a Hugging Face folder or GGUF file, or a hub id (at `revision`).

        Anything that is not a kiln folder is converted once, to the storage type of the
        compute type on this device, into the converted-model cache (`cache_dir`, default
        $KILN_CACHE_DIR or the per-user cache); later calls load the cached folder without
        touching the network or converting. Hub downloads honour HF_HUB_OFFLINE, HF_HOME /
        HF_HUB_CACHE (or `hub_cache_dir`), `local_files_only` and `token`. Progress bars show
        on a terminal unless `progress=False`. Other keyword arguments go to `Generator`.
        """
        from .sources.hub import resolve

        target = resolve_device(device, kwargs.get("device_index", 0))
        quantization = None
        if compute_type != "default":  # store what the compute type runs, so loading is direct
            quantization = resolve_compute_type(compute_type, ComputeType(None, "float32"),
                                                target).name
        resolved = resolve(name_or_path, revision=revision, quantization=quantization,
                           cache_dir=cache_dir, hub_cache_dir=hub_cache_dir,
                           local_files_only=local_files_only, token=token, progress=progress)
        return cls(resolved.folder, device=device, compute_type=compute_type,
                   cache_dir=cache_dir, **kwargs)

    @property
    def device(self) -> str:
        return self._device.type

    @property
    def compute_type(self) -> str:
        """The type the model actually runs in (CTranslate2's names, e.g. int8_float32)."""
        return self._compute.name

    @property
    def int8_backend(self) -> str | None:
        """The int8 kernel in use ("fbgemm", "onednn", "int_mm"); None when the weights are
        not int8 or int8 is dequantized inside the matmul (CUDA)."""
        return self.model.int8_backend

    # ---------------------------------------------------------------- token API

    def generate_batch(
        self,
        start_tokens: Sequence[Sequence[str | int]],
        *,
        max_batch_size: int = 0,
        batch_type: str = "examples",
        asynchronous: bool = False,
        max_length: int = 512,
        min_length: int = 0,
        sampling_topk: int = 1,
        sampling_topp: float = 1.0,
        sampling_temperature: float = 1.0,
        end_token: str | int | Sequence[str | int] | None = None,
        return_end_token: bool = False,
        include_prompt_in_result: bool = True,
        return_scores: bool = False,
        return_logits_vocab: bool = False,
        return_alternatives: bool = False,
        min_alternative_expansion_prob: float = 0.0,
        beam_size: int = 1,
        patience: float = 1.0,
        num_hypotheses: int = 1,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        disable_unk: bool = False,
        suppress_sequences: Sequence[Sequence[str | int]] | None = None,
        static_prompt: Sequence[str | int] | None = None,
        cache_static_prompt: bool = True,
        callback: Callable[[GenerationStepResult], bool] | None = None,
        seed: int | None = None,
    ) -> list[GenerationResult]:
        """Continue each prompt (token strings or ids; no special tokens are added).

        As CTranslate2: with `include_prompt_in_result=True` the result starts with the
        prompt (a leading BOS dropped) and `max_length`/`min_length` count the prompt's
        tokens after the first; otherwise they count generated tokens only. `scores` holds
        the log-probability sum of the generated tokens (end token included) over the decoded
        length, which with the prompt included counts the prompt tokens too. `callback` gets
        each generated token as a GenerationStepResult (batch_id: the prompt's index); when it
        returns True, that prompt stops. `max_batch_size` splits the work into batches of that
        many prompts (batch_type="examples") or prompt tokens ("tokens"). With
        `asynchronous=True` the call returns at once with AsyncGenerationResult objects.
        `static_prompt` runs before every prompt without being returned or counted; with
        `cache_static_prompt` its keys and values are computed once and reused (the last
        STATIC_PROMPT_CACHE_SIZE static prompts are kept).
        """
        if asynchronous:
            future = self._background().submit(
                self.generate_batch, start_tokens, max_batch_size=max_batch_size,
                batch_type=batch_type, max_length=max_length, min_length=min_length,
                sampling_topk=sampling_topk, sampling_topp=sampling_topp,
                sampling_temperature=sampling_temperature, end_token=end_token,
                return_end_token=return_end_token,
                include_prompt_in_result=include_prompt_in_result, return_scores=return_scores,
                return_logits_vocab=return_logits_vocab, return_alternatives=return_alternatives,
                min_alternative_expansion_prob=min_alternative_expansion_prob,
                beam_size=beam_size, patience=patience,
                num_hypotheses=num_hypotheses, length_penalty=length_penalty,
                repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                disable_unk=disable_unk, suppress_sequences=suppress_sequences,
                static_prompt=static_prompt, cache_static_prompt=cache_static_prompt,
                callback=callback, seed=seed)
            return [AsyncGenerationResult(future, index) for index in range(len(start_tokens))]
        sampling = SamplingParams(sampling_topk, sampling_topp, sampling_temperature)
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable: step_result -> bool (True stops the item)")
        beam = BeamOptions(beam_size, patience,
                           1 if return_alternatives else num_hypotheses, length_penalty)
        if beam_size == 1 and num_hypotheses > 1 and not return_alternatives:
            raise ValueError(f"num_hypotheses={num_hypotheses} needs beam_size >= {num_hypotheses} "
                             "(or return_alternatives=True)")
        if not 0.0 <= min_alternative_expansion_prob <= 1.0:
            raise ValueError(f"min_alternative_expansion_prob must be in [0, 1], got "
                             f"{min_alternative_expansion_prob!r}")
        if return_alternatives and (callback is not None or return_logits_vocab):
            raise ValueError("return_alternatives cannot be combined with callback or "
                             "return_logits_vocab")
        if beam_size > 1 and not sampling.greedy and 0 < sampling_topk < 2 * beam_size:
            raise ValueError(f"sampling in beam search draws 2 x beam_size candidates: "
                             f"sampling_topk must be 0 or >= {2 * beam_size}, got {sampling_topk}")
        if beam_size > 1 and (callback is not None or return_logits_vocab):
            raise ValueError("callback and return_logits_vocab work with greedy or sampled "
                             "decoding (beam_size=1) only")
        batches([], max_batch_size, batch_type)  # checks the options before any work
        end_ids = self._end_ids(end_token)
        static = self._to_ids(static_prompt, 0) if static_prompt is not None else None
        requests = [self._request(prompt, max_length, min_length, include_prompt_in_result, static)
                    for prompt in self._check_batch(start_tokens)]
        processors = self._processors(repetition_penalty, no_repeat_ngram_size, disable_unk,
                                      suppress_sequences)
        options = _DecodeOptions(sampling, end_ids, return_end_token, self._random(seed), callback,
                                 processors, return_logits_vocab, bool(cache_static_prompt))
        results: list[GenerationResult] = []
        with self._lock, torch.inference_mode():
            for start, stop in batches([len(r.prompt_ids) for r in requests], max_batch_size,
                                       batch_type):
                batch = requests[start:stop]
                if return_alternatives:
                    found = alternatives(
                        self, batch, options, num_hypotheses, min_alternative_expansion_prob,
                        max_length, min_length, beam,
                        lambda suffixes: self._search(suffixes, options, beam, length_penalty))
                    results.extend(self._beam_result(request, hypotheses, return_scores)
                                   for request, hypotheses in zip(batch, found, strict=True))
                    continue
                if beam_size > 1:
                    results.extend(self._beam_result(request, hypotheses, return_scores)
                                   for request, hypotheses in zip(
                                       batch, beam_search(self, batch, options, beam), strict=True))
                    continue
                rows = [_RowState(scored=request.counted_prompt, length_penalty=length_penalty)
                        for request in batch]
                if self.device_loop and not (callback or return_logits_vocab
                                             or options.processors.active):
                    decode_on_device(self, batch, rows, options)
                else:
                    for _ in self._decode_steps(batch, rows, options, batch_offset=start):
                        pass
                results.extend(self._result(request, row, return_scores)
                               for request, row in zip(batch, rows, strict=True))
        return results

    def _search(self, requests: list[_Request], options: _DecodeOptions, beam: BeamOptions,
                length_penalty: float) -> list[tuple[list[int], float]]:
        """The best (tokens, score) of each request by the configured search."""
        if beam.beam_size > 1:
            return [hypotheses[0] for hypotheses in beam_search(self, requests, options, beam)]
        rows = [_RowState(length_penalty=length_penalty) for _ in requests]
        for _ in self._decode_steps(requests, rows, options):
            pass
        return [(row.tokens, row.score) for row in rows]

    def generate_tokens(
        self,
        prompt: Sequence[str | int],
        *,
        max_length: int = 512,
        min_length: int = 0,
        sampling_topk: int = 1,
        sampling_topp: float = 1.0,
        sampling_temperature: float = 1.0,
        end_token: str | int | Sequence[str | int] | None = None,
        return_end_token: bool = False,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        disable_unk: bool = False,
        suppress_sequences: Sequence[Sequence[str | int]] | None = None,
        seed: int | None = None,
    ) -> Iterator[GenerationStepResult]:
        """Yield each new token of one prompt as it is generated (`max_length` new tokens at
        most). Breaking out of the loop or closing the iterator stops the generation and
        frees the generator for the next call (CTranslate2 keeps computing in the background)."""
        sampling = SamplingParams(sampling_topk, sampling_topp, sampling_temperature)
        end_ids = self._end_ids(end_token)
        request = self._request(self._check_batch([prompt])[0], max_length, min_length, False)
        processors = self._processors(repetition_penalty, no_repeat_ngram_size, disable_unk,
                                      suppress_sequences)
        options = _DecodeOptions(sampling, end_ids, return_end_token, self._random(seed),
                                 processors=processors)
        return self._stream_tokens(request, options)

    async def async_generate_tokens(self, prompt: Sequence[str | int],
                                    **kwargs) -> AsyncIterator[GenerationStepResult]:
        """`generate_tokens` for asyncio: tokens are produced in a worker thread and awaited
        here; leaving the loop early stops the generation."""
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        # One thread of its own for this stream: every step resumes on the thread that entered
        # inference mode (thread-local), and an asynchronous generate_batch waiting for the
        # lock on the Generator's worker cannot block it.
        loop = asyncio.get_running_loop()
        steps = self.generate_tokens(prompt, **kwargs)
        finished = object()
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-stream")
        try:
            while True:
                step = await loop.run_in_executor(worker, next, steps, finished)
                if step is finished:
                    return
                yield step
        finally:
            await loop.run_in_executor(worker, steps.close)
            worker.shutdown(wait=False)

    def _stream_tokens(self, request: _Request,
                       options: _DecodeOptions) -> Iterator[GenerationStepResult]:
        row = _RowState()
        with self._lock, torch.inference_mode():
            for step, picks in enumerate(self._decode_steps([request], [row], options)):
                for _, token, log_prob in picks:
                    if token in options.end_ids and not options.return_end_token:
                        return
                    yield GenerationStepResult(
                        step=step, batch_id=0, token_id=token, hypothesis_id=0,
                        token=self.vocabulary.id_to_token(token) if self.vocabulary else None,
                        log_prob=log_prob, is_last=row.done)

    def stream(self, text: str, max_length: int = 64, *, skip_special_tokens: bool = True,
               add_special_tokens: bool = True, **kwargs) -> Iterator[str]:
        """Yield the continuation of `text` as text pieces, as soon as they are whole
        characters. Joined, the pieces equal the decoded continuation. Keyword arguments go
        to `generate_tokens`."""
        tokenizer = self.require_tokenizer()
        prompt_ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens; give some text")
        steps = self.generate_tokens(prompt_ids, max_length=max_length, **kwargs)
        detokenizer = StreamingDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        for step in steps:
            piece = detokenizer.add(step.token_id)
            if piece:
                yield piece
        tail = detokenizer.finish()
        if tail:
            yield tail

    def chat(self, messages: str | list[Message], max_length: int = 256, **kwargs) -> str:
        """The assistant's reply to a conversation (or to one user message given as a str),
        through the model's chat template; generation stops at the end-of-turn token."""
        return "".join(self.stream_chat(messages, max_length=max_length, **kwargs))

    def stream_chat(self, messages: str | list[Message], max_length: int = 256,
                    **kwargs) -> Iterator[str]:
        """`chat`, yielding the reply as text pieces as they are generated."""
        if self.chat_template is None:
            raise ValueError(f"{self.model_path} has no chat template (tokenizer_config.json "
                             "'chat_template'); use generate() for plain text continuation")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        prompt = self.chat_template.render(messages, add_generation_prompt=True)
        # The template writes the special tokens itself: the tokenizer must not add more.
        return self.stream(prompt, max_length=max_length, add_special_tokens=False, **kwargs)

    def _background(self):
        """One worker for asynchronous calls (generation itself runs one call at a time)."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln")
        return self._executor

    def _random(self, seed: int | None) -> torch.Generator:
        """The generator's own random stream, or a fresh one for an explicit seed."""
        if seed is None:
            return self._rng
        generator = torch.Generator(device=self._device)
        generator.manual_seed(seed)
        return generator

    def score_batch(self, tokens: Sequence[Sequence[str | int]], *, max_batch_size: int = 0,
                    max_input_length: int | None = None) -> list[ScoringResult]:
        """Log-probability of each token given the ones before it (tokens[1:]).

        Unlike CTranslate2, nothing is cut silently: inputs longer than `max_input_length`
        (default: none) are truncated only when it is given, and the result says so; an input
        beyond the model's context is an error.
        """
        if max_input_length is not None and (not isinstance(max_input_length, int)
                                             or max_input_length < 2):
            raise ValueError(f"max_input_length must be an int >= 2 (or None), got "
                             f"{max_input_length!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 0:
            raise ValueError(f"max_batch_size must be an int >= 0, got {max_batch_size!r}")
        prompts = self._check_batch(tokens)
        truncated = [max_input_length is not None and len(p) > max_input_length for p in prompts]
        prompts = [p[:max_input_length] if cut else p for p, cut in zip(prompts, truncated,
                                                                         strict=True)]
        for index, prompt in enumerate(prompts):
            if len(prompt) < 2:
                raise ValueError(f"input {index} has {len(prompt)} token; scoring needs at least 2")
        chunk = max_batch_size or len(prompts)
        results = []
        for start in range(0, len(prompts), chunk):
            batch = prompts[start:start + chunk]
            log_probs = self.forward_batch(batch).log_softmax(dim=-1)
            for row, prompt in enumerate(batch):
                targets = torch.tensor(prompt[1:], device=log_probs.device).unsqueeze(1)
                scores = log_probs[row, : len(prompt) - 1].gather(1, targets).squeeze(1)
                names = self.vocabulary.ids_to_tokens(prompt[1:]) if self.vocabulary else []
                results.append(ScoringResult(names, scores.tolist(), truncated[start + row]))
        return results

    def forward_batch(self, inputs: Sequence[Sequence[str | int]]) -> torch.Tensor:
        """Float32 logits [batch, time, vocab] for every position of every prompt.

        Prompts of different lengths are right-padded; logits past a prompt's end are 0.
        """
        prompts = self._check_batch(inputs)
        for index, prompt in enumerate(prompts):
            if len(prompt) > self.spec.max_position_embeddings:
                raise ValueError(f"prompt {index} has {len(prompt)} tokens; the model's context "
                                 f"is {self.spec.max_position_embeddings}")
        with self._lock, torch.inference_mode():
            cache = self._kv_cache(len(prompts), max(len(prompt) for prompt in prompts))
            tokens, positions = self._pack(prompts, cache)
            logits = self.model(tokens, positions, cache, kv_length=tokens.shape[1])
            for row, prompt in enumerate(prompts):
                logits[row, len(prompt):] = 0.0
            return logits

    # ---------------------------------------------------------------- text API

    def generate(self, text: str | Sequence[str], max_length: int = 64, *,
                 include_prompt_in_result: bool = True, skip_special_tokens: bool = True,
                 stop: str | Sequence[str] | None = None, **kwargs) -> str | list[str]:
        """Generate from text; a str gives a str, a list gives a list.

        The output includes the prompt by default, as hf-hub-ctranslate2's `generate` does.
        `stop`: strings that end a prompt's generation as soon as its decoded continuation
        contains one (even across token boundaries); the text is cut before it. Other keyword
        arguments go to `generate_batch`.
        """
        if stop is not None:
            return self._generate_until(text, max_length, include_prompt_in_result,
                                        skip_special_tokens, stop, kwargs)
        tokenizer = self.require_tokenizer()
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts:
            raise ValueError("the batch is empty; give at least one prompt")
        ids = [tokenizer.encode(prompt) for prompt in prompts]
        empty = [i for i, prompt_ids in enumerate(ids) if not prompt_ids]
        if empty:
            raise ValueError(f"prompt {empty[0]} encodes to no tokens; give some text")
        results = self.generate_batch(ids, max_length=max_length,
                                      include_prompt_in_result=include_prompt_in_result, **kwargs)
        texts = [tokenizer.decode(result.sequences_ids[0], skip_special_tokens=skip_special_tokens)
                 for result in results]
        return texts[0] if isinstance(text, str) else texts

    def _generate_until(self, text: str | Sequence[str], max_length: int, include_prompt: bool,
                        skip_special_tokens: bool, stop: str | Sequence[str],
                        kwargs: dict) -> str | list[str]:
        """`generate` with stop strings: each prompt's continuation is decoded as it grows."""
        stops = [stop] if isinstance(stop, str) else list(stop)
        if not stops or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if "callback" in kwargs:
            raise ValueError("stop and callback cannot be combined; check stop strings in the "
                             "callback instead")
        tokenizer = self.require_tokenizer()
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts:
            raise ValueError("the batch is empty; give at least one prompt")
        ids = [tokenizer.encode(prompt) for prompt in prompts]
        streams = [StreamingDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
                   for prompt_ids in ids]
        continuations = [""] * len(prompts)
        generated: list[list[int]] = [[] for _ in prompts]

        def until_stop(step: GenerationStepResult) -> bool:
            row = step.batch_id
            generated[row].append(step.token_id)
            continuations[row] += streams[row].add(step.token_id)
            return any(s in continuations[row] for s in stops)

        results = self.generate_batch(ids, max_length=max_length, callback=until_stop,
                                      include_prompt_in_result=include_prompt, **kwargs)
        texts = []
        for row, result in enumerate(results):
            # Decoded as generate() decodes (prompt and continuation together when included),
            # then cut before the first stop string of the continuation.
            full = tokenizer.decode(result.sequences_ids[0], skip_special_tokens)
            returned_prompt = result.sequences_ids[0][: len(result.sequences_ids[0])
                                                      - len(generated[row])]
            start = len(tokenizer.decode(returned_prompt, skip_special_tokens)) if include_prompt else 0
            cut = min((i for i in (full.find(s, start) for s in stops) if i >= 0), default=len(full))
            texts.append(full[:cut])
        return texts[0] if isinstance(text, str) else texts

    # ---------------------------------------------------------------- checks

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer.json, so text cannot be "
                             "encoded; pass token ids to generate_batch instead")
        return self.tokenizer

    def _require_vocabulary(self):
        if self.vocabulary is None:
            raise ValueError(f"{self.model_path} has no tokenizer.json or vocabulary.json, so "
                             "token strings cannot be mapped; pass token ids instead")
        return self.vocabulary

    def _check_batch(self, start_tokens: Sequence[Sequence[str | int]]) -> list[list[int]]:
        if isinstance(start_tokens, str) or not isinstance(start_tokens, Sequence):
            raise TypeError("start_tokens must be a list of prompts, each a list of token "
                            "strings or ids")
        if len(start_tokens) == 0:
            raise ValueError("the batch is empty; give at least one prompt")
        return [self._to_ids(prompt, index) for index, prompt in enumerate(start_tokens)]

    def _to_ids(self, prompt: Sequence[str | int], index: int) -> list[int]:
        if isinstance(prompt, str) or not isinstance(prompt, Sequence):
            raise TypeError(f"prompt {index} must be a list of token strings or ids, got "
                            f"{type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty; give at least one token")
        if all(isinstance(token, str) for token in prompt):
            return self._require_vocabulary().tokens_to_ids(prompt)
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in prompt):
            raise TypeError(f"prompt {index} mixes types; give all token strings or all ints")
        bad = [token for token in prompt if not 0 <= token < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt {index} has token ids outside the vocabulary "
                             f"[0, {self.spec.vocab_size}): {bad[:5]}")
        return list(prompt)

    def _processors(self, repetition_penalty: float, no_repeat_ngram_size: int,
                    disable_unk: bool,
                    suppress_sequences: Sequence[Sequence[str | int]] | None) -> Processors:
        suppressed_ids, sequences = [], []
        if disable_unk:
            if self.config.tokens.unk is None:
                raise ValueError("disable_unk=True but this model has no unknown token")
            suppressed_ids.append(self.config.tokens.unk)
        for index, sequence in enumerate(suppress_sequences or []):
            ids = self._to_ids(sequence, index)
            if len(ids) == 1:
                suppressed_ids.append(ids[0])
            else:
                sequences.append(tuple(ids))
        return Processors(repetition_penalty, no_repeat_ngram_size, tuple(suppressed_ids),
                          tuple(sequences))

    def _end_ids(self, end_token: str | int | Sequence[str | int] | None) -> set[int]:
        if end_token is None:
            return set(self.config.tokens.eos)
        tokens = [end_token] if isinstance(end_token, (str, int)) else list(end_token)
        ids = set()
        for token in tokens:
            if isinstance(token, str):
                ids.update(self._require_vocabulary().tokens_to_ids([token]))
            elif isinstance(token, int) and 0 <= token < self.spec.vocab_size:
                ids.add(token)
            else:
                raise ValueError(f"end_token {token!r} is neither a token string nor an id in "
                                 f"[0, {self.spec.vocab_size})")
        return ids

    def _request(self, user_prompt: list[int], max_length: int, min_length: int,
                 include_prompt: bool, static: list[int] | None = None) -> _Request:
        """A validated request; a static prompt runs before the prompt but, as in CTranslate2,
        is neither returned nor counted in max_length."""
        static = static or []
        prompt = static + user_prompt
        if not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if not isinstance(min_length, int) or min_length < 0:
            raise ValueError(f"min_length must be an int >= 0, got {min_length!r}")
        # CTranslate2 feeds the first prompt token as the start token: the rest counts.
        counted_prompt = len(user_prompt) - 1 if include_prompt else 0
        max_new = max_length - counted_prompt
        if max_new <= 0:
            raise ValueError(
                f"max_length={max_length} leaves no room to generate: with "
                f"include_prompt_in_result=True it counts the prompt's {len(user_prompt)} tokens "
                "(all but the first); raise max_length or set include_prompt_in_result=False")
        context = self.spec.max_position_embeddings
        if len(prompt) + max_new > context:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) plus up to {max_new} new tokens exceeds the "
                f"model's context of {context} positions; shorten the prompt or lower max_length")
        returned = []
        if include_prompt:
            bos = self.config.tokens.bos
            returned = user_prompt[1:] if bos is not None and user_prompt[0] == bos \
                else list(user_prompt)
        return _Request(prompt, max_new, max(0, min_length - counted_prompt), returned,
                        counted_prompt, len(static))

    # ---------------------------------------------------------------- decoding

    def _static_decode_step(self) -> StaticDecodeStep | None:
        if not self.static_decode:
            return None
        if self._static_step is None:
            capture = default_capture(self._device)
            if self.int8_backend == "onednn":
                capture = None  # its op takes a list of optional scalars, which tracing refuses
            self._static_step = StaticDecodeStep(self.model, capture)
        return self._static_step

    def _kv_cache(self, num_slots: int, max_length: int) -> KVCache:
        """Reuse the cache across calls; allocate only when a call needs more room."""
        if self._cache is None or not self._cache.fits(num_slots, max_length, self.dtype,
                                                       self._device):
            self._cache = None  # release the old one before allocating
            if self._static_step is not None:
                self._static_step.reset()  # its graphs point into the old cache
            try:
                self._cache = KVCache(self.spec, num_slots, max_length, self.dtype, self._device)
            except torch.OutOfMemoryError as error:
                spec = self.spec
                needed = (2 * spec.num_layers * num_slots * spec.num_kv_heads * (max_length + 1)
                          * spec.head_dim * torch.finfo(self.dtype).bits // 8)
                raise OutOfMemory(
                    f"out of memory allocating the KV cache: {num_slots} sequences x "
                    f"{max_length} positions need {needed / 2**30:.2f} GiB on {self._device}; "
                    "lower the batch size (max_batch_size) or max_length") from error
        return self._cache

    def _decode_steps(self, batch: list[_Request], rows: list[_RowState], options: _DecodeOptions,
                      batch_offset: int = 0) -> Iterator[list[tuple[int, int, float]]]:
        """Prefill every prompt in one forward pass, then one token per step for all rows.

        Updates `rows` and yields, after each step, (row, token, log_prob) for the rows that
        took a token. Closing the iterator stops the work.
        """
        device = self._device
        lengths = [len(request.prompt_ids) for request in batch]
        total = max(length + request.max_new_tokens
                    for length, request in zip(lengths, batch, strict=True))
        cache = self._kv_cache(len(batch), total)
        logits = self._prefill(batch, cache, options.cache_static_prompt)

        end_ids, min_new = self._end_tensors(batch, options)
        longest_min = max(request.min_new_tokens for request in batch)
        next_positions = list(lengths)  # where each row's next token goes
        for step in range(max(request.max_new_tokens for request in batch)):
            if options.processors.active:
                histories = [request.prompt_ids[len(request.prompt_ids) - request.counted_prompt:]
                             + row.tokens for request, row in zip(batch, rows, strict=True)]
                logits = options.processors.apply(logits, histories)
            logits = mask_early_end(logits, end_ids, min_new, step, longest_min)
            ids, log_probs = choose_tokens(logits, options.sampling, options.generator,
                                           self.spec.usable_vocab_size)
            picks = []
            for index, (row, request, token, log_prob) in enumerate(zip(
                    rows, batch, ids.tolist(), log_probs.tolist(), strict=True)):
                if not row.done:
                    if options.keep_logits:
                        row.logits.append(logits[index].float().cpu())
                    is_end = token in options.end_ids
                    row.add(token, log_prob, is_end, options.return_end_token,
                            step + 1 >= request.max_new_tokens)
                    picks.append((index, token, log_prob))
                    if options.callback is not None and (not is_end or options.return_end_token):
                        result = GenerationStepResult(
                            step=step, batch_id=batch_offset + index, token_id=token,
                            hypothesis_id=0, log_prob=log_prob, is_last=row.done,
                            token=self.vocabulary.id_to_token(token) if self.vocabulary else None)
                        if options.callback(result):
                            row.done = True
            yield picks
            if all(row.done for row in rows):
                return
            # Finished rows keep stepping with the batch but write to the scratch column.
            for index, row in enumerate(rows):
                next_positions[index] = cache.scratch_position if row.done else lengths[index] + step
            kv_length = max(p for p in next_positions if p != cache.scratch_position) + 1
            positions = torch.tensor(next_positions, device=device).unsqueeze(1)
            logits = self.model(ids.unsqueeze(1), positions, cache, kv_length=kv_length)[:, -1]

    def _pack(self, prompts: list[list[int]], cache: KVCache,
              offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad prompts into [B, T] at positions offset..; padding goes to the cache's
        scratch column."""
        width = max(len(prompt) for prompt in prompts)
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        positions = torch.full((len(prompts), width), cache.scratch_position, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt)
            positions[row, : len(prompt)] = torch.arange(offset, offset + len(prompt))
        return tokens.to(self._device), positions.to(self._device)

    def _prefill(self, batch: list[_Request], cache: KVCache, reuse_static: bool) -> torch.Tensor:
        """Run the prompts into slots 0..B-1; return the logits of each one's last token.
        A cached static prompt is copied into the slots instead of being computed again."""
        static = batch[0].static_length
        if not (static and reuse_static):
            tokens, positions = self._pack([request.prompt_ids for request in batch], cache)
            last = torch.tensor([len(r.prompt_ids) for r in batch], device=self._device) - 1
            return self._prompt_logits(tokens, positions, cache, 0, last)
        keys, values = self._static_state(tuple(batch[0].prompt_ids[:static]), cache)
        for layer_keys, layer_values, stored_keys, stored_values in zip(
                cache.keys, cache.values, keys, values, strict=True):
            layer_keys[: len(batch), :, :static] = stored_keys
            layer_values[: len(batch), :, :static] = stored_values
        tokens, positions = self._pack([r.prompt_ids[static:] for r in batch], cache, static)
        last = torch.tensor([len(r.prompt_ids) - static for r in batch], device=self._device) - 1
        return self._prompt_logits(tokens, positions, cache, static, last)

    def _prompt_logits(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       kv_offset: int, last: torch.Tensor) -> torch.Tensor:
        """Run prompts [B, T] (cache columns from kv_offset) and return the logits at each
        row's `last` index. Long prompts and big batches run in column chunks of about
        PREFILL_CHUNK_ROWS rows, so activations stay bounded (int8 GEMMs run no slower)."""
        batch, width = tokens.shape
        limit = PREFILL_CHUNK_ROWS
        if self._device.type != "cpu":
            limit *= 16  # a GPU wants big GEMMs (and on CUDA each chunk casts the int8 weights)
        chunks = -(-batch * width // limit)
        if chunks <= 1:
            return self.model(tokens, positions, cache, kv_length=kv_offset + width,
                              last_index=last)
        size = -(-width // chunks)  # even chunks: no short tail (int8 runs <= 16 rows in 8 bits)
        logits = None
        for start in range(0, width, size):
            end = min(start + size, width)
            chunk = self.model(tokens[:, start:end], positions[:, start:end], cache,
                               kv_length=kv_offset + end,
                               last_index=(last - start).clamp(0, end - start - 1))
            inside = ((last >= start) & (last < end)).unsqueeze(1)
            logits = chunk if logits is None else torch.where(inside, chunk, logits)
        return logits

    def _static_state(self, static: tuple[int, ...], cache: KVCache):
        """The keys and values of a static prompt (per layer), from a bounded LRU cache."""
        if static in self._static_states:
            self._static_states.move_to_end(static)
            return self._static_states[static]
        tokens = torch.tensor([static], device=self._device)
        positions = torch.arange(len(static), device=self._device).unsqueeze(0)
        self._prompt_logits(tokens, positions, cache, 0,
                            torch.tensor([len(static) - 1], device=self._device))
        state = ([keys[0, :, : len(static)].clone() for keys in cache.keys],
                 [values[0, :, : len(static)].clone() for values in cache.values])
        self._static_states[static] = state
        while len(self._static_states) > STATIC_PROMPT_CACHE_SIZE:
            self._static_states.popitem(last=False)
        return state

    def _end_tensors(self, batch: list[_Request],
                     options: _DecodeOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """The end ids and each row's min_length in new tokens, as device tensors."""
        end_ids = torch.tensor(sorted(options.end_ids), dtype=torch.long, device=self._device)
        min_new = torch.tensor([r.min_new_tokens for r in batch], device=self._device)
        return end_ids, min_new

    def _beam_result(self, request: _Request, hypotheses: list[tuple[list[int], float]],
                     return_scores: bool) -> GenerationResult:
        ids = [request.returned_prompt + tokens for tokens, _ in hypotheses]
        names = [self.vocabulary.ids_to_tokens(seq) for seq in ids] if self.vocabulary else []
        return GenerationResult(sequences=names, sequences_ids=ids,
                                scores=[score for _, score in hypotheses] if return_scores else [])

    def _result(self, request: _Request, row: _RowState,
                return_scores: bool) -> GenerationResult:
        ids = request.returned_prompt + row.tokens
        tokens = self.vocabulary.ids_to_tokens(ids) if self.vocabulary is not None else []
        logits = [torch.stack(row.logits)] if row.logits else []
        return GenerationResult(sequences=[tokens], sequences_ids=[ids],
                                scores=[row.score] if return_scores else [], logits=logits)
