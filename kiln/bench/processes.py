"""What every benchmark harness needs around its worker processes: a progress line on stderr
and the environment a worker runs in."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def worker_env(threads: int) -> dict[str, str]:
    """The worker imports this very kiln, and every engine's thread pool has `threads`."""
    root = str(Path(__file__).absolute().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env
