"""What aihub adds to a stream: a product's stream through aihub vs its upstream called directly.

    uv run python bench/stream_overhead.py [--product ideas|byok|chats] [--streams 300]

`--product ideas` (the default) measures `GET /api`, the business-idea stream (`--wire markdown`
as the original client reads it, or `--wire json`); `--product byok` measures `POST /api/chat`,
the bring-your-own-key relay, read as the plain text its client appends; `--product chats`
measures `POST /chat`, a new Gemini chat read as the NDJSON its client splits (no targets: the
issues set none for it yet; the fake sends one token per event, far finer than Gemini does).

Starts a fake OpenAI (or Gemini) upstream (100 tokens at 20 ms) and `aihub serve` as separate
processes on loopback ports, then measures, at the client, the time to first token and the largest
gap between chunks of each stream, for both arms in the same run with the arms interleaved (ABBA).
Prints the
added time to first token (p50, p99), the added largest gap (p99) and the ratios to the direct
arm, for 1 stream at a time and for N streams arriving over a few seconds and held open together.

For the concurrent streams it also prints the CPU time each process spent per stream (the
upstream, the relay, this client) and how many cores that kept busy: every process here shares
this machine's cores, and once they are all busy every added millisecond is queueing, not aihub.
`--floor` adds a third arm, `bench/relay_floor.py` (the least a Python relay can do: uvicorn and
aiohttp, no framework, SDK or database), to show what the machine charges any relay.
Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from _support import free_port, register, start, stop, wait_ready

TOKENS = 100
DELAY_MS = 20


@dataclass
class Sample:
    ttft: float
    largest_gap: float
    chunks: int


@dataclass
class Arm:
    name: str
    samples: list[Sample] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    """What the first failures were (`report` prints them)."""
    relay: list[int] = field(default_factory=list)
    """The processes that relay this arm's streams (none for the direct arm)."""
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds spent during this arm's bursts, by role."""
    wall: float = 0.0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` and all their descendants (Linux' /proc; 0 elsewhere)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stack = list(pids)
    while stack:
        pid = stack.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
        stack.extend(int(child) for child in children)
    return total


async def measured(arm: Arm, upstream: int, burst: Awaitable[None]) -> None:
    """Run `burst`, adding the CPU time of the upstream, the relay and this client to `arm`."""

    def snapshot() -> dict[str, float]:
        return {
            "upstream": cpu_seconds([upstream]),
            "relay": cpu_seconds(arm.relay),
            "client": time.process_time(),
        }

    # /proc is read in a thread: nothing in `async def` reads a file on the event loop.
    before, started = await asyncio.to_thread(snapshot), time.perf_counter()
    await burst
    after = await asyncio.to_thread(snapshot)
    arm.wall += time.perf_counter() - started
    for role, value in after.items():
        arm.cpu[role] = arm.cpu.get(role, 0.0) + value - before[role]


def inherited_env() -> dict[str, str]:
    """This process's environment for the servers a benchmark starts, less the providers' and
    the database's settings, which are the benchmark's (DATABASE_POOL_SIZE and DATABASE_ECHO
    pass through, to tune aihub's pool)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "GEMINI_", "CLERK_")) and k != "DATABASE_URL"
    }


def aihub_env(env: dict[str, str], *, upstream: str, data_dir: Path) -> dict[str, str]:
    """`env` with what every aihub served here is given: the fake OpenAI `upstream` (for the
    bring-your-own-key chat too), local accounts, no retries, and its limits on, as in
    production, but large enough for every round."""
    return {
        **env,
        "DATA_DIR": str(data_dir),
        "OPENAI_API_KEY": "sk-bench-0000000000",
        "OPENAI_BASE_URL": f"{upstream}/v1",
        "BYOK_BASE_URL": f"{upstream}/v1",
        "LOG_LEVEL": "WARNING",
        "AUTH_ALLOW_REGISTRATION": "true",
        "PROVIDER_MAX_RETRIES": "0",
        # Every stream reserves a unit, as in production.
        "IDEAS_DAILY_QUOTA": "1000000000",
        "CHATS_DAILY_QUOTA": "1000000000",
        "BYOK_RATE_LIMIT": "1000000/second",
    }


ArmSpec = tuple[
    Callable[[aiohttp.ClientSession], Awaitable[aiohttp.ClientResponse]],
    Callable[[bytes], bool] | None,
]
"""How to open one stream of an arm, and which lines of it carry model text (None: the stream is
plain text, and every chunk that arrives does)."""


async def read_stream(
    session: aiohttp.ClientSession,
    request: Callable[[], Awaitable[aiohttp.ClientResponse]],
    is_token: Callable[[bytes], bool] | None,
) -> Sample:
    started = time.perf_counter()
    first: float | None = None
    last = started
    largest_gap = 0.0
    chunks = 0
    response = await request()
    async with response:
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
        pieces = response.content if is_token else response.content.iter_any()
        async for line in pieces:
            if is_token is not None and not is_token(line):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                largest_gap = max(largest_gap, now - last)
            last = now
            chunks += 1
    if first is None:
        raise RuntimeError("no token arrived")
    return Sample(first - started, largest_gap, chunks)


def direct_arm(upstream: str) -> ArmSpec:
    body = {
        "model": "gpt-5-nano",
        "messages": [{"role": "user", "content": "Come up with a new business idea"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    def request(session: aiohttp.ClientSession) -> Awaitable[aiohttp.ClientResponse]:
        return session.post(
            f"{upstream}/v1/chat/completions",
            json=body,
            headers={"Authorization": "Bearer sk-bench-0000000000"},
        )

    return (
        request,
        lambda line: (
            line.startswith(b"data: {") and b'"content"' in line and b'"content":""' not in line
        ),
    )


def aihub_arm(base: str, token: str, wire: str) -> ArmSpec:
    """The ideas stream as the original client reads it (`markdown`) or as named JSON events."""
    url = f"{base}/api" + ("?format=json" if wire == "json" else "")

    def request(session: aiohttp.ClientSession) -> Awaitable[aiohttp.ClientResponse]:
        return session.get(
            url, headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        )

    if wire == "json":
        return request, lambda line: line.startswith(b'data: {"text"')
    return request, lambda line: line.startswith(b"data: ") and len(line) > 7


def byok_arm(base: str) -> ArmSpec:
    """Bring-your-own-key chat as its original client reads it: plain text, appended."""
    body = {
        "developer_message": "You are a helpful assistant.",
        "user_message": "Come up with a new business idea",
        "chat_history": [],
        "model": "gpt-4.1-mini",
        "api_key": "sk-bench-000000000000000000000000",
    }

    def request(session: aiohttp.ClientSession) -> Awaitable[aiohttp.ClientResponse]:
        return session.post(f"{base}/api/chat", json=body)

    return request, None


GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
CHAT_TURN = {"role": "user", "parts": [{"text": "Plan a weekend in Lisbon"}]}


def gemini_direct_arm(upstream: str) -> ArmSpec:
    def request(session: aiohttp.ClientSession) -> Awaitable[aiohttp.ClientResponse]:
        return session.post(
            f"{upstream}{GEMINI_PATH}",
            json={"contents": [CHAT_TURN]},
            headers={"x-goog-api-key": "bench-gemini-key"},
        )

    return request, lambda line: line.startswith(b"data: ") and b'"text"' in line


def chats_arm(base: str, token: str) -> ArmSpec:
    """A new chat's first reply, as the Raven client reads it: NDJSON `{"response"}` lines."""

    def request(session: aiohttp.ClientSession) -> Awaitable[aiohttp.ClientResponse]:
        return session.post(
            f"{base}/chat",
            json={"messages": [CHAT_TURN]},
            headers={"Authorization": f"Bearer {token}"},
        )

    return request, lambda line: line.startswith(b'{"response"')


def floor_arm(base: str) -> ArmSpec:
    """The floor relay (`bench/relay_floor.py`), read as plain text like the BYOK chat."""

    def request(session: aiohttp.ClientSession) -> Awaitable[aiohttp.ClientResponse]:
        return session.post(f"{base}/relay")

    return request, None


async def run_burst(
    arm: Arm,
    spec: ArmSpec,
    *,
    streams: int,
    arrival: float,
) -> None:
    request, is_token = spec
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(delay: float) -> None:
            await asyncio.sleep(delay)
            try:
                arm.samples.append(await read_stream(session, lambda: request(session), is_token))
            except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                arm.failures += 1
                arm.errors.append(repr(exc))

        delays = [arrival * i / max(streams - 1, 1) for i in range(streams)]
        await asyncio.gather(*(one(d) for d in delays))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(
    title: str, direct: Arm, aihub: Arm, targets: dict[str, float], rate: float | None = None
) -> bool:
    """Print one comparison; `rate`: the streams' arrival rate (per second), for CPU demand."""

    def ms(v: float) -> str:
        return f"{v * 1000:7.1f} ms"

    d_ttft = [s.ttft for s in direct.samples]
    a_ttft = [s.ttft for s in aihub.samples]
    d_gap = [s.largest_gap for s in direct.samples]
    a_gap = [s.largest_gap for s in aihub.samples]
    added = {
        "ttft_p50": pct(a_ttft, 50) - pct(d_ttft, 50),
        "ttft_p99": pct(a_ttft, 99) - pct(d_ttft, 99),
        "gap_p99": pct(a_gap, 99) - pct(d_gap, 99),
    }
    counts = f"{len(aihub.samples)} {aihub.name} / {len(direct.samples)} direct streams"
    print(f"\n## {title}  ({counts})")
    print(f"{'':22}{'direct':>12}{aihub.name:>12}{'added':>12}{'ratio':>9}")
    for label, d, a in (
        ("TTFT p50", pct(d_ttft, 50), pct(a_ttft, 50)),
        ("TTFT p99", pct(d_ttft, 99), pct(a_ttft, 99)),
        ("largest gap p99", pct(d_gap, 99), pct(a_gap, 99)),
    ):
        print(
            f"{label:22}{ms(d):>12}{ms(a):>12}{ms(a - d):>12}{a / d if d else float('nan'):>8.2f}x"
        )
    chunks = statistics.mean(s.chunks for s in aihub.samples) if aihub.samples else 0
    print(f"chunks per {aihub.name} stream (mean): {chunks:.1f}")
    for arm in (direct, aihub):
        if arm.cpu and arm.wall:
            streams = len(arm.samples) + arm.failures
            per_stream = ", ".join(
                f"{role} {seconds / streams * 1000:.1f} ms"
                for role, seconds in arm.cpu.items()
                if seconds or role != "relay"
            )
            demand = f"{sum(arm.cpu.values()) / streams * rate:.2f}" if rate else "?"
            print(
                f"CPU per {arm.name} stream: {per_stream}; "
                f"at {rate or 0:g} new streams a second that keeps {demand} of this "
                f"machine's {os.cpu_count()} cores busy"
            )
    print(f"failures: {aihub.name} {aihub.failures}, direct {direct.failures}")
    for arm in (direct, aihub):
        for error in arm.errors[:5]:
            print(f"  {arm.name}: failure: {error}", file=sys.stderr)
    ok = aihub.failures == 0 and direct.failures == 0
    for key, limit in targets.items():
        passed = added[key] <= limit
        ok = ok and passed
        verdict = "PASS" if passed else "FAIL"
        print(f"  added {key} <= {limit * 1000:.0f} ms: {verdict} ({added[key] * 1000:.1f} ms)")
    return ok


@dataclass
class Results:
    single: tuple[Arm, Arm, Arm]
    """Direct, through aihub, through the floor relay: one stream at a time."""
    concurrent: tuple[Arm, Arm, Arm]
    """The same, many streams at once."""
    collector: dict[str, dict[str, dict[str, float]]]
    """aihub's garbage collector before and after the concurrent rounds (`gc_pauses`)."""


async def gc_pauses(base: str) -> dict[str, dict[str, float]]:
    """aihub's `aihub_gc_pause_seconds` histogram (`GET /metrics`), by generation: `count`,
    `sum`, and each bucket's cumulative count (by its bound, as text)."""
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as response:
        text = await response.text()
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "aihub_gc_pause_seconds":
            continue
        for sample in family.samples:
            generation = found.setdefault(sample.labels["generation"], {})
            if sample.name.endswith("_bucket"):
                generation[sample.labels["le"]] = sample.value
            else:
                generation[sample.name.rsplit("_", 1)[1]] = sample.value
    return found


def gc_report(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    """The garbage collector's passes between two `gc_pauses` readings, by generation: how
    many, how long in all, and the least bucket bound that every one of them fell under."""
    parts = []
    for generation, now in sorted(after.items()):
        then = before.get(generation, {})
        count = now.get("count", 0) - then.get("count", 0)
        seconds = now.get("sum", 0) - then.get("sum", 0)
        part = f"generation {generation}: {count:.0f} passes, {seconds * 1000:.0f} ms"
        if count:
            under = [
                float(le)
                for le, passes in now.items()
                if le[0].isdigit() and passes - then.get(le, 0) >= count
            ]
            part += f", each <= {min(under) * 1000:g} ms" if under else ", some > 500 ms"
        parts.append(part)
    return "; ".join(parts)


async def measure(
    args: argparse.Namespace, *, upstream: str, base: str, floor_url: str, pids: list[int]
) -> Results:
    """Both phases, against the servers `main` started (`pids`: the upstream's, aihub's, and
    the floor relay's with `--floor`)."""
    chats = args.product == "chats"
    await wait_ready(f"{upstream}/health")
    await wait_ready(f"{base}/api/health", timeout=60)
    if args.floor:
        await wait_ready(f"{floor_url}/health")
    token = await register(base)
    direct_spec = gemini_direct_arm(upstream) if chats else direct_arm(upstream)
    aihub_spec = {
        "ideas": lambda: aihub_arm(base, token, args.wire),
        "byok": lambda: byok_arm(base),
        "chats": lambda: chats_arm(base, token),
    }[args.product]()
    floor_spec = floor_arm(floor_url)
    # Warm up every path (connection pools, imports, JIT-free caches).
    for spec in (direct_spec, aihub_spec, *([floor_spec] if args.floor else [])):
        await run_burst(Arm("warm"), spec, streams=5, arrival=0.1)

    arms = 3 if args.floor else 2  # the floor's arm stays empty without `--floor`
    specs = [direct_spec, aihub_spec, floor_spec]
    single = (Arm("direct"), Arm("aihub"), Arm("floor"))
    for _ in range(args.single):
        for arm, spec in list(zip(single, specs, strict=True))[:arms]:
            await run_burst(arm, spec, streams=1, arrival=0)

    concurrent = (Arm("direct"), Arm("aihub", relay=[pids[1]]), Arm("floor", relay=pids[2:]))
    order = list(zip(concurrent, specs, strict=True))[:arms]
    gc_before = await gc_pauses(base)
    for round_ in range(args.rounds):
        for arm, spec in order if round_ % 2 == 0 else reversed(order):
            burst = run_burst(arm, spec, streams=args.streams, arrival=args.arrival)
            await measured(arm, pids[0], burst)
    gc_after = await gc_pauses(base)
    return Results(single, concurrent, {"before": gc_before, "after": gc_after})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--arrival", type=float, default=3.0)
    parser.add_argument("--single", type=int, default=30, help="sequential streams per arm")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of the concurrent test")
    parser.add_argument("--workers", type=int, default=1, help="aihub worker processes")
    parser.add_argument("--product", choices=["ideas", "byok", "chats"], default="ideas")
    parser.add_argument(
        "--database-url", help="aihub's DATABASE_URL (default: SQLite in a scratch folder)"
    )
    parser.add_argument(
        "--no-quota", action="store_true", help="ideas without a quota (to see what it costs)"
    )
    parser.add_argument(
        "--wire",
        choices=["markdown", "json"],
        default="markdown",
        help="the ideas stream's format: the original client's Markdown framing, or ?format=json",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="add an arm through bench/relay_floor.py (both phases), for scale",
    )
    parser.add_argument(
        "--floor-sdk",
        action="store_true",
        help="the floor relay opens the upstream through the openai SDK, as aihub does",
    )
    args = parser.parse_args()
    chats = args.product == "chats"
    if chats and args.floor:
        parser.error("the floor relay speaks OpenAI's API: not with --product chats")

    upstream_port, aihub_port, floor_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    floor_url = f"http://127.0.0.1:{floor_port}"
    base = f"http://127.0.0.1:{aihub_port}"
    env = inherited_env()
    scratch = Path(tempfile.mkdtemp(prefix="aihub-bench-"))
    finished = False
    processes = [
        start(
            [
                sys.executable,
                "-m",
                "tests.fakes.gemini" if chats else "tests.fakes.openai",
                "--port",
                str(upstream_port),
                "--tokens",
                str(TOKENS),
                "--delay-ms",
                str(DELAY_MS),
            ],
            env,
            scratch / "upstream.log",
        ),
        start(
            [sys.executable, "-m", "aihub.cli", "serve", "--port", str(aihub_port)],
            {
                **aihub_env(env, upstream=upstream, data_dir=scratch / "data"),
                **({"DATABASE_URL": args.database_url} if args.database_url else {}),
                **(
                    {"GEMINI_API_KEY": "bench-gemini-key", "GEMINI_BASE_URL": upstream}
                    if chats
                    else {}
                ),
                "WEB_CONCURRENCY": str(args.workers),
                **({"IDEAS_DAILY_QUOTA": "unlimited"} if args.no_quota else {}),
            },
            scratch / "aihub.log",
        ),
    ]
    if args.floor:
        floor_command = [sys.executable, "bench/relay_floor.py", "--port", str(floor_port)]
        floor_command += ["--upstream", upstream] + (["--sdk"] if args.floor_sdk else [])
        processes.append(start(floor_command, env, scratch / "floor.log"))
    try:
        results = asyncio.run(
            measure(
                args,
                upstream=upstream,
                base=base,
                floor_url=floor_url,
                pids=[process.pid for process in processes],
            )
        )

        def phase(
            title: str,
            arms: tuple[Arm, Arm, Arm],
            targets: dict[str, float],
            rate: float | None = None,
        ) -> bool:
            """Report a phase (and its floor arm with `--floor`): whether aihub met `targets`."""
            direct, aihub, floor = arms
            met = report(title, direct, aihub, {} if chats else targets, rate=rate)
            if args.floor:
                report(
                    "the same, through the floor relay (no targets)", direct, floor, {}, rate=rate
                )
            return met

        # A phase run for no streams (`--single 0`, `--rounds 0`) is not reported, nor judged.
        ok = True
        if args.single:
            ok = phase("1 stream at a time", results.single, {"ttft_p50": 0.003})
        if args.rounds:
            ok = (
                phase(
                    f"{args.streams} streams arriving over {args.arrival:g} s",
                    results.concurrent,
                    {"ttft_p50": 0.025, "ttft_p99": 0.100, "gap_p99": 0.050},
                    rate=args.streams / args.arrival,
                )
                and ok
            )
            if args.workers == 1:  # with more, `GET /metrics` is one worker's
                collector = gc_report(results.collector["before"], results.collector["after"])
                print(f"aihub's garbage collector over these rounds: {collector}")
        if chats:
            print("\nno targets for chats yet" + ("" if ok else " (failures)"))
        else:
            print("\nall targets met" if ok else "\nsome targets missed")
        finished = True
        return 0 if ok else 1
    finally:
        logs = [scratch / "upstream.log", scratch / "aihub.log"]
        logs += [scratch / "floor.log"] if args.floor else []
        stop(processes, logs, failed=not finished)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
