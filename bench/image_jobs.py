"""Image jobs end to end: a job of 4 images against a job of 1, and 50 jobs of 4 at once.

    uv run python bench/image_jobs.py [--rounds 10] [--concurrency 10] [--jobs 50] [--users 1]
    uv run python bench/image_jobs.py --recreate-database \\
        --database-url postgresql://postgres@127.0.0.1:5432/aihub_bench

Starts the fake Replicate (`tests.fakes.replicate`, every image 700 ms) and `aihub serve` as
separate processes on loopback ports, with a fresh DATA_DIR (so a fresh SQLite database unless
`--database-url` is given), registers a local user and logs in. Every job is timed at the client,
from just before its `POST /api/generate/` to the events of `GET /api/generate/{id}/stream`: the
first `progress` that says `succeeded` (first image), the last image's final `progress` (last
image) and `done`.

1. `--rounds` rounds of a 1-image job and a 4-image job, one job at a time, the order swapped
   every round (ABBA). Prints the p50 of each and the 4-image job's ratios to the 1-image job's
   time. Targets: first image <= 1.15x, last image <= 1.20x.
2. `--jobs` jobs of 4 images started together (by one user, or `--users` in turn), with
   IMAGES_CONCURRENCY=`--concurrency`: the limit allows them ceil(jobs * 4 / concurrency) * 0.7 s.
   Prints the wall time and its ratio to that.
   Targets: <= 1.5x, no failed image, every stream ends with `done`.

Exits non-zero when a target is missed. Loopback only; bounded in count and time (`--budget`).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from _support import free_port, register, start, stop, wait_ready

PROMPT = "A lighthouse on a cliff at dusk, oil painting"


@dataclass
class JobSample:
    """One job, every time in seconds from just before its POST."""

    images: int
    accepted: float
    """The POST's answer."""
    running: float | None = None
    """The first image's `running` event: the job has been claimed and an image started."""
    first: float | None = None
    last: float | None = None
    done: float | None = None
    succeeded: int = 0
    failed: int = 0
    server_ttfi: float | None = None
    """The job's own `ttfi_ms` and `total_ms` (from its creation), as `done` reports them."""
    server_total: float | None = None

    @property
    def ok(self) -> bool:
        return self.done is not None and self.failed == 0 and self.succeeded == self.images


@dataclass
class Arm:
    name: str
    images: int
    samples: list[JobSample] = field(default_factory=list)
    """The jobs that ended cleanly: `done`, every image succeeded."""
    failures: int = 0
    """Jobs that did not (an HTTP error, a failed image, a stream that ended without `done`)."""
    failed_images: int = 0
    errors: list[str] = field(default_factory=list)
    """What the failures were (`report` prints the first ones)."""

    def record(self, sample: JobSample | BaseException) -> None:
        if isinstance(sample, JobSample) and sample.ok:
            self.samples.append(sample)
            return
        self.failures += 1
        if isinstance(sample, JobSample):
            self.failed_images += sample.failed
        what = sample if isinstance(sample, BaseException) else _describe(sample)
        self.errors.append(repr(what))

    def p50(self, attr: str) -> float:
        values = [v for s in self.samples if (v := getattr(s, attr)) is not None]
        return statistics.median(values) if values else float("nan")


def _describe(sample: JobSample) -> str:
    if sample.done is None:
        return f"stream ended without done ({sample.succeeded} succeeded, {sample.failed} failed)"
    return f"{sample.failed} of {sample.images} images failed"


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """`(name, data)` of each Server-Sent Event, as soon as its blank line arrives."""
    name, data = "message", b""
    async for raw in response.content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield name, orjson.loads(data)
            name, data = "message", b""
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data += line[5:].strip()


async def run_job(session: aiohttp.ClientSession, base: str, token: str, images: int) -> JobSample:
    headers = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    body = {"prompt": PROMPT, "num_images": images}
    async with session.post(f"{base}/api/generate/", json=body, headers=headers) as response:
        if response.status != 202:
            raise RuntimeError(f"POST status {response.status}: {await response.text()}")
        job_id: str = (await response.json())["job_id"]
    sample = JobSample(images, time.perf_counter() - started)
    finished: set[int] = set()
    stream_headers = {**headers, "Accept": "text/event-stream"}
    async with session.get(f"{base}/api/generate/{job_id}/stream", headers=stream_headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"stream status {resp.status}")
        async for name, data in sse_events(resp):
            now = time.perf_counter() - started
            if name == "progress":
                status = data.get("status")
                if status == "running" and sample.running is None:
                    sample.running = now
                elif status in ("succeeded", "failed") and data["index"] not in finished:
                    finished.add(data["index"])
                    if status == "succeeded":
                        sample.succeeded += 1
                        if sample.first is None:
                            sample.first = now
                    else:
                        sample.failed += 1
                    if len(finished) == images:
                        sample.last = now
            elif name == "done":
                sample.done = now
                if data.get("ttfi_ms") is not None:
                    sample.server_ttfi = data["ttfi_ms"] / 1000
                if data.get("total_ms") is not None:
                    sample.server_total = data["total_ms"] / 1000
                if data.get("job_status") != "done":
                    sample.failed = max(sample.failed, 1)
                break
            elif name == "error":
                raise RuntimeError(f"error event: {data}")
    return sample


