"""Image jobs across real processes: several instances on one PostgreSQL, a worker killed
mid-job, and an embedded instance restarted mid-job. Every process is the real `aihub` command;
the Replicate fake runs in the test's own event loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from aihub.core.config import Settings
from tests.fakes.replicate import FakeReplicate

SETTINGS_VARIABLES = {name.upper() for name in Settings.model_fields} | {"WEB_CONCURRENCY"}
START_TIMEOUT = 60.0
IMAGE_DELAY = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    """One `aihub` command running in the background."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int | None) -> None:
        self.proc = proc
        self.base_url = f"http://127.0.0.1:{port}" if port else ""

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:
            while time.monotonic() < deadline:
                assert self.proc.returncode is None, "aihub exited before it was ready"
                try:
                    if (await client.get("/api/ready")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("aihub did not become ready")

    async def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signum)
            await asyncio.wait_for(self.proc.wait(), 30)


@pytest.fixture
def aihub_env(
    database: str, tmp_path: Path, fake_replicate: FakeReplicate
) -> Callable[..., dict[str, str]]:
    def env(**overrides: str) -> dict[str, str]:
        values = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_VARIABLES}
        values |= {
            "DATABASE_URL": database,
            "DATA_DIR": str(tmp_path / "data"),  # shared: one signing key, one file store
            "LOG_FORMAT": "console",
            "LOG_LEVEL": "WARNING",
            "AUTH_ALLOW_REGISTRATION": "true",
            "REPLICATE_API_TOKEN": "r8_TestServerToken0000000000",
            "REPLICATE_BASE_URL": fake_replicate.base_url,
            "PROVIDER_MAX_RETRIES": "0",
            "IMAGES_CONCURRENCY": "1",  # one image at a time: a kill lands between images
            "IMAGES_HEARTBEAT_SECONDS": "0.3",
            "IMAGES_STALE_SECONDS": "1.5",
            "IMAGES_POLL_SECONDS": "0.3",
        }
        values |= overrides
        return values

    return env


@pytest.fixture
async def start(
    tmp_path: Path, aihub_env: Callable[..., dict[str, str]]
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Process] = []

    async def run(command: str, **overrides: str) -> Process:
        port = free_port() if command == "serve" else None
        args = ["serve", "--port", str(port)] if port else [command]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aihub.cli",
            *args,
            cwd=tmp_path,
            env=aihub_env(**overrides),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        process = Process(proc, port)
        started.append(process)
        if port:
            await process.wait_ready()
        return process

    yield run
    for process in started:
        await process.stop(signal.SIGKILL)


async def login(base_url: str, email: str = "painter@example.com") -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        credentials = {"email": email, "password": "correct-horse-battery"}
        registered = await client.post("/api/auth/register", json=credentials)
        if registered.status_code == 201:
            token: str = registered.json()["token"]
            return token
        response = await client.post("/api/auth/login", json=credentials)
        assert response.status_code == 200, response.text
        logged_in: str = response.json()["token"]
        return logged_in


async def create_job(base_url: str, token: str, num_images: int) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        response = await client.post(
            "/api/generate/",
            json={"prompt": "a harbour at dawn", "num_images": num_images},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


async def events(
    base_url: str, job_id: str, *, last_event_id: int = 0
) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of the job's stream, read as an EventSource reads it."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(10, read=60)) as client,
        client.stream("GET", f"/api/generate/{job_id}/stream", headers=headers) as response,
    ):
        assert response.status_code == 200
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
                continue
            if fields.get("event") not in (None, "keepalive"):
                yield int(fields["id"]), fields["event"], json.loads(fields["data"])
            fields = {}


def seeds_requested(fake: FakeReplicate) -> list[int]:
    return [r.json["input"]["seed"] for r in fake.created if r.json]


