"""Every int8 matmul path PyTorch offers on this CPU, timed on kiln's layer shapes.

    python -m kiln.bench.gemm_paths --shapes 410m 2.8b --rows 1 2 4 8 16 32 128 512

For each projection shape (out x in) and row count M it times `x [M, in] @ W^T` through:

    fbgemm 8-bit (kiln decode)   per-token 8-bit activations; without VNNI each token goes in
                                 as two rows (exact 8 bits), as kiln's decode steps run
    fbgemm 7-bit (one row)       the same without the split: what fbgemm costs when each
                                 token is one row (7-bit activations on CPUs without VNNI)
    fbgemm two-pass (prompts)    kiln's prompt path: ~16-bit activations in two 8-bit passes
    fbgemm dynamic (per tensor)  quantized.linear_dynamic: one activation scale for all rows
                                 (rows then depend on each other: a reference, not faithful)
    _int_mm                      torch._int_mm on per-token int8 activations
    int8pack f32 / bf16          torch._weight_int8pack_mm: weight-only int8, activations kept
                                 in float32 / bfloat16 (more faithful than any 8-bit path)
    onednn 8-bit                 torch.ops.onednn.qlinear_pointwise (VNNI CPUs only)
    float32 / bfloat16 dense     F.linear on a float copy of the weight: the reference

Weights are cycled through enough copies (>= 256 MiB) that each call reads its weight from
memory, as a decode step does; GB/s is the int8 weight's bytes over the call's time.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..quant.kernels import FbgemmKernel, IntMMKernel, OnednnKernel, onednn_available
from .models import PYTHIA_SHAPES

STREAM_BYTES = 256 << 20
MAX_COPIES = 256


def projection_shapes(name: str) -> list[tuple[int, int]]:
    """(out, in) of a Pythia shape's four projections."""
    hidden = PYTHIA_SHAPES[name].hidden_size
    return [(3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden)]


def _paths(weight: torch.Tensor, scale: torch.Tensor) -> dict[str, Callable]:
    """name -> f(x) for one weight copy."""
    paths: dict[str, Callable] = {}
    fbgemm = FbgemmKernel(weight, scale, None)
    paths["fbgemm 8-bit (kiln decode)"] = lambda x: fbgemm(x, two_pass=False)
    one_row = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    paths["fbgemm 7-bit (one row)"] = lambda x: one_row(
        x / x.abs().amax(-1, keepdim=True), 1.0 / 63, 64, fbgemm.packed)
    paths["fbgemm two-pass (prompts)"] = lambda x: fbgemm(x, two_pass=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch._make_per_channel_quantized_tensor(
            weight.contiguous(), scale.double().reciprocal(),
            torch.zeros(weight.shape[0], dtype=torch.long), 0)
        dynamic = torch.ops.quantized.linear_prepack(quantized, None)
    paths["fbgemm dynamic (per tensor)"] = lambda x: torch.ops.quantized.linear_dynamic(x, dynamic)
    int_mm = IntMMKernel(weight, scale, None)
    paths["_int_mm"] = lambda x: int_mm(x, two_pass=False)
    inverse = (1.0 / scale).float()
    paths["int8pack f32"] = lambda x: torch._weight_int8pack_mm(x, weight, inverse)
    inverse_bf16 = inverse.bfloat16()
    paths["int8pack bf16"] = lambda x: torch._weight_int8pack_mm(x.bfloat16(), weight, inverse_bf16)
    if onednn_available():
        onednn = OnednnKernel(weight, scale, None)
        paths["onednn 8-bit"] = lambda x: onednn(x, two_pass=False)
    dense = weight.float() * inverse[:, None]
    paths["float32 dense"] = lambda x: F.linear(x, dense)
    dense_bf16 = dense.bfloat16()
    paths["bfloat16 dense"] = lambda x: F.linear(x.bfloat16(), dense_bf16)
    return paths


def time_path(build: Callable[[int], Callable], copies: int, x: torch.Tensor,
              repeats: int, budget_s: float = 3.0) -> float | None:
    """Median seconds per call, cycling through `copies` weights (fewer for a path so slow
    that the budget would not cover them: it is bound by compute, not by reading weights);
    None if the path fails."""
    try:
        first = build(0)
        first(x)
        start = time.perf_counter()
        first(x)
        once = time.perf_counter() - start
        copies = max(2, min(copies, int(budget_s / max(once * (repeats + 1), 1e-9))))
        functions = [first] + [build(index) for index in range(1, copies)]
        for function in functions:
            function(x)
    except (RuntimeError, NotImplementedError):
        return None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for function in functions:
            function(x)
        times.append((time.perf_counter() - start) / copies)
    return statistics.median(times)


def survey(shapes: list[tuple[int, int]], rows: list[int], repeats: int = 5,
           stream_bytes: int = STREAM_BYTES) -> list[dict]:
    results = []
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in shapes:
        copies = min(MAX_COPIES, max(2, stream_bytes // (out_features * in_features)))
        weights = [torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8,
                                 generator=generator) for _ in range(copies)]
        scales = [torch.rand(out_features, generator=generator) * 100 + 50 for _ in range(copies)]
        per_copy = [_paths(w, s) for w, s in zip(weights, scales, strict=True)]
        names = list(per_copy[0])
        for count in rows:
            x = torch.randn(count, in_features, generator=generator)
            for name in names:
                seconds = time_path(lambda index, name=name, table=per_copy: table[index][name],
                                    copies, x, repeats)
                results.append({"shape": f"{out_features}x{in_features}", "rows": count,
                                "path": name, "us": None if seconds is None else seconds * 1e6,
                                "gb_s": None if seconds is None else
                                out_features * in_features / seconds / 1e9})
        del per_copy, weights
    return results


def markdown(results: list[dict]) -> str:
    paths = list(dict.fromkeys(r["path"] for r in results))
    lines = ["| shape | M | " + " | ".join(paths) + " |", "|" + "---|" * (len(paths) + 2)]
    keys = list(dict.fromkeys((r["shape"], r["rows"]) for r in results))
    for shape, count in keys:
        cells = []
        for path in paths:
            found = next(r for r in results if (r["shape"], r["rows"], r["path"]) ==
                         (shape, count, path))
            cells.append("fails" if found["us"] is None else
                         f"{found['us']:.0f} us ({found['gb_s']:.0f} GB/s)")
        lines.append(f"| {shape} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .machine import cpu_model, physical_cores

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["410m", "2.8b"], choices=list(PYTHIA_SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 128, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    shapes = list(dict.fromkeys(s for name in args.shapes for s in projection_shapes(name)))
    print(f"{cpu_model()}, {threads} threads, torch {torch.__version__}")
    print(markdown(survey(shapes, args.rows, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
