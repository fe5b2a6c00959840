"""Validated options with CTranslate2's names and semantics, in two kinds:

- GenerationOptions: how ONE prompt is generated (lengths, sampling, beams, penalties, end
  tokens, stop strings, speculation). Every engine request carries one.
- CallOptions: how a generate_batch CALL runs its prompts (max_batch_size / batch_type,
  callback, return_alternatives), which no single request has.

Every entry point builds these and nothing else: options are checked once, here, before any
work. `split_options(**kwargs)` sorts a call's keyword arguments into the two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import RequestError
from .batching import BATCH_TYPES
from .sampling import SamplingParams

TokenLike = str | int
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_SPECULATIVE_TOKENS = 32


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate for one prompt. Lengths follow CTranslate2: with
    `include_prompt_in_result` (the default) `max_length`/`min_length` count the prompt's
    tokens after the first; otherwise generated tokens only. `sampling_topk=1` is greedy."""

    max_length: int = 512
    min_length: int = 0
    sampling_topk: int = 1
    sampling_topp: float = 1.0
    sampling_temperature: float = 1.0
    seed: int | None = None
    end_token: TokenLike | Sequence[TokenLike] | None = None  # None: the model's EOS ids
    return_end_token: bool = False
    include_prompt_in_result: bool = True
    return_scores: bool = False
    return_logits_vocab: bool = False
    beam_size: int = 1
    patience: float = 1.0
    num_hypotheses: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    disable_unk: bool = False
    suppress_sequences: Sequence[Sequence[TokenLike]] | None = None
    static_prompt: Sequence[TokenLike] | None = None
    cache_static_prompt: bool = True
    stop: str | Sequence[str] | None = None  # stop strings, matched on the decoded text
    top_logprobs: int = 0  # engine requests: each token event carries the n most likely tokens
    prompt_lookup: bool = False  # speculative decoding with proposals from the request's text
    num_speculative_tokens: int = 4  # proposals verified per target pass (the first, if adaptive)
    adaptive_speculation: bool = False  # k grows by 2 after a fully accepted pass, else shrinks by 1
    use_draft_model: bool = True  # speculate with the engine's draft model, when it has one

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationOptions:
        """Options from keyword arguments; an unknown name is a RequestError listing the known."""
        per_call = sorted(set(kwargs) & set(CALL_FIELDS))
        if per_call:
            raise RequestError(f"{', '.join(per_call)} apply to a whole generate_batch call, "
                               "not to one request")
        unknown = sorted(set(kwargs) - set(FIELDS))
        if unknown:
            raise RequestError(f"unknown generation option(s) {', '.join(unknown)}; known: "
                               f"{', '.join(FIELDS + CALL_FIELDS)}")
        return cls(**kwargs)

    def replace(self, **changes) -> GenerationOptions:
        if set(changes) - set(FIELDS):
            GenerationOptions.from_kwargs(**changes)  # raises, naming what is wrong
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        _check_int("max_length", self.max_length, 1)
        _check_int("min_length", self.min_length, 0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        _check_int("top_logprobs", self.top_logprobs, 0)
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1)
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise RequestError(f"num_speculative_tokens must be at most {MAX_SPECULATIVE_TOKENS},"
                               f" got {self.num_speculative_tokens}")
        if self.prompt_lookup and self.beam_size > 1:
            raise RequestError("prompt_lookup (speculative decoding) works with greedy or sampled "
                               "decoding (beam_size=1, no return_alternatives)")
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be at most {MAX_TOP_LOGPROBS}, got "
                               f"{self.top_logprobs}")
        sampling = self.sampling  # checks top-k, top-p and temperature
        beam = self.beam
        if self.beam_size == 1 and self.num_hypotheses > 1:
            raise RequestError(f"num_hypotheses={self.num_hypotheses} needs beam_size >= "
                               f"{self.num_hypotheses} (or return_alternatives=True)")
        if beam.beam_size > 1 and not sampling.greedy and 0 < self.sampling_topk < 2 * beam.beam_size:
            raise RequestError(f"sampling in beam search draws 2 x beam_size candidates: "
                               f"sampling_topk must be 0 or >= {2 * beam.beam_size}, got "
                               f"{self.sampling_topk}")
        if beam.beam_size > 1 and self.return_logits_vocab:
            raise RequestError("callback and return_logits_vocab work with greedy or sampled "
                               "decoding (beam_size=1) only")
        stops = self.stop_strings
        if self.stop is not None and (not stops or not all(isinstance(s, str) and s for s in stops)):
            raise RequestError(f"stop must be a non-empty string or a list of them, got "
                               f"{self.stop!r}")
        if len(stops) > MAX_STOP_STRINGS:
            raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if stops and beam.beam_size > 1:
            raise RequestError("stop strings work with greedy or sampled decoding (beam_size=1)")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.sampling_topk, self.sampling_topp, self.sampling_temperature)

    @property
    def beam(self) -> BeamOptions:
        return BeamOptions(self.beam_size, self.patience, self.num_hypotheses,
                           self.length_penalty)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


