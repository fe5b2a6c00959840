"""The server's Prometheus metrics (GET /metrics), in a registry of its own so that several
servers in one process (tests) do not collide."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], object | None]) -> None:
        """`engine_stats()`: the engine's EngineStats, or None before the model is loaded."""
        self.registry = registry = CollectorRegistry()

        def stat(name: str) -> Callable[[], float]:
            return lambda: float(getattr(engine_stats(), name, 0) or 0)

        Gauge("kiln_requests_waiting", "Requests queued for a KV cache slot",
              registry=registry).set_function(stat("waiting"))
        Gauge("kiln_requests_running", "Requests holding KV cache slots",
              registry=registry).set_function(stat("running"))
        Gauge("kiln_kv_slots_used", "KV cache slots in use", registry=registry
              ).set_function(stat("slots_used"))
        Gauge("kiln_kv_slots", "KV cache slots in the pool", registry=registry
              ).set_function(stat("slots"))
        Gauge("kiln_slots_in_use", "KV cache slots in use (the same as kiln_kv_slots_used)",
              registry=registry).set_function(stat("slots_used"))
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens admitted",
                                     registry=registry)
        self.generated_tokens = Counter("kiln_generation_tokens", "Tokens generated",
                                        registry=registry)
        self.finished = Counter("kiln_requests_finished", "Requests (choices) finished",
                                ["finish_reason"], registry=registry)
        self.rejected = Counter("kiln_requests_rejected",
                                "HTTP requests refused, by reason (the error's code)",
                                ["reason"], registry=registry)
        self.aborted = Counter("kiln_requests_aborted",
                               "Requests (choices) aborted: client gone or shutdown",
                               registry=registry)
        self.queue_wait = Histogram("kiln_queue_wait_seconds",
                                    "From admission until the request got its KV slots",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("kiln_time_to_first_token_seconds",
                              "From arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("kiln_inter_token_latency_seconds",
                             "Between consecutive generated tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds",
                             "From arrival to the last token", buckets=LATENCY_BUCKETS,
                             registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
