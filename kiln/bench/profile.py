"""`kiln bench --profile`: where one decode step and one prompt chunk spend their time.

For each model and case (decode at batch B, a prefill of B prompts of P tokens) it times the
step as the engine runs it (the traced decode step; prefill eager) and the same step eagerly,
then profiles the eager step with torch.profiler and splits its time by operator class:

    int8 GEMM                 the quantized matmul ops themselves (fbgemm / oneDNN / _int_mm)
    activation quantization   everything else inside the int8 kernel call: row maxima,
                              scaling, rounding, the two-pass concatenation, the split rows
                              of the exact 8-bit path, the rescale and bias
    attention                 the attention block minus its projections: KV cache writes,
                              reads, scores, softmax, weighted sum, transposes
    norms/rotary/activations  layer norms, rotary embedding, GELU/SiLU and the gate product
    embedding/residual/other  ops outside those: embeddings, residual adds, masks, the head's
                              slicing
    sampling                  choosing the next tokens from the logits (greedy), timed apart
    host                      the eager step's wall time minus all op time: Python, dispatch,
                              allocation between ops (the traced step removes most of it)

Labels are attached by wrapping the functions that run each class while profiling only; the
model code is untouched. Shares are of the eager step; the traced step's wall time is shown
beside it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

CLASSES = ("int8 GEMM", "activation quantization", "attention", "norms/rotary/activations",
           "embedding/residual/other", "sampling", "host")
GEMM_OPS = ("quantized::linear", "onednn::qlinear", "aten::_int_mm",
            "aten::_weight_int8pack_mm")
LABELS = {"kiln::quantize": "activation quantization", "kiln::attention": "attention",
          "kiln::pointwise": "norms/rotary/activations"}


@contextlib.contextmanager
def _labelled():
    """Wrap the functions that run each operator class in record_function labels."""
    from torch.nn import LayerNorm

    from ..model import decoder
    from ..quant import kernels

    patches = [(kernels.Int8Kernel, "__call__", "kiln::quantize"),
               (decoder.Attention, "forward", "kiln::attention"),
               (decoder.RMSNorm, "forward", "kiln::pointwise"),
               (LayerNorm, "forward", "kiln::pointwise"),
               (decoder, "apply_rotary", "kiln::pointwise")]
    saved = []
    for owner, name, label in patches:
        original = getattr(owner, name)
        saved.append((owner, name, original))

        def wrapped(*args, _original=original, _label=label, **kwargs):
            with torch.profiler.record_function(_label):
                return _original(*args, **kwargs)
        setattr(owner, name, wrapped)
    activations = dict(decoder._ACTIVATIONS)
    for key, function in activations.items():
        def activation(x, _function=function):
            with torch.profiler.record_function("kiln::pointwise"):
                return _function(x)
        decoder._ACTIVATIONS[key] = activation
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
        decoder._ACTIVATIONS.update(activations)


def _classify(event) -> str | None:
    """An op's class: the GEMM by name, else the innermost label around it."""
    if event.name.startswith("kiln::"):
        return None  # a label: its own time is Python between ops (host)
    if event.name.startswith(GEMM_OPS):
        return "int8 GEMM"
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in LABELS:
            return LABELS[parent.name]
        parent = parent.cpu_parent
    return "embedding/residual/other"


def split_by_class(run, steps: int) -> dict[str, float]:
    """Milliseconds per step of each op class while `run()` runs eagerly `steps` times."""
    from torch.profiler import ProfilerActivity, profile

    with _labelled():
        for _ in range(2):  # warm-up: first calls allocate and pick kernels
            run()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                run()
    totals: dict[str, float] = defaultdict(float)
    for event in profiler.events():
        kind = _classify(event)
        if kind is not None:
            totals[kind] += event.self_cpu_time_total / 1000.0 / steps
    return dict(totals)


