"""kiln's OpenAI-compatible HTTP server (`kiln serve`), on the continuous-batching engine.

Layers, each a module: `protocol` (request bodies), `service` (the model and the server's
rules), `responses` (response bodies and stream chunks), `metrics` (Prometheus), `app`
(FastAPI routes, errors, disconnects), `server` (uvicorn, loading, graceful stop).
Needs the serve extra: pip install 'kiln[serve]'.
"""
