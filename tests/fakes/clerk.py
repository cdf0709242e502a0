"""A loopback fake of Clerk: a JWKS endpoint and real RS256 tokens signed with real RSA keys.

    token = fake_clerk.issue_token("user_123", pla="u:premium")        # a session token (v2)
    token = fake_clerk.template_token("user_123", email="a@b.test")    # a JWT-template token
    fake_clerk.rotate()            # a new signing key replaces the published one
    fake_clerk.down = True         # the JWKS endpoint answers 500
    fake_clerk.slow = 10.0         # the JWKS endpoint answers after 10 s (or at `release()`)
    fake_clerk.fetch_count         # JWKS requests served so far

`issue_token(..., algorithm="none")` and `algorithm="HS256"` (HMAC keyed with the signing key's
public PEM: the classic key-confusion attack) forge tokens that a verifier must refuse.
A claim passed as `None` is left out; `omit=("exp",)` does the same.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.server import serve

ISSUER = "https://clerk.aihub.test"
AUTHORIZED_PARTY = "http://localhost:3000"


@dataclass(frozen=True)
class FakeKey:
    kid: str
    private_key: rsa.RSAPrivateKey

    @classmethod
    def generate(cls, kid: str | None = None) -> FakeKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(kid or f"ins_{secrets.token_hex(8)}", key)

    @property
    def public_jwk(self) -> dict[str, Any]:
        jwk = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {
            "kty": "RSA",
            "n": jwk["n"],
            "e": jwk["e"],
            "kid": self.kid,
            "alg": "RS256",
            "use": "sig",
        }

    @property
    def public_pem(self) -> str:
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )


class FakeClerk:
    issuer = ISSUER
    authorized_party = AUTHORIZED_PARTY

    def __init__(self) -> None:
        self._initial_key = FakeKey.generate("ins_initial")
        self.base_url = ""
        self._release = asyncio.Event()
        self.reset()

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/.well-known/jwks.json"

    def reset(self) -> None:
        """Back to one published key, up, fast, nothing fetched; frees any pending slow answer."""
        self.keys: list[FakeKey] = [self._initial_key]
        self.signing_key = self._initial_key
        self.fetch_count = 0
        self.down = False
        self.slow = 0.0
        self.release()

    def release(self) -> None:
        """Let every JWKS request held by `slow` answer now."""
        self._release.set()
        self._release = asyncio.Event()

    def rotate(self, *, keep_old: bool = False) -> FakeKey:
        """Publish a new signing key (alone, unless `keep_old`) and sign with it from now on."""
        new = FakeKey.generate()
        self.keys = [new, *self.keys] if keep_old else [new]
        self.signing_key = new
        return new

    def unpublished_key(self, kid: str | None = None) -> FakeKey:
        """A key Clerk never published: tokens signed with it carry an unknown kid."""
        return FakeKey.generate(kid)

    def issue_token(
        self,
        sub: str = "user_test",
        *,
        key: FakeKey | None = None,
        algorithm: Literal["RS256", "none", "HS256"] = "RS256",
        headers: dict[str, Any] | None = None,
        omit: Iterable[str] = (),
        template: bool = False,
        lifetime: int = 60,
        **claims: Any,
    ) -> str:
        """A token as Clerk signs it: a session token, or a JWT-template one if `template`."""
        key = key or self.signing_key
        now = int(time.time())
        payload: dict[str, Any] = {
            "sub": sub,
            "iss": self.issuer,
            "azp": self.authorized_party,
            "iat": now,
            "nbf": now - 5,
            "exp": now + lifetime,
        }
        if template:
            payload["jti"] = secrets.token_hex(10)
        else:
            payload.update({"sid": f"sess_{secrets.token_hex(8)}", "v": 2, "pla": "u:free_user"})
        payload.update(claims)
        for name in [*omit, *(name for name, value in claims.items() if value is None)]:
            payload.pop(name, None)
        header = {"kid": key.kid, **(headers or {})}
        if algorithm == "RS256":
            return jwt.encode(payload, key.private_key, "RS256", headers=header)
        return _forge(payload, header, algorithm, key)

    def template_token(self, sub: str = "user_test", **kwargs: Any) -> str:
        """A JWT-template token: no `sid`, `v` or `pla`; add `email`, `name`, `plan` as wanted."""
        return self.issue_token(sub, template=True, **kwargs)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/.well-known/jwks.json", self._jwks)])

    async def _jwks(self, request: Request) -> JSONResponse:
        self.fetch_count += 1
        if self.slow:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.slow)
        if self.down:
            return JSONResponse({"error": "down"}, status_code=500)
        return JSONResponse({"keys": [key.public_jwk for key in self.keys]})

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[FakeClerk]:
        async with serve(self.app(), lifespan="off") as base_url:
            self.base_url = base_url
            try:
                yield self
            finally:
                self.release()


def _forge(payload: dict[str, Any], header: dict[str, Any], algorithm: str, key: FakeKey) -> str:
    header = {"typ": "JWT", **header, "alg": algorithm}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if algorithm == "none":
        return signing_input + "."
    secret = key.public_pem.encode()
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def closed_port_url() -> str:
    """A loopback JWKS URL on which nothing listens: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/.well-known/jwks.json"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def fake_clerk_server() -> AsyncIterator[FakeClerk]:
    clerk = FakeClerk()
    async with clerk.serving():
        yield clerk


@pytest.fixture
def fake_clerk(fake_clerk_server: FakeClerk) -> Iterator[FakeClerk]:
    """The session's fake Clerk, reset before and after the test."""
    fake_clerk_server.reset()
    yield fake_clerk_server
    fake_clerk_server.reset()