def client(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=120, sock_connect=10),
    )


async def one_at_a_time(base: str, token: str, arm: Arm) -> None:
    async with client() as session:
        try:
            arm.record(await run_job(session, base, token, arm.images))
        except (RuntimeError, ValueError, KeyError, aiohttp.ClientError, TimeoutError) as exc:
            arm.record(exc)


async def many_at_once(base: str, tokens: list[str], arm: Arm, jobs: int) -> float:
    """Start `jobs` jobs together (the users' in turn); the wall time until the last is done."""
    async with client() as session:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(run_job(session, base, tokens[i % len(tokens)], arm.images) for i in range(jobs)),
            return_exceptions=True,
        )
        wall = time.perf_counter() - started
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result
        arm.record(result)
    return wall


def ms(v: float) -> str:
    return f"{v * 1000:8.0f} ms"


def verdict(label: str, value: float, limit: float, unit: str = "x") -> bool:
    passed = value <= limit
    shown = f"{value:.3f}{unit}" if unit else f"{value:g}"
    print(f"  {label} <= {limit:g}{unit}: {'PASS' if passed else 'FAIL'} ({shown})")
    return passed


def report_pair(single: Arm, multi: Arm, delay: float) -> dict[str, float]:
    rows = (
        ("POST answered", "accepted"),
        ("first image running", "running"),
        ("first image", "first"),
        ("last image", "last"),
        ("done event", "done"),
        ("server ttfi_ms", "server_ttfi"),
        ("server total_ms", "server_total"),
    )
    print(
        f"\n## one job at a time, ABBA  ({len(single.samples)} x {single.name},"
        f" {len(multi.samples)} x {multi.name}; an image takes {delay * 1000:.0f} ms upstream)"
    )
    print(f"{'p50':24}{single.name:>12}{multi.name:>12}{'ratio':>9}")
    for label, attr in rows:
        a, b = single.p50(attr), multi.p50(attr)
        print(f"{label:24}{ms(a):>12}{ms(b):>12}{b / a if a else float('nan'):>8.2f}x")
    print(f"failures: {single.name} {single.failures}, {multi.name} {multi.failures}")
    # A 1-image job's first image is its last: that one time is the single-image job's time.
    base = single.p50("last")
    return {"first": multi.p50("first") / base, "last": multi.p50("last") / base}


def report_burst(arm: Arm, jobs: int, users: int, wall: float, ideal: float) -> None:
    images = arm.images
    print(
        f"\n## {jobs} jobs of {images} images at once, from {users} user(s)"
        f"  ({len(arm.samples)} completed)"
    )
    lasts = sorted(s.last for s in arm.samples if s.last is not None)
    firsts = [s.first for s in arm.samples if s.first is not None]
    print(f"{'wall time':28}{ms(wall):>12}")
    print(f"{'ideal (the limit allows)':28}{ms(ideal):>12}")
    print(f"{'ratio':28}{wall / ideal:>11.2f}x")
    if lasts:
        print(f"{'last image p50 / max':28}{ms(statistics.median(lasts)):>12}{ms(lasts[-1]):>12}")
        print(
            f"{'first image p50 / max':28}{ms(statistics.median(firsts)):>12}{ms(max(firsts)):>12}"
        )
        posts = [s.accepted for s in arm.samples]
        print(
            f"{'POST answered p50 / max':28}{ms(statistics.median(posts)):>12}{ms(max(posts)):>12}"
        )
    print(f"errors: {arm.failures} jobs not cleanly done, {arm.failed_images} failed images")


async def recreate_database(url: str) -> None:
    """Drop and create the database of a PostgreSQL URL (through the `postgres` database)."""
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = parsed.database
    if not name or not name.replace("_", "").isalnum():
        raise RuntimeError(f"refusing to recreate database {name!r}")
    conn = await asyncpg.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username,
        password=parsed.password,
        database="postgres",
    )
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@dataclass
class Results:
    single: Arm
    multi: Arm
    burst: Arm
    wall: float
    """The burst's wall time."""


