"""What a result depends on besides the code: the CPU, its cores, its memory bandwidth (the
ceiling of memory-bound decoding) and the library versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import time
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    if CPUINFO.is_file():
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Distinct (socket, core) pairs among the CPUs this process may use; hyperthreads share
    a core's units, so the protocol runs one thread per physical core."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = set()
    if CPUINFO.is_file():
        cpu = socket = None
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        for line in CPUINFO.read_text().splitlines() + [""]:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                socket = value
            elif key == "core id" and (allowed is None or cpu in allowed):
                cores.add((socket, value))
    return min(len(cores), usable or 1) if cores else (usable or 1)


def memory_bandwidth_gb_s(gib: float = 2.0, repeats: int = 5, threads: int | None = None,
                          device: str = "cpu") -> float:
    """Read bandwidth of `device`'s memory: median time of summing a `gib` GiB float32 tensor
    (bytes read / s)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    tensor = torch.ones(int(gib * 1024**3) // 4, dtype=torch.float32, device=device)
    tensor.sum().item()  # first touch and thread start-up out of the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tensor.sum().item()  # .item() waits for a GPU
        times.append(time.perf_counter() - start)
    size = tensor.nbytes
    del tensor
    return size / statistics.median(times) / 1e9


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("kiln", "torch", "ctranslate2", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpu(device: str) -> dict | None:
    """The GPU's name and memory when the benchmark runs on one."""
    if not device.startswith("cuda"):
        return None
    import torch

    properties = torch.cuda.get_device_properties(torch.device(device))
    return {"name": properties.name, "memory_bytes": properties.total_memory}


def describe(threads: int, device: str = "cpu") -> dict:
    return {"cpu": cpu_model(), "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
            "memory_bytes": total_memory_bytes(), "gpu": gpu(device),
            "platform": platform.platform(), "threads": threads, "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
