"""`aihub serve | migrate | users create`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from aihub.core.config import ConfigError, Settings, load_settings

app = typer.Typer(help="aihub: five AI products behind one backend.", no_args_is_help=True)
users_app = typer.Typer(help="Manage local accounts.", no_args_is_help=True)
app.add_typer(users_app, name="users")

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        typer.echo(f"aihub: {exc}", err=True)
        raise typer.Exit(2) from None


def alembic_config(database_url: str) -> object:
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def run_migrations(settings: Settings) -> None:
    """Bring the database schema to the latest revision (synchronous: call it off the loop)."""
    from alembic import command

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings.resolved_database_url), "head")  # type: ignore[arg-type]


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (PORT)")] = None,
    migrate: Annotated[bool, typer.Option(help="Apply migrations before serving")] = True,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (WEB_CONCURRENCY)", min=1)
    ] = None,
) -> None:
    """Apply migrations, then serve every product."""
    import uvicorn

    from aihub.core.logging import configure_logging
    from aihub.main import create_app

    settings = _settings()
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
    uvicorn.run(
        "aihub.main:create_app_from_environment" if workers > 1 else create_app(settings),
        **options,
        host=host or settings.host,
        port=port or settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
def migrate() -> None:
    """Apply database migrations up to the latest revision."""
    from aihub.core.logging import configure_logging

    settings = _settings()
    configure_logging(settings.log_level, "console")
    run_migrations(settings)
    typer.echo("database is up to date")


@users_app.command("create")
def create_user(
    email: Annotated[str, typer.Option(help="Login email")],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)],
) -> None:
    """Create a local account."""
    from aihub.core.errors import AppError

    settings = _settings()
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
    try:
        async with create_sessionmaker(engine).begin() as session:
            user = await create_local_user(session, email=email, password=password)
            return str(user.id)
    finally:
        await engine.dispose()


def main() -> None:
    app(args=sys.argv[1:], prog_name="aihub")


if __name__ == "__main__":
    main()
