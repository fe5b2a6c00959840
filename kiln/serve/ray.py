"""`kiln serve --ray`: the same OpenAI app as `kiln serve`, served by N Ray Serve replicas,
each holding one engine.

- One deployment, `@serve.ingress` with the app built in the replica (after its engine has
  loaded), so every replica answers with its own service, metrics and slots.
- No `@serve.batch`: the engine batches per decode step, across requests.
- `max_ongoing_requests` is the engine's slot count: Ray sends a replica only what it can
  run at once, and the rest waits in Ray's queue (`max_queued_requests`, per proxy). A full
  queue answers 429 with Retry-After (Ray's BackpressureConfig).
- A client that disconnects cancels its request in the replica, and the app aborts the
  engine request (as in `kiln serve`).
- Every response names the replica that answered it (`x-kiln-replica`).

Ray is an optional extra: pip install 'kiln[ray]'. A running cluster is joined through
RAY_ADDRESS; without one, a local Ray starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ray import serve

log = logging.getLogger("kiln.serve")
REPLICA_HEADER = "x-kiln-replica"
DEPLOYMENT = "kiln"


@dataclass
class ReplicaOptions:
    """What each replica loads and how it serves (plain values: they travel to other
    processes and machines)."""

    model: str | None = None  # kiln folder, HF folder, .gguf, hub id; None: the default model
    revision: str | None = None
    compute_type: str = "auto"
    group_size: int | None = None
    device: str = "cpu"
    cache_dir: str | None = None
    max_batch_size: int = 8
    max_model_len: int | None = None
    kv_cache_memory: str | None = None
    served_model_name: str = "kiln"
    api_key: str | None = None
    warm_up: int = 256
    threads: int = 0  # torch threads in the replica (0: its CPUs)
    default_options: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)  # draft model and the like


def load_engine(options: ReplicaOptions):
    """The replica's AsyncEngine, loaded as `kiln serve` loads it."""
    from ..generation.async_engine import AsyncEngine
    from ..generator import Generator

    engine_options = dict(max_batch_size=options.max_batch_size, max_length=options.max_model_len,
                          kv_cache_memory=options.kv_cache_memory, **options.engine_options)
    common = dict(device=options.device, compute_type=options.compute_type,
                  cache_dir=options.cache_dir, intra_threads=options.threads,
                  group_size=options.group_size, **engine_options)
    if options.model is None:
        generator = Generator(**common)
    else:
        generator = Generator.from_pretrained(options.model, revision=options.revision,
                                              progress=False, **common)
    if options.warm_up > 0:
        generator.engine.warm_up(options.warm_up)
    return AsyncEngine(generator.engine)


@serve.ingress()
class KilnReplica:
    """One engine behind the OpenAI app. The app is built after the engine has loaded: Ray
    routes nothing to a replica before its constructor returns."""

    def __init__(self, options: dict[str, Any]) -> None:
        from .limits import ServeLimits
        from .service import ModelService

        self.options = ReplicaOptions(**options)
        if self.options.threads:
            import torch

            torch.set_num_threads(self.options.threads)
        self.replica_id = _replica_id()
        # The service's own queue never fills: Ray sends at most max_batch_size requests.
        self.service = ModelService(lambda: load_engine(self.options),
                                    self.options.served_model_name,
                                    limits=ServeLimits(
                                        max_queue=max(1, self.options.max_batch_size),
                                        max_queue_per_client=max(1, self.options.max_batch_size)),
                                    default_options=self.options.default_options)
        self.service.load()

    def __serve_build_asgi_app__(self):
        from .app import build_app

        app = build_app(self.service, self.options.api_key)
        replica = self.replica_id

        @app.middleware("http")
        async def name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app

    def check_health(self) -> None:
        """Ray's health check: a replica whose model failed to load or whose engine died is
        restarted."""
        if self.service.health in ("failed", "engine dead"):
            raise RuntimeError(f"the replica is unhealthy: {self.service.health}")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.start_draining()
            service.close()


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests of the class itself)
        return f"pid-{os.getpid()}"


def build_app(options: ReplicaOptions | None = None, *, replicas: int = 1,
              num_cpus_per_replica: float = 1, max_queued_requests: int = 64,
              autoscaling_config: dict | None = None, shutdown_timeout: float = 30.0,
              **option_fields: Any):
    """The Ray Serve application: `replicas` copies of one engine (or `autoscaling_config`,
    Ray's own, instead of a fixed count). Fields of ReplicaOptions may be given as keyword
    arguments. Run it with `serve.run(build_app(...), route_prefix="/")`."""
    options = options or ReplicaOptions(**option_fields)
    if options.threads == 0:
        options.threads = max(1, int(num_cpus_per_replica))
    settings: dict[str, Any] = dict(
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": num_cpus_per_replica},
        max_ongoing_requests=options.max_batch_size,  # the engine's slots, not Ray's default
        max_queued_requests=max_queued_requests,
        graceful_shutdown_timeout_s=shutdown_timeout,
        health_check_period_s=10,
    )
    backpressure = _backpressure_config()
    if backpressure is not None:
        settings["backpressure_config"] = backpressure
    if autoscaling_config:
        settings["autoscaling_config"] = autoscaling_config
    else:
        settings["num_replicas"] = replicas
    return serve.deployment(KilnReplica, **settings).bind(asdict(options))


def _backpressure_config():
    """429 with Retry-After for a full queue, where this Ray can say so (2.5x+); older Rays
    answer 503."""
    try:
        from ray.serve.config import BackpressureConfig
    except ImportError:
        return None
    return BackpressureConfig(status_code=429, retry_after_s=1)


def run(options: ReplicaOptions, *, host: str = "127.0.0.1", port: int = 8000,
        replicas: int = 1, num_cpus_per_replica: float = 1, max_queued_requests: int = 64,
        autoscaling_config: dict | None = None, shutdown_timeout: float = 30.0) -> int:
    """Start (or join, through RAY_ADDRESS) Ray, serve until SIGINT/SIGTERM, then shut the
    deployment down (requests in flight get `shutdown_timeout` seconds)."""
    import signal
    import threading

    import ray

    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or None, ignore_reinit_error=True, log_to_driver=False,
             **({} if address else {"include_dashboard": False}))
    serve.start(http_options={"host": host, "port": port})
    app = build_app(options, replicas=replicas, num_cpus_per_replica=num_cpus_per_replica,
                    max_queued_requests=max_queued_requests, autoscaling_config=autoscaling_config,
                    shutdown_timeout=shutdown_timeout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.run(app, name="kiln", route_prefix="/", blocking=False)
        print(f"kiln serve: {replicas if not autoscaling_config else 'autoscaled'} Ray "
              f"replica(s) on http://{host}:{port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        if not address:
            ray.shutdown()
    return 0
