"""The HTTP stack of the SDKs that take an httpx2 client (openai, google-genai): httpx2's API
over aiohttp's connection pool and C HTTP parser, keeping no cookies at either layer.

The transport is the one the openai SDK ships for its `DefaultAioHttpClient`. httpx2's own
(httpcore2 over the pure-Python h11 parser) cost the chats benchmark ~15% more CPU per streamed
Gemini reply, and ~1 ms more time to first token (`bench/stream_overhead.py --product chats`).
Through httpx2's API the adapters keep what they rely on: response hooks, and a timeout that
bounds each read rather than the whole stream.
"""

from __future__ import annotations

import ssl

import aiohttp
import httpx2
from openai._vendor.httpx_aiohttp import AiohttpTransport


def aiohttp_transport(limits: httpx2.Limits, ssl_context: ssl.SSLContext) -> AiohttpTransport:
    """An httpx2 transport on an aiohttp session of its own, built on first use (inside the
    event loop) with `limits`, and without a cookie jar: one client serves every caller (and,
    with bring-your-own-key, every caller's key), so a cookie one answer sets (a load balancer's,
    a proxy's session) must not ride along on anybody else's request."""

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=limits.max_connections or 0,
            keepalive_timeout=limits.keepalive_expiry,
            ssl=ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    return AiohttpTransport(verify=ssl_context, limits=limits, client=session)
