"""`kiln serve`: uvicorn running the app while the model loads in a thread (GET /health says
503 until it is ready), and a graceful stop.

On SIGTERM or Ctrl-C the server stops admitting (new requests get 503), lets the requests in
flight finish for up to `shutdown_timeout` seconds, aborts what is left, and exits with 0.
A second signal aborts at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import uvicorn

from ..generation.async_engine import AsyncEngine
from .app import build_app
from .embeddings import EmbeddingService
from .limits import ServeLimits
from .service import ModelService

log = logging.getLogger("kiln.serve")
POLL_SECONDS = 0.05


class _Server(uvicorn.Server):
    """uvicorn, with its exit signal turned into draining first."""

    def __init__(self, config: uvicorn.Config, service: ModelService | EmbeddingService,
                 shutdown_timeout: float):
        super().__init__(config)
        self.service, self.shutdown_timeout = service, shutdown_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:  # noqa: ARG002 - the signal handler's signature
        # Not recorded in uvicorn's captured signals: it would raise them again at exit.
        # First signal: drain until the timeout; second: abort now; third: exit at once.
        self.service.start_draining()
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.shutdown_timeout
            return
        self.drain_deadline = time.monotonic()
        if self.should_exit:
            self.force_exit = True

    async def watch(self) -> None:
        """Once draining: exit when nothing is in flight or the deadline passed."""
        while not self.should_exit:
            await asyncio.sleep(POLL_SECONDS)
            if self.drain_deadline is None:
                continue
            if self.service.in_flight and time.monotonic() < self.drain_deadline:
                continue
            if self.service.in_flight:
                log.warning("shutdown timeout: aborting %d request(s)", self.service.in_flight)
                await asyncio.to_thread(self.service.close)  # their streams end with "abort"
                for _ in range(100):  # let the handlers send their last chunk
                    if not self.service.in_flight:
                        break
                    await asyncio.sleep(POLL_SECONDS)
            self.should_exit = True


def serve(load: Callable[[], AsyncEngine], *, served_model_name: str, host: str = "127.0.0.1",
          port: int = 8000, limits: ServeLimits | None = None, api_key: str | None = None,
          shutdown_timeout: float = 30.0, log_level: str = "info",
          default_options: dict | None = None, embeddings: bool = False) -> int:
    """Serve until a signal; 0 after a graceful stop (a failure to load is raised).
    `default_options`: generation options every request starts from (e.g. prompt lookup).
    `embeddings`: `load` returns a kiln.Encoder, served on /v1/embeddings."""
    service: ModelService | EmbeddingService
    if embeddings:
        service = EmbeddingService(load, served_model_name, limits=limits)
    else:
        service = ModelService(load, served_model_name, limits=limits,
                               default_options=default_options)
    app = build_app(service, api_key)
    # Logging is kiln's (kiln.serve.logs), the access line the Guard's: uvicorn adds neither.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None,
                            access_log=False, timeout_graceful_shutdown=5, lifespan="off")
    server = _Server(config, service, shutdown_timeout)
    failure: list[BaseException] = []

    def load_model() -> None:
        try:
            service.load()
        except BaseException as error:  # noqa: BLE001 - reported by serve's caller
            failure.append(error)
            server.should_exit = True

    async def main() -> None:
        loader = threading.Thread(target=load_model, name="kiln-load", daemon=True)
        loader.start()
        watcher = asyncio.ensure_future(server.watch())
        try:
            await server.serve()
        finally:
            watcher.cancel()
        await asyncio.to_thread(service.close)

    asyncio.run(main())
    if failure:
        raise failure[0]
    return 0