def _median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def profile_model(folder: Path, batches: list[int], prompt_cases: list[tuple[int, int]],
                  context: int = 128, repeats: int = 10, compute_type: str = "int8") -> list[dict]:
    """Rows of the table for one kiln folder: decode at each batch (sequences `context` long)
    and each (batch, prompt tokens) prefill."""
    from ..generation.loaded_model import open_model
    from ..generation.runner import ModelRunner
    from ..generation.sampling import SamplingParams, choose_tokens
    from ..model.kv_cache import KVCache

    loaded = open_model(folder, compute_type=compute_type)
    spec, model, device = loaded.spec, loaded.model, loaded.device
    slots = max([*batches, *(b for b, _ in prompt_cases)])
    longest = max([context, *(p for _, p in prompt_cases)])
    cache = KVCache(spec, slots, longest + 8, loaded.dtype, device)
    traced = ModelRunner(model, cache, device)
    eager = ModelRunner(model, cache, device, static_decode=False)
    vocab = spec.vocab_size
    generator = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(0, min(vocab, 50000), (length,), generator=generator).tolist()

    eager.prefill([(slot, prompt(context), 0, False) for slot in range(slots)])
    rows_out = []
    with torch.inference_mode():
        for batch in batches:
            rows = [(slot, 5, context) for slot in range(batch)]
            traced.warm_up(context + 1)
            logits = eager.decode(rows)
            greedy = [(SamplingParams(), None)] * batch

            def sample(logits=logits, greedy=greedy):
                choose_tokens(logits, greedy, vocab)

            entry = {"case": f"decode b{batch}",
                     "engine_ms": _median_ms(lambda rows=rows: traced.decode(rows), repeats),
                     "eager_ms": _median_ms(lambda rows=rows: eager.decode(rows), repeats)}
            classes = split_by_class(lambda rows=rows: eager.decode(rows), repeats)
            classes["sampling"] = _median_ms(sample, repeats)
            entry["classes"] = _with_host(classes, entry["eager_ms"])
            rows_out.append(entry)
        for batch, length in prompt_cases:
            chunks = [(slot, prompt(length), 0, True) for slot in range(batch)]
            entry = {"case": f"prefill {batch}x{length}",
                     "engine_ms": _median_ms(lambda c=chunks: eager.prefill(c), max(3, repeats // 3))}
            entry["eager_ms"] = entry["engine_ms"]
            classes = split_by_class(lambda c=chunks: eager.prefill(c), max(2, repeats // 5))
            entry["classes"] = _with_host(classes, entry["eager_ms"])
            rows_out.append(entry)
    # the folder's weights (packed kernels keep theirs outside the state dict)
    weight_bytes = sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
    for entry in rows_out:
        entry["weight_bytes"] = weight_bytes
    return rows_out


def _with_host(classes: dict[str, float], eager_ms: float) -> dict[str, float]:
    ops = sum(value for name, value in classes.items() if name != "sampling")
    classes["host"] = max(0.0, eager_ms - ops)
    return classes


def markdown(model: str, rows: list[dict], bandwidth_gb_s: float | None) -> str:
    head = ("| model | case | engine step ms | eager ms | " + " | ".join(CLASSES) +
            " | weights GB/s (engine) |")
    lines = [head, "|" + "---|" * (len(CLASSES) + 5)]
    for entry in rows:
        eager = entry["eager_ms"]
        cells = []
        for name in CLASSES:
            value = entry["classes"].get(name, 0.0)
            share = f" ({100 * value / eager:.0f}%)" if name != "sampling" else ""
            cells.append(f"{value:.2f}{share}")
        rate = entry["weight_bytes"] / (entry["engine_ms"] / 1000) / 1e9
        lines.append(f"| {model} | {entry['case']} | {entry['engine_ms']:.2f} | {eager:.2f} | "
                     + " | ".join(cells) + f" | {rate:.1f} |")
    if bandwidth_gb_s:
        lines.append(f"\nMemory read probe: {bandwidth_gb_s:.1f} GB/s.")
    return "\n".join(lines)


def run_profile(options) -> str:
    """`kiln bench --profile`: the table for every model of `options` in kiln int8 (prefill
    cases: every batch x prompt length of at most 1024 tokens), printed and returned."""
    from . import machine
    from .folders import EngineType, engine_folder, resolve_models

    threads = options.threads or machine.physical_cores()
    torch.set_num_threads(threads)
    work_dir = Path(options.work_dir).expanduser()
    engine = EngineType.parse(next((e for e in options.engines if e.startswith("kiln:int")),
                                   "kiln:int8"))
    bandwidth = machine.memory_bandwidth_gb_s(options.bandwidth_gib, threads=threads)
    tables = [f"{machine.cpu_model()}, {threads} threads, torch {torch.__version__}, "
              f"{engine}:\n"]
    for model in resolve_models(options.models, options.model_configs):
        folder = engine_folder(model, engine, work_dir)
        cases = [(batch, length) for batch in options.batch for length in options.prompt_tokens
                 if batch * length <= 1024]
        rows = profile_model(folder, options.batch, cases, compute_type=engine.dtype
                             if engine.dtype.startswith("int8") else "default")
        tables.append(markdown(model.name, rows, None))
    tables.append(f"\nMemory read probe: {bandwidth:.1f} GB/s.")
    text = "\n".join(tables)
    print(text)
    return text
