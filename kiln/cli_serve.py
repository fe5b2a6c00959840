"""The `kiln serve` command: its parser and its runners, on uvicorn or on Ray Serve replicas.
The server's packages are imported only when the command runs."""

from __future__ import annotations

import argparse

from .cli import _add_model_options, _add_speculation_options, _draft, _load, _speculation
from .errors import KilnError


def add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="POST /v1/completions and /v1/chat/completions (streamed or not), "
                    "GET /v1/models, /health and /metrics, on the continuous-batching engine; "
                    "for an encoder model (BERT family), POST /v1/embeddings instead. "
                    "Needs the serve extra: pip install 'kiln[serve]'.")
    _add_model_options(parser)
    parser.set_defaults(compute_type="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="sequences generated at once: KV cache slots (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a slot before new ones get 429 (default: 64)")
    parser.add_argument("--kv-cache-memory", default=None,
                        help='size the KV cache by memory instead, e.g. "2GiB" (as many slots as '
                             "fit, at most --max-batch-size)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="positions per sequence, prompt included (default: the model's "
                             "context)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 (default: "
                             "$KILN_API_KEY, else open)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients ask for (default: --model as given)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM/Ctrl-C, seconds to let requests in flight finish "
                             "(default: 30)")
    _add_limit_options(parser)
    _add_speculation_options(parser)
    parser.add_argument("--warm-up", type=int, default=256, metavar="POSITIONS",
                        help="before reporting healthy, capture the decode steps of every batch "
                             "size for sequences of up to this many positions (default: 256; 0: "
                             "none; longer sequences capture theirs on first use)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text, or one JSON object per line (default: text); either way "
                             "an access line per request (id, status, tokens, TTFT, duration)")
    ray = parser.add_argument_group("Ray Serve (pip install 'kiln[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="serve from Ray Serve replicas, one engine each (joins $RAY_ADDRESS, "
                          "else starts a local Ray)")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (default: 1)")
    ray.add_argument("--num-cpus-per-replica", type=float, default=1,
                     help="CPUs Ray reserves for each replica, also its torch threads (default: 1)")
    ray.add_argument("--autoscaling", default=None, metavar="JSON",
                     help='Ray autoscaling_config instead of --replicas, e.g. '
                          '\'{"min_replicas": 1, "max_replicas": 4}\'')
    parser.set_defaults(run=_run_serve)


def _add_limit_options(parser) -> None:
    limits = parser.add_argument_group(
        "limits (every refusal names the flag that raises it)")
    limits.add_argument("--max-body-size", default="4MiB",
                        help='request body size, e.g. "4MiB" (default); larger bodies get 413 '
                             "before they are read")
    limits.add_argument("--max-prompt-chars", type=int, default=1_000_000,
                        help="characters of all prompts (or messages) of one request "
                             "(default: 1000000)")
    limits.add_argument("--max-stop-count", type=int, default=4,
                        help="stop sequences per request (default: 4, as OpenAI)")
    limits.add_argument("--max-stop-chars", type=int, default=256,
                        help="characters per stop sequence (default: 256)")
    limits.add_argument("--max-choices", type=int, default=16,
                        help="sequences one request may ask for, prompts x n (default: 16)")
    limits.add_argument("--max-embedding-inputs", type=int, default=2048,
                        help="inputs of one /v1/embeddings request (default: 2048, as OpenAI)")
    limits.add_argument("--max-queue-per-client", type=int, default=None,
                        help="sequences one client address may have queued (default: half of "
                             "--max-queue); beyond it 429")
    limits.add_argument("--queue-timeout", type=float, default=60.0,
                        help="seconds a request may wait for a slot before 503 with "
                             "Retry-After (default: 60)")
    limits.add_argument("--request-timeout", type=float, default=None,
                        help="seconds a whole request may take: a running one is cut with "
                             'finish_reason "length", one without a token yet gets 504 '
                             "(default: none)")
    limits.add_argument("--send-timeout", type=float, default=30.0,
                        help="seconds a client may leave its response unread before its "
                             "request is aborted and its slot freed (default: 30)")
    limits.add_argument("--allowed-origins", nargs="+", default=(), metavar="ORIGIN",
                        help="origins browsers may call the API from (CORS), e.g. "
                             "http://localhost:3000 or '*' (default: none)")
    limits.add_argument("--allowed-hosts", nargs="+", default=(), metavar="HOST",
                        help="Host header values served, e.g. localhost 127.0.0.1 (default: "
                             "any); guards against DNS rebinding")


def serve_limits(args: argparse.Namespace):
    from .generation.slots import parse_memory
    from .serve.limits import ServeLimits

    return ServeLimits(
        max_body_bytes=parse_memory(args.max_body_size, "--max-body-size"),
        max_prompt_chars=args.max_prompt_chars,
        max_stop_count=args.max_stop_count, max_stop_chars=args.max_stop_chars,
        max_choices=args.max_choices, max_queue=args.max_queue,
        max_embedding_inputs=args.max_embedding_inputs,
        max_queue_per_client=args.max_queue_per_client, queue_timeout=args.queue_timeout,
        request_timeout=args.request_timeout, send_timeout=args.send_timeout,
        allowed_origins=tuple(args.allowed_origins),
        allowed_hosts=tuple(host.lower() for host in args.allowed_hosts))


def _run_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from .serve.server import serve
    except ImportError as error:
        raise KilnError(f"kiln serve needs {error.name}: pip install 'kiln[serve]'") from error
    from .generation.async_engine import AsyncEngine
    from .serve.logs import configure_logging
    from .sources.default_model import NAME
    from .sources.hub import source_kind

    for name in ("max_batch_size", "max_queue", "port"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    limits = serve_limits(args)  # bad limits are refused before the model loads
    configure_logging(args.log_level, args.log_format)
    kind = source_kind(args.model, args.revision)
    if kind == "translator":
        raise ValueError(f"{args.model} is a translation model; kiln serve serves text "
                         "generation and embedding models: translate with `kiln translate` or "
                         "kiln.Translator")
    if kind == "encoder":
        if args.ray:
            raise ValueError("--ray serves text-generation models; serve encoders without it")
        return serve(lambda: _load_encoder(args), served_model_name=args.served_model_name
                     or args.model, host=args.host, port=args.port, limits=limits,
                     api_key=args.api_key or os.environ.get("KILN_API_KEY") or None,
                     shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
                     embeddings=True)
    args.seed = None
    engine_options = dict(max_batch_size=args.max_batch_size, kv_cache_memory=args.kv_cache_memory,
                          max_length=args.max_model_len)

    def load() -> AsyncEngine:
        engine = _load(args, **engine_options).engine
        if args.warm_up > 0:  # no stream should wait for a capture
            engine.warm_up(args.warm_up)
        return AsyncEngine(engine)

    if args.ray:
        return _run_ray_serve(args, NAME)
    return serve(load, served_model_name=args.served_model_name or args.model or NAME,
                 host=args.host, port=args.port, limits=limits,
                 default_options=_speculation(args),
                 api_key=args.api_key or os.environ.get("KILN_API_KEY") or None,
                 shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)


def _load_encoder(args: argparse.Namespace):
    from .encoder import Encoder

    compute_type = "default" if args.compute_type == "auto" else args.compute_type
    return Encoder(args.model, device=args.device, compute_type=compute_type,
                   revision=args.revision)


def _run_ray_serve(args: argparse.Namespace, default_name: str) -> int:
    import json
    import os

    try:
        from .serve.ray import ReplicaOptions, run
    except ImportError as error:
        raise KilnError(f"kiln serve --ray needs {error.name}: pip install 'kiln[ray]'") from error
    if args.replicas < 1 or args.num_cpus_per_replica <= 0:
        raise ValueError("--replicas must be >= 1 and --num-cpus-per-replica > 0")
    autoscaling = json.loads(args.autoscaling) if args.autoscaling else None
    options = ReplicaOptions(
        model=args.model, revision=args.revision, compute_type=args.compute_type,
        group_size=args.group_size, device=args.device, cache_dir=args.cache_dir,
        max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        served_model_name=args.served_model_name or args.model or default_name,
        api_key=args.api_key or os.environ.get("KILN_API_KEY") or None, warm_up=args.warm_up,
        default_options=_speculation(args), engine_options=_draft(args))
    return run(options, host=args.host, port=args.port, replicas=args.replicas,
               num_cpus_per_replica=args.num_cpus_per_replica, max_queued_requests=args.max_queue,
               autoscaling_config=autoscaling, shutdown_timeout=args.shutdown_timeout)
