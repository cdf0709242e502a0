"""Per-client rate limits: the spec parser, GCRA in memory (on a fake clock) and in a real Redis,
whom `X-Forwarded-For` is believed from, and `POST /api/chat` refusing with 429 and Retry-After."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request

from aihub.core.config import ConfigError, load_settings
from aihub.core.ratelimit import (
    IPNetwork,
    MemoryRateLimiter,
    RateLimit,
    RateLimited,
    RedisRateLimiter,
    client_address,
    parse_networks,
    rate_limit,
)
from tests.conftest import MakeApp, Served
from tests.fakes.openai import FakeOpenAI

REDIS_URL = os.environ.get("AIHUB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
APP_PREFIX = "aihub:ratelimit:"
"""The prefix the app's own limiter uses (`RedisRateLimiter`'s default)."""

CHAT = {"user_message": "hi", "chat_history": [], "api_key": "sk-test-" + "a" * 24}


class FakeClock:
    """Seconds, moved by hand (what `MemoryRateLimiter(clock=...)` reads)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    """A client of the test Redis; unreachable, the test fails on CI and is skipped elsewhere."""
    client = Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {REDIS_URL} unreachable: {exc}")
        pytest.skip(f"Redis unreachable: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"aihub-test:{uuid.uuid4().hex}:"
    yield prefix
    keys = [key async for key in redis.scan_iter(match=prefix + "*")]
    if keys:
        await redis.delete(*keys)


def unique_client() -> str:
    """An address no other test (nor an earlier run) uses: its Redis key is this test's own."""
    return f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}"


# --- RateLimit.parse -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "limit", "period"),
    [
        ("20/minute", 20, 60),
        ("5/10second", 5, 10),
        ("100/hours", 100, 3600),
        (" 3 / day ", 3, 86400),
        ("1/second", 1, 1),
        ("2/MINUTES", 2, 60),
        ("7 / 2 hour", 7, 7200),
    ],
)
def test_parse_reads_count_and_period(spec: str, limit: int, period: float) -> None:
    assert RateLimit.parse(spec) == RateLimit(limit, period)


@pytest.mark.parametrize(
    "spec",
    ["", "0/minute", "ten/minute", "5/fortnight", "5", "-1/minute", "5/", "/minute", "5/1.5second"],
)
def test_parse_refuses_anything_else(spec: str) -> None:
    with pytest.raises(ValueError, match="must look like 20/minute"):
        RateLimit.parse(spec)


def test_parse_refuses_a_zero_period() -> None:
    with pytest.raises(ValueError, match="must look like 20/minute"):
        RateLimit.parse("5/0second")


def test_byok_rate_limit_setting_is_checked_at_start_up() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, byok_rate_limit="nope")
    assert str(caught.value).startswith("BYOK_RATE_LIMIT: must look like 20/minute")

    assert load_settings(_env_file=None, byok_rate_limit="unlimited").byok_rate_limit is None
    assert load_settings(_env_file=None, byok_rate_limit="").byok_rate_limit is None
    assert load_settings(_env_file=None, byok_rate_limit="3/minute").byok_rate_limit == "3/minute"
    assert load_settings(_env_file=None).byok_rate_limit == "30/minute"


def test_trusted_proxies_must_be_addresses_or_ranges() -> None:
    assert parse_networks([" 10.0.0.1 ", "10.1.2.3/8", "fd00::/8"]) == parse_networks(
        ["10.0.0.1/32", "10.0.0.0/8", "fd00::/8"]
    )
    with pytest.raises(ValueError, match=re.escape("'proxy.local' is not an IP address or CIDR")):
        parse_networks(["10.0.0.1", " proxy.local "])

    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, trusted_proxies="10.0.0.1, 300.1.1.1")
    assert str(caught.value) == "TRUSTED_PROXIES: '300.1.1.1' is not an IP address or CIDR range"
    settings = load_settings(_env_file=None, trusted_proxies=" 10.0.0.1 ,, 192.168.0.0/16 ")
    assert settings.trusted_proxies == ["10.0.0.1", "192.168.0.0/16"]