async def measure(args: argparse.Namespace, fake: str, base: str) -> Results:
    """Both parts, against the servers `main` started, within `args.budget`."""
    async with asyncio.timeout(args.budget):
        await wait_ready(f"{fake}/v1/predictions/none")
        await wait_ready(f"{base}/api/health", timeout=60)
        tokens = [await register(base) for _ in range(args.users)]
        token = tokens[0]
        single, multi = Arm("1 image", 1), Arm(f"{args.images} images", args.images)
        # Warm up: connection pools (database, the Replicate client's), imports, first queries.
        for arm in (Arm(single.name, 1), Arm(multi.name, args.images)):
            await one_at_a_time(base, token, arm)
        for round_ in range(args.rounds):
            order = (single, multi) if round_ % 2 == 0 else (multi, single)
            for arm in order:
                await one_at_a_time(base, token, arm)
        burst = Arm(f"{args.images} images, burst", args.images)
        wall = await many_at_once(base, tokens, burst, args.jobs)
    return Results(single, multi, burst, wall)


def report(args: argparse.Namespace, results: Results) -> bool:
    single, multi, burst, wall = results.single, results.multi, results.burst, results.wall
    for arm in (single, multi, burst):
        for error in arm.errors[:5]:
            print(f"  {arm.name}: failure: {error}", file=sys.stderr)
    ratios = report_pair(single, multi, args.delay_ms / 1000)
    ideal = math.ceil(args.jobs * args.images / args.concurrency) * args.delay_ms / 1000
    report_burst(burst, args.jobs, args.users, wall, ideal)

    print("\n## summary")
    results_ok = [
        verdict(f"{multi.name}: first image / 1-image job", ratios["first"], 1.15),
        verdict(f"{multi.name}: last image / 1-image job", ratios["last"], 1.20),
        verdict("one at a time: failed jobs", single.failures + multi.failures, 0, ""),
        verdict(f"{args.jobs} jobs at once: wall / ideal", wall / ideal, 1.5),
        verdict(f"{args.jobs} jobs at once: jobs not cleanly done", burst.failures, 0, ""),
    ]
    return all(results_ok)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="ABBA rounds of part 1")
    parser.add_argument("--images", type=int, default=4, help="images of the larger job")
    parser.add_argument("--jobs", type=int, default=50, help="jobs started together in part 2")
    parser.add_argument(
        "--users", type=int, default=1, help="part 2's jobs come from this many users, in turn"
    )
    parser.add_argument("--concurrency", type=int, default=10, help="IMAGES_CONCURRENCY")
    parser.add_argument("--delay-ms", type=float, default=700.0, help="the fake's time per image")
    parser.add_argument("--budget", type=float, default=600.0, help="give up after this (s)")
    parser.add_argument(
        "--database-url", help="aihub's DATABASE_URL (default: SQLite in a scratch folder)"
    )
    parser.add_argument(
        "--recreate-database",
        action="store_true",
        help="drop and create --database-url's (PostgreSQL) database first",
    )
    args = parser.parse_args()
    if args.recreate_database:
        if not args.database_url or not args.database_url.startswith("postgres"):
            parser.error("--recreate-database needs a PostgreSQL --database-url")
        asyncio.run(recreate_database(args.database_url))

    fake_port, aihub_port = free_port(), free_port()
    fake = f"http://127.0.0.1:{fake_port}"
    base = f"http://127.0.0.1:{aihub_port}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "GEMINI_", "CLERK_", "DATABASE_", "REPLICATE_", "IMAGES_"))
    }
    scratch = Path(tempfile.mkdtemp(prefix="aihub-bench-"))
    data_dir = scratch / "data"
    processes = [
        start(
            [
                sys.executable,
                "-m",
                "tests.fakes.replicate",
                "--port",
                str(fake_port),
                "--delay-ms",
                str(args.delay_ms),
            ],
            env,
            scratch / "replicate.log",
        ),
        start(
            [sys.executable, "-m", "aihub.cli", "serve", "--port", str(aihub_port)],
            {
                **env,
                "DATA_DIR": str(data_dir),
                **({"DATABASE_URL": args.database_url} if args.database_url else {}),
                "REPLICATE_API_TOKEN": "r8_bench0000000000000000000000000000000",
                "REPLICATE_BASE_URL": fake,
                "LOG_LEVEL": "WARNING",
                "AUTH_ALLOW_REGISTRATION": "true",
                "WEB_CONCURRENCY": "1",
                "IMAGES_CONCURRENCY": str(args.concurrency),
                "IMAGES_MAX_PER_JOB": str(max(args.images, 1)),
                "IMAGES_MAX_JOBS_IN_FLIGHT": str(max(args.jobs, 4)),
                # Every job still reserves its units, as in production; there is just no cap.
                "IMAGES_DAILY_QUOTA": "unlimited",
            },
            scratch / "aihub.log",
        ),
    ]
    ok = False
    try:
        ok = report(args, asyncio.run(measure(args, fake, base)))
        print("\nall targets met" if ok else "\nsome targets missed")
        return 0 if ok else 1
    except TimeoutError:
        print(f"\ngave up after {args.budget:g} s", file=sys.stderr)
        return 2
    finally:
        stop(processes, [scratch / "replicate.log", scratch / "aihub.log"], failed=not ok)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
