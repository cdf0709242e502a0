"""The HTTP server: uvicorn as every aihub process runs it, with a limit on request heads, and
each response's head sent with its first bytes of body.

uvicorn's httptools protocol (the fast one, and the one `uvicorn[standard]` picks) keeps a
request's head, its request line and headers, however long it grows: 10 MB of headers were
answered 200, and a client that sends headers without end makes the server keep them all.
uvicorn's h11 protocol has a limit (`h11_max_incomplete_event_size`); `HeadLimitedProtocol` is
the httptools protocol with that same limit, from that same option (`MAX_REQUEST_HEADER_BYTES`).

uvicorn writes a response's status line and headers the moment the app starts the response, and
its body in a write of its own: two writes, two packets, and two wake-ups of the client, for every
response. A stream's client is woken by the head, reads it, and is woken again for the first
delta, which on a machine whose processes share its cores waits meanwhile (the upstream servers
aihub talks to, aiohttp's and others, send a head with the first bytes of its body).
`HeadWithBody` holds the head until the body's first write, or the end of the event loop's turn.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, NoReturn

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from aihub.core.config import Settings

logger = logging.getLogger("aihub.server")

H11_DEFAULT_MAX_HEAD_BYTES = 16 * 1024
"""h11's own limit, when uvicorn is given none."""

_REFUSALS = {
    414: ("uri_too_long", "The request's target is longer than {} bytes"),
    431: ("request_header_fields_too_large", "The request's headers are larger than {} bytes"),
}


class HeadWithBody(asyncio.Transport):
    """A response's transport that holds its first write, the status line and headers, until
    the next (the body's first bytes), or the end of the event loop's current turn, whichever
    comes first: head and body go out in one write, while a head whose body is not ready (a
    stream whose first token is still far off) goes out at once all the same.

    Once the head is out, the response's cycle gets the connection's own transport back, so the
    rest of the body costs nothing more. (The cycle is held weakly: a request whose client left
    before its response began would otherwise leave the two in a reference cycle.)
    """

    def __init__(self, cycle: RequestResponseCycle, transport: asyncio.Transport) -> None:
        super().__init__()
        self._cycle = weakref.ref(cycle)
        self._transport = transport
        self._held: bytes | None = None
        self._flush: asyncio.Handle | None = None
        self._released = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._released:
            self._transport.write(data)
        elif self._held is None:
            self._held = bytes(data)
            self._flush = asyncio.get_running_loop().call_soon(self._send_held)
        else:
            self._release(self._held + data)

    def _send_held(self) -> None:
        self._release(self._held)

    def _release(self, data: bytes | None) -> None:
        """Write `data` (what was held, and whatever followed it), unless the connection is
        closing, and step aside."""
        if self._flush is not None:
            self._flush.cancel()
        self._held = self._flush = None
        self._released = True
        if (cycle := self._cycle()) is not None:
            cycle.transport = self._transport
        if data is not None and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._send_held()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop the parser: uvicorn then calls `send_400_response`,
    which sends the refusal instead."""


_UNHEARD = logging.getLogger("aihub.server.unheard")
"""Where the protocol's uvicorn logger points while a head too large stops the parser: uvicorn
takes that for a malformed request and warns "Invalid HTTP request received." before the
refusal, which logs what happened itself."""
_UNHEARD.disabled = True


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request whose head is larger than the server's
    `h11_max_incomplete_event_size` (h11's own default if unset): 414 when its target alone is,
    else 431, as JSON (`{"error", "detail"}`), and the connection is closed.

    The parts the parser hands over (the target as it arrives, each header once whole) are
    counted as they come. A header still arriving is kept by the parser, out of sight, so the
    bytes received since the head began are counted too: a head that is not complete once
    that many bytes have come is refused then, before any more of it is kept.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.max_head_bytes = config.h11_max_incomplete_event_size or H11_DEFAULT_MAX_HEAD_BYTES
        self._received: int | None = 0
        """Bytes received since the current request's head began; None while its body is."""
        self._parsed = 0
        """Bytes of the current head's target and header fields, as the parser gave them."""
        self._refusal: int | None = None
        """The status the request was refused with."""
        self._uvicorn_logger = self.logger

    def data_received(self, data: bytes) -> None:
        if self._received is not None:
            self._received += len(data)
        super().data_received(data)
        if (
            self._received is not None  # the head is not complete yet
            and self._received > self.max_head_bytes
            and self._refusal is None
        ):
            self._refuse(431)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed = 0

    def on_url(self, url: bytes) -> None:
        self._parsed += len(url)
        if self._parsed > self.max_head_bytes:
            self._stop_parsing(414)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed += len(name) + len(value) + 4  # ": " and the line's end
        if self._parsed > self.max_head_bytes:
            self._stop_parsing(431)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._received = None
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous and self.cycle is not None:  # not an upgrade
            self.cycle.transport = HeadWithBody(self.cycle, self.transport)

    def on_message_complete(self) -> None:
        self._received = 0  # the next request's head may follow on this connection
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self.logger = self._uvicorn_logger
            self._refuse(self._refusal)

    def _stop_parsing(self, status: int) -> NoReturn:
        self._refusal = status
        self.logger = _UNHEARD  # `send_400_response` gives uvicorn's back
        raise _HeadTooLarge

    def _refuse(self, status: int) -> None:
        self._refusal = status
        code, detail = _REFUSALS[status]
        body = orjson.dumps({"error": code, "detail": detail.format(self.max_head_bytes)})
        logger.warning(
            "refused a request whose head is larger than %d bytes",
            self.max_head_bytes,
            extra={"status": status, "client": self.client[0] if self.client else None},
        )
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The options every aihub server runs uvicorn with, `aihub serve` and the tests' alike."""
    return {
        "http": HeadLimitedProtocol,
        "h11_max_incomplete_event_size": settings.max_request_header_bytes,
        "log_config": None,
        "access_log": False,  # aihub logs its own (`aihub.access`)
        "proxy_headers": False,  # aihub decides whom to believe (TRUSTED_PROXIES)
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds,
    }
