"""Where kiln keeps converted models: a per-user cache folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

CACHE_ENV = "KILN_CACHE_DIR"


def cache_dir(override: str | Path | None = None) -> Path:
    """The converted-model cache: `override`, else $KILN_CACHE_DIR, else the platform's
    per-user cache folder (XDG_CACHE_HOME or ~/.cache on Linux) + /kiln."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "kiln"
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "kiln" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln"
