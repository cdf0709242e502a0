"""What every benchmark here needs: loopback ports, the servers as processes, a user."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "bench-password-123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A process whose stderr goes to `log` (a pipe nobody reads could fill up and stall it)."""
    with log.open("wb") as stderr:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def stop(processes: list[subprocess.Popen[bytes]], logs: list[Path], *, failed: bool) -> None:
    """Stop the processes; print the end of each log if the run failed or a server errored."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    for log in logs:
        text = log.read_text(errors="replace")
        if text.strip() and (failed or '"level":"error"' in text or "Traceback" in text):
            print(f"\n--- {log} (last 2000 characters)", file=sys.stderr)
            sys.stderr.write(text[-2000:])


async def register(base: str) -> str:
    """A new local user's bearer token."""
    email = f"bench-{random.randrange(10**9)}@example.com"
    body = {"email": email, "password": PASSWORD}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/api/auth/register", json=body) as response,
    ):
        data = await response.json()
        if response.status >= 300:
            raise RuntimeError(f"register failed: {data}")
        token: str = data["token"]
        return token
