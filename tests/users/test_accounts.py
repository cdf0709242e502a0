"""Local accounts: register, log in (the image-jobs contract), /api/me, aihub's JWKS."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import bcrypt
import httpx
import jwt
import pytest

from aihub.core.errors import Unprocessable
from aihub.users import service
from tests.factories import DEFAULT_PASSWORD, bearer, create_user, create_user_in_app, unique_email


@pytest.fixture
async def open_app(make_app: Any) -> AsyncIterator[Any]:
    async with make_app(auth_allow_registration=True) as served:
        yield served


@pytest.fixture
def api(open_app: Any) -> httpx.AsyncClient:
    client: httpx.AsyncClient = open_app.client
    return client


async def register(
    api: httpx.AsyncClient, email: str, password: str = DEFAULT_PASSWORD
) -> httpx.Response:
    return await api.post("/api/auth/register", json={"email": email, "password": password})


async def log_in(
    api: httpx.AsyncClient, email: str, password: str = DEFAULT_PASSWORD
) -> httpx.Response:
    return await api.post("/api/auth/login", json={"email": email, "password": password})


async def test_register_answers_like_login(api: httpx.AsyncClient) -> None:
    response = await register(api, "  Ada@Example.COM ")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"token", "token_type", "expires_at", "user"}
    assert body["token_type"] == "bearer"
    assert body["user"]["email"] == "ada@example.com"
    assert isinstance(body["user"]["id"], str)

    me = await api.get("/api/me", headers=bearer(body["token"]))
    assert me.json() == {
        "id": body["user"]["id"],
        "email": "ada@example.com",
        "name": None,
        "plan": None,
        "clerk_id": None,
    }


async def test_login_returns_the_image_jobs_contract(api: httpx.AsyncClient) -> None:
    user_id, _ = await create_user(api, email="grace@example.com")
    response = await log_in(api, "GRACE@example.com ")
    assert response.status_code == 200
    body = response.json()
    assert body["user"] == {"id": user_id, "email": "grace@example.com"}
    assert body["token_type"] == "bearer"
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["iss"] == "aihub"
    assert claims["sub"] == user_id
    assert abs(claims["exp"] - time.time() - 12 * 3600) < 60
    assert body["expires_at"].startswith(time.strftime("%Y", time.gmtime(claims["exp"])))


async def test_wrong_password_and_unknown_email_look_alike(api: httpx.AsyncClient) -> None:
    await create_user(api, email="linus@example.com")
    started = time.perf_counter()
    wrong = await log_in(api, "linus@example.com", "not-the-password")
    wrong_seconds = time.perf_counter() - started
    started = time.perf_counter()
    unknown = await log_in(api, "nobody@example.com", "not-the-password")
    unknown_seconds = time.perf_counter() - started

    expected = {"error": "invalid_credentials", "detail": "Invalid email or password"}
    assert (wrong.status_code, wrong.json()) == (401, expected)
    assert (unknown.status_code, unknown.json()) == (401, expected)
    # bcrypt runs for the unknown email too: the two take comparable time.
    assert unknown_seconds > wrong_seconds * 0.4


async def test_duplicate_email_is_409(api: httpx.AsyncClient) -> None:
    assert (await register(api, "dup@example.com")).status_code == 201
    again = await register(api, "DUP@example.com")
    assert again.status_code == 409
    assert again.json()["error"] == "email_taken"


async def test_concurrent_registrations_of_one_email_make_one_account(
    api: httpx.AsyncClient,
) -> None:
    responses = await asyncio.gather(*(register(api, "race@example.com") for _ in range(4)))
    assert sorted(r.status_code for r in responses) == [201, 409, 409, 409]


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [
        ("not-an-email", DEFAULT_PASSWORD, "email"),
        ("a@b", DEFAULT_PASSWORD, "email"),
        ("ok@example.com", "short7!", "password"),
        ("ok@example.com", "ü" * 40, "password"),  # 80 bytes: beyond bcrypt's 72
    ],
)
async def test_invalid_registration_is_422_without_echo(
    api: httpx.AsyncClient, email: str, password: str, field: str
) -> None:
    response = await register(api, email, password)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail.startswith(field)
    assert password not in response.text


async def test_registration_closed_is_403(make_app: Any) -> None:
    async with make_app(auth_allow_registration=False) as served:
        response = await register(served.client, unique_email())
        assert response.status_code == 403
        assert response.json()["error"] == "registration_closed"
        # Accounts made by an operator (the CLI path) still log in.
        await create_user_in_app(served.app, email="ops@example.com")
        assert (await log_in(served.client, "ops@example.com")).status_code == 200


async def test_service_validates_like_the_api(open_app: Any) -> None:
    async with open_app.app.state.sessions() as session:
        with pytest.raises(Unprocessable, match="valid email"):
            await service.create_local_user(session, email="nope", password=DEFAULT_PASSWORD)
        with pytest.raises(Unprocessable, match="at least 8"):
            await service.create_local_user(session, email="x@example.com", password="short")


async def test_jwks_verifies_issued_tokens(api: httpx.AsyncClient) -> None:
    user_id, token = await create_user(api)
    response = await api.get("/.well-known/jwks.json")
    assert response.status_code == 200
    (key,) = response.json()["keys"]
    assert key["kid"] == jwt.get_unverified_header(token)["kid"]
    assert {key["kty"], key["alg"], key["use"]} == {"RSA", "RS256", "sig"}
    assert "d" not in key
    claims = jwt.decode(token, jwt.PyJWK(key).key, algorithms=["RS256"], issuer="aihub")
    assert claims["sub"] == user_id


async def test_secrets_never_reach_the_logs(
    api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "Sup3r-secret-passphrase"
    email = unique_email()
    registered = (await register(api, email, password)).json()
    await log_in(api, email, "Wrong-secret-passphrase")
    logged_in = (await log_in(api, email, password)).json()
    await api.get("/api/me", headers=bearer(logged_in["token"]))
    await api.get("/api/me", headers=bearer(logged_in["token"][:-3] + "xyz"))
    await register(api, "bad", password)

    text = caplog.text + " ".join(str(record.args) for record in caplog.records)
    for secret in (password, "Wrong-secret-passphrase", registered["token"], logged_in["token"]):
        assert secret not in text
    assert logged_in["token"].split(".")[2] not in text


class HeldBcrypt:
    """bcrypt held, once `hold()` is called, until `release` is set; `entered` counts the hashes
    that began."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.release = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def hold(self) -> None:
        real_checkpw, real_hashpw = bcrypt.checkpw, bcrypt.hashpw

        def held(real: Any) -> Any:
            def call(password: bytes, other: bytes) -> Any:
                with self._lock:
                    self.entered += 1
                self.release.wait(10)
                return real(password, other)

            return call

        self.monkeypatch.setattr(bcrypt, "checkpw", held(real_checkpw))
        self.monkeypatch.setattr(bcrypt, "hashpw", held(real_hashpw))

    async def until_entered(self, count: int = 1) -> None:
        for _ in range(500):
            if self.entered >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.entered} hashes began, not {count}")


