"""Running `kiln serve` as users do: a subprocess on a free port, waited for on /health."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    api_key: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, body: dict | str | bytes, **kwargs) -> httpx.Response:
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        headers = {"Content-Type": "application/json", **self.headers, **kwargs.pop("headers", {})}
        return httpx.post(self.url + path, content=content, headers=headers,
                          timeout=kwargs.pop("timeout", 120), **kwargs)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics, by name (with its labels, as written)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def wait_until(self, condition, timeout: float = 10.0, what: str = "condition") -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if condition():
                return time.perf_counter() - start
            time.sleep(0.02)
        raise AssertionError(f"{what} not reached within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the server did not exit; log:\n{self.log.read_text()}") from None


def start_server(log_dir: Path, *args: str, api_key: str | None = API_KEY,
                 timeout: float = 300) -> Server:
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    command = [sys.executable, "-m", "kiln", "serve", "--port", str(port), "--log-level", "warning",
               *args]
    if api_key:
        command += ["--api-key", api_key]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    server = Server(process, port, log, api_key)
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise AssertionError(f"kiln serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"kiln serve was not healthy within {timeout} s:\n{log.read_text()}")
