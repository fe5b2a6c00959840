"""The `kiln` command. Each subcommand has a parser builder and a runner; heavy imports
(torch) happen only when a command runs, so `kiln --help` is instant."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import KilnError
from .quant.compute_types import DEFAULT_GROUP_SIZE, GROUP_SIZES, NAMED


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert a checkpoint into a kiln folder")
    parser.add_argument("source", help="a Hugging Face checkpoint folder, a .gguf file or a hub id")
    parser.add_argument("output_dir", help="the kiln folder to write")
    parser.add_argument("--quantization", choices=list(NAMED),
                        help="weight type to store (default: the checkpoint's)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                        help=f"int4: input columns per scale and minimum (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--copy-files", nargs="+", default=None, metavar="FILE",
                        help="extra files of the source folder to copy")
    parser.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .sources.hub import convert_source

    output = convert_source(args.source, args.output_dir, quantization=args.quantization,
                            force=args.force, copy_files=args.copy_files, revision=args.revision,
                            progress=sys.stderr.isatty(), group_size=args.group_size)
    print(f"wrote {output}")
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a kiln folder, a Hugging Face folder, a .gguf file or a hub id "
                             "(converted once into the cache); default: kiln's default model, "
                             "SmolLM2-135M-Instruct")
    parser.add_argument("--revision", default=None,
                        help="hub revision (branch, tag or commit), e.g. step3000")
    parser.add_argument("--cache-dir", default=None,
                        help="where converted models are kept (default: $KILN_CACHE_DIR or the "
                             "per-user cache folder)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--compute-type", default="default",
                        help="default, auto, a float type (float32, float16, bfloat16), int8 "
                             "(int8_float32, ...) or int4 (int4_float32, ...)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                        help=f"int4 compute types: input columns per scale (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--tensor-parallel", action="store_true",
                        help="one rank of `torchrun --nproc-per-node N -m kiln ...`: hold 1/N "
                             "of every layer (rank 0 prints)")


def _add_sampling_options(parser: argparse.ArgumentParser, max_length: int) -> None:
    parser.add_argument("--max-length", type=int, default=max_length,
                        help=f"new tokens to generate at most (default: {max_length})")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=1, help="1: greedy (default); 0: all")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def _load(args: argparse.Namespace, **engine_options):
    from .generator import Generator

    engine_options.update(_draft(args))
    if getattr(args, "group_size", None) is not None:
        engine_options["group_size"] = args.group_size
    if getattr(args, "tensor_parallel", False):
        engine_options["tensor_parallel"] = True
    if args.model is None:
        if args.revision is not None:
            raise ValueError("--revision needs --model (a hub id)")
        return Generator(device=args.device, compute_type=args.compute_type, seed=args.seed,
                         cache_dir=args.cache_dir, **engine_options)
    return Generator.from_pretrained(args.model, revision=args.revision, device=args.device,
                                     compute_type=args.compute_type, seed=args.seed,
                                     cache_dir=args.cache_dir, **engine_options)


def _add_speculation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-lookup", action="store_true",
                        help="speculative decoding with proposals from the text itself (same "
                             "greedy output; faster when the output repeats the input)")
    parser.add_argument("--draft-model", default=None,
                        help="speculative decoding with this smaller model (same tokenizer) "
                             "proposing tokens: a folder, .gguf file or hub id")
    parser.add_argument("--draft-compute-type", default="default",
                        help="the draft model's compute type (default: as stored)")
    parser.add_argument("--speculative-tokens", type=int, default=4, metavar="K",
                        help="proposals verified per model pass (default: 4)")


def _speculation(args: argparse.Namespace) -> dict:
    if not (args.prompt_lookup or args.draft_model):
        return {}
    return dict(prompt_lookup=args.prompt_lookup, num_speculative_tokens=args.speculative_tokens)


def _draft(args: argparse.Namespace) -> dict:
    if not getattr(args, "draft_model", None):
        return {}
    return dict(draft_model=args.draft_model, draft_compute_type=args.draft_compute_type)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_length=args.max_length, sampling_topk=args.top_k, sampling_topp=args.top_p,
                sampling_temperature=args.temperature, **_speculation(args))


def _print_stream(pieces) -> None:
    out = sys.stdout if _is_first_rank() else open(os.devnull, "w")  # noqa: SIM115
    for piece in pieces:  # every rank runs every step; one prints
        out.write(piece)
        out.flush()
    out.write("\n")


def _is_first_rank() -> bool:
    """True unless this process is a tensor-parallel rank other than 0."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="continue a prompt, printing as it goes")
    parser.add_argument("prompt", help="the text to continue (with --chat: the question)")
    parser.add_argument("--chat", action="store_true",
                        help="ask the prompt as a chat message through the model's chat template")
    _add_model_options(parser)
    _add_sampling_options(parser, max_length=64)
    _add_speculation_options(parser)
    parser.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    generator = _load(args)
    if args.chat:
        _print_stream(generator.stream_chat(args.prompt, **_sampling(args)))
        return 0
    pieces = generator.stream(args.prompt, **_sampling(args))
    first = next(pieces, "")  # errors surface before the prompt is echoed
    if _is_first_rank():
        sys.stdout.write(args.prompt)
    _print_stream(itertools.chain([first], pieces))
    return 0