@pytest.fixture
def held_bcrypt(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldBcrypt]:
    held = HeldBcrypt(monkeypatch)
    yield held
    held.release.set()


@pytest.mark.parametrize("route", ["login", "register"])
async def test_no_database_connection_is_held_while_a_password_is_hashed(
    open_app: Any, held_bcrypt: HeldBcrypt, route: str
) -> None:
    """A flood of logins must not hold the pool for a quarter second each (every route that
    needs the database would wait for them, readiness probes included)."""
    email = unique_email()
    await create_user_in_app(open_app.app, email=email)
    held_bcrypt.hold()
    attempt = (
        log_in(open_app.client, email)
        if route == "login"
        else register(open_app.client, unique_email())
    )
    pending = asyncio.ensure_future(attempt)
    await held_bcrypt.until_entered()
    if route == "register":
        await asyncio.sleep(0.05)  # it would have looked the email up by now

    assert open_app.app.state.engine.sync_engine.pool.checkedout() == 0
    held_bcrypt.release.set()
    assert (await pending).status_code in (200, 201)


async def test_a_flood_of_logins_queues_behind_itself_not_in_front_of_other_work(
    make_app: Any, held_bcrypt: HeldBcrypt
) -> None:
    async with make_app(auth_rate_limit="unlimited") as served:
        held_bcrypt.hold()
        flood = [
            asyncio.ensure_future(log_in(served.client, unique_email(), "wrong-password"))
            for _ in range(40)
        ]
        await held_bcrypt.until_entered(2)
        await asyncio.sleep(0.3)  # every attempt has arrived and waits for its hash

        # The default executor (file I/O and the like) is free while every hash waits.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 2) == "free"
        held_bcrypt.release.set()
        assert {(await attempt).status_code for attempt in flood} == {401}


async def test_logins_and_registrations_are_rate_limited_per_address(make_app: Any) -> None:
    async with make_app(auth_allow_registration=True, auth_rate_limit="3/minute") as served:
        api = served.client
        assert (await register(api, "limited@example.com")).status_code == 201
        assert (await log_in(api, "limited@example.com", "wrong-password")).status_code == 401
        assert (await log_in(api, "limited@example.com")).status_code == 200

        refused = await log_in(api, "limited@example.com")

        assert refused.status_code == 429
        assert refused.json()["error"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 20
        assert (await register(api, "other@example.com")).status_code == 429
