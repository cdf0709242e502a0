"""Bearer-token authentication: Clerk tokens and aihub's own, behind one `CurrentUser`.

API
---
`Authenticator` holds every key; the app builds one in its lifespan and keeps it on
`app.state.authenticator`::

    authenticator = await Authenticator.create(settings)  # never waits for the network
    ...
    await authenticator.aclose()

- `await authenticator.verify(token) -> LocalIdentity | ClerkIdentity` — raises `Unauthorized`
  (401) for any bad token and `ServiceUnavailable` (503) when Clerk's keys cannot be had.
- `authenticator.issuer` — aihub's own `TokenIssuer` (`issue(user_id)`, `jwks()`).
- `authenticator.settings` — the settings it was built from.

Dependencies (FastAPI `Annotated` aliases):

- `CurrentUser` — the caller's `User`, from `Authorization: Bearer <token>`; 401 otherwise.
- `OptionalUser` — `User | None`: None when there is no `Authorization` header at all.
- `AuthenticatorDep` — `app.state.authenticator`.
- `CurrentPlan` — the caller's plan: a Clerk token's claim, or a local user's stored plan.
- `require_plan(plan, required)` — raises `PlanRequired` (403, code "plan_required").

Accepted tokens: Clerk session tokens and Clerk JWT-template tokens (RS256, keys from
`CLERK_JWKS_URL` or the PEM in `CLERK_JWT_KEY`), and tokens aihub issues itself (RS256, its own
key, `iss` "aihub"). `exp` is required; `nbf`/`iat` are checked with `JWT_LEEWAY_SECONDS`; `azp`,
when present, must be one of `CLERK_AUTHORIZED_PARTIES` when that list is set.

Clerk's keys are fetched with an async HTTP client, never on a request's critical path when the
token's kid is cached: a prefetch starts at start-up, stale keys keep serving while a refresh
runs or fails, refreshes are single-flight, and unknown kids trigger at most one fetch per
`CLERK_JWKS_COOLDOWN_SECONDS`.

The user is loaded in a short session of its own (`app.state.sessions`), never the request's
session: a stream must not hold a database connection for its whole length.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import Response

from aihub.core.config import ConfigError, Settings
from aihub.core.errors import Forbidden, Unauthorized, handle_app_error
from aihub.core.jwks import JwksCache
from aihub.users import service
from aihub.users.models import User
from aihub.users.tokens import ALGORITHM, ISSUER, TokenIssuer

logger = logging.getLogger("aihub.auth")


AUTH_ERRORS = {
    401: "Missing, invalid or expired token",
    503: "Clerk's signing keys cannot be fetched right now",
}


class PlanRequired(Forbidden):
    code = "plan_required"
    default_message = "Your plan does not include this feature"


@dataclass(frozen=True, slots=True)
class LocalIdentity:
    """A token aihub issued: `sub` is the user's id."""

    user_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ClerkIdentity:
    """A verified Clerk token; None means the token did not say."""

    clerk_id: str
    email: str | None = None
    name: str | None = None
    plan: str | None = None


Identity = LocalIdentity | ClerkIdentity


