"""One engine in one fresh process: load, warm up, time R runs, print one JSON line.

Run as `python -m kiln.bench.worker --engine kiln --model DIR ...`. A run is a 1-token call
(the time to first token, which is the prefill) then an N-token call; decoding speed is
B*(N-1) / (time(N) - time(1)), the same arithmetic for every engine. Only the standard
library is imported before the engine, so import time and peak RSS are the engine's own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
import traceback
from pathlib import Path


def prompt_ids(seed: int, batch: int, length: int, vocab: int) -> list[list[int]]:
    """Random ids in [1, vocab): the same seed gives every engine the same prompts."""
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(batch)]


def _timed(engine, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    lengths = engine.generate(prompts, new_tokens)
    elapsed = time.perf_counter() - start
    if any(length != new_tokens for length in lengths):
        raise RuntimeError(f"asked for {new_tokens} new tokens per prompt, got {lengths}: the "
                           "engine stopped early although min_length was set")
    return elapsed


def measure(engine, prompts: list[list[int]], new_tokens: int, runs: int) -> dict:
    batch, length = len(prompts), len(prompts[0])
    start = time.perf_counter()
    # Both shapes of call (prefill alone, prefill + decode steps), so no first-call cost lands
    # in a timing; a short decode is enough to warm every code path.
    _timed(engine, prompts, 1)
    _timed(engine, prompts, min(new_tokens, 8))
    warmup = time.perf_counter() - start
    timed = []
    for _ in range(runs):
        first = _timed(engine, prompts, 1)
        total = _timed(engine, prompts, new_tokens)
        decode = total - first
        timed.append({
            "ttft_s": first, "total_s": total,
            "prefill_tokens_per_s": batch * length / first,
            "decode_tokens_per_s": (batch * (new_tokens - 1) / decode
                                    if new_tokens > 1 and decode > 0 else None),
        })
    return {"warmup_s": warmup, "measurements": timed}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux VmHWM, not ru_maxrss: ru_maxrss keeps
    the parent's peak across fork + exec, so every worker would report at least the harness's."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _tokenizer_size(folder: Path) -> int:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no tokenizer.json to size the prompts from; pass --vocab")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    ids = [*(vocab.values() if isinstance(vocab, dict) else range(len(vocab))),
           *(token["id"] for token in tokenizer.get("added_tokens", []))]
    return max(ids) + 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kiln.bench.worker", description=__doc__)
    parser.add_argument("--engine", required=True, choices=["kiln", "ctranslate2", "transformers"])
    parser.add_argument("--model", required=True, help="the folder the engine loads")
    parser.add_argument("--compute-type", default="default",
                        help="kiln: default/float32/...; CTranslate2: int8/float32/...; "
                             "transformers: a torch dtype name")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=None,
                        help="prompt ids are drawn below this (default: the folder's tokenizer size)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in ("batch", "prompt_tokens", "new_tokens", "threads", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    from .engines import ENGINES

    record = dict(vars(args))
    vocab = args.vocab or _tokenizer_size(Path(args.model))
    prompts = prompt_ids(args.seed, args.batch, args.prompt_tokens, vocab)
    engine = ENGINES[args.engine]()
    import_s, load_s = engine.load(args.model, args.compute_type, args.threads, args.device)
    record.update(import_s=import_s, load_s=load_s, compute_type_used=engine.compute_type,
                  int8_backend_used=getattr(engine, "int8_backend", None))
    record.update(measure(engine, prompts, args.new_tokens, args.runs))
    record.update(peak_rss_bytes=peak_rss_bytes(), peak_device_bytes=engine.peak_device_bytes())
    return record


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    try:
        record = run(args)
    except Exception as error:  # reported as data: the harness records it in the engine's cell
        traceback.print_exc()
        record = {**vars(args), "error": f"{type(error).__name__}: {error}",
                  "peak_rss_bytes": peak_rss_bytes()}
        print(json.dumps(record), flush=True)
        return 1
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