# --- MemoryRateLimiter ---------------------------------------------------------------------------


async def test_memory_allows_a_burst_then_one_request_per_interval() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limit = RateLimit.parse("3/minute")

    assert [await limiter.hit("a", limit) for _ in range(3)] == [None, None, None]
    assert await limiter.hit("a", limit) == 20.0  # period / limit: one request paid back
    assert await limiter.hit("a", limit) == 20.0  # a refused request costs nothing

    clock.advance(19.5)
    assert await limiter.hit("a", limit) == pytest.approx(0.5)
    clock.advance(0.5)
    assert await limiter.hit("a", limit) is None
    assert await limiter.hit("a", limit) == 20.0  # one, not a new burst

    clock.advance(60)  # everything paid back: a whole burst again
    assert [await limiter.hit("a", limit) for _ in range(3)] == [None, None, None]
    assert await limiter.hit("a", limit) == 20.0


async def test_memory_burst_and_interval_of_a_multiple_of_a_unit() -> None:
    clock = FakeClock(1000.0)
    limiter = MemoryRateLimiter(clock=clock)
    limit = RateLimit.parse("5/10second")

    assert [await limiter.hit("k", limit) for _ in range(5)] == [None] * 5
    assert await limiter.hit("k", limit) == 2.0
    clock.advance(2.0)
    assert await limiter.hit("k", limit) is None
    assert await limiter.hit("k", limit) == 2.0


async def test_memory_keys_are_independent() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limit = RateLimit.parse("2/minute")

    assert [await limiter.hit("a", limit) for _ in range(2)] == [None, None]
    assert await limiter.hit("a", limit) == 30.0

    assert [await limiter.hit("b", limit) for _ in range(2)] == [None, None]
    assert await limiter.hit("b", limit) == 30.0
    clock.advance(10)
    assert await limiter.hit("a", limit) == 20.0
    assert await limiter.hit("c", limit) is None


async def test_memory_forgets_clients_once_they_have_paid_back() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limit = RateLimit.parse("2/minute")

    for index in range(1000):
        assert await limiter.hit(f"client-{index}", limit) is None
    assert await limiter.hit("busy", limit) is None
    assert await limiter.hit("busy", limit) is None
    assert len(limiter._tats) == 1001

    clock.advance(59)  # everyone but "busy" paid back, but sweeps run once a minute at most
    assert await limiter.hit("late", limit) is None
    assert len(limiter._tats) == 1002

    clock.advance(1)  # 60 s after the first sweep; "busy" (tat 60) is paid back too
    assert await limiter.hit("fresh", limit) is None
    # "late" still owes (tat 89) and the hit that swept stores its own client: nothing else.
    assert set(limiter._tats) == {"late", "fresh"}

    limiter._sweep(clock.now + 60)  # the next sweep, once those are paid back: nothing at all
    assert limiter._tats == {}


async def test_memory_sweep_keeps_clients_that_still_owe() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    hourly = RateLimit.parse("1/hour")

    assert await limiter.hit("owes", hourly) is None
    clock.advance(61)
    assert await limiter.hit("other", hourly) is None  # sweeps

    assert "owes" in limiter._tats
    assert await limiter.hit("owes", hourly) == 3600 - 61


async def test_memory_burst_at_one_instant_is_never_cut_short_by_rounding() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock(1000.0))
    limit = RateLimit.parse("3/second")

    assert [await limiter.hit("k", limit) for _ in range(3)] == [None, None, None]


# --- RedisRateLimiter ----------------------------------------------------------------------------


