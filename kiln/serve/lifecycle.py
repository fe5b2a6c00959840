"""What every served model shares, whatever it serves (text generation or embeddings): its
name, its limits, and its state from loading to draining, with the checks every route makes
first (ready? the right model name?)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .api_errors import RETRY_AFTER_SECONDS, APIError
from .limits import ServeLimits

log = logging.getLogger("kiln.serve")
REASONS = {"loading": "the model is still loading",
           "shutting down": "the server is shutting down",
           "failed": "the model failed to load",
           "engine dead": "the engine stopped on an internal error"}


class ServedModel:
    """A model behind the HTTP layer: `load()` (in a thread) makes it ready; subclasses say
    what a loaded model is (`_loaded`) and whether it still works (`_alive`)."""

    def __init__(self, load: Callable[[], Any], served_model_name: str, *,
                 limits: ServeLimits | None = None) -> None:
        self._load = load
        self.served_model_name = served_model_name
        self.limits = limits or ServeLimits()
        self.state = "loading"  # -> "ready" -> "draining"; or "failed"
        self.in_flight = 0  # HTTP requests being answered
        self.started = int(time.time())

    def load(self) -> None:
        """Load the model (blocking: run it in a thread); the service is ready after."""
        try:
            loaded = self._load()
        except BaseException:
            self.state = "failed"
            raise
        self._loaded(loaded)
        if self.state == "loading":
            self.state = "ready"

    def _loaded(self, loaded: Any) -> None:
        raise NotImplementedError

    def _alive(self) -> bool:
        return True

    def start_draining(self) -> None:
        if self.state != "draining":
            log.info("shutting down: no new requests; %d in flight", self.in_flight)
        self.state = "draining"

    @property
    def health(self) -> str:
        """"ok", or why the service cannot answer: loading, shutting down, failed (the model
        did not load), or engine dead (its loop stopped on an error it could not contain)."""
        if self.state == "ready" and not self._alive():
            return "engine dead"
        return {"ready": "ok", "loading": "loading", "draining": "shutting down",
                "failed": "failed"}[self.state]

    def check_ready(self) -> None:
        if self.health == "ok":
            return
        raise APIError(503, f"{REASONS[self.health]}; retry later", "service_unavailable",
                       code="service_unavailable",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.served_model_name!r}", param="model",
                           code="model_not_found")
