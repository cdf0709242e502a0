"""The least a Python relay can do: the floor that `stream_overhead.py --floor` measures aihub by.

    uv run python bench/relay_floor.py --port 9200 --upstream http://127.0.0.1:9100

A bare ASGI app on uvicorn (uvloop, httptools, as aihub runs) that answers any request by opening
the upstream's streamed chat completion with aiohttp and writing each read's text deltas to the
client as plain text. No framework, no SDK, no auth, no database, no validation, no errors
handled: nothing a product needs, so what it costs is what the machine charges any Python relay
for the same streams. Benchmarks only.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import orjson
import uvicorn

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
    def __init__(self, upstream: str) -> None:
        self.url = f"{upstream}/v1/chat/completions"
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            if self.session is not None:
                await self.session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        while (await receive()).get("more_body"):
            pass
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
            )
        async with self.session.post(self.url, data=BODY, headers=HEADERS) as upstream:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            buffer = b""
            async for chunk in upstream.content.iter_any():
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
    args = parser.parse_args()
    uvicorn.run(Relay(args.upstream), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
