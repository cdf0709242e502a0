"""The least a Python relay can do: the floor that `stream_overhead.py --floor` measures aihub by.

    uv run python bench/relay_floor.py --port 9200 --upstream http://127.0.0.1:9100 [--sdk]

A bare ASGI app on uvicorn (uvloop, httptools, as aihub runs) that answers any request by opening
the upstream's streamed chat completion with aiohttp and writing each read's text deltas to the
client as plain text. No framework, no SDK, no auth, no database, no validation, no errors
handled: nothing a product needs, so what it costs is what the machine charges any Python relay
for the same streams. With `--sdk` it opens the upstream as aihub does, through the official
`openai` SDK (its generic `post` over its aiohttp client, the body read raw), to show what the
SDK alone adds. Its connections to the upstream stay open while idle as long as aihub's do
(`IDLE_CONNECTION_SECONDS`): with `--floor` a round of lone streams takes longer than that, and a
floor that kept its connection while aihub opened a new one gained ~1 ms on aihub per stream.
Benchmarks only.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai
import orjson
import uvicorn

from aihub.providers.openai import IDLE_CONNECTION_SECONDS

BODY = orjson.dumps(
    {
        "model": "gpt-5-nano",
        "messages": [{"role": "user", "content": "Come up with a new business idea"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-0000000000"}


class Relay:
    def __init__(self, upstream: str, *, sdk: bool) -> None:
        self.url = f"{upstream}/v1/chat/completions"
        self.session: aiohttp.ClientSession | None = None
        self.sdk = (
            openai.AsyncOpenAI(
                api_key="sk-bench-0000000000",
                base_url=f"{upstream}/v1",
                max_retries=0,
                http_client=openai.DefaultAioHttpClient(
                    limits=httpx2.Limits(
                        max_connections=1000,
                        max_keepalive_connections=100,
                        keepalive_expiry=IDLE_CONNECTION_SECONDS,
                    )
                ),
            )
            if sdk
            else None
        )

    async def open(self) -> AsyncIterator[bytes]:
        """The upstream's body, as it arrives."""
        if self.sdk is not None:
            stream = await self.sdk.post(
                "/chat/completions",
                cast_to=object,
                body=orjson.loads(BODY),
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
            async with stream:
                async for chunk in stream.response.aiter_raw():
                    yield chunk
            return
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=IDLE_CONNECTION_SECONDS),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        async with self.session.post(self.url, data=BODY, headers=HEADERS) as upstream:
            async for chunk in upstream.content.iter_any():
                yield chunk

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            if self.session is not None:
                await self.session.close()
            if self.sdk is not None:
                await self.sdk.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        while (await receive()).get("more_body"):
            pass
        started = False
        buffer = b""
        async for chunk in self.open():
            if not started:
                started = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                    }
                )
            *lines, buffer = (buffer + chunk).split(b"\n")
            text = []
            for line in lines:
                if line.startswith(b"data: {"):
                    for choice in orjson.loads(line[6:]).get("choices") or ():
                        if content := (choice.get("delta") or {}).get("content"):
                            text.append(content)
            if text:
                body = "".join(text).encode()
                await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--sdk", action="store_true", help="open the upstream through the SDK")
    args = parser.parse_args()
    relay = Relay(args.upstream, sdk=args.sdk)
    uvicorn.run(relay, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
