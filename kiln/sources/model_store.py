"""Where kiln keeps converted models (a per-user folder), and `kiln cache ls | rm`: the
models kept there, with their size and origin."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..storage.layout import CONFIG_FILE

STORE_ENV = "KILN_CACHE_DIR"


def store_dir(override: str | Path | None = None) -> Path:
    """The folder of converted models: `override`, else $KILN_CACHE_DIR, else the platform's
    per-user cache folder (XDG_CACHE_HOME or ~/.cache on Linux) + /kiln."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "kiln"
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "kiln" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln"


@dataclass
class StoredModel:
    folder: Path
    bytes: int
    source: str
    revision: str
    quantization: str


def stored_models(root: str | Path | None = None) -> list[StoredModel]:
    models = []
    for config_path in sorted((store_dir(root) / "models").glob(f"**/{CONFIG_FILE}")):
        folder = config_path.parent
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = {}
        source = config.get("source", {})
        origin = source.get("origin", {})
        quantization = config.get("quantization", {})
        models.append(StoredModel(
            folder=folder,
            bytes=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
            source=origin.get("hub_id") or origin.get("path") or source.get("path", "?"),
            revision=(f"{origin['revision']} ({origin['commit'][:10]})"
                      if "commit" in origin else "-"),
            quantization=(f"{quantization.get('weights')}_{quantization.get('dtype')}"
                          if quantization.get("weights") else quantization.get("dtype", "?"))))
    return models


def format_table(models: list[StoredModel]) -> str:
    if not models:
        return "no converted models in the cache"
    rows = [("SIZE", "TYPE", "REVISION", "SOURCE", "FOLDER")]
    rows += [(f"{m.bytes / 2**20:.1f} MiB", m.quantization, m.revision, m.source, str(m.folder))
             for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths,
                                                                          strict=True)) + "  " + row[4]
                     for row in rows)


def remove(pattern: str, root: str | Path | None = None) -> list[Path]:
    """Remove stored models whose source or folder contains `pattern` ('all': every one)."""
    removed = []
    for model in stored_models(root):
        if pattern == "all" or pattern in model.source or pattern in str(model.folder):
            shutil.rmtree(model.folder)
            removed.append(model.folder)
    if not removed:
        raise ValueError(f"no cached model matches {pattern!r}; see `kiln cache ls`")
    return removed
