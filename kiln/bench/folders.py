"""The benchmark's work folder: every model and every engine's folder, built once and reused.

A folder counts as built only when its marker (`.NAME.done`, beside it, written last) holds the
recipe it was built from; anything else is rebuilt, so an interrupted build never gets used.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .models import PYTHIA_SHAPES, SMOLLM2, PythiaShape, build_pythia, build_smollm2, smollm2_gguf

ENGINES = ("kiln", "ctranslate2", "transformers")
DEFAULT_WORK_DIR = Path("~/.cache/kiln/bench")


@dataclass(frozen=True)
class EngineType:
    """`kiln:int8`: an engine and the weight/compute type it runs the model in;
    `kiln:int8@onednn` also names kiln's int8 backend."""

    engine: str
    dtype: str
    backend: str | None = None

    @classmethod
    def parse(cls, text: str) -> EngineType:
        engine, _, dtype = text.partition(":")
        dtype, _, backend = dtype.partition("@")
        if engine not in ENGINES or not dtype:
            raise ValueError(f"engine {text!r} is not ENGINE:TYPE with ENGINE one of "
                             f"{', '.join(ENGINES)} (for example kiln:int8, transformers:bfloat16)")
        if backend:
            from ..quant.kernels import BACKENDS

            if engine != "kiln" or backend not in BACKENDS:
                raise ValueError(f"engine {text!r}: only kiln takes @BACKEND, one of "
                                 f"{', '.join(BACKENDS)} (for example kiln:int8@onednn)")
        return cls(engine, dtype, backend or None)

    def __str__(self) -> str:
        suffix = f"@{self.backend}" if self.backend else ""
        return f"{self.engine}:{self.dtype}{suffix}"


@dataclass(frozen=True)
class BenchModel:
    """A model of the benchmark: a Pythia shape with random weights, or SmolLM2 (shape None)."""

    name: str
    shape: PythiaShape | None = None

    def recipe(self) -> str:
        if self.shape is not None:
            return self.shape.key()
        gguf = smollm2_gguf()
        return json.dumps({"gguf": str(gguf), "bytes": gguf.stat().st_size})

    def build_hf(self, folder: Path) -> None:
        if self.shape is not None:
            build_pythia(self.shape, folder)
        else:
            build_smollm2(folder)


def resolve_models(names: list[str], custom: dict[str, PythiaShape] | None = None) -> list[BenchModel]:
    custom = custom or {}
    models = []
    for name in names:
        if name in custom:
            models.append(BenchModel(name, custom[name]))
        elif name in PYTHIA_SHAPES:
            models.append(BenchModel(name, PYTHIA_SHAPES[name]))
        elif name == SMOLLM2:
            models.append(BenchModel(name))
        else:
            known = [*PYTHIA_SHAPES, SMOLLM2, *custom]
            raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")
    return models


def build_once(folder: Path, recipe: str, build: Callable[[Path], object]) -> Path:
    """`build(folder)` unless the marker says this recipe is already there."""
    marker = folder.parent / f".{folder.name}.done"
    if folder.is_dir() and marker.is_file() and marker.read_text() == recipe:
        return folder
    marker.unlink(missing_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    build(folder)
    marker.write_text(recipe)
    return folder


def converter_version(engine: str) -> str:
    """What a converted folder depends on besides the source: CTranslate2's version, or
    kiln's converter sources (a changed converter means a folder worth rebuilding)."""
    if engine == "ctranslate2":
        return importlib.metadata.version("ctranslate2")
    root = Path(__file__).absolute().parents[1]
    digest = hashlib.sha256()
    for path in sorted([root / "conversion" / "convert.py", root / "model" / "spec.py",
                        root / "quant" / "int8.py", root / "quant" / "int4.py",
                        root / "quant" / "stored.py", *root.glob("conversion/archs/*.py"),
                        *root.glob("conversion/formats/*.py")]):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def hf_folder(model: BenchModel, work_dir: Path) -> Path:
    return build_once(work_dir / model.name / "hf", model.recipe(), model.build_hf)


def engine_folder(model: BenchModel, engine: EngineType, work_dir: Path) -> Path:
    """The folder `engine` loads, converted from the model's HF folder on first use."""
    source = hf_folder(model, work_dir)
    if engine.engine == "transformers":
        return source
    recipe = json.dumps({"source": model.recipe(), "engine": str(engine),
                         "converter": converter_version(engine.engine)})
    if engine.engine == "ctranslate2":
        from .ct2_convert import convert_with_ctranslate2

        return build_once(work_dir / model.name / f"ct2-{engine.dtype}", recipe,
                          lambda out: convert_with_ctranslate2(source, out, engine.dtype))
    from ..conversion import convert

    # kiln:int4-g64: int4 in groups of 64
    quantization, _, group = engine.dtype.partition("-g")
    group_size = int(group) if group else None

    def build(out: Path, checkpoint: Path) -> None:
        convert(checkpoint, out, quantization=quantization, group_size=group_size)

    if model.shape is None:
        from ..sources.default_model import default_model_path

        default = default_model_path()
        stored = json.loads((default / "config.json").read_text()).get("quantization", {})
        if stored.get("dtype") == engine.dtype and not stored.get("weights"):
            return default  # kiln's own converted default model, as users get it
        gguf = smollm2_gguf()
        return build_once(work_dir / model.name / f"kiln-{engine.dtype}", recipe,
                          lambda out: build(out, gguf))
    return build_once(work_dir / model.name / f"kiln-{engine.dtype}", recipe,
                      lambda out: build(out, source))


def tokenizer_size(hf: Path) -> int:
    """Prompts draw ids below this: ids every engine's tokenizer knows."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(hf / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
