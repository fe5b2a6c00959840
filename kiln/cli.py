"""The `kiln` command. Each subcommand has a parser builder and a runner; heavy imports
(torch) happen only when a command runs, so `kiln --help` is instant."""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence

from . import __version__


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert a checkpoint into a kiln folder")
    parser.add_argument("source", help="a Hugging Face checkpoint folder")
    parser.add_argument("output_dir", help="the kiln folder to write")
    parser.add_argument("--quantization", choices=["float32", "float16", "bfloat16"],
                        help="weight type to store (default: the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--copy-files", nargs="+", default=None, metavar="FILE",
                        help="extra files of the source folder to copy")
    parser.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .conversion import convert

    output = convert(args.source, args.output_dir, quantization=args.quantization,
                     force=args.force, copy_files=args.copy_files)
    print(f"wrote {output}")
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a kiln folder (default: kiln's default model, SmolLM2-135M-Instruct)")
    parser.add_argument("--cache-dir", default=None,
                        help="where converted models are kept (default: $KILN_CACHE_DIR or the "
                             "per-user cache folder)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--compute-type", default="default",
                        help="default, auto, float32, float16 or bfloat16")


def _add_sampling_options(parser: argparse.ArgumentParser, max_length: int) -> None:
    parser.add_argument("--max-length", type=int, default=max_length,
                        help=f"new tokens to generate at most (default: {max_length})")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=1, help="1: greedy (default); 0: all")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def _load(args: argparse.Namespace):
    from .generator import Generator

    return Generator(args.model, device=args.device, compute_type=args.compute_type,
                     seed=args.seed, cache_dir=args.cache_dir)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_length=args.max_length, sampling_topk=args.top_k, sampling_topp=args.top_p,
                sampling_temperature=args.temperature)


def _print_stream(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="continue a prompt, printing as it goes")
    parser.add_argument("prompt", help="the text to continue (with --chat: the question)")
    parser.add_argument("--chat", action="store_true",
                        help="ask the prompt as a chat message through the model's chat template")
    _add_model_options(parser)
    _add_sampling_options(parser, max_length=64)
    parser.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    generator = _load(args)
    if args.chat:
        _print_stream(generator.stream_chat(args.prompt, **_sampling(args)))
        return 0
    pieces = generator.stream(args.prompt, **_sampling(args))
    first = next(pieces, "")  # errors surface before the prompt is echoed
    sys.stdout.write(args.prompt)
    _print_stream(itertools.chain([first], pieces))
    return 0


def _add_chat(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="talk with the model (an interactive loop)")
    parser.add_argument("--system", default=None, help="a system message to start with")
    _add_model_options(parser)
    _add_sampling_options(parser, max_length=512)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="Convert causal language models and run them fast.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_convert(subparsers)
    _add_generate(subparsers)
    _add_chat(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as error:
        print(f"kiln {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