@dataclass
class BeamOptions:
    beam_size: int
    patience: float = 1.0
    num_hypotheses: int = 1
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise RequestError(f"beam_size must be an int >= 1, got {self.beam_size!r}")
        if not isinstance(self.num_hypotheses, int) or not 1 <= self.num_hypotheses:
            raise RequestError(f"num_hypotheses must be an int >= 1, got {self.num_hypotheses!r}")
        if self.num_hypotheses > self.beam_size and self.beam_size > 1:
            raise RequestError(f"num_hypotheses ({self.num_hypotheses}) cannot exceed beam_size "
                               f"({self.beam_size})")
        if not self.patience > 0:
            raise RequestError(f"patience must be > 0, got {self.patience!r}")

    @property
    def max_candidates(self) -> int:
        return round(self.beam_size * self.patience)


@dataclass(frozen=True)
class CallOptions:
    """How one generate_batch call runs its prompts. `alternatives`: with return_alternatives,
    how many first tokens to expand (the call's num_hypotheses)."""

    max_batch_size: int = 0
    batch_type: str = "examples"
    callback: Callable | None = None  # step_result -> bool (True stops that prompt)
    return_alternatives: bool = False
    min_alternative_expansion_prob: float = 0.0
    alternatives: int = 1

    def __post_init__(self) -> None:
        if self.callback is not None and not callable(self.callback):
            raise TypeError("callback must be callable: step_result -> bool (True stops the item)")
        if not 0.0 <= self.min_alternative_expansion_prob <= 1.0:
            raise RequestError(f"min_alternative_expansion_prob must be in [0, 1], got "
                               f"{self.min_alternative_expansion_prob!r}")
        if self.batch_type not in BATCH_TYPES:
            raise RequestError(f"batch_type must be one of {BATCH_TYPES}, got {self.batch_type!r}")
        if (not isinstance(self.max_batch_size, int) or isinstance(self.max_batch_size, bool)
                or self.max_batch_size < 0):
            raise RequestError(f"max_batch_size must be an int >= 0 (0: no limit), got "
                               f"{self.max_batch_size!r}")

    def check_with(self, options: GenerationOptions) -> None:
        """The checks that need both the call's and the requests' options."""
        if self.return_alternatives and (self.callback is not None or options.return_logits_vocab):
            raise RequestError("return_alternatives cannot be combined with callback or "
                               "return_logits_vocab")
        if self.return_alternatives and options.prompt_lookup:
            raise RequestError("prompt_lookup (speculative decoding) works with greedy or sampled "
                               "decoding (beam_size=1, no return_alternatives)")
        if self.callback is not None and options.beam_size > 1:
            raise RequestError("callback and return_logits_vocab work with greedy or sampled "
                               "decoding (beam_size=1) only")


def split_options(**kwargs) -> tuple[GenerationOptions, CallOptions]:
    """A call's keyword arguments as the options of each of its requests and of the call."""
    call_kwargs = {name: kwargs.pop(name) for name in CALL_FIELDS if name in kwargs}
    if call_kwargs.get("return_alternatives"):  # the count of first tokens to expand
        call_kwargs["alternatives"] = kwargs.pop("num_hypotheses", 1)
    call = CallOptions(**call_kwargs)
    options = GenerationOptions.from_kwargs(**kwargs)
    call.check_with(options)
    return options, call


FIELDS = tuple(field.name for field in dataclasses.fields(GenerationOptions))
CALL_FIELDS = tuple(field.name for field in dataclasses.fields(CallOptions)
                    if field.name != "alternatives")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise RequestError(f"{name} must be {kind}, got {value!r}")
