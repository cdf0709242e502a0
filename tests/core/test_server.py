"""The server's limit on request heads, over raw sockets (an HTTP client would refuse to send
most of these requests)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import weakref
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import orjson
import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from aihub.core.server import HeadWithBody
from tests.conftest import MakeApp, Served

LIMIT = 4096


@contextlib.asynccontextmanager
async def connection(
    served: Served,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    url = urlsplit(served.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers, body (by its `content-length`)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {
        name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def get(target: str = "/api/health", *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
async def limited(make_app: MakeApp) -> AsyncIterator[Served]:
    async with make_app(max_request_header_bytes=LIMIT) as served:
        yield served


async def test_a_head_within_the_limit_is_served(limited: Served) -> None:
    # Headers adding up to just under the limit, in one write and again byte by byte.
    filler = [f"X-Filler-{i}: {'v' * 80}" for i in range((LIMIT - 200) // 96)]
    request = get("/api/health", *filler)
    assert len(request) < LIMIT
    async with connection(limited) as (reader, writer):
        writer.write(request)
        status, _, body = await response(reader)
        assert status == 200
        assert orjson.loads(body)["status"] == "ok"
        for byte in request:  # the same again on the same connection, one byte per write
            writer.write(bytes([byte]))
            await writer.drain()
        status, _, _ = await response(reader)
        assert status == 200


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (get("/api/health", *[f"X-Filler-{i}: {'v' * 80}" for i in range(60)]), 431, None),
        (get("/api/health", f"Cookie: session={'c' * LIMIT}"), 431, None),
        (get(f"/api/health?q={'q' * LIMIT}"), 414, "uri_too_long"),
    ],
    ids=["many headers", "one long header", "long target"],
)
async def test_a_head_over_the_limit_is_refused_and_the_connection_closed(
    limited: Served,
    request_bytes: bytes,
    status: int,
    code: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with connection(limited) as (reader, writer):
        writer.write(request_bytes)
        got, headers, body = await response(reader)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    assert got == status
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = orjson.loads(body)
    assert error == {
        "error": code or "request_header_fields_too_large",
        "detail": error["detail"],
    }
    assert str(LIMIT) in error["detail"]
    assert any(
        record.name == "aihub.server" and record.levelno == logging.WARNING
        for record in caplog.records
    )
    # uvicorn's word for a malformed request is not said of one aihub refused.
    assert not [record for record in caplog.records if record.name == "uvicorn.error"]


async def test_a_malformed_request_is_still_uvicorn_s_to_answer_and_log(
    limited: Served, caplog: pytest.LogCaptureFixture
) -> None:
    async with connection(limited) as (reader, writer):
        writer.write(b"GET /api/health HTTP/1.1\r\nHost test\r\n\r\n")  # no colon
        status, _, _ = await response(reader)
    assert status == 400
    assert [record.getMessage() for record in caplog.records if record.name == "uvicorn.error"] == [
        "Invalid HTTP request received."
    ]


async def test_a_header_without_end_is_refused_before_it_ends(limited: Served) -> None:
    """A header value still arriving is kept by the parser, where no callback sees it: the
    bytes received are what stops it."""
    sent = 0
    async with connection(limited) as (reader, writer):

        async def send_without_end() -> None:
            nonlocal sent
            writer.write(b"GET /api/health HTTP/1.1\r\nHost: test\r\nX-Endless: ")
            with contextlib.suppress(ConnectionError):
                while sent < 1000 * 1024:
                    writer.write(b"v" * 1024)
                    await writer.drain()
                    sent += 1024
                    await asyncio.sleep(0.001)

        sender = asyncio.create_task(send_without_end())
        status, _, body = await response(reader)
        refused_after = sent
        await sender
    assert status == 431
    assert orjson.loads(body)["error"] == "request_header_fields_too_large"
    assert refused_after < 4 * LIMIT


async def test_the_limit_applies_to_each_request_on_a_connection(limited: Served) -> None:
    async with connection(limited) as (reader, writer):
        for _ in range(3):
            writer.write(get("/api/health", f"X-Small: {'s' * (LIMIT // 2)}"))
            status, _, _ = await response(reader)
            assert status == 200
        writer.write(get("/api/health", f"X-Big: {'b' * LIMIT}"))
        status, _, _ = await response(reader)
    assert status == 431


async def test_a_body_larger_than_the_head_limit_is_the_body_limits_concern(
    limited: Served,
) -> None:
    body = orjson.dumps({"email": "a@example.com", "password": "p" * (4 * LIMIT)})
    request = (
        b"POST /api/auth/login HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    async with connection(limited) as (reader, writer):
        writer.write(request)  # head and body in one write: the body is not the head's
        status, _, answer = await response(reader)
    # The application's own answer (no password is that long): the request reached it.
    assert (status, orjson.loads(answer)["error"]) == (422, "validation_error")


async def test_the_default_limit_takes_a_large_cookie(served: Served) -> None:
    """32 KiB by default: browsers send cookies of a few KiB, and a Clerk session token."""
    assert served.settings.max_request_header_bytes == 32_768
    response = await served.client.get("/api/health", headers={"Cookie": "a=" + "c" * 12_000})
    assert response.status_code == 200


class Recording(asyncio.Transport):
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Cycle:
    """What `HeadWithBody` needs of uvicorn's request cycle."""

    transport: asyncio.Transport


def held(transport: Recording) -> tuple[Cycle, HeadWithBody]:
    cycle = Cycle()
    wrapper = HeadWithBody(cast(RequestResponseCycle, cycle), transport)
    cycle.transport = wrapper
    return cycle, wrapper


async def test_a_response_s_head_goes_out_with_its_body_s_first_bytes() -> None:
    transport = Recording()
    cycle, _ = held(transport)

    cycle.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.writes == []
    cycle.transport.write(b"first")
    cycle.transport.write(b"second")
    await asyncio.sleep(0)

    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nfirst", b"second"]
    assert cycle.transport is transport  # the rest of the body goes straight through


async def test_a_head_whose_body_is_not_ready_goes_out_at_the_end_of_the_turn() -> None:
    transport = Recording()
    cycle, _ = held(transport)

    cycle.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    await asyncio.sleep(0)

    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]
    assert cycle.transport is transport


async def test_closing_sends_a_held_head_first_unless_the_connection_is_closing() -> None:
    transport = Recording()
    cycle, wrapper = held(transport)
    cycle.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    cycle.transport.close()
    assert (transport.writes, transport.closed) == ([b"HTTP/1.1 204 No Content\r\n\r\n"], True)

    gone = Recording()
    cycle, wrapper = held(gone)
    cycle.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    gone.closed = True  # the client left
    await asyncio.sleep(0)
    wrapper.write(b"late")  # a write through the wrapper, once it has stepped aside
    assert gone.writes == [b"late"]
    assert cycle.transport is gone


async def test_a_head_request_gets_its_head(served: Served) -> None:
    """uvicorn writes no body for HEAD: the head goes out on its own."""
    async with connection(served) as (reader, writer):
        writer.write(b"HEAD /api/health HTTP/1.1\r\nHost: test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 ")


def test_a_cycle_whose_response_never_began_is_freed_without_the_collector() -> None:
    """A client that leaves before its response begins leaves no reference cycle behind."""
    cycle, wrapper = held(Recording())
    freed = weakref.ref(cycle)
    gc.disable()
    try:
        del cycle, wrapper
        assert freed() is None
    finally:
        gc.enable()