def parse_public_key(pem: str, *, source: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(pem.replace("\\n", "\n").encode())
    except ValueError as exc:
        raise ConfigError(f"{source}: not a PEM public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError(f"{source}: must be an RSA public key")
    return key


class UserCache:
    """Users recently loaded for a token, so that starting a stream need not wait on the database.

    An entry lives `ttl` seconds; a Clerk token whose profile claims differ from the cached user
    misses, so plan changes are written at once. Deleting a user must call `forget`; another
    instance may keep serving a deleted user's reads for at most `ttl` seconds, while their
    first write there finds no user row and is refused (`handle_integrity_error`).

    A user who keeps calling never waits on the database: an entry read in the second half of
    its life is served and reloaded in the background. Requests that miss together share one
    load: at 300 concurrent streams of one user, an entry that expired made every request that
    arrived before its reload ended load the user again, each queueing for the pool (~0.2 s of
    their time to first token, `bench/stream_overhead.py`).
    """

    def __init__(
        self,
        ttl: float,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, User]] = OrderedDict()
        """key -> (when the entry was loaded, the user)."""
        self._loading: dict[tuple[str | None, ...], asyncio.Task[User]] = {}
        """The loads under way, by identity and profile claims."""

    async def user(self, identity: Identity, load: Callable[[Identity], Awaitable[User]]) -> User:
        """The identity's user: cached, or from `load` (shared with the requests for the same
        identity that are waiting for it)."""
        key = _cache_key(identity)
        entry = self._entries.get(key)
        if entry is not None:
            loaded_at, user = entry
            age = self._clock() - loaded_at
            if age < self.ttl and _profile_matches(user, identity):
                if age >= self.ttl / 2:
                    self._start_load(identity, load, refresh=True)
                return user
            del self._entries[key]
        return await asyncio.shield(self._start_load(identity, load, refresh=False))

    def put(self, identity: Identity, user: User) -> None:
        if self.ttl <= 0:
            return
        key = _cache_key(identity)
        self._entries[key] = (self._clock(), user)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, user_id: uuid.UUID) -> None:
        for key, (_, user) in list(self._entries.items()):
            if user.id == user_id:
                del self._entries[key]

    async def aclose(self) -> None:
        """Stop the loads under way (the database is closed after this)."""
        loads = list(self._loading.values())
        for loading in loads:
            loading.cancel()
        await asyncio.gather(*loads, return_exceptions=True)

    def _start_load(
        self, identity: Identity, load: Callable[[Identity], Awaitable[User]], *, refresh: bool
    ) -> asyncio.Task[User]:
        """The load under way for the identity, started if there is none."""
        claims = _claims_key(identity)
        loading = self._loading.get(claims)
        if loading is None:
            loading = asyncio.ensure_future(self._load(identity, load, refresh=refresh))
            self._loading[claims] = loading
            loading.add_done_callback(functools.partial(self._loaded, claims))
        return loading

    def _loaded(self, claims: tuple[str | None, ...], loading: asyncio.Task[User]) -> None:
        del self._loading[claims]
        if not loading.cancelled():
            loading.exception()  # a refresh's failure is logged; a load's waiters have it

    async def _load(
        self, identity: Identity, load: Callable[[Identity], Awaitable[User]], *, refresh: bool
    ) -> User:
        try:
            user = await load(identity)
        except Unauthorized:
            self._entries.pop(_cache_key(identity), None)  # the user is gone
            raise
        except Exception:
            if refresh:  # nobody waits for it: the entry serves until it expires
                logger.warning("could not reload a cached user", exc_info=True)
            raise
        self.put(identity, user)
        return user


def _cache_key(identity: Identity) -> tuple[str, str]:
    if isinstance(identity, LocalIdentity):
        return ("local", str(identity.user_id))
    return ("clerk", identity.clerk_id)


def _claims_key(identity: Identity) -> tuple[str | None, ...]:
    """The identity with what a load writes from it (a Clerk user's profile claims)."""
    if isinstance(identity, LocalIdentity):
        return ("local", str(identity.user_id))
    return ("clerk", identity.clerk_id, identity.email, identity.name, identity.plan)


def _profile_matches(user: User, identity: Identity) -> bool:
    if isinstance(identity, LocalIdentity):
        return True
    claims = (("email", identity.email), ("name", identity.name), ("plan", identity.plan))
    return all(value is None or getattr(user, field) == value for field, value in claims)


