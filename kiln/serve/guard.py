"""The ASGI layer around the app that every request passes first: a request id, the Host
allowlist, the Content-Type rule, the body size limit, a send timeout, the access log, and
the last word on errors (a bug answers 500 with the request id, never its internals).

It is plain ASGI rather than a Starlette middleware so that a too-large body is refused from
its Content-Length, or as soon as the limit is read, without reading the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from .limits import ServeLimits
from .service import APIError

log = logging.getLogger("kiln.serve")
access_log = logging.getLogger("kiln.serve.access")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
JSON_TYPES = ("application/json",)


class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the server's limit of {limit} "
                              "bytes (kiln serve --max-body-size)", code="body_too_large",
                         # the rest of the body is not read: the connection cannot be reused
                         headers={"Connection": "close"})


class Guard:
    """Wraps the ASGI `app`; `rejected(reason)` counts a refusal in the metrics."""

    def __init__(self, app, limits: ServeLimits, rejected: Callable[[str], None]) -> None:
        self.app, self.limits, self.rejected = app, limits, rejected

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status: list[int] = []  # the response's status, once started
        send_timeout = self.limits.send_timeout

        async def guarded_send(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            if not await _sent_within(send(message), send_timeout):
                state["send_timed_out"] = True
                raise SendTimeout(f"the client read nothing for {send_timeout} s "
                                  "(kiln serve --send-timeout)")

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                self.rejected(refusal.code or str(refusal.status))
                await _send_error(guarded_send, refusal)
                return
            await self.app(scope, self._limited(scope, receive), guarded_send)
        except SendTimeout as error:
            log.warning("request %s: %s; its sequences were aborted", request_id, error)
        except Exception:  # noqa: BLE001 - the last word: a bug, answered without internals
            log.exception("request %s failed", request_id)
            if not status:
                await _send_error(guarded_send, APIError(
                    500, f"internal error (request id {request_id}); the server log has the "
                         "details", "server_error", code="internal_error"))
        finally:
            _log_access(scope, state, status[0] if status else 499, started)

    def _refusal(self, scope) -> APIError | None:
        """An error for a request refused from its headers alone."""
        headers = _headers(scope)
        if self.limits.allowed_hosts:
            host = headers.get("host", "").rsplit(":", 1)[0].strip("[]").lower()
            if host not in self.limits.allowed_hosts:
                return APIError(400, f"the Host {host!r} is not served here (kiln serve "
                                     "--allowed-hosts)", code="invalid_host")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind not in JSON_TYPES:
                return APIError(415, "send the body as JSON with 'Content-Type: application/json'"
                                     f" (got {kind or 'no Content-Type'!r})",
                                code="unsupported_media_type")
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    return APIError(400, "the Content-Length header is not a number",
                                    code="invalid_content_length")
                if int(length) > self.limits.max_body_bytes:
                    return BodyTooLarge(self.limits.max_body_bytes)
        return None

    def _limited(self, scope, receive):
        """`receive`, refusing the body once more than the limit has arrived (a body sent
        without Content-Length, chunked)."""
        limit = self.limits.max_body_bytes
        read = 0

        async def receive_limited():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise BodyTooLarge(limit)
            return message

        return receive_limited


async def _sent_within(sending, timeout: float) -> bool:
    """Await `sending`; False if it takes longer than `timeout` (it is then cancelled).
    Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation of the caller
    that arrives as the send completes, and a stream whose client left then runs on."""
    task = asyncio.ensure_future(sending)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        return False
    task.result()  # its exception, if any
    return True


class SendTimeout(Exception):
    """The client stopped reading its response."""


def _headers(scope) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", [])}


def _request_id(scope) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id":
            given = value.decode("latin-1")
            if REQUEST_ID.fullmatch(given):
                return given
    return uuid.uuid4().hex


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _log_access(scope, state: dict, status: int, started: float) -> None:
    usage = state.get("usage") or {}
    ttft = state.get("ttft")
    client = (scope.get("client") or ("-", 0))[0]
    fields = {"request_id": state.get("request_id"), "client": client,
              "method": scope["method"], "path": scope["path"], "status": status,
              "duration_ms": round((time.perf_counter() - started) * 1000, 2),
              "prompt_tokens": usage.get("prompt_tokens"),
              "completion_tokens": usage.get("completion_tokens"),
              "ttft_ms": None if ttft is None else round(ttft * 1000, 2)}
    access_log.info(" ".join(f"{name}={value}" for name, value in fields.items()),
                    extra={"fields": fields})
