"""`kiln cache ls | rm`: the converted models kiln keeps, with their size and origin."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .paths import cache_dir
from .storage.layout import CONFIG_FILE


@dataclass
class CachedModel:
    folder: Path
    bytes: int
    source: str
    revision: str
    quantization: str


def cached_models(root: str | Path | None = None) -> list[CachedModel]:
    models = []
    for config_path in sorted((cache_dir(root) / "models").glob(f"**/{CONFIG_FILE}")):
        folder = config_path.parent
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = {}
        source = config.get("source", {})
        origin = source.get("origin", {})
        quantization = config.get("quantization", {})
        models.append(CachedModel(
            folder=folder,
            bytes=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
            source=origin.get("hub_id") or origin.get("path") or source.get("path", "?"),
            revision=(f"{origin['revision']} ({origin['commit'][:10]})"
                      if "commit" in origin else "-"),
            quantization=(f"{quantization.get('weights')}_{quantization.get('dtype')}"
                          if quantization.get("weights") else quantization.get("dtype", "?"))))
    return models


def format_table(models: list[CachedModel]) -> str:
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
    """Remove cached models whose source or folder contains `pattern` ('all': every one)."""
    removed = []
    for model in cached_models(root):
        if pattern == "all" or pattern in model.source or pattern in str(model.folder):
            shutil.rmtree(model.folder)
            removed.append(model.folder)
    if not removed:
        raise ValueError(f"no cached model matches {pattern!r}; see `kiln cache ls`")
    return removed