class Authenticator:
    """Verifies bearer tokens; see the module docstring for the API."""

    def __init__(
        self,
        settings: Settings,
        *,
        issuer: TokenIssuer,
        clerk_jwks: JwksCache | None = None,
        clerk_static_key: rsa.RSAPublicKey | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.issuer = issuer
        self._clerk_jwks = clerk_jwks
        self._clerk_static_key = clerk_static_key
        self._http_client = http_client
        self.users = UserCache(settings.auth_user_cache_seconds)
        self._verified: OrderedDict[str, tuple[float, Identity]] = OrderedDict()
        """Tokens verified lately, until when their verification stands, and what they say."""

    @classmethod
    async def create(cls, settings: Settings) -> Authenticator:
        """Load aihub's key (off the loop) and start prefetching Clerk's keys in the background."""
        issuer = await TokenIssuer.load(settings)
        static_key = None
        if settings.clerk_jwt_key:
            static_key = parse_public_key(settings.clerk_jwt_key, source="CLERK_JWT_KEY")
        jwks = client = None
        if settings.clerk_jwks_url:
            client = httpx.AsyncClient(
                timeout=settings.clerk_jwks_timeout_seconds, follow_redirects=False
            )
            jwks = JwksCache(
                settings.clerk_jwks_url,
                client=client,
                cooldown_seconds=settings.clerk_jwks_cooldown_seconds,
                max_age_seconds=settings.clerk_jwks_max_age_seconds,
                timeout_seconds=settings.clerk_jwks_timeout_seconds,
            )
            jwks.start_refresh()
        return cls(
            settings,
            issuer=issuer,
            clerk_jwks=jwks,
            clerk_static_key=static_key,
            http_client=client,
        )

    async def aclose(self) -> None:
        await self.users.aclose()
        if self._clerk_jwks is not None:
            await self._clerk_jwks.aclose()
        if self._http_client is not None:
            await self._http_client.aclose()

    async def verify(self, token: str) -> Identity:
        """The token's identity. A token verified in the last `VERIFIED_FOR` seconds, and not
        expired since, is not verified again: a client sends the same token with every call,
        and parsing and checking an RS256 token twice cost ~0.3 ms of each. Only successes are
        remembered; a signing key that disappears stops working within `VERIFIED_FOR`."""
        now = time.time()
        remembered = self._verified.get(token)
        if remembered is not None:
            if now < remembered[0]:
                return remembered[1]
            del self._verified[token]
        identity, expires = await self._verify(token)
        if expires is not None:
            self._verified[token] = (min(expires, now + VERIFIED_FOR), identity)
            while len(self._verified) > VERIFIED_MAX_TOKENS:
                self._verified.popitem(last=False)
        return identity

    async def _verify(self, token: str) -> tuple[Identity, float | None]:
        """The token's identity, and its expiry (epoch seconds) if it has a usable one."""
        header, unverified = _unverified_parts(token)
        if header.get("alg") != ALGORITHM:
            raise Unauthorized("Unsupported token algorithm")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("Invalid token")
        if kid == self.issuer.kid or unverified.get("iss") == ISSUER:
            return self._verify_local(token)
        return await self._verify_clerk(token, kid)

    def _verify_local(self, token: str) -> tuple[LocalIdentity, float | None]:
        claims = _decode(lambda: self.issuer.verify(token, leeway=self._leeway))
        try:
            return LocalIdentity(user_id=uuid.UUID(str(claims["sub"]))), _expiry(claims)
        except ValueError:
            raise Unauthorized("Invalid token") from None

    async def _verify_clerk(
        self, token: str, kid: str | None
    ) -> tuple[ClerkIdentity, float | None]:
        key = await self._clerk_key(kid)
        claims: dict[str, Any] = _decode(
            lambda: jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                leeway=self._leeway,
                issuer=self.settings.clerk_issuer,
                options={"require": ["exp", "sub"], "verify_aud": False},
            )
        )
        self._check_authorized_party(claims)
        return clerk_identity(claims), _expiry(claims)

    async def _clerk_key(self, kid: str | None) -> Any:
        cached = self._clerk_jwks.cached(kid) if self._clerk_jwks and kid else None
        if cached is not None:
            return cached.key
        if self._clerk_static_key is not None:
            # Networkless verification: the PEM key is Clerk's, whatever the kid.
            return self._clerk_static_key
        if self._clerk_jwks is None or kid is None:
            raise Unauthorized("Invalid token")
        fetched = await self._clerk_jwks.get(kid)
        if fetched is None:
            raise Unauthorized("Unknown signing key")
        return fetched.key

    def _check_authorized_party(self, claims: dict[str, Any]) -> None:
        allowed = self.settings.clerk_authorized_parties
        azp = claims.get("azp")
        if azp is None or not allowed:
            return
        if not isinstance(azp, str) or azp.rstrip("/") not in allowed:
            raise Unauthorized("Token issued for another application")

    @property
    def _leeway(self) -> float:
        return float(self.settings.jwt_leeway_seconds)


VERIFIED_FOR = 60.0
"""Seconds a token's verification is reused at most (never past the token's `exp`)."""
VERIFIED_MAX_TOKENS = 10_000


def _expiry(claims: dict[str, Any]) -> float | None:
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def _unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, unverified: used only to pick the key."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise Unauthorized("Invalid token") from None
    if not isinstance(claims, dict):
        raise Unauthorized("Invalid token")
    return header, claims


