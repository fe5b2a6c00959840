"""The HTTP layer: FastAPI routes over a ModelService, errors in OpenAI's shape, Server-Sent
Events, and client disconnects turned into aborts. Around it, the Guard (guard.py): request
ids, the body/Content-Type/Host rules, the send timeout, the access log and the last word on
errors; CORS only for --allowed-origins.

A response starts only when its first token is there (or its error is known), so a request
that times out in the queue gets a real 503 even when it asked for a stream.

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
from starlette.middleware.cors import CORSMiddleware

from ..errors import EngineDeadError
from .embeddings import EmbeddingRequest, EmbeddingService
from .guard import Guard, SendTimeout
from .metrics import CONTENT_TYPE
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import Formatter
from .service import APIError, ModelService, bad_request

log = logging.getLogger("kiln.serve")
ENGINE_DEAD = APIError(503, "the engine stopped on an internal error; retry on another server",
                       "service_unavailable", code="engine_dead")
REJECTIONS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "bad_method",
              413: "body_too_large", 415: "unsupported_media_type", 429: "queue_full",
              503: "service_unavailable", 504: "request_timeout"}


def build_app(service: ModelService | EmbeddingService, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    limits = service.limits
    if limits.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(limits.allowed_origins),
                           allow_methods=["GET", "POST"], expose_headers=["x-request-id"],
                           allow_headers=["authorization", "content-type", "x-request-id"])
    app.add_middleware(Guard, limits=limits,
                       rejected=lambda reason: service.metrics.rejected.labels(reason).inc())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        reason = error.code or REJECTIONS.get(error.status, str(error.status))
        service.metrics.rejected.labels(reason).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code == 404 else "invalid_request_error"
        return await _api_error(request, APIError(error.status_code, str(error.detail), kind,
                                                  headers=dict(error.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return await _api_error(request, _validation_failure(error.errors()))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, error: EngineDeadError) -> JSONResponse:
        log.error("a request met a dead engine: %s", error)
        return await _api_error(request, ENGINE_DEAD)

    # Any other exception is a bug: the Guard answers 500 with the request id and logs it.

    expected_key = api_key.encode() if api_key is not None else None

    def authorize(request: Request) -> None:
        if expected_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Header values arrive as latin-1: compare their bytes (a str of non-ASCII characters
        # cannot be compared in constant time).
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("latin-1"), expected_key):
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

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict:
        authorize(request)
        service.check_ready()
        service.check_model(model_id)
        return service.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body = await _parse(request, CompletionRequest)
        admitted = await service.admit_completion(body, _client(request))
        return await _answer(request, body, admitted, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await _parse(request, ChatCompletionRequest)
        admitted = await service.admit_chat(body, _client(request))
        return await _answer(request, body, admitted, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        authorize(request)
        body = await _parse(request, EmbeddingRequest)
        if not isinstance(service, EmbeddingService):
            service.check_ready()
            raise bad_request(f"{service.served_model_name!r} generates text; serve an encoder "
                              "model (e.g. sentence-transformers/all-MiniLM-L6-v2) for "
                              "embeddings", "model", code="wrong_endpoint")
        service.in_flight += 1
        try:
            result = await _until_disconnected(request, service.embed(body))
        finally:
            service.in_flight -= 1
        if result is None:  # the client left
            return Response(status_code=499)
        request.state.usage = result["usage"]
        return JSONResponse(result)

    async def _answer(request: Request, body, admitted, chat: bool) -> Response:
        formatter = Formatter(service, admitted, chat)
        events = service.timed_events(admitted)
        service.in_flight += 1
        try:  # the first token, or the error to answer instead (queue or request timeout)
            first = await _until_disconnected(request, events.__anext__())
        except BaseException:
            await events.aclose()
            _done(request, admitted)
            raise
        if first is None:  # the client left before its first token
            await events.aclose()
            _done(request, admitted)
            return Response(status_code=499)
        events = _prepend(first, events)
        if body.stream:
            return EventStream(formatter.chunks(events, body.include_usage),
                               on_close=lambda: _done(request, admitted))
        try:
            result = await _until_disconnected(request, formatter.whole(events))
        finally:
            await events.aclose()
            _done(request, admitted)
        if result is None:  # the client left: nobody reads an answer
            return Response(status_code=499)
        return JSONResponse(result)

    def _done(request: Request, admitted) -> None:
        service.done(admitted)
        service.in_flight -= 1
        request.state.usage = admitted.usage  # for the access log
        request.state.ttft = admitted.ttft

    return app


def _client(request: Request) -> str:
    """Whose share of the queue a request takes: its address."""
    return request.client.host if request.client else ""


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as `model`; malformed JSON and invalid fields are 400s naming the field."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as error:
        raise bad_request(f"the body is not UTF-8: {error}") from None
    except RecursionError:
        raise bad_request("the body is not valid JSON for kiln: it is nested too deeply") from None
    except json.JSONDecodeError as error:
        raise bad_request(f"the body is not valid JSON: {error}") from None
    except ValueError:  # Python refuses to convert integers of over 4300 digits
        raise bad_request("the body holds an integer with too many digits") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the body holds a lone UTF-16 surrogate (e.g. \\ud800 without its "
                          "pair); send valid Unicode text") from None
    except RecursionError:
        raise bad_request("the body is nested too deeply") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _validation_failure(error.errors()) from None
    except RecursionError:
        raise bad_request("the body is nested too deeply") from None


def _validation_failure(errors: list[dict]) -> APIError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = location[0] if location else None
    cause = (first.get("ctx") or {}).get("error")
    if getattr(cause, "param", None):  # a field refused by name (an unknown field)
        param = cause.param
    where = ".".join(location)
    text = str(first.get("msg")).removeprefix("Value error, ")
    message = f"{where}: {text}" if where else text
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
            except SendTimeout as error:  # the client stopped reading: give up its slots
                log.warning("request %s: %s; its sequences were aborted",
                            scope.get("state", {}).get("request_id"), error)
                return
            except EngineDeadError:  # the stream has begun: report in it
                log.error("a streamed request met a dead engine")
                failure = ENGINE_DEAD.body()
                await send({"type": "http.response.body", "more_body": True,
                            "body": f"data: {json.dumps(failure)}\n\n".encode()})
            except Exception:  # noqa: BLE001 - the stream has begun: report in it
                request_id = scope.get("state", {}).get("request_id")
                log.exception("streamed request %s failed", request_id)
                failure = APIError(500, f"internal error (request id {request_id}); the server "
                                        "log has the details", "server_error",
                                   code="internal_error").body()
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
