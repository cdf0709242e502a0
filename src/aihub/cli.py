"""`aihub serve | migrate | worker | users create`.

Every command checks what it can before it starts (settings, the data folder, keys, the database)
and reports a problem as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from aihub.core.config import ConfigError, Settings, load_settings

app = typer.Typer(help="aihub: five AI products behind one backend.", no_args_is_help=True)
users_app = typer.Typer(help="Manage local accounts.", no_args_is_help=True)
app.add_typer(users_app, name="users")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATABASE_CONNECT_TIMEOUT_SECONDS = 10.0


@contextmanager
def _reported_config_errors() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        for line in str(exc).splitlines():
            typer.echo(f"aihub: {line}", err=True)
        raise typer.Exit(2) from None


def _settings() -> Settings:
    with _reported_config_errors():
        return load_settings()


def check_start_up(settings: Settings) -> None:
    """Blocking: raise `ConfigError` for what settings validation alone cannot see."""
    from aihub.core.auth import parse_public_key
    from aihub.users.tokens import check_signing_key

    prepare_data_dir(settings.data_dir)
    check_signing_key(settings)
    if settings.clerk_jwt_key:
        parse_public_key(settings.clerk_jwt_key, source="CLERK_JWT_KEY")
    if (prompt_file := settings.chat_system_prompt_file) and not settings.chat_system_prompt:
        try:
            prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = _os_reason(exc) if isinstance(exc, OSError) else "not UTF-8 text"
            message = f"CHAT_SYSTEM_PROMPT_FILE: cannot read {prompt_file} ({reason})"
            raise ConfigError(message) from None
    check_database(settings.resolved_database_url)


def check_redis(url: str) -> None:
    """Ping Redis once: rate limits configured to be shared must not silently be off."""
    from redis.exceptions import RedisError

    try:
        asyncio.run(_ping_redis(url))
    except (OSError, RedisError) as exc:
        # Never the URL itself: it may hold a password.
        raise ConfigError(f"REDIS_URL: cannot connect ({type(exc).__name__})") from None


async def _ping_redis(url: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
    finally:
        await client.aclose()


def prepare_data_dir(path: Path) -> None:
    """Create the data folder if need be (readable by its owner only: it holds the database and
    the signing key) and prove it writable."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"DATA_DIR: {path} is not a folder")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"DATA_DIR: cannot create {path} ({_os_reason(exc)})") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"DATA_DIR: cannot write to {path} ({_os_reason(exc)})") from None


