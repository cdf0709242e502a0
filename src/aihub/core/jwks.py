"""Clerk's public signing keys, fetched asynchronously and cached.

Never on a request's critical path when the token's kid is cached: a refresh runs in the
background, stale keys keep serving while it runs or fails, refreshes are single-flight, and
unknown kids trigger at most one fetch per cool-down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import jwt

from aihub.core.errors import ServiceUnavailable
from aihub.users.tokens import ALGORITHM

logger = logging.getLogger("aihub.auth")

MAX_JWKS_BYTES = 256 * 1024


class KeysUnavailable(ServiceUnavailable):
    code = "auth_keys_unavailable"
    default_message = "Authentication keys are temporarily unavailable"


class JwksCache:
    """Clerk's public keys by kid, refreshed in the background and served stale on failure."""

    def __init__(
        self,
        url: str,
        *,
        client: httpx.AsyncClient,
        cooldown_seconds: float,
        max_age_seconds: float,
        timeout_seconds: float,
    ) -> None:
        self.url = url
        self._client = client
        self._cooldown = cooldown_seconds
        self._max_age = max_age_seconds
        self._timeout = timeout_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._last_failed = False
        self._refresh_task: asyncio.Task[None] | None = None

    def cached(self, kid: str) -> jwt.PyJWK | None:
        """A cached key, starting a background refresh when the cache is old (never waits)."""
        key = self._keys.get(kid)
        if key is not None and self._is_old() and self._may_attempt():
            self.start_refresh()
        return key

    async def get(self, kid: str) -> jwt.PyJWK | None:
        """The key for `kid`, refreshing once for an unknown kid unless in cool-down.

        None when the key set is known and lacks `kid`; `KeysUnavailable` when it cannot be known.
        """
        if (key := self.cached(kid)) is not None:
            return key
        if self._refreshing() or self._may_attempt():
            # shield: a caller that goes away must not cancel the refresh others wait on.
            await asyncio.shield(self.start_refresh())
        if (key := self._keys.get(kid)) is not None:
            return key
        if self._last_failed:
            raise KeysUnavailable()
        return None

    def start_refresh(self) -> asyncio.Task[None]:
        """Start a refresh unless one is running; either way return the running one."""
        if self._refresh_task is None or self._refresh_task.done():
            self._attempted_at = time.monotonic()
            self._refresh_task = asyncio.create_task(self._refresh(), name="clerk-jwks-refresh")
        return self._refresh_task

    async def aclose(self) -> None:
        task = self._refresh_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _refreshing(self) -> bool:
        return self._refresh_task is not None and not self._refresh_task.done()

    def _may_attempt(self) -> bool:
        return self._attempted_at is None or (
            time.monotonic() - self._attempted_at >= self._cooldown
        )

    def _is_old(self) -> bool:
        return self._fetched_at is None or time.monotonic() - self._fetched_at >= self._max_age

    async def _refresh(self) -> None:
        try:
            keys = await self._fetch()
        except (httpx.HTTPError, ValueError) as exc:
            self._last_failed = True
            logger.warning(
                "could not fetch Clerk's signing keys; serving cached keys",
                extra={
                    "jwks_url": self.url,
                    "error": type(exc).__name__,
                    "cached": len(self._keys),
                },
            )
            return
        self._keys = keys
        self._fetched_at = time.monotonic()
        self._last_failed = False
        logger.info("fetched Clerk's signing keys", extra={"keys": len(keys)})

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        response = await self._client.get(self.url, timeout=self._timeout)
        response.raise_for_status()
        if len(response.content) > MAX_JWKS_BYTES:
            raise ValueError("JWKS document too large")
        keys = parse_jwks(response.json())
        if not keys:
            raise ValueError("JWKS document has no usable RS256 key")
        return keys


def parse_jwks(document: Any) -> dict[str, jwt.PyJWK]:
    """The usable RS256 signing keys of a JWKS document, by kid; other keys are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("kty") != "RSA" or entry.get("alg", ALGORITHM) != ALGORITHM:
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            keys[entry["kid"]] = jwt.PyJWK(entry, algorithm=ALGORITHM)
        except jwt.PyJWKError:
            continue
    return keys