async def image_seeds(base_url: str, token: str, job_id: str) -> dict[int, str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        response = await client.get(
            f"/api/generate/{job_id}", headers={"Authorization": f"Bearer {token}"}
        )
    assert response.status_code == 200, response.text
    return {image["index"]: image["status"] for image in response.json()["images"]}


def assert_complete(stream: list[tuple[int, str, dict[str, Any]]], total: int) -> None:
    ids = [event_id for event_id, _, _ in stream]
    assert ids == list(range(1, len(ids) + 1)), ids  # nothing missed, nothing twice
    assert stream[-1][1] == "done", stream[-1]
    assert stream[-1][2]["succeeded"] == total, stream[-1]
    assert stream[-1][2]["failed"] == 0
    succeeded = {
        d["index"] for _, name, d in stream if name == "progress" and d["status"] == "succeeded"
    }
    assert succeeded == set(range(total))


def requests_per_image(fake: FakeReplicate, seeds: list[int]) -> dict[int, int]:
    requested = seeds_requested(fake)
    return {seed: requested.count(seed) for seed in seeds}


async def seeds_of(database_url: str, job_id: str) -> list[int]:
    from sqlalchemy import select

    from aihub.core.db import create_engine, create_sessionmaker
    from aihub.images.models import JobImage

    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            rows = await session.scalars(
                select(JobImage.seed).where(JobImage.job_id == job_id).order_by(JobImage.index)
            )
            return list(rows)
    finally:
        await engine.dispose()


def postgres_only(database: str) -> None:
    if not database.startswith("postgresql"):
        pytest.skip("several instances share one PostgreSQL; SQLite is one instance's database")


async def test_a_job_created_on_one_instance_streams_live_from_another(
    database: str, start: Callable[..., Any], fake_replicate: FakeReplicate
) -> None:
    postgres_only(database)
    fake_replicate.image_delay = 0.3
    creator, watcher, _worker = await asyncio.gather(
        start("serve", IMAGES_WORKER="false"),
        start("serve", IMAGES_WORKER="false"),
        start("worker"),
    )
    token = await login(creator.base_url)

    job_id = await create_job(creator.base_url, token, 3)
    seen: list[tuple[int, str, dict[str, Any]]] = []
    arrivals: list[float] = []
    async for event in events(watcher.base_url, job_id):
        seen.append(event)
        arrivals.append(time.monotonic())

    assert_complete(seen, 3)
    # Live, not replayed at the end: the images arrived about an image's time apart.
    finished = [
        at
        for at, (_, name, data) in zip(arrivals, seen, strict=True)
        if name == "progress" and data["status"] == "succeeded"
    ]
    assert finished[-1] - finished[0] > 0.3


async def test_a_killed_worker_s_job_completes_elsewhere_without_redoing_images(
    database: str, start: Callable[..., Any], fake_replicate: FakeReplicate
) -> None:
    postgres_only(database)
    fake_replicate.image_delay = IMAGE_DELAY
    server, doomed = await asyncio.gather(start("serve", IMAGES_WORKER="false"), start("worker"))
    token = await login(server.base_url)
    job_id = await create_job(server.base_url, token, 4)
    seeds = await seeds_of(database, job_id)

    seen: list[tuple[int, str, dict[str, Any]]] = []
    successor = None
    async for event in events(server.base_url, job_id):
        seen.append(event)
        _, name, data = event
        if name == "progress" and data["status"] == "succeeded" and data["index"] == 1:
            await doomed.stop(signal.SIGKILL)  # no goodbye: only its heartbeat stops
            successor = await start("worker")

    assert successor is not None
    assert_complete(seen, 4)
    counts = requests_per_image(fake_replicate, seeds)
    assert counts[seeds[0]] == 1
    assert counts[seeds[1]] == 1  # finished before the kill: not redone
    assert all(counts[seed] in (1, 2) for seed in seeds[2:]), counts
    # The job remembers it was claimed twice; its images are all there, once.
    assert await image_seeds(server.base_url, token, job_id) == dict.fromkeys(range(4), "succeeded")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "crashed"])
async def test_an_embedded_instance_restarted_mid_job_completes_it(
    database: str,
    start: Callable[..., Any],
    fake_replicate: FakeReplicate,
    signum: int,
) -> None:
    fake_replicate.image_delay = IMAGE_DELAY
    first = await start("serve")
    token = await login(first.base_url)
    job_id = await create_job(first.base_url, token, 3)
    seeds = await seeds_of(database, job_id)

    last_id = 0
    async for event_id, name, data in events(first.base_url, job_id):
        last_id = event_id
        if name == "progress" and data["status"] == "succeeded":
            break
    await first.stop(signum)

    second = await start("serve")
    # The client reconnects where it stopped and gets exactly the rest.
    rest = [e async for e in events(second.base_url, job_id, last_event_id=last_id)]
    assert rest[0][0] == last_id + 1
    assert rest[-1][1] == "done"
    assert rest[-1][2]["succeeded"] == 3, rest[-1]
    everything = [e async for e in events(second.base_url, job_id)]
    assert_complete(everything, 3)
    counts = requests_per_image(fake_replicate, seeds)
    done_before = {
        d["index"]
        for _, n, d in everything[:last_id]
        if n == "progress" and d["status"] == "succeeded"
    }
    for index in done_before:
        assert counts[seeds[index]] == 1, counts