async def test_redis_allows_a_burst_then_says_how_long_to_wait(redis: Redis, prefix: str) -> None:
    limiter = RedisRateLimiter(redis, prefix=prefix)
    limit = RateLimit.parse("3/minute")

    assert [await limiter.hit("a", limit) for _ in range(3)] == [None, None, None]
    wait = await limiter.hit("a", limit)
    assert wait is not None
    assert 19 < wait <= 20
    assert await limiter.hit("b", limit) is None  # another key, another budget

    # The state is Redis's own clock (microseconds) plus the whole burst.
    seconds, micros = await redis.time()
    stored = await redis.get(prefix + "a")
    assert stored is not None
    tat = int(float(stored))
    assert 59_000_000 < tat - (seconds * 1_000_000 + micros) <= 60_000_000


async def test_redis_lets_one_request_through_per_interval(redis: Redis, prefix: str) -> None:
    limiter = RedisRateLimiter(redis, prefix=prefix)
    limit = RateLimit.parse("4/second")

    assert [await limiter.hit("k", limit) for _ in range(4)] == [None] * 4
    wait = await limiter.hit("k", limit)
    assert wait is not None
    assert 0.1 < wait <= 0.25

    await asyncio.sleep(wait + 0.02)
    assert await limiter.hit("k", limit) is None
    again = await limiter.hit("k", limit)
    assert again is not None
    assert 0.1 < again <= 0.25


async def test_redis_instances_sharing_a_prefix_share_the_budget(redis: Redis, prefix: str) -> None:
    # Two app instances: each its own connection pool, one Redis.
    first = RedisRateLimiter(Redis.from_url(REDIS_URL), prefix=prefix)
    second = RedisRateLimiter(Redis.from_url(REDIS_URL), prefix=prefix)
    elsewhere = RedisRateLimiter(redis, prefix=prefix + "other:")
    limit = RateLimit.parse("3/minute")
    try:
        assert await first.hit("client", limit) is None
        assert await second.hit("client", limit) is None
        assert await first.hit("client", limit) is None

        assert await second.hit("client", limit) is not None
        assert await first.hit("client", limit) is not None
        assert await elsewhere.hit("client", limit) is None  # another prefix, another budget
    finally:
        await first.aclose()
        await second.aclose()


async def test_redis_concurrent_hits_never_exceed_the_limit(redis: Redis, prefix: str) -> None:
    limiter = RedisRateLimiter(Redis.from_url(REDIS_URL), prefix=prefix)
    limit = RateLimit.parse("10/minute")
    try:
        results = await asyncio.gather(*(limiter.hit("k", limit) for _ in range(50)))
    finally:
        await limiter.aclose()

    assert results.count(None) == 10
    waits = [wait for wait in results if wait is not None]
    assert len(waits) == 40
    assert all(5 < wait <= 6 for wait in waits), waits


async def test_redis_keys_expire_once_paid_back(redis: Redis, prefix: str) -> None:
    limiter = RedisRateLimiter(redis, prefix=prefix)
    minute = RateLimit.parse("3/minute")

    assert await limiter.hit("minute", minute) is None
    assert 19_000 < await redis.pttl(prefix + "minute") <= 20_000
    assert await limiter.hit("minute", minute) is None
    assert await limiter.hit("minute", minute) is None
    assert 59_000 < await redis.pttl(prefix + "minute") <= 60_000
    assert await limiter.hit("minute", minute) is not None
    assert 59_000 < await redis.pttl(prefix + "minute") <= 60_000  # a refusal writes nothing

    quick = RateLimit.parse("5/second")
    assert await limiter.hit("quick", quick) is None
    assert 0 < await redis.pttl(prefix + "quick") <= 200
    await asyncio.sleep(0.3)
    assert await redis.exists(prefix + "quick") == 0


async def test_redis_failure_lets_requests_through_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RedisRateLimiter.from_url("redis://127.0.0.1:1", prefix="aihub-test:closed:")
    limit = RateLimit.parse("1/minute")
    try:
        with caplog.at_level(logging.WARNING, logger="aihub.ratelimit"):
            assert await limiter.hit("k", limit) is None
            assert await limiter.hit("k", limit) is None  # over the limit, but nobody can tell
    finally:
        await limiter.aclose()

    warnings = [r for r in caplog.records if r.name == "aihub.ratelimit"]
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert warnings[0].getMessage() == "rate limiter unavailable: ConnectionError"


