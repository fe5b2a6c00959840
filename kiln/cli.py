"""The `kiln` command. Each subcommand has a parser builder and a runner; heavy imports
(torch) happen only when a command runs, so `kiln --help` is instant."""

from __future__ import annotations

import argparse
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


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="continue a prompt")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--model", required=True, help="a kiln folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--compute-type", default="default",
                        help="default, auto, float32, float16 or bfloat16")
    parser.add_argument("--max-length", type=int, default=64,
                        help="new tokens to generate at most (default: 64)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=1, help="1: greedy (default); 0: all")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from .generator import Generator

    generator = Generator(args.model, device=args.device, compute_type=args.compute_type,
                          seed=args.seed)
    tokenizer = generator.require_tokenizer()
    prompt_ids = tokenizer.encode(args.prompt)
    result = generator.generate_batch(
        [prompt_ids], max_length=args.max_length, include_prompt_in_result=False,
        sampling_topk=args.top_k, sampling_topp=args.top_p,
        sampling_temperature=args.temperature)[0]
    # Decode prompt and completion together: decoding them apart can lose a joining space.
    print(tokenizer.decode(prompt_ids + result.sequences_ids[0]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="Convert causal language models and run them fast.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_convert(subparsers)
    _add_generate(subparsers)
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