def _add_chat(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="talk with the model (an interactive loop)")
    parser.add_argument("--system", default=None, help="a system message to start with")
    _add_model_options(parser)
    _add_sampling_options(parser, max_length=512)
    _add_speculation_options(parser)
    parser.set_defaults(run=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    generator = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("kiln chat: type a message; an empty line or Ctrl-D quits.")
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        pieces = []
        for piece in generator.stream_chat(messages, **_sampling(args)):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark kiln against CTranslate2 and transformers, side by side",
        description="Build Pythia-shaped random models (and SmolLM2-135M) once, run every engine "
                    "in its own fresh process, and write results.json, a markdown table, a chart "
                    "and BENCHMARKS.md. Takes hours with the defaults.")
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help="160m, 410m, 1b, smollm2, or names given by --model-config "
                             "(default: 160m 410m 1b smollm2)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8], metavar="B")
    parser.add_argument("--prompt-tokens", nargs="+", type=int, default=[32, 512], metavar="P")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3,
                        help="fresh processes per engine and case (default: 3)")
    parser.add_argument("--engines", nargs="+", metavar="ENGINE:TYPE",
                        default=["kiln:int8", "kiln:float32", "ctranslate2:int8",
                                 "ctranslate2:float32", "transformers:float32",
                                 "transformers:bfloat16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every engine (default: the physical cores)")
    parser.add_argument("--work-dir", default="~/.cache/kiln/bench",
                        help="where models are built once and reused (default: ~/.cache/kiln/bench)")
    parser.add_argument("--output", default="benchmarks/results",
                        help="folder for results.json, results.md and the chart")
    parser.add_argument("--benchmarks-md", default="BENCHMARKS.md",
                        help="the file whose section for this output folder is written")
    parser.add_argument("--no-benchmarks-md", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--model-config", action="append", metavar="NAME=JSON",
                        help='an extra Pythia shape, e.g. tiny=\'{"hidden_size": 64, '
                             '"num_layers": 2, "num_heads": 4}\'')
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--bandwidth-gib", type=float, default=2.0,
                        help="size of the bandwidth measurement's tensor (default: 2)")
    parser.add_argument("--worker-timeout", type=float, default=3600.0,
                        help="seconds before a worker is stopped and recorded as an error")
    parser.add_argument("--concurrency", nargs="+", type=int, default=None, metavar="N",
                        help="measure the engine instead: N requests with max_length drawn from "
                             "16-256 submitted at once vs the same requests one after another "
                             "(aggregate tokens/s, TTFT, inter-token latency); kiln engines only")
    parser.add_argument("--speculative", action="store_true",
                        help="measure speculative decoding instead: prompt lookup on SmolLM2 "
                             "with and without, acceptance, tokens per pass, verify cost (more "
                             "with python benchmarks/speculative.py)")
    parser.add_argument("--profile", action="store_true",
                        help="split one kiln int8 decode step and prompt chunk by operator "
                             "class (int8 GEMM, activation quantization, attention, norms, "
                             "sampling, host) for each --models and --batch")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build and convert the models into --work-dir, measure nothing")
    parser.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from .bench.run import options_from_args, run_bench

    if args.speculative:
        from .bench.speculative import main as speculative

        speculative(["--runs", str(args.runs), "--tokens", str(args.new_tokens)])
        return 0
    if args.profile:
        from .bench.profile import run_profile

        run_profile(options_from_args(args))
        return 0
    run_bench(options_from_args(args))
    return 0


