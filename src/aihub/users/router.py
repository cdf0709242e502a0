"""Local accounts (`/api/auth/*`), the caller's profile (`/api/me`), aihub's public keys, and
Clerk's webhooks (`/webhooks/clerk`, `/clerk-webhook`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from aihub.core.auth import AUTH_ERRORS, AuthenticatorDep, CurrentUser
from aihub.core.clock import Now
from aihub.core.config import Settings, SettingsDep
from aihub.core.db import SessionDep, Sessions
from aihub.core.errors import ServiceUnavailable, error_responses
from aihub.core.ratelimit import RateLimit, configured, rate_limit
from aihub.storage.base import delete_user_files
from aihub.usage.quotas import quota_policies
from aihub.users import service, webhooks
from aihub.users.models import User
from aihub.users.schemas import (
    AccountCreate,
    JwksRead,
    LoginRequest,
    TokenRead,
    UserRead,
    UserSummary,
    WebhookReceipt,
)
from aihub.users.service import RegistrationClosed

router = APIRouter(tags=["auth"])

_INVALID_BODY = error_responses({422: "Invalid body"})
_UNAUTHORIZED = error_responses(AUTH_ERRORS)


def _auth_limit(settings: Settings) -> RateLimit | None:
    return configured(settings.auth_rate_limit)


_RATE_LIMITED = [Depends(rate_limit("auth", _auth_limit))]
"""Login and registration, per client address: each costs a quarter of a second of bcrypt."""


@router.post(
    "/api/auth/register",
    status_code=201,
    dependencies=_RATE_LIMITED,
    responses={
        **error_responses(
            {
                403: "Registration is closed",
                409: "The email already has an account",
                429: "Too many attempts from this address (see Retry-After)",
            }
        ),
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
    dependencies=_RATE_LIMITED,
    responses={
        **error_responses(
            {
                401: "Invalid email or password",
                429: "Too many attempts from this address (see Retry-After)",
            }
        ),
        **_INVALID_BODY,
    },
)
async def log_in(
    body: LoginRequest, sessions: Sessions, authenticator: AuthenticatorDep
) -> TokenRead:
    """Exchange email and password for a bearer token."""
    user = await service.authenticate_local(sessions, email=body.email, password=body.password)
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


webhooks_router = APIRouter(tags=["webhooks"])


class WebhooksNotConfigured(ServiceUnavailable):
    code = "webhooks_not_configured"
    default_message = "CLERK_WEBHOOK_SECRET is not set on this server"


_WEBHOOK_DESCRIPTION = """Clerk's `user.created`, `user.updated` and `user.deleted` events,
delivered by svix and verified with `CLERK_WEBHOOK_SECRET`. Each delivery is applied once: a
redelivery (same `svix-id`) answers 200 and changes nothing. `user.deleted` deletes everything the
user owns. Other event types are acknowledged and ignored."""


@webhooks_router.post(
    "/webhooks/clerk",
    summary="Receive a Clerk webhook",
    description=_WEBHOOK_DESCRIPTION,
    responses=error_responses(
        {
            400: "Missing or malformed svix headers, bad signature, stale timestamp or body",
            503: "Webhooks are not configured",
        }
    ),
)
@webhooks_router.post(
    "/clerk-webhook",
    summary="Receive a Clerk webhook (the chats app's path)",
    description="The same handler as `POST /webhooks/clerk`.",
    responses=error_responses({400: "Verification failed", 503: "Webhooks are not configured"}),
)
async def receive_clerk_webhook(
    request: Request,
    settings: SettingsDep,
    sessions: Sessions,
    authenticator: AuthenticatorDep,
    now: Now,
) -> WebhookReceipt:
    if settings.clerk_webhook_secret is None:
        raise WebhooksNotConfigured()
    applied = await webhooks.receive_clerk_webhook(
        sessions,
        body=await request.body(),
        headers=request.headers,
        key=webhooks.decode_secret(settings.clerk_webhook_secret.get_secret_value()),
        policies=quota_policies(settings),
        now=now,
    )
    if applied.user_id is not None:
        authenticator.users.forget(applied.user_id)
    if applied.deleted and applied.user_id is not None:
        await delete_user_files(request.app.state.storage, applied.user_id)
    return WebhookReceipt(status=applied.status)
