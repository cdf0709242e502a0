"""Local accounts (`/api/auth/*`), the caller's profile (`/api/me`) and aihub's public keys."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from aihub.core.auth import AuthenticatorDep, CurrentUser
from aihub.core.db import SessionDep
from aihub.users import service
from aihub.users.models import User
from aihub.users.schemas import (
    AccountCreate,
    ErrorRead,
    JwksRead,
    LoginRequest,
    TokenRead,
    UserRead,
    UserSummary,
)
from aihub.users.service import RegistrationClosed

router = APIRouter(tags=["auth"])

_INVALID_BODY: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorRead, "description": "Invalid body"}
}
_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorRead, "description": "Missing, invalid or expired token"},
    503: {"model": ErrorRead, "description": "Clerk's signing keys cannot be fetched"},
}


@router.post(
    "/api/auth/register",
    status_code=201,
    responses={
        403: {"model": ErrorRead, "description": "Registration is closed"},
        409: {"model": ErrorRead, "description": "The email already has an account"},
        **_INVALID_BODY,
    },
)
async def register_account(
    body: AccountCreate, session: SessionDep, authenticator: AuthenticatorDep
) -> TokenRead:
    """Create a local account and log it in (only where `registration_open`)."""
    if not authenticator.settings.registration_open:
        raise RegistrationClosed()
    user = await service.create_local_user(session, email=body.email, password=body.password)
    return _token_for(user, authenticator)


@router.post(
    "/api/auth/login",
    responses={
        401: {"model": ErrorRead, "description": "Invalid email or password"},
        **_INVALID_BODY,
    },
)
async def log_in(
    body: LoginRequest, session: SessionDep, authenticator: AuthenticatorDep
) -> TokenRead:
    """Exchange email and password for a bearer token."""
    user = await service.authenticate_local(session, email=body.email, password=body.password)
    return _token_for(user, authenticator)


@router.get("/api/me", responses=_UNAUTHORIZED)
async def read_me(user: CurrentUser) -> UserRead:
    """The caller, whichever kind of token they sent."""
    return UserRead(
        id=str(user.id), email=user.email, name=user.name, plan=user.plan, clerk_id=user.clerk_id
    )


@router.get("/.well-known/jwks.json")
async def read_jwks(authenticator: AuthenticatorDep, response: Response) -> JwksRead:
    """aihub's public signing keys, to verify the tokens it issues."""
    response.headers["Cache-Control"] = "public, max-age=300"
    return JwksRead.model_validate(authenticator.issuer.jwks())


def _token_for(user: User, authenticator: AuthenticatorDep) -> TokenRead:
    issued = authenticator.issuer.issue(user.id)
    return TokenRead(
        token=issued.token,
        expires_at=issued.expires_at,
        user=UserSummary(id=str(user.id), email=user.email),
    )