# --- client_address ------------------------------------------------------------------------------


def request_from(peer: str | None, forwarded_for: list[str] | None = None) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/api/chat",
        "query_string": b"",
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded_for or []],
        "client": None if peer is None else (peer, 51234),
    }
    return Request(scope)


PROXIES = parse_networks(["10.0.0.0/8", "192.168.1.1", "fd00::/8", "::1"])


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "trusted", "expected"),
    [
        # No trusted proxies: the header is never read.
        ("198.51.100.9", ["203.0.113.1"], [], "198.51.100.9"),
        ("10.0.0.1", ["203.0.113.1"], [], "10.0.0.1"),
        # An untrusted peer cannot spoof its address.
        ("198.51.100.9", ["203.0.113.1"], PROXIES, "198.51.100.9"),
        ("192.168.1.2", ["203.0.113.1"], PROXIES, "192.168.1.2"),
        ("2001:db8::9", ["203.0.113.1"], PROXIES, "2001:db8::9"),
        # A trusted peer: the right-most hop it did not vouch for.
        ("10.0.0.1", ["203.0.113.1"], PROXIES, "203.0.113.1"),
        ("10.0.0.1", ["203.0.113.1, 10.20.30.40"], PROXIES, "203.0.113.1"),
        ("10.0.0.1", ["198.51.100.66, 203.0.113.1, 192.168.1.1"], PROXIES, "203.0.113.1"),
        ("192.168.1.1", ["203.0.113.1,10.9.9.9"], PROXIES, "203.0.113.1"),
        ("10.0.0.1", ["  203.0.113.1  ,  10.0.0.2 "], PROXIES, "203.0.113.1"),
        ("10.0.0.1", [" , 203.0.113.1, , "], PROXIES, "203.0.113.1"),
        # A single trusted address is not a range.
        ("192.168.1.1", ["203.0.113.1, 192.168.1.2"], PROXIES, "192.168.1.2"),
        # Several headers are one list, in order.
        ("10.0.0.1", ["198.51.100.66", "203.0.113.1, 10.0.0.2"], PROXIES, "203.0.113.1"),
        ("10.0.0.1", ["203.0.113.1", "10.0.0.2"], PROXIES, "203.0.113.1"),
        ("10.0.0.1", ["203.0.113.1", "198.51.100.7"], PROXIES, "198.51.100.7"),
        # An IPv4 proxy as a dual-stack listener sees it (IPv4-mapped IPv6) is still trusted.
        ("::ffff:10.0.0.1", ["203.0.113.7"], PROXIES, "203.0.113.7"),
        ("::ffff:203.0.113.9", ["198.51.100.1"], PROXIES, "::ffff:203.0.113.9"),
        # IPv6 peers, hops and ranges.
        ("::1", ["2001:db8::1"], PROXIES, "2001:db8::1"),
        ("fd00::1", ["2001:db8::1, fd12::2"], PROXIES, "2001:db8::1"),
        ("fd00::1", ["203.0.113.1, fd00::2, 10.0.0.3"], PROXIES, "203.0.113.1"),
        # Every hop trusted (or none at all): the peer.
        ("10.0.0.1", ["10.0.0.2, 10.0.0.3"], PROXIES, "10.0.0.1"),
        ("fd00::1", ["::1", "fd00::2"], PROXIES, "fd00::1"),
        ("10.0.0.1", [], PROXIES, "10.0.0.1"),
        ("10.0.0.1", [" , "], PROXIES, "10.0.0.1"),
        # Names and garbage are never trusted hops, so they are the client, verbatim.
        ("10.0.0.1", ["203.0.113.1, not-an-ip"], PROXIES, "not-an-ip"),
        ("10.0.0.1", ["unknown, 10.0.0.2"], PROXIES, "unknown"),
        ("10.0.0.1", ["203.0.113.1:8080, 10.0.0.2"], PROXIES, "203.0.113.1:8080"),
        ("10.0.0.1", ["[2001:db8::1]:443"], PROXIES, "[2001:db8::1]:443"),
        ("10.0.0.1", ["10.0.0.2, proxy.local, 10.0.0.3"], PROXIES, "proxy.local"),
    ],
)
def test_client_address(
    peer: str, forwarded_for: list[str], trusted: list[IPNetwork], expected: str
) -> None:
    assert client_address(request_from(peer, forwarded_for), trusted) == expected