def check_database(url: str) -> None:
    """Connect once, so that an unreachable database fails here rather than at a request."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    try:
        asyncio.run(_connect(url))
    except (OSError, DBAPIError, ValueError, TypeError) as exc:  # TimeoutError is an OSError
        parsed = make_url(url)  # only host, port or path are shown: never the password
        if parsed.get_backend_name() == "sqlite":
            where = f"cannot open the database at {parsed.database}"
        else:
            host = parsed.host or "localhost"
            where = f"cannot connect to the database at {host}:{parsed.port or 5432}"
        raise ConfigError(f"{where} ({_database_reason(exc)})") from None


async def _connect(url: str) -> None:
    from aihub.core.db import create_engine

    engine = create_engine(url, pool_size=1)
    try:
        async with asyncio.timeout(DATABASE_CONNECT_TIMEOUT_SECONDS), engine.connect():
            pass
    finally:
        await engine.dispose()


def _database_reason(exc: Exception) -> str:
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, TimeoutError):
        return f"no answer within {DATABASE_CONNECT_TIMEOUT_SECONDS:g}s"
    if isinstance(exc, OSError):
        return _os_reason(exc)
    if not isinstance(exc, DBAPIError):  # the driver refused a connection setting
        return f"{type(exc).__name__}: {str(exc).partition(chr(10))[0]}"
    # SQLAlchemy wraps the adapter's error, which wraps the driver's: say what the driver said.
    driver_error: BaseException = exc
    if exc.orig is not None:
        driver_error = exc.orig.__cause__ or exc.orig
    first_line = str(driver_error).strip().partition("\n")[0]
    return first_line or type(driver_error).__name__


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"unknown host: {exc.strerror}"
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def alembic_config(database_url: str) -> object:
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def run_migrations(settings: Settings) -> None:
    """Bring the database schema to the latest revision (synchronous: call it off the loop)."""
    from alembic import command

    command.upgrade(alembic_config(settings.resolved_database_url), "head")  # type: ignore[arg-type]


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (PORT)")] = None,
    migrate: Annotated[bool, typer.Option(help="Apply migrations before serving")] = True,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (WORKERS or WEB_CONCURRENCY)", min=1)
    ] = None,
) -> None:
    """Apply migrations, then serve every product."""
    import uvicorn

    from aihub.core.logging import configure_logging
    from aihub.core.server import uvicorn_options
    from aihub.main import create_app

    settings = _settings()
    with _reported_config_errors():
        check_start_up(settings)
        if settings.redis_url:  # only the server uses it: migrations need not wait for Redis
            check_redis(settings.redis_url)
    configure_logging(settings.log_level, settings.log_format)
    if migrate:
        run_migrations(settings)
    workers = workers or settings.workers
    options: dict[str, Any] = {}
    if workers > 1:
        # Each worker builds its own app; the signing key must exist before they race for it.
        from aihub.users.tokens import load_signing_key

        load_signing_key(settings)
        options = {"workers": workers, "factory": True}
        if settings.resolved_database_url.startswith("sqlite"):
            logging.getLogger("aihub").warning(
                "%d workers on SQLite: an image job's stream served by one worker learns of "
                "another's progress only every IMAGES_POLL_SECONDS; use PostgreSQL to run "
                "several workers",
                workers,
            )
    uvicorn.run(
        "aihub.main:create_app_from_environment"
        if workers > 1
        else create_app(settings, freeze_gc=True),
        **options,
        **uvicorn_options(settings),
        host=host or settings.host,
        port=port or settings.port,
    )


@app.command()
def migrate() -> None:
    """Apply database migrations up to the latest revision."""
    from aihub.core.logging import configure_logging

    settings = _settings()
    with _reported_config_errors():
        check_start_up(settings)
    configure_logging(settings.log_level, "console")
    run_migrations(settings)
    typer.echo("database is up to date")


@app.command()
def worker(
    migrate: Annotated[bool, typer.Option(help="Apply migrations before starting")] = False,
) -> None:
    """Run image jobs without serving HTTP: extra capacity beside `aihub serve`, or the only
    worker when the servers run with IMAGES_WORKER=false. Stops on SIGTERM or Ctrl-C, handing its
    unfinished jobs back to the queue."""
    from aihub.core.logging import configure_logging

    settings = _settings()
    with _reported_config_errors():
        check_start_up(settings)
    configure_logging(settings.log_level, settings.log_format)
    if migrate:
        run_migrations(settings)
    asyncio.run(_run_worker(settings))


async def _run_worker(settings: Settings) -> None:
    import signal

    from aihub.core.db import create_engine, create_sessionmaker
    from aihub.core.notify import create_notifier
    from aihub.images.worker import ImageWorker, WorkerSettings
    from aihub.providers.routing import ProviderRegistry
    from aihub.storage import create_storage

    engine = create_engine(settings.resolved_database_url, pool_size=settings.database_pool_size)
    notifier = create_notifier(settings.resolved_database_url)
    providers = await asyncio.to_thread(ProviderRegistry, settings)  # reads CA bundles
    storage = create_storage(settings)
    chain = providers.image_chain(settings.images_model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await notifier.start()
    sessions = create_sessionmaker(engine)
    image_worker = ImageWorker(
        sessions=sessions,
        notifier=notifier,
        chain=chain,
        storage=storage,
        options=WorkerSettings.of(settings),
    )
    image_worker.start()
    logging.getLogger("aihub").info(
        "image worker %s running %s", image_worker.id, chain.label, extra={"chain": chain.label}
    )
    try:
        await stop.wait()
    finally:
        await image_worker.stop()
        await notifier.aclose()
        await storage.aclose()
        await providers.aclose()
        await sessions.aclose()
        await engine.dispose()


@users_app.command("create")
def create_user(
    email: Annotated[str, typer.Option(help="Login email")],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)],
) -> None:
    """Create a local account."""
    from aihub.core.errors import AppError

    settings = _settings()
    with _reported_config_errors():
        check_start_up(settings)
    run_migrations(settings)
    try:
        user_id = asyncio.run(_create_user(settings, email, password))
    except AppError as exc:
        typer.echo(f"aihub: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"created user {user_id} <{email.strip().lower()}>")


async def _create_user(settings: Settings, email: str, password: str) -> str:
    from aihub.core.db import create_engine, create_sessionmaker
    from aihub.users.service import create_local_user

    engine = create_engine(settings.resolved_database_url)
    sessions = create_sessionmaker(engine)
    try:
        async with sessions.begin() as session:
            user = await create_local_user(session, email=email, password=password)
            return str(user.id)
    finally:
        await sessions.aclose()
        await engine.dispose()


def main() -> None:
    app(args=sys.argv[1:], prog_name="aihub")


if __name__ == "__main__":
    main()
