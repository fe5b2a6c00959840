"""Generator: CTranslate2's Generator API (and a text API) over kiln's engine.

Every call becomes engine requests, so one Generator shared by threads runs their calls
batched together, each with its own options, and each prompt gives the same tokens alone or
batched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import torch

from .generation import text as text_api
from .generation import token_api
from .generation.chat import Message
from .generation.config import SIZING_FIELDS, EngineConfig
from .generation.engine import Engine
from .generation.options import split_options
from .generation.results import AsyncGenerationResult, GenerationResult, GenerationStepResult, ScoringResult
from .generation.tokenizer import Tokenizer
from .quant.compute_types import ComputeType
from .quant.compute_types import resolve as resolve_compute_type

ENGINE_OPTIONS = tuple(name for name in SIZING_FIELDS if name != "seed")


class Generator:
    """Loads a model; generates with `generate_batch` (tokens) or `generate` (text).

    One Generator may be shared by threads: their calls run together on its engine.
    """

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu",
                 compute_type: str = "default", *, device_index: int = 0,
                 intra_threads: int = 0, seed: int | None = None,
                 verify_checksums: bool = False, cache_dir: str | Path | None = None,
                 int8_backend: str = "auto", group_size: int | None = None,
                 tensor_parallel: bool = False, **engine_options) -> None:
        """Load a kiln folder. Anything else `from_pretrained` takes (a Hugging Face, GGUF or
        CTranslate2 checkpoint, a hub id) is converted once into the store (`cache_dir`) in
        its own type. With no `model_path`: kiln's default model, SmolLM2-135M-Instruct.
        `group_size`: int4 groups when quantizing to int4 at load (default 32).
        `tensor_parallel`: run as one rank of `torchrun --nproc-per-node N`, holding 1/N of
        every layer; every rank runs the same calls and gets the same results.
        `engine_options` size and drive the engine (EngineConfig: max_batch_size, max_length,
        kv_cache_memory, kv_cache_dtype, max_prefill_tokens_per_step, draft_model, ...)."""
        unknown = sorted(set(engine_options) - set(ENGINE_OPTIONS))
        if unknown:
            raise TypeError(f"Generator() got unexpected keyword argument(s) {', '.join(unknown)}")
        config = EngineConfig(device=device, compute_type=compute_type, device_index=device_index,
                              intra_threads=intra_threads, verify_checksums=verify_checksums,
                              cache_dir=cache_dir, int8_backend=int8_backend,
                              group_size=group_size, tensor_parallel=tensor_parallel, seed=seed,
                              **engine_options)
        self.engine = Engine(model_path, config)
        self._executor = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, revision: str | None = None,
                        device: str = "auto", compute_type: str = "auto",
                        cache_dir: str | Path | None = None,
                        hub_cache_dir: str | Path | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, progress: bool | None = None,
                        **kwargs) -> Generator:
        """Load a kiln folder, a Hugging Face folder or GGUF file, or a hub id (at `revision`).

        Anything that is not a kiln folder is converted once, to the storage type of the
        compute type on this device, into the converted-model store (`cache_dir`, default
        $KILN_CACHE_DIR or the per-user cache); later calls load the stored folder without
        touching the network or converting. Hub downloads honour HF_HUB_OFFLINE, HF_HOME /
        HF_HUB_CACHE (or `hub_cache_dir`), `local_files_only` and `token`. Progress bars show
        on a terminal unless `progress=False`. Other keyword arguments go to `Generator`.
        """
        from .model.loading import resolve_device
        from .sources.hub import resolve

        target = resolve_device(device, kwargs.get("device_index", 0))
        quantization = None
        if compute_type != "default":  # store what the compute type runs, so loading is direct
            quantization = resolve_compute_type(compute_type, ComputeType(None, "float32"),
                                                target).name
        resolved = resolve(name_or_path, revision=revision, quantization=quantization,
                           group_size=kwargs.get("group_size"),
                           cache_dir=cache_dir, hub_cache_dir=hub_cache_dir,
                           local_files_only=local_files_only, token=token, progress=progress)
        return cls(resolved.folder, device=device, compute_type=compute_type,
                   cache_dir=cache_dir, **kwargs)

    # ---------------------------------------------------------------- what is loaded

    model_path = property(lambda self: self.engine.loaded.path)
    config = property(lambda self: self.engine.loaded.config)
    spec = property(lambda self: self.engine.loaded.spec)
    model = property(lambda self: self.engine.loaded.model)
    tokenizer = property(lambda self: self.engine.loaded.tokenizer)
    vocabulary = property(lambda self: self.engine.loaded.vocabulary)
    chat_template = property(lambda self: self.engine.loaded.chat_template)
    dtype = property(lambda self: self.engine.loaded.dtype)

    @property
    def device(self) -> str:
        return self.engine.loaded.device.type

    @property
    def compute_type(self) -> str:
        """The type the model actually runs in (CTranslate2's names, e.g. int8_float32)."""
        return self.engine.loaded.compute.name

    @property
    def int8_backend(self) -> str | None:
        """The int8 kernel in use ("fbgemm", "onednn", "int_mm"); None when the weights are
        not int8 or int8 is dequantized inside the matmul (CUDA)."""
        return self.model.int8_backend

    @property
    def static_decode(self) -> bool:
        """Decode steps run at static shapes, captured once and replayed (on by default)."""
        return self.engine.runner.static_decode

    @static_decode.setter
    def static_decode(self, value: bool) -> None:
        self.engine.runner.static_decode = bool(value)

    # ---------------------------------------------------------------- token API

    def generate_batch(self, start_tokens: Sequence[Sequence[str | int]], *,
                       asynchronous: bool = False, **options) -> list[GenerationResult]:
        """Continue each prompt (token strings or ids; no special tokens are added), with
        CTranslate2's options and semantics (GenerationOptions lists them): lengths, sampling,
        beam search, penalties, end tokens, static_prompt, return_alternatives, callback,
        max_batch_size / batch_type. With `asynchronous=True` the call returns at once with
        AsyncGenerationResult objects."""
        if asynchronous:
            future = self._background().submit(self.generate_batch, start_tokens, **options)
            return [AsyncGenerationResult(future, index) for index in range(len(start_tokens))]
        request_options, call = split_options(**options)
        return token_api.generate_batch(self.engine, start_tokens, request_options, call)

    def generate_tokens(self, prompt: Sequence[str | int], **options) -> Iterator[GenerationStepResult]:
        """Yield each new token of one prompt as it is generated (`max_length` new tokens at
        most; options: lengths, sampling, end tokens, penalties, seed). Breaking out of the
        loop or closing the iterator stops the generation (CTranslate2 keeps computing)."""
        return token_api.generate_tokens(self.engine, prompt, options)

    async def async_generate_tokens(self, prompt: Sequence[str | int],
                                    **options) -> AsyncIterator[GenerationStepResult]:
        """`generate_tokens` for asyncio: tokens are produced in a worker thread and awaited
        here; leaving the loop early stops the generation."""
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        loop = asyncio.get_running_loop()
        steps = self.generate_tokens(prompt, **options)
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

    def score_batch(self, tokens: Sequence[Sequence[str | int]], *, max_batch_size: int = 0,
                    max_input_length: int | None = None) -> list[ScoringResult]:
        """Log-probability of each token given the ones before it (tokens[1:]).

        Unlike CTranslate2, nothing is cut silently: inputs longer than `max_input_length`
        (default: none) are truncated only when it is given, and the result says so; an input
        beyond the model's context is an error.
        """
        return token_api.score_batch(self.engine, tokens, max_batch_size, max_input_length)

    def forward_batch(self, inputs: Sequence[Sequence[str | int]]) -> torch.Tensor:
        """Float32 logits [batch, time, vocab] for every position of every prompt.

        Prompts of different lengths are right-padded; logits past a prompt's end are 0.
        """
        return token_api.forward_batch(self.engine, inputs)

    # ---------------------------------------------------------------- text API

    def generate(self, text: str | Sequence[str], max_length: int = 64, *,
                 include_prompt_in_result: bool = True, skip_special_tokens: bool = True,
                 stop: str | Sequence[str] | None = None, **options) -> str | list[str]:
        """Generate from text; a str gives a str, a list gives a list.

        The output includes the prompt by default, as hf-hub-ctranslate2's `generate` does.
        `stop`: strings that end a prompt's generation as soon as its decoded continuation
        contains one (even across token boundaries); the text is cut before it. Other keyword
        arguments are generate_batch's options.
        """
        return text_api.generate_text(self.engine, self.require_tokenizer(), text, max_length,
                                      include_prompt_in_result, skip_special_tokens,
                                      dict(options, stop=stop))

    def stream(self, text: str, max_length: int = 64, *, skip_special_tokens: bool = True,
               add_special_tokens: bool = True, **options) -> Iterator[str]:
        """Yield the continuation of `text` as text pieces, as soon as they are whole
        characters. Joined, the pieces equal the decoded continuation (cut before a `stop`
        string). Keyword arguments are generation options."""
        return text_api.stream_text(self.engine, self.require_tokenizer(), text, max_length,
                                    skip_special_tokens, add_special_tokens, **options)

    def chat(self, messages: str | list[Message], max_length: int = 256, **options) -> str:
        """The assistant's reply to a conversation (or to one user message given as a str),
        through the model's chat template; generation stops at the end-of-turn token."""
        return "".join(self.stream_chat(messages, max_length=max_length, **options))

    def stream_chat(self, messages: str | list[Message], max_length: int = 256,
                    **options) -> Iterator[str]:
        """`chat`, yielding the reply as text pieces as they are generated."""
        prompt = text_api.chat_prompt(self.chat_template, self.model_path, messages)
        # The template writes the special tokens itself: the tokenizer must not add more.
        return self.stream(prompt, max_length=max_length, add_special_tokens=False, **options)

    def require_tokenizer(self) -> Tokenizer:
        return self.engine.require_tokenizer()

    def _background(self):
        """One worker for asynchronous calls."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln")
        return self._executor