def test_client_address_without_a_peer_is_unknown() -> None:
    assert client_address(request_from(None, ["203.0.113.1"]), PROXIES) == "unknown"
    assert client_address(request_from(None), []) == "unknown"


# --- the dependency ------------------------------------------------------------------------------


class NeverCalled(MemoryRateLimiter):
    async def hit(self, key: str, limit: RateLimit) -> float | None:
        raise AssertionError("no limit: the limiter must not be asked")


def request_to_app(state: SimpleNamespace, peer: str, forwarded_for: list[str]) -> Request:
    request = request_from(peer, forwarded_for)
    request.scope["app"] = SimpleNamespace(state=state)
    return request


async def test_dependency_counts_per_name_and_client_and_raises_rate_limited() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    state = SimpleNamespace(
        settings=SimpleNamespace(spec="2/minute"),
        trusted_proxies=parse_networks(["10.0.0.1"]),
        rate_limiter=limiter,
    )

    def limit_of(settings: Any) -> RateLimit | None:
        return RateLimit.parse(settings.spec) if settings.spec else None

    chat = rate_limit("chat", limit_of)
    other = rate_limit("other", limit_of)
    alice = request_to_app(state, "10.0.0.1", ["203.0.113.1"])
    bob = request_to_app(state, "10.0.0.1", ["203.0.113.2"])

    await chat(alice)
    await chat(alice)
    with pytest.raises(RateLimited) as caught:
        await chat(alice)
    await chat(bob)  # another client
    await other(alice)  # another limit
    assert set(limiter._tats) == {"chat:203.0.113.1", "chat:203.0.113.2", "other:203.0.113.1"}

    refused = caught.value
    assert refused.status_code == 429
    assert refused.code == "rate_limited"
    assert refused.headers == {"Retry-After": "30"}
    assert refused.message == "Too many requests; try again in 30 s"

    state.settings.spec = None  # the limit is read on every request
    await chat(alice)
    assert limiter._tats["chat:203.0.113.1"] == 60.0  # not counted


async def test_dependency_without_a_limit_does_nothing() -> None:
    state = SimpleNamespace(settings=None, trusted_proxies=[], rate_limiter=NeverCalled())
    unlimited = rate_limit("chat", lambda settings: None)
    for _ in range(5):
        await unlimited(request_to_app(state, "203.0.113.1", []))


@pytest.mark.parametrize(
    ("wait", "header"), [(0.000001, "1"), (0.5, "1"), (1.0, "1"), (1.01, "2"), (20.0, "20")]
)
def test_retry_after_is_whole_seconds_rounded_up(wait: float, header: str) -> None:
    refused = RateLimited(wait)
    assert refused.headers == {"Retry-After": header}
    assert refused.message == f"Too many requests; try again in {header} s"


# --- over HTTP -----------------------------------------------------------------------------------


async def chat(
    served: Served, *, forwarded_for: str | None = None, body: Any = CHAT
) -> httpx.Response:
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    return await served.client.post("/api/chat", json=body, headers=headers)


def assert_rate_limited(response: httpx.Response) -> int:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/json"
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 20  # 3/minute: one request back every 20 s
    body = response.json()
    assert body == {"error": "rate_limited", "detail": body["detail"]}
    assert isinstance(body["detail"], str)
    assert body["detail"] == f"Too many requests; try again in {retry_after} s"
    return retry_after


