"""From a name to a loadable kiln folder: local folders and files, Hugging Face hub ids with
revisions, and the store of converted models (model_store.py) that makes the second load
instant.

    kiln folder            used as it is
    HF folder / GGUF file  converted once into the store (keyed on path, content, type)
    hub id                 resolved with huggingface_hub (revision, HF_HUB_OFFLINE, HF_HOME,
                           HF_HUB_CACHE, local_files_only, token), then converted once into
                           the store, keyed on repo id, resolved commit and storage type
    CTranslate2 folder     read in place (model.bin) and converted once into the store
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import conversion
from ..conversion.formats import hf
from ..conversion.formats.ctranslate2 import is_ctranslate2_folder
from ..model.spec import is_kiln_folder
from .model_store import store_dir

# Only what kiln reads (no ONNX, TF or Flax weights); a CTranslate2 repo's model.bin is
# fetched in a second step, once the small files show the repo is one.
CTRANSLATE2_WEIGHTS = ["model.bin", "model-*-of-*.bin"]
ALLOW_PATTERNS = [
    "config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
    "pytorch_model.bin.index.json", "vocabulary.*", *hf.TOKENIZER_FILES,
    # CTranslate2 translators' token strings
    "shared_vocabulary.*", "source_vocabulary.*", "target_vocabulary.*",
    # sentence-transformers' pipeline (kiln.Encoder.embed pools and normalizes as it says)
    "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Resolved:
    """A loadable kiln folder and where it came from."""

    folder: Path
    source: dict


def resolve(name_or_path: str | Path, *, revision: str | None = None,
            quantization: str | None = None, cache_dir: str | Path | None = None,
            hub_cache_dir: str | Path | None = None, local_files_only: bool = False,
            token: str | bool | None = None, progress: bool | None = None,
            group_size: int | None = None) -> Resolved:
    """A kiln folder for `name_or_path`, converting (once) what needs converting
    (int4: in groups of `group_size`)."""
    path = Path(name_or_path).expanduser()
    if quantization and quantization.startswith("int4"):
        from ..quant.compute_types import DEFAULT_GROUP_SIZE

        group_size = group_size or DEFAULT_GROUP_SIZE
    else:
        group_size = None
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids; {path} is a local path")
        return _resolve_local(path, quantization, cache_dir, progress, group_size)
    name = str(name_or_path)
    if not HUB_ID.match(name):
        raise FileNotFoundError(f"no model at {name}: it is neither an existing path nor a hub "
                                "id (ORG/NAME)")
    snapshot = download(name, revision, hub_cache_dir, local_files_only, token, progress)
    commit = snapshot.name
    folder = (store_dir(cache_dir) / "models" / "hub" / name.replace("/", "--") / commit /
              _store_name(quantization, group_size))
    source = {"hub_id": name, "revision": revision or "main", "commit": commit}
    return Resolved(_convert_once(snapshot, folder, quantization, source, progress, group_size),
                    source)


def _store_name(quantization: str | None, group_size: int | None) -> str:
    """The store's folder for one conversion of a source: the type (and int4 groups)."""
    return (quantization or "default") + (f"-g{group_size}" if group_size else "")


def convert_source(source: str | Path, output_dir: str | Path, quantization: str | None = None,
                   force: bool = False, copy_files: Iterable[str] | None = None, *,
                   max_shard_bytes: int = conversion.DEFAULT_SHARD_BYTES, progress: bool = False,
                   origin: dict[str, Any] | None = None, revision: str | None = None,
                   token: str | bool | None = None, group_size: int | None = None) -> Path:
    """Convert a local Hugging Face checkpoint folder, GGUF file or CTranslate2 folder, or a hub
    id, into a kiln folder (`kiln.convert`).

    `quantization` is a compute type name (float32, float16, bfloat16, int8, int8_float32,
    int8_float16, int8_bfloat16, int16); None keeps the checkpoint's float type.
    A source that is not a local path but a hub id (ORG/NAME) is downloaded first (only the
    files kiln reads), at `revision`. `progress` shows a bar over the tensors; `origin`
    (hub id, revision, commit) is recorded in config.json.
    """
    source = Path(source)
    if not source.exists() and HUB_ID.match(str(source)):
        snapshot = download(str(source), revision, None, False, token, progress)
        origin = {"hub_id": str(source), "revision": revision or "main", "commit": snapshot.name}
        source = snapshot
    elif revision is not None:
        raise ValueError(f"revision={revision!r} applies to hub ids; {source} is a local path")
    return conversion.convert(source, output_dir, quantization, force, copy_files,
                              max_shard_bytes=max_shard_bytes, progress=progress, origin=origin,
                              group_size=group_size)


