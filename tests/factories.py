"""Plain async factories that build test data the way a client (or the CLI) would."""

from __future__ import annotations

import secrets

import httpx
from fastapi import FastAPI

from aihub.users import service

DEFAULT_PASSWORD = "correct-horse-battery"


def unique_email() -> str:
    return f"user-{secrets.token_hex(6)}@example.com"


async def create_user(
    client: httpx.AsyncClient, *, email: str | None = None, password: str = DEFAULT_PASSWORD
) -> tuple[str, str]:
    """A local account made through `POST /api/auth/register`: `(user id, bearer token)`.

    The app must have registration open (`make_app(auth_allow_registration=True)`); where it is
    closed, use `create_user_in_app`, which goes through the service as the CLI does.
    """
    response = await client.post(
        "/api/auth/register", json={"email": email or unique_email(), "password": password}
    )
    if response.status_code == 403:
        raise AssertionError(
            "registration is closed on this app: serve it with auth_allow_registration=True "
            "or use tests.factories.create_user_in_app"
        )
    assert response.status_code == 201, response.text
    body = response.json()
    return body["user"]["id"], body["token"]


async def create_user_in_app(
    app: FastAPI, *, email: str | None = None, password: str = DEFAULT_PASSWORD
) -> tuple[str, str]:
    """Like `create_user`, straight through the service (registration open or not)."""
    async with app.state.sessions() as session:
        user = await service.create_local_user(
            session, email=email or unique_email(), password=password
        )
        await session.commit()
    issued = app.state.authenticator.issuer.issue(user.id)
    return str(user.id), issued.token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
