"""Per-client rate limits: GCRA, in memory or shared through Redis.

A limit "N/period" lets a client make a burst of N requests, then one every period/N (the generic
cell rate algorithm: one timestamp a client, no counters to reset, an exact `Retry-After`). With
`REDIS_URL` the state lives in Redis, updated by one Lua script that reads Redis's own clock, so
every instance enforces one limit; without it, in this process's memory.

The client is its address; `X-Forwarded-For` is believed only from `TRUSTED_PROXIES`, read from
the right, skipping trusted hops: the first address a trusted proxy did not vouch for is the
client's (the frontends reach aihub through their own servers, which must be listed to get
per-user limits rather than one limit for the whole frontend).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from redis.asyncio import Redis
from redis.exceptions import RedisError

from aihub.core.errors import AppError

logger = logging.getLogger("aihub.ratelimit")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(second|minute|hour|day)s?\s*$")


@dataclass(frozen=True, slots=True)
class RateLimit:
    limit: int
    period: float
    """Seconds; `limit` requests may come at once, then one every `period / limit`."""

    @classmethod
    def parse(cls, spec: str) -> RateLimit:
        """`"20/minute"`, `"100/hour"`, `"5/10second"`; `ValueError` otherwise."""
        match = _SPEC.match(spec.lower())
        if not match or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
            raise ValueError("must look like 20/minute (N/second, minute, hour or day)")
        count, multiple, unit = match.groups()
        return cls(int(count), int(multiple or 1) * _PERIODS[unit])


class RateLimited(AppError):
    status_code = 429
    code = "rate_limited"
    default_message = "Too many requests"

    def __init__(self, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(
            f"Too many requests; try again in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


class RateLimiter(ABC):
    @abstractmethod
    async def hit(self, key: str, limit: RateLimit) -> float | None:
        """Count a request; None when allowed, else the seconds until one would be."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


_FLOAT_SLACK = 1e-6


class MemoryRateLimiter(RateLimiter):
    """GCRA in this process (one event loop: no locks needed)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._next_sweep = 0.0

    async def hit(self, key: str, limit: RateLimit) -> float | None:
        now = self._clock()
        self._sweep(now)
        interval = limit.period / limit.limit
        new_tat = max(self._tats.get(key, now), now) + interval
        allow_at = new_tat - limit.period
        if now < allow_at - _FLOAT_SLACK:  # N additions of period/N may exceed the period a hair
            return allow_at - now
        self._tats[key] = new_tat
        return None

    def _sweep(self, now: float) -> None:
        """Forget clients whose every request has been paid back (keeps memory bounded)."""
        if now < self._next_sweep:
            return
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        self._next_sweep = now + 60


_GCRA = """
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - period
if now < allow_at then return allow_at - now end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000))
return -1
"""


class RedisRateLimiter(RateLimiter):
    """GCRA in Redis, shared by every instance. If Redis fails, requests are let through (and
    logged): a broken limiter must not take the product down."""

    def __init__(self, redis: Redis, *, prefix: str = "aihub:ratelimit:") -> None:
        self._redis = redis
        self._prefix = prefix
        self._script: Any = redis.register_script(_GCRA)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisRateLimiter:
        return cls(Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1), **kwargs)

    async def hit(self, key: str, limit: RateLimit) -> float | None:
        micros = limit.period * 1_000_000
        try:
            wait = await self._script(
                # Rounded down: a whole burst at one instant must fit in the period.
                keys=[self._prefix + key],
                args=[max(1, math.floor(micros / limit.limit)), math.floor(micros)],
            )
        except (RedisError, OSError) as exc:
            logger.warning("rate limiter unavailable: %s", type(exc).__name__)
            return None
        return None if int(wait) < 0 else int(wait) / 1_000_000

    async def aclose(self) -> None:
        await self._redis.aclose()


def parse_networks(values: Sequence[str]) -> list[IPNetwork]:
    """IP addresses and CIDR ranges; `ValueError` naming the first that is neither."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value.strip()!r} is not an IP address or CIDR range") from None
    return networks


def client_address(request: Request, trusted: Sequence[IPNetwork]) -> str:
    """The caller's address: the peer, or what trusted proxies say it is."""
    peer = request.client.host if request.client else "unknown"
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getlist("x-forwarded-for")).split(",")]
    for hop in reversed([h for h in hops if h]):
        if not _is_trusted(hop, trusted):
            return hop
    return peer


def _is_trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # a name or garbage: never a trusted hop, so it is the client
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 proxy seen by a dual-stack listener
    return any(ip in network for network in trusted)


@functools.lru_cache(maxsize=16)
def configured(spec: str | None) -> RateLimit | None:
    """A rate-limit setting, parsed once (not on every request: settings are validated at
    start-up); None when it is off."""
    return RateLimit.parse(spec) if spec else None


def rate_limit(
    name: str, limit_of: Callable[[Any], RateLimit | None]
) -> Callable[[Request], Awaitable[None]]:
    """A dependency enforcing `limit_of(settings)` per client address, under `name`."""

    async def dependency(request: Request) -> None:
        state = request.app.state
        limit = limit_of(state.settings)
        if limit is None:
            return
        client = client_address(request, state.trusted_proxies)
        wait = await state.rate_limiter.hit(f"{name}:{client}", limit)
        if wait is not None:
            raise RateLimited(wait)

    return dependency