def _add_perplexity(subparsers) -> None:
    parser = subparsers.add_parser("perplexity", help="measure a model's perplexity on a text file")
    parser.add_argument("file", help="a UTF-8 text file")
    parser.add_argument("--max-tokens", type=int, default=2048,
                        help="score the first N tokens (default: 2048; 0: all)")
    parser.add_argument("--window", type=int, default=None,
                        help="tokens per forward pass (default: the model's context)")
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    _add_model_options(parser)
    parser.set_defaults(run=_run_perplexity)


def _run_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .perplexity import perplexity

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{args.file} is not UTF-8 text: {error}") from error
    generator = _load(args)
    result = perplexity(generator, text, max_tokens=args.max_tokens or None, window=args.window)
    if _is_first_rank():
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
              f"({generator.compute_type}, {result.windows} window(s))")
    return 0


def _add_cache(subparsers) -> None:
    parser = subparsers.add_parser("cache", help="list or remove converted models")
    parser.add_argument("action", choices=["ls", "rm"])
    parser.add_argument("pattern", nargs="?", default=None,
                        help="for rm: part of a source or folder, or 'all'")
    parser.add_argument("--cache-dir", default=None)
    parser.set_defaults(run=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    from .sources.model_store import format_table, remove, stored_models

    if args.action == "ls":
        print(format_table(stored_models(args.cache_dir)))
        return 0
    if not args.pattern:
        raise ValueError("kiln cache rm needs what to remove: part of a source, or 'all'")
    for folder in remove(args.pattern, args.cache_dir):
        print(f"removed {folder}")
    return 0


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a model on lm-evaluation-harness tasks (pip install 'kiln[lmeval]')")
    parser.add_argument("model", nargs="?", default=None,
                        help="a kiln folder, Hugging Face folder, .gguf file or hub id "
                             "(default: kiln's default model)")
    parser.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                        help="lm-eval task names, e.g. lambada_openai")
    parser.add_argument("--revision", default=None, help="hub revision, e.g. step3000")
    parser.add_argument("--compute-type", default="default")
    parser.add_argument("--group-size", type=int, default=None, help="int4 groups")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None,
                        help="items per task (a fraction below 1)")
    parser.add_argument("--include-path", default=None, help="a folder of extra task YAMLs")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise ValueError("kiln eval needs lm-evaluation-harness: pip install 'kiln[lmeval]'") \
            from None
    import json

    from .lmeval import KilnLM

    model = KilnLM(model=args.model, revision=args.revision, compute_type=args.compute_type,
                   device=args.device, batch_size=args.batch_size, group_size=args.group_size)
    results = lm_eval.simple_evaluate(
        model=model, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
        task_manager=TaskManager(include_path=args.include_path))
    print(make_table(results))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, default=str)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .cli_seq2seq import add_embed, add_translate
    from .cli_serve import add_serve  # here: cli_serve builds on this module's options

    parser = argparse.ArgumentParser(
        prog="kiln", description="Convert causal language models and run them fast.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_convert(subparsers)
    _add_generate(subparsers)
    _add_chat(subparsers)
    _add_perplexity(subparsers)
    _add_eval(subparsers)
    _add_cache(subparsers)
    add_translate(subparsers)
    add_embed(subparsers)
    add_serve(subparsers)
    _add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (KilnError, ValueError, FileNotFoundError, FileExistsError, TypeError) as error:
        # One line, no traceback: kiln's own errors and the bad-input errors it raises.
        print(f"kiln {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
