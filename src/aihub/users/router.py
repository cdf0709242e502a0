"""Local accounts (`/api/auth/*`), the caller's profile (`/api/me`) and aihub's public keys."""

from __future__ import annotations

from fastapi import APIRouter, Response

from aihub.core.auth import AUTH_ERRORS, AuthenticatorDep, CurrentUser
from aihub.core.db import SessionDep
from aihub.core.errors import error_responses
from aihub.users import service
from aihub.users.models import User
from aihub.users.schemas import (
    AccountCreate,
    JwksRead,
    LoginRequest,
    TokenRead,
    UserRead,
    UserSummary,
)
from aihub.users.service import RegistrationClosed

router = APIRouter(tags=["auth"])

_INVALID_BODY = error_responses({422: "Invalid body"})
_UNAUTHORIZED = error_responses(AUTH_ERRORS)


@router.post(
    "/api/auth/register",
    status_code=201,
    responses={
        **error_responses({403: "Registration is closed", 409: "The email already has an account"}),
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
        **error_responses({401: "Invalid email or password"}),
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
