"""Bearer tokens: Clerk session and template tokens, aihub's own, and Clerk's key cache."""

from __future__ import annotations

import asyncio
import stat
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from aihub.core import auth as auth_module
from aihub.core.auth import (
    Authenticator,
    ClerkIdentity,
    CurrentPlan,
    Identity,
    LocalIdentity,
    OptionalUser,
    UserCache,
    require_plan,
)
from aihub.core.config import ConfigError, Settings
from aihub.core.errors import ServiceUnavailable, Unauthorized
from aihub.users.models import User
from aihub.users.tokens import KEY_FILE_NAME, TokenIssuer
from tests.factories import bearer, create_user_in_app
from tests.fakes.clerk import FakeClerk, closed_port_url

# --- the Authenticator on its own ------------------------------------------------------------


def auth_settings(tmp_path: Path, fake_clerk: FakeClerk, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": tmp_path, "clerk_jwks_url": fake_clerk.jwks_url}
    values.update(overrides)
    return Settings(_env_file=None, **values)


@asynccontextmanager
async def authenticator(
    tmp_path: Path, fake_clerk: FakeClerk, **overrides: Any
) -> AsyncIterator[Authenticator]:
    auth = await Authenticator.create(auth_settings(tmp_path, fake_clerk, **overrides))
    try:
        yield auth
    finally:
        await auth.aclose()


async def rejected(auth: Authenticator, token: str) -> str:
    with pytest.raises(Unauthorized) as caught:
        await auth.verify(token)
    assert not token or token not in caught.value.message
    return caught.value.message


async def test_session_token_is_accepted(tmp_path: Path, fake_clerk: FakeClerk) -> None:
    async with authenticator(tmp_path, fake_clerk) as auth:
        identity = await auth.verify(fake_clerk.issue_token("user_1", pla="u:premium_subscription"))
    assert identity == ClerkIdentity(clerk_id="user_1", plan="premium_subscription")


async def test_a_verified_token_is_not_verified_again_until_it_expires(
    tmp_path: Path, fake_clerk: FakeClerk, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[str] = []
    real = auth_module._unverified_parts

    def counting(token: str) -> Any:
        parsed.append(token)
        return real(token)

    monkeypatch.setattr(auth_module, "_unverified_parts", counting)
    token = fake_clerk.issue_token("user_1", lifetime=2)
    async with authenticator(tmp_path, fake_clerk, jwt_leeway_seconds=0) as auth:
        for _ in range(3):
            identity = await auth.verify(token)
            assert isinstance(identity, ClerkIdentity)
            assert identity.clerk_id == "user_1"
        assert len(parsed) == 1
        for _ in range(2):  # failures are never remembered
            await rejected(auth, token + "x")
        assert len(parsed) == 3
        await asyncio.sleep(2.5)  # past `exp`: verified again, and refused
        assert await rejected(auth, token) == "Token expired"


async def test_a_verification_is_reused_for_a_bounded_time(
    tmp_path: Path, fake_clerk: FakeClerk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key that leaves Clerk's JWKS must stop verifying tokens soon, whatever their `exp`."""
    monkeypatch.setattr(auth_module, "VERIFIED_FOR", 0.2)
    token = fake_clerk.issue_token("user_1", lifetime=3600)
    async with authenticator(tmp_path, fake_clerk) as auth:
        await auth.verify(token)
        monkeypatch.setattr(auth, "_verify", _refuse)
        await auth.verify(token)  # still remembered
        await asyncio.sleep(0.3)
        assert await rejected(auth, token) == "Unknown signing key"


async def _refuse(token: str) -> Any:
    raise Unauthorized("Unknown signing key")


async def test_template_token_without_session_claims_is_accepted(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    token = fake_clerk.template_token("user_2", email="Ada@Example.com", name="Ada", plan="pro")
    async with authenticator(tmp_path, fake_clerk) as auth:
        identity = await auth.verify(token)
    assert identity == ClerkIdentity(
        clerk_id="user_2", email="ada@example.com", name="Ada", plan="pro"
    )


async def test_expired_token_is_rejected(tmp_path: Path, fake_clerk: FakeClerk) -> None:
    async with authenticator(tmp_path, fake_clerk) as auth:
        assert await rejected(auth, fake_clerk.issue_token(lifetime=-60)) == "Token expired"


async def test_token_without_exp_is_rejected(tmp_path: Path, fake_clerk: FakeClerk) -> None:
    async with authenticator(tmp_path, fake_clerk) as auth:
        assert "exp" in await rejected(auth, fake_clerk.issue_token(omit=["exp"]))


async def test_future_nbf_is_rejected_beyond_the_leeway(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    now = int(time.time())
    async with authenticator(tmp_path, fake_clerk, jwt_leeway_seconds=5) as auth:
        assert await rejected(auth, fake_clerk.issue_token(nbf=now + 60)) == "Token not yet valid"
        assert await rejected(auth, fake_clerk.issue_token(iat=now + 60)) == "Token not yet valid"
        # A clock a couple of seconds ahead is tolerated.
        await auth.verify(fake_clerk.issue_token(nbf=now + 2, iat=now + 2))


async def test_bad_signature_is_rejected(tmp_path: Path, fake_clerk: FakeClerk) -> None:
    impostor = fake_clerk.unpublished_key(kid=fake_clerk.signing_key.kid)
    async with authenticator(tmp_path, fake_clerk) as auth:
        await auth.verify(fake_clerk.issue_token())
        assert await rejected(auth, fake_clerk.issue_token(key=impostor)) == "Invalid token"


async def test_alg_none_is_rejected(tmp_path: Path, fake_clerk: FakeClerk) -> None:
    async with authenticator(tmp_path, fake_clerk) as auth:
        await auth.verify(fake_clerk.issue_token())
        await rejected(auth, fake_clerk.issue_token(algorithm="none"))


async def test_hs256_signed_with_the_public_key_is_rejected(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    async with authenticator(tmp_path, fake_clerk) as auth:
        await auth.verify(fake_clerk.issue_token())
        await rejected(auth, fake_clerk.issue_token(algorithm="HS256"))


async def test_garbage_is_rejected_without_echoing_it(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    async with authenticator(tmp_path, fake_clerk) as auth:
        for token in ["not-a-jwt", "a.b.c", "eyJhbGciOiJSUzI1NiJ9.e30.", ""]:
            await rejected(auth, token)


async def test_azp_is_checked_only_when_present_and_configured(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    parties = ["http://localhost:3000", "https://app.example.com"]
    async with authenticator(tmp_path, fake_clerk, clerk_authorized_parties=parties) as auth:
        await auth.verify(fake_clerk.issue_token(azp="http://localhost:3000"))
        await auth.verify(fake_clerk.issue_token(azp="https://app.example.com/"))
        await auth.verify(fake_clerk.template_token(azp=None))
        message = await rejected(auth, fake_clerk.issue_token(azp="https://evil.example"))
        assert message == "Token issued for another application"
    async with authenticator(tmp_path, fake_clerk) as auth:
        await auth.verify(fake_clerk.issue_token(azp="https://anything.example"))


async def test_unknown_kid_costs_exactly_one_refresh(tmp_path: Path, fake_clerk: FakeClerk) -> None:
    async with authenticator(tmp_path, fake_clerk, clerk_jwks_cooldown_seconds=0) as auth:
        await auth.verify(fake_clerk.issue_token())
        assert fake_clerk.fetch_count == 1

        fake_clerk.rotate()
        await auth.verify(fake_clerk.issue_token())
        assert fake_clerk.fetch_count == 2

        stranger = fake_clerk.unpublished_key()
        assert await rejected(auth, fake_clerk.issue_token(key=stranger)) == "Unknown signing key"
        assert fake_clerk.fetch_count == 3


async def test_a_flood_of_unknown_kids_costs_one_fetch_per_cooldown(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    strangers = [fake_clerk.unpublished_key() for _ in range(3)]
    tokens = [
        fake_clerk.issue_token(key=strangers[i % 3], headers={"kid": f"ins_{i}"}) for i in range(60)
    ]
    async with authenticator(tmp_path, fake_clerk, clerk_jwks_cooldown_seconds=0.5) as auth:
        await auth.verify(fake_clerk.issue_token())
        assert fake_clerk.fetch_count == 1
        await asyncio.sleep(0.55)

        results = await asyncio.gather(
            *(auth.verify(t) for t in tokens[:30]), return_exceptions=True
        )
        assert all(isinstance(result, Unauthorized) for result in results)
        for token in tokens[30:]:
            await rejected(auth, token)
        assert fake_clerk.fetch_count == 2

        await asyncio.sleep(0.55)
        await rejected(auth, tokens[0])
        assert fake_clerk.fetch_count == 3


async def test_cached_keys_keep_serving_while_the_key_server_is_down(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    overrides = {"clerk_jwks_cooldown_seconds": 0, "clerk_jwks_max_age_seconds": 0.01}
    async with authenticator(tmp_path, fake_clerk, **overrides) as auth:
        await auth.verify(fake_clerk.issue_token())
        fake_clerk.down = True
        for _ in range(5):
            await asyncio.sleep(0.02)  # the cache is old: each call starts a refresh, which fails
            assert isinstance(await auth.verify(fake_clerk.issue_token()), ClerkIdentity)
        assert fake_clerk.fetch_count > 1


@pytest.mark.parametrize("unreachable", ["down", "refused"])
async def test_no_keys_at_all_is_503(
    tmp_path: Path, fake_clerk: FakeClerk, unreachable: str
) -> None:
    fake_clerk.down = True
    url = fake_clerk.jwks_url if unreachable == "down" else closed_port_url()
    async with authenticator(tmp_path, fake_clerk, clerk_jwks_url=url) as auth:
        with pytest.raises(ServiceUnavailable):
            await auth.verify(fake_clerk.issue_token())
        fake_clerk.down = False
        # Within the cool-down, the failure is not retried on every request.
        with pytest.raises(ServiceUnavailable):
            await auth.verify(fake_clerk.issue_token())
    if unreachable == "down":
        assert fake_clerk.fetch_count == 1


async def test_a_slow_key_server_does_not_stall_requests_with_a_cached_kid(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    overrides = {"clerk_jwks_cooldown_seconds": 0, "clerk_jwks_timeout_seconds": 20}
    async with authenticator(tmp_path, fake_clerk, **overrides) as auth:
        await auth.verify(fake_clerk.issue_token())
        fake_clerk.slow = 20
        hanging = asyncio.create_task(
            auth.verify(fake_clerk.issue_token(key=fake_clerk.unpublished_key()))
        )
        await asyncio.sleep(0.1)

        started = time.perf_counter()
        for _ in range(20):
            await auth.verify(fake_clerk.issue_token("user_cached"))
        assert time.perf_counter() - started < 1.0
        assert not hanging.done()

        fake_clerk.release()
        with pytest.raises(Unauthorized):
            await hanging


async def test_start_up_does_not_wait_for_the_key_server(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    fake_clerk.slow = 20
    started = time.perf_counter()
    async with authenticator(tmp_path, fake_clerk):
        assert time.perf_counter() - started < 2.0
        await asyncio.sleep(0.05)
        assert fake_clerk.fetch_count == 1  # the prefetch is under way


async def test_networkless_pem_key(tmp_path: Path, fake_clerk: FakeClerk) -> None:
    pem = fake_clerk.signing_key.public_pem.replace("\n", "\\n")  # as a one-line .env value
    async with authenticator(tmp_path, fake_clerk, clerk_jwks_url=None, clerk_jwt_key=pem) as auth:
        assert isinstance(await auth.verify(fake_clerk.issue_token()), ClerkIdentity)
        stranger = fake_clerk.unpublished_key(kid=fake_clerk.signing_key.kid)
        await rejected(auth, fake_clerk.issue_token(key=stranger))
    assert fake_clerk.fetch_count == 0


async def test_bad_clerk_pem_fails_at_start_up(tmp_path: Path, fake_clerk: FakeClerk) -> None:
    with pytest.raises(ConfigError, match="CLERK_JWT_KEY"):
        await Authenticator.create(auth_settings(tmp_path, fake_clerk, clerk_jwt_key="nope"))


# --- aihub's own tokens -----------------------------------------------------------------------


async def test_own_tokens_verify_and_never_reach_clerk(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    async with authenticator(tmp_path, fake_clerk) as auth:
        user_id = uuid.uuid4()
        token = auth.issuer.issue(user_id).token
        assert await auth.verify(token) == LocalIdentity(user_id=user_id)

        other_install = await TokenIssuer.load(auth_settings(tmp_path / "other", fake_clerk))
        await rejected(auth, other_install.issue(user_id).token)
        await rejected(auth, token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))
    assert fake_clerk.fetch_count == 1  # the start-up prefetch only


async def test_signing_key_is_generated_once_with_private_permissions(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    settings = auth_settings(tmp_path / "data", fake_clerk)
    first = await TokenIssuer.load(settings)
    path = tmp_path / "data" / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = await TokenIssuer.load(settings)
    assert first.kid == second.kid
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE_NAME]


async def test_bad_configured_signing_key_fails_at_start_up(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    settings = auth_settings(tmp_path, fake_clerk, auth_jwt_private_key="-----BEGIN nonsense")
    with pytest.raises(ConfigError, match="AUTH_JWT_PRIVATE_KEY"):
        await TokenIssuer.load(settings)


# --- over HTTP ------------------------------------------------------------------------------------


async def count_clerk_users(app: FastAPI, clerk_id: str) -> int:
    async with app.state.sessions() as session:
        query = select(func.count()).select_from(User).where(User.clerk_id == clerk_id)
        return int((await session.execute(query)).scalar_one())


async def test_missing_and_bad_tokens_are_401_json(make_app: Any, fake_clerk: FakeClerk) -> None:
    async with make_app() as served:
        missing = await served.client.get("/api/me")
        wrong_scheme = await served.client.get("/api/me", headers={"Authorization": "Basic abc"})
        expired_token = fake_clerk.issue_token(lifetime=-60)
        expired = await served.client.get("/api/me", headers=bearer(expired_token))
    for response in (missing, wrong_scheme, expired):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        body = response.json()
        assert body["error"] == "unauthorized"
        assert isinstance(body["detail"], str)
    assert expired.json()["detail"] == "Token expired"
    assert expired_token not in expired.text


async def test_clerk_user_is_created_on_first_sight(make_app: Any, fake_clerk: FakeClerk) -> None:
    async with make_app() as served:
        response = await served.client.get(
            "/api/me", headers=bearer(fake_clerk.issue_token("user_new"))
        )
        assert response.status_code == 200
        body = response.json()
        assert body["clerk_id"] == "user_new"
        assert body["plan"] == "free_user"
        again = await served.client.get(
            "/api/me", headers=bearer(fake_clerk.issue_token("user_new"))
        )
        assert again.json()["id"] == body["id"]


async def test_concurrent_first_requests_make_one_user(
    make_app: Any, fake_clerk: FakeClerk
) -> None:
    async with make_app() as served:
        await served.client.get("/api/me", headers=bearer(fake_clerk.issue_token("user_warmup")))
        token = fake_clerk.issue_token("user_racing")
        responses = await asyncio.gather(
            *(served.client.get("/api/me", headers=bearer(token)) for _ in range(10))
        )
        assert [r.status_code for r in responses] == [200] * 10
        assert len({r.json()["id"] for r in responses}) == 1
        assert await count_clerk_users(served.app, "user_racing") == 1


async def test_plan_and_profile_follow_the_token(make_app: Any, fake_clerk: FakeClerk) -> None:
    async def me(token: str) -> dict[str, Any]:
        response = await served.client.get("/api/me", headers=bearer(token))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async with make_app() as served:
        assert (await me(fake_clerk.issue_token("user_p")))["plan"] == "free_user"
        upgraded = await me(fake_clerk.issue_token("user_p", pla="u:premium_subscription"))
        assert upgraded["plan"] == "premium_subscription"
        templated = await me(
            fake_clerk.template_token("user_p", email="p@example.com", name="Pat", plan="pro")
        )
        assert templated | {"id": None} == {
            "id": None,
            "clerk_id": "user_p",
            "email": "p@example.com",
            "name": "Pat",
            "plan": "pro",
        }
        # A token that says nothing about the plan leaves it alone.
        assert (await me(fake_clerk.template_token("user_p")))["plan"] == "pro"


async def test_wrong_azp_is_401_over_http(make_app: Any, fake_clerk: FakeClerk) -> None:
    async with make_app(clerk_authorized_parties="http://localhost:3000") as served:
        good = await served.client.get("/api/me", headers=bearer(fake_clerk.issue_token()))
        token = fake_clerk.issue_token(azp="https://evil.example")
        bad = await served.client.get("/api/me", headers=bearer(token))
    assert good.status_code == 200
    assert bad.status_code == 401


async def test_key_server_down_over_http(make_app: Any, fake_clerk: FakeClerk) -> None:
    async with make_app(clerk_jwks_cooldown_seconds=0, clerk_jwks_max_age_seconds=0.01) as served:
        first = await served.client.get("/api/me", headers=bearer(fake_clerk.issue_token()))
        fake_clerk.down = True
        await asyncio.sleep(0.02)
        cached = await served.client.get("/api/me", headers=bearer(fake_clerk.issue_token()))
    assert (first.status_code, cached.status_code) == (200, 200)

    fake_clerk.reset()
    fake_clerk.down = True
    async with make_app() as served:
        response = await served.client.get("/api/me", headers=bearer(fake_clerk.issue_token()))
    assert response.status_code == 503
    assert response.json()["error"] == "auth_keys_unavailable"


async def test_token_of_a_deleted_user_is_401(make_app: Any) -> None:
    async with make_app() as served:
        user_id, token = await create_user_in_app(served.app)
        assert (await served.client.get("/api/me", headers=bearer(token))).status_code == 200
        async with served.app.state.sessions() as session:
            await session.delete(await session.get(User, uuid.UUID(user_id)))
            await session.commit()
        # Deleting a user forgets it in the authenticator's cache (the deletion cascade does).
        served.app.state.authenticator.users.forget(uuid.UUID(user_id))
        response = await served.client.get("/api/me", headers=bearer(token))
    assert response.status_code == 401


async def test_users_are_cached_for_a_short_while(make_app: Any) -> None:
    async with make_app(auth_user_cache_seconds=0.3) as served:
        user_id, token = await create_user_in_app(served.app)
        assert (await served.client.get("/api/me", headers=bearer(token))).status_code == 200
        async with served.app.state.sessions() as session:
            await session.delete(await session.get(User, uuid.UUID(user_id)))
            await session.commit()
        cached = await served.client.get("/api/me", headers=bearer(token))
        await asyncio.sleep(0.35)
        expired = await served.client.get("/api/me", headers=bearer(token))
    assert cached.status_code == 200
    assert expired.status_code == 401


def _user(email: str = "cached@example.com") -> User:
    return User(id=uuid.uuid4(), email=email)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Loads:
    """A user loader that counts its calls and waits to be let through."""

    def __init__(self, *users: User | Exception) -> None:
        self.results = list(users)
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, identity: Identity) -> User:
        self.calls += 1
        await self.gate.wait()
        result = self.results[min(self.calls, len(self.results)) - 1]
        if isinstance(result, Exception):
            raise result
        return result


async def test_requests_that_miss_together_share_one_load() -> None:
    cache, loads = UserCache(30), _Loads(_user())
    identity = LocalIdentity(uuid.uuid4())
    loads.gate.clear()
    waiting = [asyncio.ensure_future(cache.user(identity, loads)) for _ in range(20)]
    await asyncio.sleep(0.01)
    waiting[0].cancel()  # one caller leaving does not stop the others' load
    loads.gate.set()
    users = await asyncio.gather(*waiting[1:])
    assert loads.calls == 1
    assert {id(user) for user in users} == {id(loads.results[0])}
    assert await cache.user(identity, loads) is loads.results[0]  # cached now
    assert loads.calls == 1


async def test_an_entry_read_late_in_its_life_is_served_and_reloaded_behind() -> None:
    first, second = _user(), _user()
    clock = _Clock()
    cache, loads = UserCache(30, clock=clock), _Loads(first, second)
    identity = LocalIdentity(uuid.uuid4())
    assert await cache.user(identity, loads) is first
    clock.now += 14
    assert await cache.user(identity, loads) is first  # young: not reloaded
    assert loads.calls == 1

    clock.now += 2
    loads.gate.clear()
    # Served at once, though the reload is held up; the readers meanwhile start no other.
    served = [await cache.user(identity, loads) for _ in range(5)]
    assert served == [first] * 5
    await asyncio.sleep(0)
    assert loads.calls == 2
    loads.gate.set()
    await asyncio.sleep(0.01)
    clock.now += 20  # the first load would have expired by now; the reload has not
    assert await cache.user(identity, loads) is second
    assert loads.calls == 2


async def test_a_reload_that_finds_the_user_gone_drops_the_entry() -> None:
    clock = _Clock()
    cache, loads = UserCache(30, clock=clock), _Loads(_user(), Unauthorized("Unknown user"))
    identity = LocalIdentity(uuid.uuid4())
    await cache.user(identity, loads)
    clock.now += 20
    await cache.user(identity, loads)  # served, and reloaded behind
    await asyncio.sleep(0.01)
    with pytest.raises(Unauthorized):
        await cache.user(identity, loads)
    assert loads.calls == 3


async def test_a_reload_that_fails_leaves_the_entry_until_it_expires(
    caplog: pytest.LogCaptureFixture,
) -> None:
    user, clock = _user(), _Clock()
    cache, loads = UserCache(30, clock=clock), _Loads(user, OSError("database down"))
    identity = LocalIdentity(uuid.uuid4())
    await cache.user(identity, loads)
    clock.now += 20
    assert await cache.user(identity, loads) is user
    await asyncio.sleep(0.01)
    assert await cache.user(identity, loads) is user  # a reload is due again: it fails again
    await asyncio.sleep(0.01)
    assert loads.calls == 3
    assert "could not reload a cached user" in caplog.text
    clock.now += 10
    with pytest.raises(OSError, match="database down"):
        await cache.user(identity, loads)


async def test_clerk_tokens_with_other_claims_do_not_share_a_load() -> None:
    cache, loads = UserCache(30), _Loads(_user(), _user())
    loads.gate.clear()
    free = asyncio.ensure_future(cache.user(ClerkIdentity("user_c"), loads))
    paid = asyncio.ensure_future(cache.user(ClerkIdentity("user_c", plan="pro"), loads))
    await asyncio.sleep(0.01)
    loads.gate.set()
    await asyncio.gather(free, paid)
    assert loads.calls == 2


async def test_closing_the_cache_stops_its_loads() -> None:
    cache, loads = UserCache(30), _Loads(_user())
    loads.gate.clear()
    waiting = asyncio.ensure_future(cache.user(LocalIdentity(uuid.uuid4()), loads))
    await asyncio.sleep(0.01)
    await cache.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_optional_user_and_plan_gate(make_app: Any, fake_clerk: FakeClerk) -> None:
    async with make_app() as served:

        async def whoami(user: OptionalUser) -> dict[str, str | None]:
            return {"clerk_id": user.clerk_id if user else None}

        async def premium(plan: CurrentPlan) -> dict[str, str]:
            require_plan(plan, "premium_subscription")
            return {"ok": "yes"}

        served.app.add_api_route("/test/whoami", whoami)
        served.app.add_api_route("/test/premium", premium)
        client = served.client

        assert (await client.get("/test/whoami")).json() == {"clerk_id": None}
        signed_in = await client.get(
            "/test/whoami", headers=bearer(fake_clerk.issue_token("user_o"))
        )
        assert signed_in.json() == {"clerk_id": "user_o"}
        bad = await client.get("/test/whoami", headers=bearer("garbage"))
        assert bad.status_code == 401

        free = await client.get("/test/premium", headers=bearer(fake_clerk.issue_token("user_o")))
        assert free.status_code == 403
        assert free.json()["error"] == "plan_required"
        paid_token = fake_clerk.issue_token("user_o", pla="u:premium_subscription")
        paid = await client.get("/test/premium", headers=bearer(paid_token))
        assert paid.status_code == 200
        # The plan ends with the token that stops claiming it, cache or no cache.
        lapsed = await client.get("/test/premium", headers=bearer(fake_clerk.issue_token("user_o")))
        assert lapsed.status_code == 403


async def test_hostile_profile_claims_are_stored_safely(
    make_app: Any, fake_clerk: FakeClerk
) -> None:
    token = fake_clerk.issue_token("user_h", email="a" * 400 + "@x.test", name="Eve\u0000 Null")
    async with make_app() as served:
        response = await served.client.get("/api/me", headers=bearer(token))
    assert response.status_code == 200
    assert response.json()["email"] is None
    assert response.json()["name"] == "Eve Null"


async def test_clerk_issuer_is_checked_when_configured(
    make_app: Any, fake_clerk: FakeClerk
) -> None:
    async with make_app(clerk_issuer=fake_clerk.issuer) as served:
        ours = await served.client.get("/api/me", headers=bearer(fake_clerk.issue_token("u1")))
        other = fake_clerk.issue_token("u1", iss="https://evil.clerk.accounts.dev")
        theirs = await served.client.get("/api/me", headers=bearer(other))
        missing = fake_clerk.issue_token("u1", iss=None)
        none = await served.client.get("/api/me", headers=bearer(missing))
    assert ours.status_code == 200
    assert theirs.status_code == 401
    assert theirs.json()["detail"] == "Token issued by another Clerk instance"
    assert none.status_code == 401
