"""The real `aihub` command in a subprocess: bad configuration is one line on stderr."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from aihub.core.config import Settings

TIMEOUT_SECONDS = 60  # the command imports the whole app first; a slow machine needs ~5 s

SETTINGS_VARIABLES = {name.upper() for name in Settings.model_fields} | {"WEB_CONCURRENCY"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_aihub(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`aihub *args` with a scratch DATA_DIR, run where no `.env` is found, nothing else set."""
    environment = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_VARIABLES}
    environment |= {"DATA_DIR": str(tmp_path / "data"), "PORT": str(free_port()), **env}
    return subprocess.run(
        [sys.executable, "-m", "aihub.cli", *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )


def escaped(pem: str) -> str:
    """A PEM as one `.env` line, newlines written as `\\n`."""
    return pem.strip().replace("\n", "\\n")


BAD_SETTINGS = {
    "clerk-jwt-key": ({"CLERK_JWT_KEY": "notapem"}, "aihub: CLERK_JWT_KEY: not a PEM public key"),
    "auth-jwt-private-key": (
        {"AUTH_JWT_PRIVATE_KEY": "garbage"},
        "aihub: AUTH_JWT_PRIVATE_KEY: not an unencrypted PEM private key",
    ),
    "unreachable-database": (
        {"DATABASE_URL": "postgresql://nobody:s3cret-pw@127.0.0.1:1/x"},
        "aihub: cannot connect to the database at 127.0.0.1:1 (connection refused)",
    ),
    "data-dir": (
        {"DATA_DIR": "/proc/nope"},
        "aihub: DATA_DIR: cannot create /proc/nope (no such file or directory)",
    ),
    "byok-rate-limit": (
        {"BYOK_RATE_LIMIT": "lots"},
        "aihub: BYOK_RATE_LIMIT: must look like 20/minute (N/second, minute, hour or day)",
    ),
    "clerk-webhook-secret": (
        {"CLERK_WEBHOOK_SECRET": "whsec_not*base64"},
        "aihub: CLERK_WEBHOOK_SECRET: must be a svix signing secret (whsec_ followed by base64)",
    ),
    "quota": (
        {"CHALLENGES_DAILY_QUOTA": "-3"},
        "aihub: CHALLENGES_DAILY_QUOTA: Input should be greater than or equal to 0",
    ),
    "clerk-jwks-url": (
        {"CLERK_JWKS_URL": "notaurl"},
        "aihub: CLERK_JWKS_URL: must be an absolute http:// or https:// URL",
    ),
    "system-prompt-file": (
        {"CHAT_SYSTEM_PROMPT_FILE": "/nonexistent/prompt.md"},
        "aihub: CHAT_SYSTEM_PROMPT_FILE: cannot read /nonexistent/prompt.md"
        " (no such file or directory)",
    ),
    "database-url-parameter": (
        {"DATABASE_URL": "postgresql://u:s3cret-pw@127.0.0.1:1/x?application_name=aihub"},
        "aihub: DATABASE_URL: the query parameter 'application_name' is not supported"
        " (supported: sslmode or ssl, connect_timeout or timeout, command_timeout)",
    ),
}


@pytest.mark.parametrize(
    ("command", "env", "line"),
    [
        *(
            (command, env, line)
            for command in ("serve", "migrate")
            for env, line in BAD_SETTINGS.values()
        ),
        # Only the server uses Redis: `aihub migrate` does not wait for it.
        (
            "serve",
            {"REDIS_URL": "redis://:s3cret-pw@127.0.0.1:1/0"},
            "aihub: REDIS_URL: cannot connect (ConnectionError)",
        ),
    ],
)
def test_bad_setting_is_one_line_and_a_failed_exit(
    tmp_path: Path, command: str, env: dict[str, str], line: str
) -> None:
    result = run_aihub(tmp_path, command, **env)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [line]
    assert "Traceback" not in result.stdout + result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_data_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a folder")
    result = run_aihub(tmp_path, "migrate")
    assert result.returncode != 0
    assert result.stderr.splitlines() == [f"aihub: DATA_DIR: {tmp_path / 'data'} is not a folder"]


def test_settings_left_empty_as_the_example_shows_them_mean_their_default(
    tmp_path: Path,
) -> None:
    """`.env.example` shows these as `NAME=`: uncommenting one must not stop the server."""
    empty = {
        "AUTH_ALLOW_REGISTRATION": "",
        "CHALLENGES_TEMPERATURE": "",
        "CHAT_SYSTEM_PROMPT_FILE": "",
    }
    result = run_aihub(tmp_path, "migrate", **empty, LOG_LEVEL="debug")
    assert result.returncode == 0, result.stderr


def test_migrate_on_a_fresh_data_dir(tmp_path: Path) -> None:
    result = run_aihub(tmp_path, "migrate")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "database is up to date"
    assert (tmp_path / "data" / "aihub.db").is_file()
    assert "Traceback" not in result.stderr
    # It holds the database and the signing key: no other local user may look in.
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700


def test_migrate_accepts_one_line_pem_keys(tmp_path: Path, auth_private_key: str) -> None:
    private_key = serialization.load_pem_private_key(auth_private_key.encode(), password=None)
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    result = run_aihub(
        tmp_path,
        "migrate",
        AUTH_JWT_PRIVATE_KEY=escaped(auth_private_key),
        CLERK_JWT_KEY=escaped(public_pem.decode()),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "database is up to date"


def test_serve_runs_the_embedded_default_from_nothing(tmp_path: Path) -> None:
    """The README's first command: no configuration, migrations applied, ideas on `offline`."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_VARIABLES}
    environment |= {"DATA_DIR": str(tmp_path / "data"), "OFFLINE_TOKEN_DELAY_MS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "aihub.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            health = _wait_for_health(client, server)
            assert health["products"]["ideas"]["offline"] is True
            registered = client.post(
                "/api/auth/register",
                json={"email": "first@example.com", "password": "correct-horse"},
            )
            assert registered.status_code == 201
            token = registered.json()["token"]
            idea = client.get("/api", headers={"Authorization": f"Bearer {token}"})
            assert idea.status_code == 200
            assert idea.text.endswith("event: done\ndata:\n\n")
            assert (tmp_path / "data" / "aihub.db").exists()
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=TIMEOUT_SECONDS)
    assert "Traceback" not in stderr
    # Lines are written by a thread of their own: none is lost when the process stops.
    assert '"GET /api 200"' in stderr
    assert "Finished server process" in stderr.splitlines()[-1]


def _wait_for_health(client: httpx.Client, server: subprocess.Popen[str]) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        assert server.poll() is None, "aihub serve exited"
        try:
            response = client.get("/api/health")
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        body: dict[str, Any] = response.json()
        return body
    raise AssertionError("aihub serve did not answer")
