"""Serve an ASGI app on a loopback port inside the running event loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@asynccontextmanager
async def serve(app: ASGIApp, *, lifespan: str = "on", **options: Any) -> AsyncIterator[str]:
    """Yield the base URL (`http://127.0.0.1:PORT`) of `app` served by a real uvicorn, with
    uvicorn's `options` over these (aihub's own: `aihub.core.server.uvicorn_options`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it, Nagle and delayed ACKs cost ~40 ms a request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        **{
            "log_config": None,
            "access_log": False,
            "proxy_headers": False,  # as `aihub serve`: aihub decides whom to believe
            **options,
            "lifespan": lifespan,
            "timeout_graceful_shutdown": 2,
        },
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server._serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


class SetsCookies:
    """Wraps a fake's app: every response sets `cookie()`'s cookie, when it names one (as a load
    balancer in front of a provider does), so a test can check that no client sends it back."""

    def __init__(self, app: ASGIApp, cookie: Callable[[], str | None]) -> None:
        self.app = app
        self.cookie = cookie

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_cookie(message: Message) -> None:
            cookie = self.cookie()
            if message["type"] == "http.response.start" and cookie is not None:
                headers = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def serve_forever(app: ASGIApp, *, host: str, port: int) -> None:
    """Serve a fake on its own, for benchmarks: the fastest uvicorn set-up there is."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        backlog=4096,
    )
