"""Quality beside speed: perplexity of each engine and type on the same real text and tokens.

Runs on SmolLM2-135M (the one trained model at hand) over the first 2048 tokens of the GPL-3
text in tests/data, each engine in its own process like the speed runs, and reports the
change against kiln's float32 perplexity.

Keys are ENGINE:TYPE (`kiln:int4-g64`: int4 in groups of 64), and `llama.cpp-Q4_0:TYPE`: the
same weights quantized by llama.cpp's own Q4_0 (or Q8_0) quantizer (the `gguf` package's),
written as a GGUF file and run by kiln: `:float32` runs that file's weights exactly
(dequantized), `:int4` keeps its 4-bit blocks as kiln int4.

SmolLM2's file is itself Q4_1 (asymmetric 4-bit, blocks of 32): its "float32" weights lie on
a 32-block 4-bit grid, which kiln's int4 at group 32 keeps exactly and every other grid (Q4_0's
symmetric one, groups of 64 or 128) does not. A model trained in float would rank them the
same way but with smaller gaps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

TEXT = Path(__file__).resolve().parents[2] / "tests" / "data" / "GPL-3"
MAX_TOKENS = 2048
ENGINES = ("kiln:float32", "kiln:int8", "kiln:int4", "kiln:int4-g64", "kiln:int4-g128",
           "llama.cpp-Q8_0:float32", "llama.cpp-Q4_0:float32", "llama.cpp-Q4_0:int4",
           "ctranslate2:float32", "ctranslate2:int8", "transformers:float32")
LLAMA_CPP = "llama.cpp-"


def token_ids(kiln_folder: Path) -> list[int]:
    from kiln.generation.tokenizer import Tokenizer

    return Tokenizer.from_folder(kiln_folder).encode(TEXT.read_text(encoding="utf-8"))[:MAX_TOKENS]


def _perplexity(engine: str, compute_type: str, folder: Path, ids: list[int]) -> float:
    """Runs inside the worker process."""
    if engine == "kiln":
        import kiln
        from kiln.perplexity import perplexity

        generator = kiln.Generator(folder)  # in the type its folder stores
        return perplexity(generator, TEXT.read_text(encoding="utf-8"), MAX_TOKENS).perplexity
    if engine == "ctranslate2":
        import ctranslate2

        vocabulary = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
        tokens = [vocabulary[i] for i in ids]
        generator = ctranslate2.Generator(str(folder), compute_type=compute_type)
        result = generator.score_batch([tokens], max_input_length=len(tokens))[0]
        return math.exp(-sum(result.log_probs) / len(result.log_probs))
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, compute_type))
    with torch.inference_mode():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    return math.exp(loss.item())


def measure(folders: dict[str, Path], kiln_float_folder: Path) -> dict[str, float | str]:
    """{engine:type: perplexity or an error message}, each in a fresh process."""
    ids = token_ids(kiln_float_folder)
    results: dict[str, float | str] = {}
    for key, folder in folders.items():
        engine, compute_type = key.split(":")
        engine = "kiln" if engine.startswith(LLAMA_CPP) else engine
        code = ("import json, sys; from pathlib import Path; from kiln.bench.quality import "
                "_perplexity; print(json.dumps(_perplexity(sys.argv[1], sys.argv[2], "
                "Path(sys.argv[3]), json.loads(sys.argv[4]))))")
        process = subprocess.run([sys.executable, "-c", code, engine, compute_type, str(folder),
                                  json.dumps(ids)], capture_output=True, text=True)
        if process.returncode == 0:
            results[key] = float(process.stdout.strip().splitlines()[-1])
        else:
            results[key] = f"error: {process.stderr.strip().splitlines()[-1][:200]}"
    return results


def markdown(results: dict[str, float | str], reference_key: str = "kiln:float32") -> str:
    reference = results.get(reference_key)
    lines = [f"Perplexity, SmolLM2-135M-Instruct, first {MAX_TOKENS} tokens of GPL-3 "
             f"(change against {reference_key}):", "",
             "| engine:type | perplexity | change |", "|---|---|---|"]
    for key, value in results.items():
        if isinstance(value, float) and isinstance(reference, float):
            lines.append(f"| {key} | {value:.3f} | {100 * (value / reference - 1):+.2f}% |")
        else:
            lines.append(f"| {key} | {value} | |")
    return "\n".join(lines) + "\n"


def llama_cpp_folder(key: str, work_dir: Path) -> Path:
    """The kiln folder of `llama.cpp-KIND:TYPE`: SmolLM2's GGUF re-quantized by llama.cpp's
    KIND quantizer, then converted by kiln to TYPE; both built once."""
    import json

    from ..conversion import convert
    from .folders import build_once, converter_version
    from .gguf_requantize import requantize
    from .models import smollm2_gguf

    source, target = key[len(LLAMA_CPP):].split(":")
    original = smollm2_gguf()
    gguf_file = work_dir / "smollm2" / f"llama.cpp-{source}.gguf"
    recipe = json.dumps({"gguf": str(original), "bytes": original.stat().st_size, "to": source})
    build_once(gguf_file.parent / f"llama.cpp-{source}", recipe,
               lambda out: (out.mkdir(), requantize(original, gguf_file, source)))
    recipe = json.dumps({"gguf": recipe, "kiln": target, "converter": converter_version("kiln")})
    return build_once(work_dir / "smollm2" / f"llama.cpp-{source}-kiln-{target}", recipe,
                      lambda out: convert(gguf_file, out, quantization=target))


def main(argv: list[str] | None = None) -> int:
    """python -m kiln.bench.quality [--work-dir DIR] [KEY ...]: print the perplexity table
    (markdown) for KEYs (default: all of ENGINES)."""
    import argparse

    from .folders import DEFAULT_WORK_DIR, EngineType, engine_folder, resolve_models

    parser = argparse.ArgumentParser(prog="python -m kiln.bench.quality",
                                     description="Perplexity of SmolLM2 per engine and type.")
    parser.add_argument("keys", nargs="*", metavar="KEY",
                        help=f"ENGINE:TYPE or llama.cpp-KIND:TYPE (default: {' '.join(ENGINES)})")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR),
                        help="where the folders are built once (default: %(default)s)")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir).expanduser()
    keys = ["kiln:float32", *[key for key in (args.keys or ENGINES) if key != "kiln:float32"]]
    model = resolve_models(["smollm2"])[0]
    folders = {key: llama_cpp_folder(key, work_dir) if key.startswith(LLAMA_CPP)
               else engine_folder(model, EngineType.parse(key), work_dir) for key in keys}
    print(markdown(measure(folders, folders["kiln:float32"])), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
