"""A GPT-NeoX-shaped CTranslate2 model.bin of any size, written directly (no converter run):
for memory tests on files too large to build through transformers in a test."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

SCALARS = {"i32": ("<i", 3), "i16": ("<h", 2), "i8": ("<b", 1)}


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variables(hidden: int, layers: int, vocab: int, heads: int) -> dict[str, tuple]:
    variables: dict[str, tuple] = {
        "decoder/embeddings/weight": ("f", (vocab, hidden)),
        "decoder/projection/weight": ("f", (vocab, hidden)),
        "decoder/layer_norm/gamma": ("f", (hidden,)), "decoder/layer_norm/beta": ("f", (hidden,)),
        "decoder/num_heads": ("i16", heads), "decoder/pre_norm": ("i8", 1),
        "decoder/activation": ("i8", 3), "decoder/scale_embeddings": ("i8", 0),
    }
    shapes = {"self_attention/linear_0": (3 * hidden, hidden),
              "self_attention/linear_1": (hidden, hidden),
              "ffn/linear_0": (4 * hidden, hidden), "ffn/linear_1": (hidden, 4 * hidden)}
    for i in range(layers):
        prefix = f"decoder/layer_{i}/"
        for norm in ("input_layer_norm", "post_attention_layer_norm"):
            variables[f"{prefix}{norm}/gamma"] = ("f", (hidden,))
            variables[f"{prefix}{norm}/beta"] = ("f", (hidden,))
        for linear, shape in shapes.items():
            variables[f"{prefix}{linear}/weight"] = ("f", shape)
            variables[f"{prefix}{linear}/bias"] = ("f", shape[:1])
        variables[f"{prefix}self_attention/rotary_dim"] = ("i32", hidden // heads // 4)
        variables[f"{prefix}self_attention/rotary_interleave"] = ("i8", 0)
    return variables


def write(folder: Path, hidden: int = 1536, layers: int = 4, vocab: int = 50304,
          heads: int = 16) -> Path:
    """Random float32 weights (one random block repeated: fast to write at any size)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    block = (torch.randn(1 << 22) * 0.02).numpy().tobytes()
    variables = _variables(hidden, layers, vocab, heads)
    with open(folder / "model.bin", "wb") as out:
        out.write(struct.pack("<I", 6) + _string("TransformerDecoderModelSpec") + struct.pack("<I", 1))
        out.write(struct.pack("<I", len(variables)))
        for name in sorted(variables):
            kind, value = variables[name]
            out.write(_string(name))
            if kind == "f":
                size = 4 * int(torch.tensor(value).prod())
                out.write(struct.pack("<B", len(value)) + struct.pack(f"<{len(value)}I", *value))
                out.write(struct.pack("<BI", 0, size))
                while size:
                    piece = block[:size]
                    out.write(piece)
                    size -= len(piece)
            else:
                fmt, type_id = SCALARS[kind]
                raw = struct.pack(fmt, value)
                out.write(struct.pack("<B", 0) + struct.pack("<BI", type_id, len(raw)) + raw)
        out.write(struct.pack("<I", 0))  # no aliases
    (folder / "vocabulary.json").write_text(json.dumps([f"t{i}" for i in range(vocab)]))
    (folder / "config.json").write_text(json.dumps(
        {"bos_token": "t0", "eos_token": "t0", "unk_token": "t0", "layer_norm_epsilon": None}))
    return folder