async def test_chat_is_refused_after_the_limit(make_app: MakeApp, fake_openai: FakeOpenAI) -> None:
    async with make_app(byok_rate_limit="3/minute") as served:
        for _ in range(3):
            response = await chat(served)
            assert response.status_code == 200, response.text
            assert response.text

        assert_rate_limited(await chat(served))
        assert_rate_limited(await chat(served))
        assert len(fake_openai.requests) == 3  # a refused chat never reaches OpenAI
        assert (await served.client.get("/api/health")).status_code == 200  # only /api/chat


async def test_chat_without_a_limit_is_never_refused(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    async with make_app(byok_rate_limit="unlimited") as served:
        for _ in range(5):
            assert (await chat(served)).status_code == 200


async def test_untrusted_forwarded_for_is_ignored(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    async with make_app(byok_rate_limit="3/minute") as served:
        for index in range(3):
            response = await chat(served, forwarded_for=f"203.0.113.{index}")
            assert response.status_code == 200, response.text

        assert_rate_limited(await chat(served, forwarded_for="203.0.113.99"))
        assert_rate_limited(await chat(served))


async def test_trusted_proxy_gives_each_client_its_own_budget(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    async with make_app(byok_rate_limit="3/minute", trusted_proxies="127.0.0.1") as served:
        for _ in range(3):
            assert (await chat(served, forwarded_for="203.0.113.1")).status_code == 200
        assert_rate_limited(await chat(served, forwarded_for="203.0.113.1"))
        # Spoofing hops to the left of what the proxy appended does not help.
        assert_rate_limited(await chat(served, forwarded_for="198.51.100.1, 203.0.113.1"))

        assert (await chat(served, forwarded_for="203.0.113.2")).status_code == 200
        assert (await chat(served, forwarded_for="2001:db8::2")).status_code == 200
        assert (await chat(served)).status_code == 200  # the proxy itself: 127.0.0.1
        assert len(fake_openai.requests) == 6


async def test_invalid_bodies_count_but_unparsable_json_does_not(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    async with make_app(byok_rate_limit="3/minute") as served:
        # JSON that is not JSON fails in FastAPI before any dependency runs: not counted.
        for _ in range(3):
            response = await served.client.post(
                "/api/chat", content=b"{not json", headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 422, response.text
        # A valid request still has its whole budget...
        assert (await chat(served)).status_code == 200

        # ...but a body that parses and then fails validation is counted: FastAPI runs the
        # rate limit dependency before it reports the body's errors.
        invalid = {**CHAT, "api_key": "not-a-key"}
        assert (await chat(served, body=invalid)).status_code == 422
        assert (await chat(served, body={"user_message": " "})).status_code == 422
        assert_rate_limited(await chat(served, body=invalid))
        assert_rate_limited(await chat(served))
        assert len(fake_openai.requests) == 1


async def test_instances_sharing_redis_share_a_client_s_budget(
    make_app: MakeApp, fake_openai: FakeOpenAI, redis: Redis
) -> None:
    # The app's limiter uses the default prefix, so the client is an address of this test's own
    # (through a trusted proxy), and its key is deleted afterwards.
    client, other = unique_client(), unique_client()
    settings = {
        "byok_rate_limit": "3/minute",
        "redis_url": REDIS_URL,
        "trusted_proxies": "127.0.0.1",
    }
    try:
        async with make_app(**settings) as first, make_app(**settings) as second:
            assert isinstance(first.app.state.rate_limiter, RedisRateLimiter)
            assert (await chat(first, forwarded_for=client)).status_code == 200
            assert (await chat(second, forwarded_for=client)).status_code == 200
            assert (await chat(first, forwarded_for=client)).status_code == 200

            assert_rate_limited(await chat(second, forwarded_for=client))
            assert_rate_limited(await chat(first, forwarded_for=client))
            assert 59_000 < await redis.pttl(f"{APP_PREFIX}byok:{client}") <= 60_000

            assert (await chat(second, forwarded_for=other)).status_code == 200
            assert len(fake_openai.requests) == 4
    finally:
        await redis.delete(f"{APP_PREFIX}byok:{client}", f"{APP_PREFIX}byok:{other}")
