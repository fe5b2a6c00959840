"""`kiln translate` and `kiln embed`: the translation and embedding models (kiln.Translator,
kiln.Encoder) from the command line. Texts come as arguments, or one per line on stdin."""

from __future__ import annotations

import argparse
import json
import sys


def add_translate(subparsers) -> None:
    parser = subparsers.add_parser(
        "translate", help="translate text with a seq2seq model (Marian, BART, M2M100, NLLB, T5)",
        description="Prints one translation per line. M2M100, NLLB and mBART need "
                    "--src-lang and --tgt-lang (codes as the model's tokenizer names them, "
                    "e.g. en and de, or eng_Latn and deu_Latn).")
    parser.add_argument("text", nargs="*", help="texts to translate (default: lines of stdin)")
    _add_common(parser)
    parser.add_argument("--src-lang", default=None, help="source language code")
    parser.add_argument("--tgt-lang", default=None, help="target language code")
    parser.add_argument("--beam-size", type=int, default=2, help="beam width (default: 2)")
    parser.add_argument("--max-decoding-length", type=int, default=256,
                        help="target tokens at most (default: 256)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="texts translated together (default: 32)")
    parser.set_defaults(run=_run_translate)


def add_embed(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed", help="sentence embeddings from an encoder model (BERT family)",
        description="Prints one JSON array per text (JSON Lines), pooled and normalized as the "
                    "model's sentence-transformers files say.")
    parser.add_argument("text", nargs="*", help="texts to embed (default: lines of stdin)")
    _add_common(parser)
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="unit-length vectors (default: as the model's files say)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="texts embedded together (default: 32)")
    parser.set_defaults(run=_run_embed)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a Hugging Face or CTranslate2 folder, a kiln folder or a hub id")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--compute-type", default="default",
                        help="default (as stored), auto, int8, float32, float16, ... ")


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.text) or [line.rstrip("\n") for line in sys.stdin]
    if not texts:
        raise ValueError("no text: give texts as arguments or lines on stdin")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    return texts


def _run_translate(args: argparse.Namespace) -> int:
    from .compat import MultiLingualTranslatorCT2fromHfHub, TranslatorCT2fromHfHub

    texts = _texts(args)
    if (args.src_lang is None) != (args.tgt_lang is None):
        raise ValueError("give both --src-lang and --tgt-lang, or neither")
    multilingual = args.src_lang is not None
    kind = MultiLingualTranslatorCT2fromHfHub if multilingual else TranslatorCT2fromHfHub
    model = kind(args.model, device=args.device, compute_type=args.compute_type,
                 hub_kwargs={"revision": args.revision} if args.revision else None)
    options = dict(beam_size=args.beam_size, max_decoding_length=args.max_decoding_length,
                   max_batch_size=args.batch_size,
                   decode_tok_kwargs={"skip_special_tokens": True})
    if multilingual:
        options.update(src_lang=args.src_lang, tgt_lang=args.tgt_lang)
    for start in range(0, len(texts), args.batch_size):
        for line in model.generate(texts[start:start + args.batch_size], **options):
            print(line, flush=True)
    return 0


def _run_embed(args: argparse.Namespace) -> int:
    from .encoder import Encoder

    texts = _texts(args)
    encoder = Encoder(args.model, device=args.device, compute_type=args.compute_type,
                      revision=args.revision)
    for start in range(0, len(texts), args.batch_size):
        vectors = encoder.embed(texts[start:start + args.batch_size], args.batch_size,
                                args.normalize)
        for vector in vectors.tolist():
            print(json.dumps(vector), flush=True)
    return 0
