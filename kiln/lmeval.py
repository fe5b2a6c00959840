"""kiln as an lm-evaluation-harness model, registered as `kiln`:

    python -m kiln.lmeval --model kiln \\
        --model_args model=EleutherAI/pythia-160m,revision=step3000,compute_type=int8 \\
        --tasks lambada_openai

(`python -m kiln.lmeval` takes lm_eval's own arguments; plain `lm_eval --model kiln` works with
lm-eval releases that load the `lm_eval.models` entry point kiln declares.)

Requests are encoded as lm-eval's own Hugging Face model encodes them (TemplateLM: the
context's trailing spaces move to the continuation, the continuation's tokens are those
the whole string adds to the context's, an empty context is the prefix token), so scores
compare item for item. Log-likelihoods come from the model's float32 logits (`forward_batch`),
generation from the engine, with `until` as stop strings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

try:
    # lm-eval fills its model registry lazily, only while it is empty: fill it before kiln
    # registers, or its own models ("hf", ...) would go missing.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError("kiln's lm-eval model needs lm-evaluation-harness: "
                      "pip install 'kiln[lmeval]'") from _error

from .generator import Generator

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def _to_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("kiln")
class KilnLM(TemplateLM):
    """`model`: a kiln folder, Hugging Face folder, .gguf file or hub id (None: kiln's
    default model); `revision`, `compute_type` (and int4's `group_size`), `device`,
    `batch_size` (sequences per forward pass), `max_length` (context; default the model's)."""

    def __init__(self, model: str | None = None, revision: str | None = None,
                 compute_type: str = "default", device: str = "cpu",
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 group_size: int | None = None, cache_dir: str | None = None,
                 generator: Generator | None = None, **_ignored: Any) -> None:
        super().__init__()
        if generator is None:
            device, index = _device(device)
            options = dict(compute_type=compute_type, cache_dir=cache_dir, device=device,
                           device_index=index, group_size=int(group_size) if group_size else None)
            if model is None:
                generator = Generator(**options)
            else:
                generator = Generator.from_pretrained(model, revision=revision, progress=False,
                                                      **options)
        self.generator = generator
        self.tokenizer = generator.require_tokenizer()
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
        self._max_length = int(max_length) if max_length else generator.engine.max_length
        tokens = generator.config.tokens
        self._eot = tokens.eos[0] if tokens.eos else None
        self._bos = tokens.bos

    # ------------------------------------------------------------------ what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self._eot if self._eot is not None else self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: BOS, else end of text (as lm-eval's HF)."""
        if self._bos is not None:
            return self._bos
        if self._eot is None:
            raise ValueError("the model has neither a BOS nor an EOS token to score an empty "
                             "context after")
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.generator.model_path)

    def tok_encode(self, string: str, **_: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    def tok_decode(self, tokens: Sequence[int], **_: Any) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: Any
                              ) -> list[tuple[float, bool]]:
        """(sum of log P(continuation | context), whether greedy decoding gives it) for
        (cache key, context tokens, continuation tokens) triples, in the order given."""
        scored: dict[int, tuple[float, bool]] = {}
        # Longest first: similar lengths share a pass, and memory peaks at the start.
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for batch in _chunks(order, self.batch_size):
            windows = []
            for index in batch:
                _, context, continuation = requests[index]
                if not continuation:
                    raise ValueError("a loglikelihood request with an empty continuation")
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                windows.append((whole[:-1], len(continuation)))
            logits = self.generator.forward_batch([inputs for inputs, _ in windows])
            for row, index in enumerate(batch):
                inputs, length = windows[row]
                continuation = torch.tensor(requests[index][2][-length:])
                selected = logits[row, len(inputs) - length:len(inputs)]
                log_probs = F.log_softmax(selected.double(), dim=-1)
                total = log_probs.gather(1, continuation.unsqueeze(1)).sum().item()
                greedy = bool((selected.argmax(-1) == continuation).all())
                scored[index] = (total, greedy)
                cache_key = requests[index][0]
                if cache_key is not None:
                    self.cache_hook.add_partial("loglikelihood", cache_key, scored[index])
        return [scored[i] for i in range(len(requests))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of the context as lm-eval's HF model
        takes them (each window predicts its tokens after as much preceding text as fits)."""
        results = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, *window) for window in windows])
            total = sum(score for score, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            prompt = self.tok_encode(context)[-(self.max_length - max_new):] or \
                [self.prefix_token_id]
            options = _sampling(kwargs)
            result = self.generator.generate_batch(
                [prompt], max_length=max_new, include_prompt_in_result=False,
                stop=[stop for stop in until if stop], **options)[0]
            text = self.tok_decode(result.sequences_ids[0])
            for stop in until:  # as lm-eval's HF model: cut at the first of each
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            results.append(text)
        return results


def _device(device: str | None) -> tuple[str, int]:
    """lm-eval's device string ("cuda:1", "cpu", None) as kiln's device and index. lm-eval
    asks for cuda:0 unless told otherwise; without a GPU that means the CPU, as for its HF
    model."""
    name, _, index = str(device or "cpu").partition(":")
    if name == "cuda" and not torch.cuda.is_available():
        return "cpu", 0
    return name, int(index or 0)


def _sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's generation kwargs as kiln options: greedy unless sampling is asked for."""
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    if not _to_bool(kwargs.get("do_sample", False)) or temperature == 0.0:
        return {"sampling_topk": 1}
    options: dict[str, Any] = {"sampling_topk": 0, "sampling_temperature": temperature}
    if "top_p" in kwargs:
        options["sampling_topp"] = float(kwargs["top_p"])
    if "top_k" in kwargs:
        options["sampling_topk"] = int(kwargs["top_k"])
    return options


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + size]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m kiln.lmeval ARGS`: lm-eval's own command line, with the `kiln` model
    registered first (lm-eval releases that do not load plugins from the `lm_eval.models`
    entry point cannot see it from plain `lm_eval`)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
