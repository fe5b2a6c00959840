"""kiln on a GPU in one call: (a) correctness against transformers on the same card, (b) decode
speed at Pythia shapes against transformers float16, with the fraction of the measured copy
bandwidth. Prints a table last and writes JSON. Runs from the source tree; needs only torch
and transformers (plus kiln's small dependencies). `--device cpu --shapes tiny` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kiln  # noqa: E402
from kiln.bench.random_folder import pythia_spec, write_random_folder  # noqa: E402
from kiln.quant.compute_types import ComputeType  # noqa: E402
from kiln.quant.int4 import Int4Linear  # noqa: E402

SHAPES = {"tiny": (128, 2, 4), "410m": (1024, 24, 16), "1b": (2048, 16, 8),
          "2.8b": (2560, 32, 32), "12b": (5120, 36, 40)}
# TYPE@BACKEND: an int8 backend other than the device's default (int_mm: W8A8 for prompts).
CORRECTNESS_TYPES = ("float32", "bfloat16", "int8_float16", "int8_bfloat16", "int8_float16@int_mm",
                     "int4_bfloat16", "int4_float16")
PROMPT_TOKENS = 80  # over 64 rows: the prompt takes the many-rows path of every int8 backend
SPEED_PROMPT = list(range(10, 42))  # the 32-token prompt of every speed run


def tiny_models():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    yield "gpt_neox", GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=512, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=512, rotary_pct=0.25, max_position_embeddings=256))
    yield "llama", LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=256, max_position_embeddings=256))


def correctness(device: str, work: Path) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 must mean float32 on both sides
    rows = []
    prompt = torch.randint(3, 500, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    for family, model in tiny_models():
        model.eval().save_pretrained(work / family)
        folder = kiln.convert(work / family, work / f"{family}-kiln", force=True)
        reference = model.to(device)
        with torch.inference_mode():
            expected = reference(prompt.to(device)).logits.float().cpu()
            expected_ids = reference.generate(prompt.to(device), max_new_tokens=32, do_sample=False,
                                              eos_token_id=None, pad_token_id=0)[0, PROMPT_TOKENS:].tolist()
        for label in CORRECTNESS_TYPES:
            compute_type, _, backend = label.partition("@")
            row = {"family": family, "compute_type": label}
            try:
                generator = kiln.Generator(folder, device=device, compute_type=compute_type,
                                           int8_backend=backend or "auto")
                actual = generator.forward_batch(prompt.tolist()).cpu()
                options = dict(max_length=32, end_token=[], include_prompt_in_result=False)
                ids = generator.generate_batch(prompt.tolist(), **options)[0].sequences_ids[0]
                row["graph_vs_eager"] = graph_vs_eager(generator, prompt[0, :17].tolist())
                row.update(max_abs_diff=(actual - expected).abs().max().item(),
                           relative_error=((actual - expected).norm() / expected.norm()).item(),
                           greedy_agreement=sum(a == b for a, b in zip(ids, expected_ids, strict=True)) / 32)
                # 4-bit weights move logits ~8% per layer on these random models
                limit = 0.25 if compute_type.startswith("int4") else 0.05
                int4_layers = [m for m in generator.model.modules() if isinstance(m, Int4Linear)]
                if int4_layers:  # the tinygemm kernel, not the slow exact fallback
                    row["int4_kernel"] = sum(m.uses_kernel for m in int4_layers) / len(int4_layers)
                row["ok"] = row["graph_vs_eager"] < (1e-5 if compute_type == "float32" else 2e-2) and (
                    row["max_abs_diff"] <= 1e-3 and row["greedy_agreement"] == 1.0
                    if compute_type == "float32" else row["relative_error"] < limit
                ) and row.get("int4_kernel", 1.0) == 1.0
            except Exception as error:  # one failing type must not hide the others
                row.update(ok=False, error=f"{type(error).__name__}: {error}")
            rows.append(row)
    return rows


def graph_vs_eager(generator, prompt: list[int], steps: int = 16) -> float:
    """The largest relative logits difference between the decode step as replayed (a CUDA graph;
    a trace on CPU) for a padded batch (3 rows run as 4) and the eager step, fed the same
    tokens for `steps`."""
    from kiln.generation.static_step import StaticDecodeStep, batch_bucket, default_capture
    from kiln.model.kv_cache import KVCache

    model, device, rows = generator.model, generator.engine.loaded.device, 3
    static = StaticDecodeStep(model, default_capture(device))
    caches = [KVCache(generator.spec, slots, len(prompt) + steps, generator.engine.kv_cache_dtype,
                      device) for slots in (rows, batch_bucket(rows))]
    tokens = torch.tensor([prompt] * rows, device=device)
    positions = torch.arange(len(prompt), device=device).expand(rows, -1)
    worst = 0.0
    with torch.inference_mode():
        for cache in caches:
            logits = model(tokens, positions, cache, kv_length=len(prompt))[:, -1]
        for step in range(steps):
            ids = logits.argmax(-1)
            position = torch.full((rows,), len(prompt) + step, device=device)
            kv_length = len(prompt) + step + 1
            logits = model(ids[:, None], position[:, None], caches[0], kv_length=kv_length,
                           decode=True)[:, -1]
            replayed = static.step(ids, position, caches[1], kv_length)
            worst = max(worst, ((replayed - logits).norm() / logits.norm()).item())
    return worst


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def copy_bandwidth(device: str) -> float:
    source = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    target = torch.empty_like(source)
    target.copy_(source)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    _sync(device)
    return 2 * source.nbytes * 10 / (time.perf_counter() - start)


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_rate(run, batch: int, new_tokens: int, device: str) -> tuple[float, float]:
    """(decode tokens/s, seconds of the prompt alone)."""
    run(batch, 8)  # warm-up: Triton tunes its kernels and the decode step graph is captured
    _sync(device)
    start = time.perf_counter()
    run(batch, 1)
    _sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    run(batch, new_tokens)
    _sync(device)
    return batch * (new_tokens - 1) / (time.perf_counter() - start - first), first


def kiln_speed(shape: str, compute_type: str, batches, new_tokens: int, device: str,
               work: Path, static_decode: bool = True, int8_backend: str = "auto") -> dict:
    spec = pythia_spec(*SHAPES[shape])
    compute = ComputeType.parse(compute_type)
    folder = write_random_folder(spec, work / f"{shape}-{compute_type}", compute)
    weight_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    generator = kiln.Generator(folder, device=device, compute_type=compute_type,
                               int8_backend=int8_backend)
    generator.static_decode = static_decode

    def run(batch, tokens):
        generator.generate_batch([SPEED_PROMPT] * batch, max_length=tokens, min_length=tokens,
                                 end_token=[], include_prompt_in_result=False)

    measured = {batch: decode_rate(run, batch, new_tokens, device) for batch in batches}
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    shutil.rmtree(folder)
    return {"rates": {batch: rate for batch, (rate, _) in measured.items()},
            "prefill_tokens_per_s": {batch: batch * len(SPEED_PROMPT) / first
                                     for batch, (_, first) in measured.items()},
            "weight_bytes": weight_bytes, "peak_gpu_bytes": peak}


def transformers_speed(shape: str, batches, new_tokens: int, device: str) -> dict:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads = SHAPES[shape]
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=4 * hidden,
                           rotary_pct=0.25, max_position_embeddings=2048)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = GPTNeoXForCausalLM._from_config(config, dtype=dtype).eval()
    prompt = torch.tensor(SPEED_PROMPT, device=device)

    def run(batch, tokens):
        with torch.inference_mode():
            model.generate(prompt.repeat(batch, 1), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=0)

    measured = {batch: decode_rate(run, batch, new_tokens, device) for batch in batches}
    return {"rates": {batch: rate for batch, (rate, _) in measured.items()},
            "prefill_tokens_per_s": {batch: batch * len(SPEED_PROMPT) / first
                                     for batch, (_, first) in measured.items()}}


def speculative_pair(draft_shape: str, target_shape: str, device: str, work: Path,
                     k: int = 4) -> dict:
    """A draft/target pair (random weights, int8_float16): greedy with the draft equals plain
    greedy, and what a trained pair's speed-up depends on here: c (a draft step / a target
    step), v (a target pass over k+1 rows / one row), the speed-up predicted for acceptance a."""
    from kiln.bench.speculative import pass_seconds

    compute = ComputeType.parse("int8_float16")
    folders = [write_random_folder(pythia_spec(*SHAPES[shape]), work / f"spec-{role}-{shape}",
                                   compute)
               for role, shape in (("draft", draft_shape), ("target", target_shape))]
    plain = kiln.Generator(folders[1], device=device, compute_type="int8_float16")
    options = dict(max_length=16, end_token=[], include_prompt_in_result=False)
    expected = plain.generate_batch([SPEED_PROMPT], **options)[0].sequences_ids
    target_step = pass_seconds(plain.engine.runner, 1, repeats=20)
    verify = pass_seconds(plain.engine.runner, k + 1, repeats=20)
    del plain
    _free(device)
    fast = kiln.Generator(folders[1], device=device, compute_type="int8_float16",
                          draft_model=folders[0], draft_compute_type="int8_float16")
    same = fast.generate_batch([SPEED_PROMPT], num_speculative_tokens=k,
                               **options)[0].sequences_ids == expected
    c = pass_seconds(fast.engine.draft.runner, 1, repeats=20) / target_step
    v = verify / target_step
    del fast
    for folder in folders:
        shutil.rmtree(folder)
    predicted = {a: (1 - a ** (k + 1)) / ((1 - a) * (k * c + v)) for a in (0.7, 0.8, 0.9)}
    return {"draft": draft_shape, "target": target_shape, "k": k, "greedy_equal": same,
            "c": c, "v": v, "target_step_ms": target_step * 1e3, "predicted": predicted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=["1b", "2.8b", "12b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--output", default="benchmarks/results/gpu_check.json")
    parser.add_argument("--speculative", nargs=2, default=["410m", "12b"],
                        metavar=("DRAFT", "TARGET"), help="the speculative-decoding pair")
    args = parser.parse_args()
    report = {"device": args.device, "date": time.strftime("%Y-%m-%d"),
              "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "triton": _triton_version()}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        report["correctness"] = correctness(args.device, work)
        report["copy_bandwidth_bytes_per_s"] = bandwidth = copy_bandwidth(args.device)
        report["speed"] = []
        for index, shape in enumerate(args.shapes):
            # The first shape also runs eager decode steps (what the CUDA graphs are worth) and
            # W8A8 for prompts and batches over 64 rows (int8_backend="int_mm").
            variants = [("int8_float16", True, "auto"), ("int4_bfloat16", True, "auto"),
                        ("bfloat16", True, "auto")]
            if index == 0:
                variants += [("int8_float16", False, "auto"), ("int8_float16", True, "int_mm")]
            for compute_type, graphs, backend in variants:
                try:
                    result = kiln_speed(shape, compute_type, args.batches, args.new_tokens,
                                        args.device, work, static_decode=graphs,
                                        int8_backend=backend)
                except Exception as error:
                    result = {"error": f"{type(error).__name__}: {error}"}
                label = (f"kiln:{compute_type}" + ("" if graphs else " eager")
                         + ("" if backend == "auto" else f" {backend}"))
                report["speed"].append({"shape": shape, "engine": label, **result})
                _free(args.device)
            try:
                result = transformers_speed(shape, args.batches, args.new_tokens, args.device)
            except Exception as error:
                result = {"error": f"{type(error).__name__}: {error}"}
            report["speed"].append({"shape": shape, "engine": "transformers:float16", **result})
            _free(args.device)
        try:
            report["speculative"] = speculative_pair(*args.speculative, args.device, work)
        except Exception as error:
            report["speculative"] = {"error": f"{type(error).__name__}: {error}"}
        _free(args.device)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print_table(report, bandwidth)
    # Speculative greedy equality is reported, not required: on CUDA attention is not batch-
    # invariant (SDPA), so a near-tie may flip between a verify pass and a decode step.
    return 0 if all(row["ok"] for row in report["correctness"]) else 1


def print_table(report: dict, bandwidth: float) -> None:
    print(f"\n{report['card']} ({report['device']}), torch {report['torch']}, "
          f"triton {report['triton']}, {report['date']}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    print("\ncorrectness (tiny random models, kiln vs transformers on the same device):")
    for row in report["correctness"]:
        detail = row.get("error") or (f"max|diff| {row['max_abs_diff']:.2e}  "
                                      f"rel {row['relative_error']:.2e}  "
                                      f"greedy {row['greedy_agreement']:.0%}  "
                                      f"graph vs eager {row['graph_vs_eager']:.1e}")
        print(f"  {'ok  ' if row['ok'] else 'FAIL'} {row['family']:9} {row['compute_type']:19} {detail}")
    print("\ndecode tokens/s (fraction of the copy-bandwidth ceiling at batch 1; peak GPU memory; "
          "prompt tokens/s at the largest batch):")
    for row in report["speed"]:
        if "error" in row:
            print(f"  {row['shape']:5} {row['engine']:22} error: {row['error'][:100]}")
            continue
        rates = "  ".join(f"b{b}: {r:8.1f}" for b, r in row["rates"].items())
        extra = ""
        if row.get("weight_bytes"):
            ceiling = bandwidth / 2 / row["weight_bytes"]  # read bandwidth ~ half of copy traffic
            extra = f"  {row['rates'][min(row['rates'])] / ceiling:.0%} of ceiling"
        if row.get("peak_gpu_bytes"):
            extra += f"  peak {row['peak_gpu_bytes'] / 2**30:.1f} GiB"
        if row.get("prefill_tokens_per_s"):
            extra += f"  prompt {row['prefill_tokens_per_s'][max(row['prefill_tokens_per_s'])]:.0f}/s"
        print(f"  {row['shape']:5} {row['engine']:22} {rates}{extra}")
    spec = report["speculative"]
    if "error" in spec:
        print(f"\nspeculative decoding: error: {spec['error'][:200]}")
        return
    predicted = "  ".join(f"a={a}: {x:.2f}x" for a, x in spec["predicted"].items())
    print(f"\nspeculative decoding, {spec['draft']} drafting for {spec['target']} (k={spec['k']}):"
          f" greedy {'equal' if spec['greedy_equal'] else 'DIFFERENT'}; c {spec['c']:.3f}, "
          f"v {spec['v']:.2f}, target step {spec['target_step_ms']:.1f} ms; predicted {predicted}")


if __name__ == "__main__":
    raise SystemExit(main())
