"""Pure-ASGI middleware: request ids, access logs and metrics, and a request-body size limit.

Pure ASGI (never `BaseHTTPMiddleware`) so that streams pass through untouched and unbuffered.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aihub.core import metrics
from aihub.core.logging import request_id_var

access_log = logging.getLogger("aihub.access")

RESPONSE_STARTED = "aihub.response_started"
"""Scope key set once the response has started: inner layers read it instead of wrapping
`send` themselves (every wrapper costs every chunk of every stream)."""

SEND_BODY = "aihub.send_body"
"""Scope key: the `send` that `RequestContextMiddleware` was given. The layers inside it (request
ids, CORS, the error handlers) look at a response's start only, so a stream that has started
sends its chunks here, past them: each layer's wrapper cost every chunk of every stream."""


class InFlight:
    """The requests being served. A server that stops cancels the ones that outlive its
    graceful timeout; their clean-up (a stream storing its partial answer, a reservation given
    back) must finish before what it uses is closed: `drained` waits for it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def add(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drained(self, seconds: float) -> int:
        """Wait up to `seconds` for every request to end; how many did not."""
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=seconds)
        return len(pending)


class RequestContextMiddleware:
    """Gives each request an id (or keeps a sane incoming `X-Request-ID`), logs and times it,
    and counts it in `in_flight`."""

    def __init__(self, app: ASGIApp, in_flight: InFlight | None = None) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight is not None and (task := asyncio.current_task()) is not None:
            self.in_flight.add(task)
        request_id = _incoming_request_id(scope) or secrets.token_hex(8)
        token = request_id_var.set(request_id)
        scope[SEND_BODY] = send
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                scope[RESPONSE_STARTED] = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # `send` holds the request's scope (uvicorn's cycle keeps it): left in the scope, it
            # would make a reference cycle of the whole request, its connection included, freed
            # only by the garbage collector's full passes, which stop the event loop meanwhile.
            del scope[SEND_BODY]
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            route_path = getattr(route, "path", "unmatched")
            metrics.http_request_duration.labels(scope["method"], route_path, str(status)).observe(
                elapsed
            )
            access_log.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={"status": status, "duration_ms": round(elapsed * 1000, 1)},
            )
            request_id_var.reset(token)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if 0 < len(candidate) <= 64 and candidate.replace("-", "").isalnum():
                return candidate
    return None


class BodySizeLimitMiddleware:
    """Answers 413 when a request body is larger than the limit, declared or streamed."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        larger: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.larger = dict(larger or {})
        """(method, path) -> limit, for routes that take large bodies; a path ending in `/`
        covers every path under it."""

    def _limit(self, scope: Scope) -> int:
        method, path = scope["method"], scope["path"]
        for (route_method, route_path), limit in self.larger.items():
            if method == route_method and (
                path == route_path or (route_path.endswith("/") and path.startswith(route_path))
            ):
                return limit
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_413(send, limit)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            # Only an app that reads its body after starting its response gets here, and
            # FastAPI reads bodies before: the 413 normally comes from the error handler.
            await _send_413(send, limit)


class _BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body parsing re-raises it instead of answering 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body is larger than {limit} bytes")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, limit: int) -> None:
    body = orjson.dumps(
        {"error": "payload_too_large", "detail": f"Request body is larger than {limit} bytes"}
    )
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
