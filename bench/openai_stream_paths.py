"""Time to first token of many concurrent OpenAI streams, through three client paths.

Starts the fake OpenAI (`tests.fakes.openai`) in a subprocess on a loopback port, answering every
request with 100 tokens 20 ms apart, then opens 300 streams arriving evenly over 3 s through:

  (a) the SDK iterating parsed `ChatCompletionChunk` objects, default httpx2 client;
  (b) the same, with `DefaultAioHttpClient`;
  (c) aihub's `OpenAIProvider`: the SDK's `post(stream=True)`, the body read raw, orjson per
      `data:` line, aiohttp.

Every stream is read to its end (the parsing load is the point); time to first token is measured
from each stream's scheduled arrival. Prints p50/p99 per arm and each arm's ratio to arm (c).

    uv run python bench/openai_stream_paths.py [--streams 300] [--arrival 3] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import openai

from aihub.providers.base import Message, TextDelta, TextRequest
from aihub.providers.openai import OpenAIProvider

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-5-nano"
PROMPT = "Come up with a new business idea for AI Agents."
API_KEY = "sk-bench-not-a-real-key"
BUDGET_SECONDS = 300

StreamOnce = Callable[[float], Awaitable[float]]
"""Run one stream to its end; return its time to first token, from the given arrival time."""
Close = Callable[[], Awaitable[None]]
MakeArm = Callable[[str], tuple[StreamOnce, Close]]


def make_sdk(base_url: str, *, aiohttp: bool) -> tuple[StreamOnce, Close]:
    client = openai.AsyncOpenAI(
        api_key=API_KEY,
        base_url=base_url,
        max_retries=0,
        http_client=openai.DefaultAioHttpClient() if aiohttp else None,
    )

    async def once(arrival: float) -> float:
        first = math.nan
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if math.isnan(first) and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - arrival
        return first

    return once, client.close


def make_adapter(base_url: str) -> tuple[StreamOnce, Close]:
    provider = OpenAIProvider(api_key=API_KEY, base_url=base_url, max_retries=0)
    request = TextRequest(messages=(Message.user(PROMPT),))

    async def once(arrival: float) -> float:
        first = math.nan
        async for event in provider.stream_text(request, model=MODEL):
            if math.isnan(first) and isinstance(event, TextDelta):
                first = time.perf_counter() - arrival
        return first

    return once, provider.aclose


ARMS: dict[str, tuple[str, MakeArm]] = {
    "a": ("SDK chunk objects, httpx2", lambda url: make_sdk(url, aiohttp=False)),
    "b": ("SDK chunk objects, aiohttp", lambda url: make_sdk(url, aiohttp=True)),
    "c": ("streaming response + orjson, aiohttp", make_adapter),
}


async def run_arm(base_url: str, key: str, *, streams: int, arrival: float) -> list[float]:
    once, close = ARMS[key][1](base_url)
    start = time.perf_counter() + 0.05
    gap = arrival / streams

    async def one(index: int) -> float:
        at = start + index * gap
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        return await once(at)

    try:
        results = await asyncio.gather(*(one(i) for i in range(streams)), return_exceptions=True)
    finally:
        await close()
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        print(f"  arm {key}: {len(failures)} streams failed, e.g. {failures[0]!r}")
    return [r for r in results if isinstance(r, float) and not math.isnan(r)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the fake OpenAI exited before it started")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError("the fake OpenAI did not start within 15 s")


async def bench(
    args: argparse.Namespace, port: int, process: subprocess.Popen[bytes]
) -> dict[str, list[float]]:
    """Every arm's times to first token, against the fake `main` started on `port`."""
    await wait_for_port(port, process)
    base_url = f"http://127.0.0.1:{port}/v1"
    ttft: dict[str, list[float]] = {key: [] for key in ARMS}
    for _ in range(args.rounds):
        for key in ARMS:
            ttft[key] += await run_arm(base_url, key, streams=args.streams, arrival=args.arrival)
            await asyncio.sleep(1)  # let sockets of the previous arm close
    return ttft


def report(ttft: dict[str, list[float]]) -> None:
    base50, base99 = percentile(ttft["c"], 0.5), percentile(ttft["c"], 0.99)
    print(f"{'arm':<44} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'p50/c':>7} {'p99/c':>7}")
    for key, (label, _) in ARMS.items():
        p50, p99 = percentile(ttft[key], 0.5), percentile(ttft[key], 0.99)
        print(
            f"({key}) {label:<40} {len(ttft[key]):>4} {p50 * 1000:>8.1f} {p99 * 1000:>8.1f} "
            f"{p50 / base50:>7.2f} {p99 / base99:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--arrival", type=float, default=3.0, help="seconds over which they arrive")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    else:
        runner = uvloop.run
    port = free_port()
    command = [sys.executable, "-m", "tests.fakes.openai", "--port", str(port)]
    command += ["--tokens", str(args.tokens), "--delay-ms", str(args.delay_ms)]
    process = subprocess.Popen(command, cwd=ROOT)
    try:
        print(
            f"{args.streams} streams arriving over {args.arrival:g} s, "
            f"{args.tokens} tokens at {args.delay_ms:g} ms, {args.rounds} round(s)"
        )
        report(runner(asyncio.wait_for(bench(args, port, process), BUDGET_SECONDS)))
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    main()
