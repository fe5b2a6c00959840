"""The HTTP layer: FastAPI routes over a ModelService, errors in OpenAI's shape, Server-Sent
Events, and client disconnects turned into aborts.

A disconnect is noticed by listening for the ASGI `http.disconnect` message while the
request runs (streamed or not), so a client that leaves frees its KV slot within a decode
step even while its text is held back or it still waits in the queue.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngineDeadError
from .metrics import CONTENT_TYPE
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import Formatter
from .service import APIError, ModelService, bad_request

log = logging.getLogger("kiln.serve")
ENGINE_DEAD = APIError(503, "the engine stopped on an internal error; retry on another server",
                       "service_unavailable", code="engine_dead")
REJECTIONS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 429: "queue_full",
              503: "service_unavailable"}


def build_app(service: ModelService, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        reason = error.code or REJECTIONS.get(error.status, str(error.status))
        service.metrics.rejected.labels(reason).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(error.status_code, str(error.detail), kind).body(),
                            status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return await _api_error(request, _validation_failure(error.errors()))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, error: EngineDeadError) -> JSONResponse:
        log.error("a request met a dead engine: %s", error)
        return await _api_error(request, ENGINE_DEAD)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {error}", "server_error").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), api_key):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> Response:
        status = service.health
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        service.check_ready()
        return {"object": "list", "data": [service.model_card()]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body = await _parse(request, CompletionRequest)
        return await _answer(request, body, service.admit_completion(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await _parse(request, ChatCompletionRequest)
        return await _answer(request, body, service.admit_chat(body), chat=True)

    async def _answer(request: Request, body, admitted, chat: bool) -> Response:
        formatter = Formatter(service, admitted, chat)
        events = service.events(admitted)
        service.in_flight += 1
        if body.stream:
            return EventStream(formatter.chunks(events, body.include_usage),
                               on_close=lambda: _done(admitted))
        try:
            result = await _until_disconnected(request, formatter.whole(events))
        finally:
            _done(admitted)
        if result is None:  # the client left: nobody reads an answer
            return Response(status_code=499)
        return JSONResponse(result)

    def _done(admitted) -> None:
        service.note_abandoned(admitted)
        service.in_flight -= 1

    return app


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as `model`; malformed JSON and invalid fields are 400s naming the field."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _validation_failure(error.errors()) from None


def _validation_failure(errors: list[dict]) -> APIError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = location[0] if location else None
    where = ".".join(location)
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return APIError(400, message, param=param)


async def _until_disconnected(request: Request, work: Awaitable):
    """`work`'s result, or None (and `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        listener.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


async def _disconnected(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """A text/event-stream response that stops (closing `chunks`, which aborts the engine
    requests behind it) as soon as the client disconnects."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            try:
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk.encode(),
                                "more_body": True})
            except EngineDeadError:  # the stream has begun: report in it
                log.error("a streamed request met a dead engine")
                failure = ENGINE_DEAD.body()
                await send({"type": "http.response.body", "more_body": True,
                            "body": f"data: {json.dumps(failure)}\n\n".encode()})
            except Exception as error:  # noqa: BLE001 - the stream has begun: report in it
                log.exception("streamed request failed")
                failure = APIError(500, f"internal error: {error}", "server_error").body()
                await send({"type": "http.response.body", "more_body": True,
                            "body": f"data: {json.dumps(failure)}\n\n".encode()})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        sender = asyncio.ensure_future(stream())
        listener = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when this task is cancelled (Ray Serve cancels a request whose client
            # left), perhaps again while cleaning up: the engine request is aborted and the
            # request counted as done whatever happens.
            for task in (sender, listener):
                task.cancel()
            try:
                await asyncio.gather(sender, listener, return_exceptions=True)
            finally:
                try:
                    await self.chunks.aclose()
                finally:
                    self.on_close()
