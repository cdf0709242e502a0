"""aihub's own signing key and the bearer tokens it issues to local accounts.

The key is RS256: `AUTH_JWT_PRIVATE_KEY` (PEM) when set, otherwise generated on first run into
`DATA_DIR/auth_private_key.pem` (mode 0600) so tokens survive restarts. Its kid is the RFC 7638
thumbprint of the public key, which `GET /.well-known/jwks.json` publishes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from aihub.core.config import ConfigError, Settings

logger = logging.getLogger("aihub.auth")

ISSUER = "aihub"
ALGORITHM = "RS256"
KEY_FILE_NAME = "auth_private_key.pem"
MIN_KEY_BITS = 2048


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: datetime


class TokenIssuer:
    """Signs aihub's own tokens and verifies them; publishes the public key as a JWKS."""

    def __init__(self, private_key: rsa.RSAPrivateKey, *, ttl_seconds: int) -> None:
        self._private_key = private_key
        self._public_key = private_key.public_key()
        self._ttl = timedelta(seconds=ttl_seconds)
        self._public_jwk = public_jwk(self._public_key)
        self.kid: str = self._public_jwk["kid"]

    @classmethod
    async def load(cls, settings: Settings) -> TokenIssuer:
        """The configured key, or the one in the data folder (created on first run)."""
        private_key = await asyncio.to_thread(load_signing_key, settings)
        return cls(private_key, ttl_seconds=settings.auth_token_ttl_seconds)

    def issue(self, user_id: uuid.UUID) -> IssuedToken:
        now = datetime.now(UTC).replace(microsecond=0)
        expires_at = now + self._ttl
        claims = {
            "iss": ISSUER,
            "sub": str(user_id),
            "iat": now,
            "exp": expires_at,
            "jti": secrets.token_urlsafe(12),
        }
        token = jwt.encode(claims, self._private_key, ALGORITHM, headers={"kid": self.kid})
        return IssuedToken(token=token, expires_at=expires_at)

    def verify(self, token: str, *, leeway: float) -> dict[str, Any]:
        """The claims of a token this issuer signed; raises `jwt.InvalidTokenError` otherwise."""
        claims: dict[str, Any] = jwt.decode(
            token,
            self._public_key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            leeway=leeway,
            options={"require": ["exp", "iat", "sub", "iss"], "verify_aud": False},
        )
        if "aud" in claims:  # a scoped token (see `issue_scoped`) is no bearer token
            raise jwt.InvalidAudienceError("a scoped token cannot authenticate requests")
        return claims

    def issue_scoped(
        self, user_id: uuid.UUID, *, audience: str, ttl_seconds: int, **claims: str
    ) -> IssuedToken:
        """A short-lived token good for one purpose only (`audience`), such as streaming one
        image job; `verify` refuses it as a bearer token."""
        now = datetime.now(UTC).replace(microsecond=0)
        expires_at = now + timedelta(seconds=ttl_seconds)
        payload = {
            **claims,
            "iss": ISSUER,
            "aud": audience,
            "sub": str(user_id),
            "iat": now,
            "exp": expires_at,
        }
        token = jwt.encode(payload, self._private_key, ALGORITHM, headers={"kid": self.kid})
        return IssuedToken(token=token, expires_at=expires_at)

    def verify_scoped(self, token: str, *, audience: str, leeway: float) -> dict[str, Any]:
        """The claims of a scoped token for `audience`; raises `jwt.InvalidTokenError`."""
        claims: dict[str, Any] = jwt.decode(
            token,
            self._public_key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            audience=audience,
            leeway=leeway,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
        return claims

    def derive_key(self, purpose: str) -> bytes:
        """A secret for `purpose` (HMAC keys), derived from the signing key: every instance that
        shares the signing key derives the same one."""
        der = self._private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return hashlib.sha256(f"aihub:{purpose}\0".encode() + der).digest()

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [dict(self._public_jwk)]}


def public_jwk(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
    members = {"kty": "RSA", "n": str(jwk["n"]), "e": str(jwk["e"])}
    return {**members, "kid": rfc7638_thumbprint(members), "alg": ALGORITHM, "use": "sig"}


def rfc7638_thumbprint(members: dict[str, str]) -> str:
    """Base64url SHA-256 of the required JWK members, sorted, without whitespace."""
    required = {name: members[name] for name in ("e", "kty", "n")}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(canonical).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def load_signing_key(settings: Settings) -> rsa.RSAPrivateKey:
    """Blocking: parse the configured key, or read/create the key file. Run it in a thread."""
    if settings.auth_jwt_private_key is not None:
        pem = settings.auth_jwt_private_key.get_secret_value().replace("\\n", "\n")
        return parse_private_key(pem.encode(), source="AUTH_JWT_PRIVATE_KEY")
    path = settings.data_dir / KEY_FILE_NAME
    if not path.exists():
        _create_key_file(path)
    return parse_private_key(path.read_bytes(), source=str(path))


def check_signing_key(settings: Settings) -> None:
    """Blocking: raise `ConfigError` now if the configured or stored key is unusable.

    Unlike `load_signing_key` it never creates the key file, so a command that only checks the
    configuration leaves the data folder as it found it.
    """
    if settings.auth_jwt_private_key is not None or (settings.data_dir / KEY_FILE_NAME).exists():
        load_signing_key(settings)


def parse_private_key(pem: bytes, *, source: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: not an unencrypted PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < MIN_KEY_BITS:
        raise ConfigError(f"{source}: must be an RSA private key of at least {MIN_KEY_BITS} bits")
    return key


def _create_key_file(path: Path) -> None:
    """Write a new key atomically with mode 0600; a key another process wrote first wins."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_KEY_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
        _publish(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _publish(temporary: Path, path: Path) -> None:
    try:
        os.link(temporary, path)  # atomic, and never replaces a key another process wrote
    except FileExistsError:
        return
    except OSError:  # a filesystem without hard links
        if path.exists():
            return
        os.replace(temporary, path)
    logger.info("generated aihub's token signing key", extra={"path": str(path)})