def _decode(decode: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a PyJWT decode, turning its errors into short 401s that never echo the token."""
    try:
        claims: dict[str, Any] = decode()
    except jwt.ExpiredSignatureError:
        raise Unauthorized("Token expired") from None
    except jwt.ImmatureSignatureError:
        raise Unauthorized("Token not yet valid") from None
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthorized(f"Token lacks the {exc.claim!r} claim") from None
    except jwt.InvalidIssuerError:
        raise Unauthorized("Token issued by another Clerk instance") from None
    except jwt.InvalidTokenError:
        raise Unauthorized("Invalid token") from None
    return claims


def clerk_identity(claims: dict[str, Any]) -> ClerkIdentity:
    """Session tokens carry the plan as `pla` ("u:premium"); JWT templates may carry `plan`."""
    clerk_id = claims.get("sub")
    if not isinstance(clerk_id, str) or not 0 < len(clerk_id) <= 64 or not clerk_id.isprintable():
        raise Unauthorized("Invalid token")
    plan = _plan(claims)
    name = _text(claims.get("name"))
    if name is None:
        parts = (_text(claims.get("first_name")), _text(claims.get("last_name")))
        name = " ".join(part for part in parts if part) or None
    email = _text(claims.get("email"))
    if email is not None and len(email) > 320:
        email = None  # not an address anyone can have; keep the user, drop the claim
    return ClerkIdentity(
        clerk_id=clerk_id,
        email=email.lower() if email else None,
        name=name[:200] if name else None,
        plan=plan[:100] if plan else None,
    )


def _plan(claims: dict[str, Any]) -> str | None:
    session_plan = _text(claims.get("pla"))  # "u:premium" (user) or "o:team" (organisation)
    if session_plan is not None:
        return session_plan.partition(":")[2] or session_plan
    return _text(claims.get("plan"))


def _text(value: object) -> str | None:
    """A claim as storable text: NUL characters (PostgreSQL refuses them) removed."""
    if not isinstance(value, str):
        return None
    return value.replace("\x00", "").strip() or None


async def get_authenticator(request: Request) -> Authenticator:
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator


AuthenticatorDep = Annotated[Authenticator, Depends(get_authenticator)]

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="A Clerk session or JWT-template token, or a token from POST /api/auth/login.",
)
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


async def get_current_user(request: Request, credentials: BearerCredentials) -> User:
    # The authenticator from the app itself, not as a dependency of its own: every
    # authenticated request solves this one, and FastAPI's solving of a dependency cost more
    # than the lookup.
    authenticator: Authenticator = request.app.state.authenticator
    if credentials is None:
        raise Unauthorized()
    identity = await authenticator.verify(credentials.credentials)
    request.state.identity = identity
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessions
    user = await authenticator.users.user(identity, functools.partial(_load_user, sessions))
    request.state.user_id = user.id
    return user


async def handle_integrity_error(request: Request, exc: Exception) -> Response:
    """A write broke a database constraint. When the caller's own user row is gone, another
    instance deleted them (Clerk's `user.deleted`) after this one had cached them (`UserCache`):
    forget them here too and refuse, as the next token check would, rather than answer 500 until
    the cache entry expires. Any other broken constraint is unexpected, and raised on."""
    user_id: uuid.UUID | None = getattr(request.state, "user_id", None)
    if user_id is None:
        raise exc
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessions
    async with sessions() as session:
        if await session.scalar(select(User.id).where(User.id == user_id)) is not None:
            raise exc
    authenticator: Authenticator = request.app.state.authenticator
    authenticator.users.forget(user_id)
    return await handle_app_error(request, service.AccountDeleted())


async def _load_user(sessions: async_sessionmaker[AsyncSession], identity: Identity) -> User:
    async with sessions() as session:
        user = await _user_of(session, identity)
        if isinstance(identity, ClerkIdentity):
            await session.commit()  # a user seen for the first time, or a changed plan
    return user


async def _user_of(session: AsyncSession, identity: Identity) -> User:
    if isinstance(identity, LocalIdentity):
        user = await session.get(User, identity.user_id)
        if user is None:
            raise Unauthorized("Unknown user")
        return user
    return await service.get_or_create_clerk_user(
        session,
        clerk_id=identity.clerk_id,
        email=identity.email,
        name=identity.name,
        plan=identity.plan,
    )


async def get_optional_user(request: Request, credentials: BearerCredentials) -> User | None:
    if "authorization" not in request.headers:
        return None
    return await get_current_user(request, credentials)


CurrentUser = Annotated[User, Depends(get_current_user)]
OptionalUser = Annotated[User | None, Depends(get_optional_user)]


async def get_current_plan(request: Request, user: CurrentUser) -> str | None:
    """The caller's plan: a Clerk token's own claim (the token is the authority, so a plan that
    ended ends at once), else the local user's plan."""
    identity: Identity = request.state.identity
    return identity.plan if isinstance(identity, ClerkIdentity) else user.plan


CurrentPlan = Annotated[str | None, Depends(get_current_plan)]


def require_plan(plan: str | None, required: str | None) -> None:
    """Raise `PlanRequired` unless `plan` is `required` (None: no plan needed)."""
    if required is not None and plan != required:
        raise PlanRequired(f"This needs the {required} plan")
