"""A minimal OpenAI-style /v1/completions endpoint over CTranslate2, the way users of
CTranslate2 and hf-hub-ctranslate2 put a model behind FastAPI: one `ctranslate2.Generator`,
each request's tokens streamed from `generate_tokens` on a worker thread. A peer for
benchmarks/serve_bench.py, not part of kiln.

    python benchmarks/ct2_server.py --model CT2_FOLDER --tokenizer HF_FOLDER --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid

import ctranslate2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers import Tokenizer


def build_app(generator: ctranslate2.Generator, tokenizer: Tokenizer, name: str) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = tokenizer.encode(body["prompt"]).tokens
        options = dict(max_length=int(body.get("max_tokens", 16)),
                       sampling_temperature=float(body.get("temperature", 1.0)) or 1.0,
                       sampling_topk=1 if not body.get("temperature") else 0)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                for step in generator.generate_tokens(prompt, **options):
                    loop.call_soon_threadsafe(queue.put_nowait, step.token_id)
                    if stop.is_set():
                        break
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=produce, daemon=True).start()
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": name}

        async def pieces():
            ids, shown = [], ""
            try:
                while (token := await queue.get()) is not None:
                    ids.append(token)
                    text = tokenizer.decode(ids)
                    if not text.endswith("\ufffd"):  # whole characters only
                        yield text[len(shown):]
                        shown = text
            finally:
                stop.set()

        if body.get("stream"):
            async def events():
                async for piece in pieces():
                    chunk = {**head, "choices": [{"index": 0, "text": piece,
                                                  "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text = "".join([piece async for piece in pieces()])
        return JSONResponse({**head, "choices": [{"index": 0, "text": text,
                                                  "finish_reason": "length"}]})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    generator = ctranslate2.Generator(args.model, device="cpu", compute_type=args.compute_type,
                                      intra_threads=args.threads)
    tokenizer = Tokenizer.from_file(f"{args.tokenizer}/tokenizer.json")
    uvicorn.run(build_app(generator, tokenizer, "ctranslate2"), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