def download(repo_id: str, revision: str | None, hub_cache_dir: str | Path | None,
             local_files_only: bool, token: str | bool | None, progress: bool | None) -> Path:
    """The snapshot folder of the files kiln needs (from the local hub cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import tqdm as hub_tqdm

    class SilentProgress(hub_tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(
            repo_id, revision=revision, cache_dir=hub_cache_dir, allow_patterns=patterns,
            local_files_only=local_files_only, token=token,
            tqdm_class=None if _show_progress(progress) else SilentProgress))

    try:
        snapshot = fetch(ALLOW_PATTERNS)
        if is_ctranslate2_folder(snapshot) and not (snapshot / "model.bin").is_file():
            snapshot = fetch(CTRANSLATE2_WEIGHTS)
        return snapshot
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{repo_id} (revision {revision or 'main'}) is not in the local hub cache and the hub "
            "cannot be reached (offline, or local_files_only): download it once online, or "
            "check the name, revision and HF_HOME / HF_HUB_CACHE") from error
    except RevisionNotFoundError as error:
        raise ValueError(f"{repo_id} has no revision {revision!r}") from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(f"no hub repository {repo_id!r} (or it is private: pass token=)") \
            from error


def _resolve_local(path: Path, quantization: str | None, cache_dir: str | Path | None,
                   progress: bool | None, group_size: int | None = None) -> Resolved:
    if path.is_dir() and is_kiln_folder(path):
        return Resolved(path, {"path": str(path)})
    if not (path.suffix == ".gguf" and path.is_file()) and not hf.is_hf_folder(path) \
            and not (path.is_dir() and is_ctranslate2_folder(path)):
        raise FileNotFoundError(f"{path} is not a model: expected a kiln folder, a Hugging Face "
                                "checkpoint folder (config.json + weights), a CTranslate2 folder "
                                "(model.bin) or a .gguf file")
    fingerprint = _fingerprint(path)
    folder = (store_dir(cache_dir) / "models" / "local" / f"{path.name}-{fingerprint}" /
              _store_name(quantization, group_size))
    source = {"path": str(path.resolve()), "fingerprint": fingerprint}
    return Resolved(_convert_once(path, folder, quantization, source, progress, group_size),
                    source)


def _fingerprint(path: Path) -> str:
    """Changes when the path or any of its files changes (name, size, modification time)."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def stored_folder_is_sound(folder: Path) -> bool:
    """A stored conversion that loads: config readable, weight files present, sizes as written."""
    from ..model.loading import check_folder

    try:
        check_folder(folder)
    except (ValueError, FileNotFoundError, OSError):
        return False
    return True


def _convert_once(source: Path, folder: Path, quantization: str | None, origin: dict,
                  progress: bool | None, group_size: int | None = None) -> Path:
    if is_kiln_folder(folder) and stored_folder_is_sound(folder):
        return folder  # already stored: nothing is read or converted
    try:
        # A broken or partial entry is replaced; conversion itself writes atomically.
        conversion.convert(source, folder, quantization=quantization, force=folder.exists(),
                           progress=_show_progress(progress), origin=origin,
                           group_size=group_size)
    except OSError:
        if not (is_kiln_folder(folder) and stored_folder_is_sound(folder)):
            raise  # unless another process finished the same conversion first
    return folder


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def source_kind(name_or_path: str | Path | None, revision: str | None = None,
                hub_cache_dir: str | Path | None = None) -> str:
    """"generator", "encoder" or "translator": which kiln class loads this model (a hub id
    is fetched first, into the hub cache the loaders read). None is kiln's default model."""
    if name_or_path is None:
        return "generator"
    path = Path(name_or_path).expanduser()
    if path.exists():
        return conversion.model_kind(path)
    if not HUB_ID.match(str(name_or_path)):
        return "generator"  # the loader names the problem
    return conversion.model_kind(download(str(name_or_path), revision, hub_cache_dir, False,
                                          None, None))
