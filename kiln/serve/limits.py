"""The bounds `kiln serve` puts on every request and client, each a command-line flag.

Every limit has a default that a normal client never meets and an error that names the limit
and the flag that raises it. Sizes are checked before the work they bound: the body's size
before it is read, a prompt's characters before it is tokenized, the queue before anything.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 4 * MiB  # 413 from Content-Length, or once that much was read
    max_prompt_chars: int = 1_000_000  # all prompts (or messages) of one request together
    max_stop_count: int = 4  # as the OpenAI API
    max_stop_chars: int = 256  # per stop string
    max_choices: int = 16  # prompts x n of one request
    max_embedding_inputs: int = 2048  # inputs of one /v1/embeddings request, as OpenAI
    max_queue: int = 64  # sequences waiting for a KV slot, all clients together
    max_queue_per_client: int | None = None  # None: half of max_queue
    queue_timeout: float = 60.0  # seconds without a slot before a request gets 503
    request_timeout: float | None = None  # seconds a whole request may take; None: no limit
    send_timeout: float = 30.0  # seconds a client may leave a response unread
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no cross-origin browser access
    allowed_hosts: tuple[str, ...] = ()  # Host header allowlist; empty: any host

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_chars", "max_stop_chars", "max_choices",
                     "max_queue", "max_embedding_inputs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_stop_count < 0:
            raise ValueError("--max-stop-count must be >= 0")
        if self.max_queue_per_client is not None and self.max_queue_per_client < 1:
            raise ValueError("--max-queue-per-client must be >= 1")
        for name in ("queue_timeout", "send_timeout", "request_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds")

    @property
    def queue_per_client(self) -> int:
        """A client (API key, else address) may fill at most this much of the queue."""
        if self.max_queue_per_client is not None:
            return self.max_queue_per_client
        return max(1, self.max_queue // 2)
