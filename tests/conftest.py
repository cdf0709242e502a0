"""Test harness: a real, migrated database per run (SQLite, or PostgreSQL when
AIHUB_TEST_DATABASE_URL names one), loopback fakes of every provider and of Clerk, and the app
served by a real uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aihub.core.clock import Clock
from aihub.core.config import Settings
from aihub.core.db import Base, create_engine
from aihub.core.server import uvicorn_options
from aihub.main import create_app
from tests.fakes.server import serve

pytest_plugins = [
    "tests.fakes.openai",
    "tests.fakes.gemini",
    "tests.fakes.replicate",
    "tests.fakes.clerk",
]

# Tests decide every setting themselves: nothing from the developer's shell or .env leaks in.
for _name in [*Settings.model_fields, "WEB_CONCURRENCY", "WORKERS"]:
    os.environ.pop(_name.upper(), None)


# --- database ----------------------------------------------------------------------------------


async def _migrate(url: str) -> None:
    from alembic import command

    from aihub.cli import alembic_config

    await asyncio.to_thread(command.upgrade, alembic_config(url), "head")  # type: ignore[arg-type]


@asynccontextmanager
async def _postgres_database(base_url: str) -> AsyncIterator[str]:
    """A database of this run's own on the server `base_url` names, dropped afterwards."""
    admin_url = make_url(base_url).set(drivername="postgresql+asyncpg")
    name = f"aihub_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    except (OSError, Exception) as exc:
        await admin.dispose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {admin_url.host}:{admin_url.port} unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture(scope="session")
async def database_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    base_url = os.environ.get("AIHUB_TEST_DATABASE_URL")
    if not base_url:
        path = tmp_path_factory.mktemp("db") / "aihub.db"
        url = f"sqlite+aiosqlite:///{path.as_posix()}"
        await _migrate(url)
        yield url
        return
    async with _postgres_database(base_url) as url:
        await _migrate(url)
        yield url


@pytest.fixture(scope="session")
async def db_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def database(database_url: str, db_engine: AsyncEngine) -> AsyncIterator[str]:
    """The migrated database's URL; the test leaves its tables empty behind it."""
    yield database_url
    async with db_engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            await conn.execute(table.delete())


# --- app -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def auth_private_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def make_settings(
    database: str,
    tmp_path: Path,
    auth_private_key: str,
    fake_openai: Any,
    fake_gemini: Any,
    fake_replicate: Any,
    fake_clerk: Any,
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database,
            "data_dir": tmp_path / "data",
            "log_format": "console",
            "auth_jwt_private_key": auth_private_key,
            "clerk_jwks_url": fake_clerk.jwks_url,
            "openai_api_key": "sk-test-server-key-0000000000",
            "openai_base_url": fake_openai.base_url,
            "byok_base_url": fake_openai.base_url,
            "gemini_api_key": "AIzaTestServerKey00000000000000000000",
            "gemini_base_url": fake_gemini.base_url,
            "replicate_api_token": "r8_TestServerToken0000000000",
            "replicate_base_url": fake_replicate.base_url,
            "provider_max_retries": 0,
            "provider_timeout_seconds": 10,
            "offline_token_delay_ms": 0,
            "auth_allow_registration": True,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


@dataclass
class Served:
    app: FastAPI
    settings: Settings
    base_url: str
    client: httpx.AsyncClient


MakeApp = Callable[..., AbstractAsyncContextManager[Served]]


@pytest.fixture
def make_app(make_settings: Callable[..., Settings]) -> MakeApp:
    """`async with make_app(**settings) as served:` a real server on a loopback port; `clock`
    replaces the app's clock (see `tests.factories.FakeClock`)."""

    @asynccontextmanager
    async def make(*, clock: Clock | None = None, **overrides: Any) -> AsyncIterator[Served]:
        settings = make_settings(**overrides)
        app = create_app(settings) if clock is None else create_app(settings, clock=clock)
        async with (
            serve(app, **uvicorn_options(settings)) as base_url,
            httpx.AsyncClient(base_url=base_url, timeout=15) as client,
        ):
            yield Served(app, settings, base_url, client)

    return make


@pytest.fixture
async def served(make_app: MakeApp) -> AsyncIterator[Served]:
    async with make_app() as served:
        yield served


@pytest.fixture
def client(served: Served) -> httpx.AsyncClient:
    return served.client
