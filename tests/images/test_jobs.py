"""Image jobs over a real server, against the Replicate fake: the stream as the original
frontend's `EventSource` reads it (order, ids, resuming, late subscribers, keep-alives), strict
stream access, bounds, quota and refunds, provider errors, idempotency, cancelling, ownership,
signed file links and metrics."""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from sqlalchemy import delete

from aihub.images.models import ImageJob
from aihub.images.router import STREAM_AUDIENCE
from aihub.users import service as users_service
from tests.conftest import MakeApp, Served
from tests.factories import bearer, create_user
from tests.fakes.replicate import FakeReplicate
from tests.sse_clients import NamedEvent, aiter_event_source, event_source_events

JOB_ID = re.compile(r"^job_[A-Za-z0-9_-]{24}$")
STREAM_TIMEOUT = 20.0
PROMPT = "a lighthouse at dusk, oil on canvas"


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """bcrypt's cheapest cost: these tests make many accounts and never test passwords."""
    monkeypatch.setattr(users_service, "BCRYPT_ROUNDS", 4)


async def post_job(
    served: Served,
    token: str,
    num_images: int = 1,
    prompt: str = PROMPT,
    **headers: str,
) -> httpx.Response:
    return await served.client.post(
        "/api/generate/",
        json={"prompt": prompt, "num_images": num_images},
        headers={**bearer(token), **headers},
    )


async def start_job(served: Served, token: str, num_images: int = 1, prompt: str = PROMPT) -> str:
    response = await post_job(served, token, num_images, prompt)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def stream_path(job_id: str) -> str:
    return f"/api/generate/{job_id}/stream"


async def read_stream(
    served: Served,
    job_id: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
) -> list[NamedEvent]:
    """The whole stream, read until the server ends it (which it must, after `done`)."""
    async with asyncio.timeout(STREAM_TIMEOUT):
        response = await served.client.get(
            stream_path(job_id), headers=headers or {}, params=params or {}
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache, no-transform"
    return event_source_events(response.text)


@asynccontextmanager
async def open_stream(
    served: Served, job_id: str, *, headers: dict[str, str] | None = None
) -> AsyncIterator[AsyncIterator[NamedEvent]]:
    """The stream as it arrives, event by event (an `EventSource` in a browser)."""
    async with served.client.stream("GET", stream_path(job_id), headers=headers or {}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield aiter_event_source(response)


def data(event: NamedEvent) -> dict[str, Any]:
    assert isinstance(event.data, dict), event
    return event.data


def without_keepalives(events: list[NamedEvent]) -> list[NamedEvent]:
    return [e for e in events if e.event != "keepalive"]


def check_story(
    events: list[NamedEvent], num_images: int, *, ran: bool = True
) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Assert what every job's stream must look like; return each image's last progress and the
    `done` data."""
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)], events
    assert {e.event for e in events} <= {"progress", "done"}, events
    head = events[:num_images]
    assert [(e.event, data(e)["index"], data(e)["status"]) for e in head] == [
        ("progress", i, "pending") for i in range(num_images)
    ]
    for event in head:
        assert data(event)["url"] is None
        assert data(event)["error"] is None
        assert data(event)["file_url"] is None
    assert events[-1].event == "done"
    assert [e.event for e in events].count("done") == 1
    finals: dict[int, dict[str, Any]] = {}
    for index in range(num_images):
        mine = [data(e) for e in events if e.event == "progress" and data(e)["index"] == index]
        statuses = [d["status"] for d in mine]
        assert statuses[-1] in ("succeeded", "failed"), statuses
        expected = ["pending", "running", statuses[-1]] if ran else ["pending", statuses[-1]]
        assert statuses == expected, (index, statuses)
        finals[index] = mine[-1]
    assert len(events) == num_images + len(finals) + (num_images if ran else 0) + 1
    done = data(events[-1])
    assert done["status"] == "done"
    assert done["total"] == num_images
    assert done["succeeded"] == sum(f["status"] == "succeeded" for f in finals.values())
    assert done["failed"] == sum(f["status"] == "failed" for f in finals.values())
    return finals, done


def comparable(events: list[NamedEvent]) -> list[tuple[str, str | None, dict[str, Any]]]:
    """Events without their `file_url` (a fresh signature is made for each stream)."""
    return [(e.event, e.id, {k: v for k, v in data(e).items() if k != "file_url"}) for e in events]


async def images_left(served: Served, token: str) -> int:
    response = await served.client.get("/api/usage", headers=bearer(token))
    assert response.status_code == 200, response.text
    products = {p["product"]: p for p in response.json()["products"]}
    remaining: int = products["images"]["quota"]["remaining"]
    return remaining


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


def assert_error(response: httpx.Response, status: int, error: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["detail"], str)
    if error is not None:
        assert body["error"] == error, body


# --- the stream ----------------------------------------------------------------------------------


async def test_a_job_streams_each_image_in_order_and_ends_with_done(
    served: Served, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 0.1
    _, token = await create_user(served.client)

    created = await post_job(served, token, 3)

    assert created.status_code == 202, created.text
    body = created.json()
    job_id = body["job_id"]
    assert JOB_ID.fullmatch(job_id)
    assert body["status"] == "queued"
    assert body["num_images"] == 3
    assert body["stream_url"] == f"{served.base_url}/api/generate/{job_id}/stream"
    assert body["stream_token"] is None  # the stream needs none by default
    assert body["stream_token_expires_at"] is None

    events = await read_stream(served, job_id)  # no token: the job id is the capability

    finals, done = check_story(events, 3)
    assert done["job_status"] == "done"
    assert (done["succeeded"], done["failed"]) == (3, 0)
    assert isinstance(done["ttfi_ms"], int)
    assert isinstance(done["total_ms"], int)
    assert 0 <= done["ttfi_ms"] <= done["total_ms"]
    predictions = set(fake_replicate.predictions)
    assert len(predictions) == 3
    seen = set()
    for index, final in finals.items():
        assert final["status"] == "succeeded"
        assert final["error"] is None
        assert final["provider"] == "replicate"
        assert final["mime_type"] == "image/png"
        match = re.fullmatch(
            rf"{re.escape(fake_replicate.base_url)}/files/(\w+)/out-0\.png", final["url"]
        )
        assert match, final["url"]  # the provider's own URL, as the frontend renders it
        seen.add(match.group(1))
        file_url = urlsplit(final["file_url"])
        assert f"{file_url.scheme}://{file_url.netloc}" == served.base_url
        assert file_url.path == f"/api/generate/{job_id}/images/{index}"
        assert set(parse_qs(file_url.query)) == {"expires", "signature"}
    assert seen == predictions
    for request in fake_replicate.created:
        assert request.json["input"]["prompt"] == PROMPT


async def test_images_are_generated_concurrently(
    served: Served, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 0.5
    _, token = await create_user(served.client)
    job_id = await start_job(served, token, 4)

    _, done = check_story(await read_stream(served, job_id), 4)

    assert done["succeeded"] == 4
    assert done["ttfi_ms"] >= 400  # no image comes faster than the fake makes it
    assert done["total_ms"] < 1800  # one after the other would take at least 2000 ms


async def test_a_late_subscriber_gets_the_whole_story_and_last_event_id_resumes_exactly(
    served: Served, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 0.05
    _, token = await create_user(served.client)
    job_id = await start_job(served, token, 2)
    live = await read_stream(served, job_id)
    check_story(live, 2)

    late = await read_stream(served, job_id)
    assert comparable(late) == comparable(live)
    for final in late:  # fresh signed links still open the images
        if final.event == "progress" and data(final)["status"] == "succeeded":
            image = await served.client.get(data(final)["file_url"])
            assert image.status_code == 200

    for after in range(len(live)):
        by_header = await read_stream(served, job_id, headers={"Last-Event-ID": str(after)})
        assert comparable(by_header) == comparable(live[after:]), after
        by_query = await read_stream(served, job_id, params={"last_event_id": after})
        assert comparable(by_query) == comparable(live[after:]), after


async def test_a_dropped_connection_resumes_after_the_last_event_it_saw(
    served: Served, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 0.4
    _, token = await create_user(served.client)
    job_id = await start_job(served, token, 2)

    first: list[NamedEvent] = []
    async with asyncio.timeout(STREAM_TIMEOUT), open_stream(served, job_id) as events:
        async for event in events:
            first.append(event)
            if len(first) == 3:
                break  # the connection drops before the images are done
    assert [e.id for e in first] == ["1", "2", "3"]
    assert all(data(e)["status"] != "succeeded" for e in first)

    rest = await read_stream(served, job_id, headers={"Last-Event-ID": first[-1].id or ""})

    assert rest[0].id == "4"
    check_story(first + rest, 2)
    assert comparable(first + rest) == comparable(await read_stream(served, job_id))


async def test_keepalives_fill_the_silences(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 0.8
    async with make_app(sse_keepalive_seconds=0.1) as served:
        _, token = await create_user(served.client)
        job_id = await start_job(served, token, 1)
        received: list[NamedEvent] = []
        async with asyncio.timeout(STREAM_TIMEOUT), open_stream(served, job_id) as events:
            async for event in events:
                received.append(event)
        # The stream ended by itself, after done.

    keepalives = [e for e in received if e.event == "keepalive"]
    assert keepalives, [e.event for e in received]
    assert all(e.data == {} and e.id is None for e in keepalives)
    names = [e.event if e.event != "progress" else data(e)["status"] for e in received]
    silence = names[names.index("running") + 1 : names.index("succeeded")]
    assert "keepalive" in silence, names
    assert received[-1].event == "done"
    check_story(without_keepalives(received), 1)


async def test_a_deleted_job_ends_its_stream_with_an_error_event(make_app: MakeApp) -> None:
    async with make_app(images_worker=False, images_poll_seconds=0.2) as served:
        _, token = await create_user(served.client)
        job_id = await start_job(served, token, 2)
        received: list[NamedEvent] = []
        async with asyncio.timeout(STREAM_TIMEOUT), open_stream(served, job_id) as events:
            async for event in events:
                received.append(event)
                if len(received) == 2:
                    async with served.app.state.sessions.begin() as session:
                        await session.execute(delete(ImageJob).where(ImageJob.id == job_id))

    assert [e.event for e in received] == ["progress", "progress", "error"]
    assert received[-1].data == {"error": "The job no longer exists", "job_id": job_id}


# --- unknown and malformed ----------------------------------------------------------------------


MALFORMED_JOB_IDS = [
    "job_" + "A" * 24,  # well-formed, unknown
    "nope",
    "job_short",
    "JOB_" + "a" * 24,
    "job_" + "a" * 23 + "!",
    "job_" + "a" * 25,
    "job_" + "a" * 23 + ".",
]


async def test_unknown_and_malformed_job_ids_are_404_json(served: Served) -> None:
    _, token = await create_user(served.client)
    owner = bearer(token)
    for job_id in MALFORMED_JOB_IDS:
        assert_error(await served.client.get(stream_path(job_id)), 404, "job_not_found")
    for job_id in MALFORMED_JOB_IDS[:3]:
        assert_error(await served.client.get(f"/api/generate/{job_id}", headers=owner), 404)
        assert_error(await served.client.delete(f"/api/generate/{job_id}", headers=owner), 404)
        image = await served.client.get(f"/api/generate/{job_id}/images/0", headers=owner)
        assert_error(image, 404)


async def test_an_over_long_job_id_is_the_same_404(served: Served) -> None:
    response = await served.client.get(stream_path("job_" + "a" * 80))
    assert_error(response, 404, "job_not_found")


async def test_a_malformed_last_event_id_is_a_422(served: Served) -> None:
    _, token = await create_user(served.client)
    job_id = await start_job(served, token, 1)
    for headers, params in [
        ({"Last-Event-ID": "abc"}, {}),
        ({"Last-Event-ID": "-1"}, {}),
        ({"Last-Event-ID": "1.5"}, {}),
        ({"Last-Event-ID": "1" * 21}, {}),
        ({}, {"last_event_id": "-1"}),
        ({}, {"last_event_id": "x"}),
    ]:
        response = await served.client.get(stream_path(job_id), headers=headers, params=params)
        assert_error(response, 422)
        assert "last" in response.json()["detail"].lower(), (headers, params)


async def test_a_last_event_id_of_other_digits_is_a_422_not_a_500(served: Served) -> None:
    """`"²".isdigit()` is True but `int("²")` fails: a header byte 0xB2 must not be a 500."""
    _, token = await create_user(served.client)
    job_id = await start_job(served, token, 1)
    response = await served.client.get(stream_path(job_id), headers={b"Last-Event-ID": b"\xb2"})
    assert_error(response, 422)


async def test_resuming_after_done_ends_at_once(
    served: Served, fake_replicate: FakeReplicate
) -> None:
    """Nothing ever follows `done`: a client resuming from it (an `EventSource` reconnects by
    itself when a stream closes) must get an ended stream, not an open one forever."""
    _, token = await create_user(served.client)
    job_id = await start_job(served, token, 1)
    events = await read_stream(served, job_id)
    assert events[-1].event == "done"
    for after in (events[-1].id or "", "999"):
        try:
            async with asyncio.timeout(1.5):
                response = await served.client.get(
                    stream_path(job_id), headers={"Last-Event-ID": after}
                )
        except TimeoutError:
            pytest.fail(f"the stream resumed after id {after} was still open after 1.5 s")
        assert response.status_code in (200, 204)
        assert without_keepalives(event_source_events(response.text)) == []


# --- strict stream access ------------------------------------------------------------------------


async def test_strict_mode_needs_the_owner_or_the_jobs_own_token(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    async with make_app(
        images_stream_requires_auth=True, images_stream_token_seconds=600, jwt_leeway_seconds=0
    ) as served:
        owner_id, owner = await create_user(served.client)
        _, stranger = await create_user(served.client)
        created = await post_job(served, owner, 1)
        assert created.status_code == 202
        job_id, token = created.json()["job_id"], created.json()["stream_token"]
        assert isinstance(token, str)
        assert token
        expires_at = datetime.fromisoformat(created.json()["stream_token_expires_at"])
        expected = datetime.now(UTC) + timedelta(seconds=600)
        assert abs((expires_at - expected).total_seconds()) < 10
        other_job = await post_job(served, owner, 1)
        other_token = other_job.json()["stream_token"]

        assert_error(await served.client.get(stream_path(job_id)), 401)
        by_owner = await read_stream(served, job_id, headers=bearer(owner))
        check_story(by_owner, 1)
        by_token = await read_stream(served, job_id, params={"token": token})
        assert comparable(by_token) == comparable(by_owner)

        assert_error(await served.client.get(stream_path(job_id), headers=bearer(stranger)), 404)
        another_jobs = await served.client.get(stream_path(job_id), params={"token": other_token})
        assert_error(another_jobs, 401)
        for bad in ("not-a-jwt", owner, token + "x"):
            assert_error(await served.client.get(stream_path(job_id), params={"token": bad}), 401)
        assert_error(await served.client.get(stream_path(job_id), headers=bearer("garbage")), 401)

        issuer = served.app.state.authenticator.issuer
        user = uuid.UUID(owner_id)
        expired = issuer.issue_scoped(user, audience=STREAM_AUDIENCE, ttl_seconds=-2, job=job_id)
        response = await served.client.get(stream_path(job_id), params={"token": expired.token})
        assert_error(response, 401)
        assert "expired" in response.json()["detail"]
        wrong_audience = issuer.issue_scoped(
            user, audience="aihub:other", ttl_seconds=60, job=job_id
        )
        response = await served.client.get(
            stream_path(job_id), params={"token": wrong_audience.token}
        )
        assert_error(response, 401)
        someone_else = issuer.issue_scoped(
            uuid.uuid4(), audience=STREAM_AUDIENCE, ttl_seconds=60, job=job_id
        )
        response = await served.client.get(
            stream_path(job_id), params={"token": someone_else.token}
        )
        assert_error(response, 401)
        forged = issuer.issue_scoped(user, audience=STREAM_AUDIENCE, ttl_seconds=60, job=job_id)
        assert (
            await served.client.get(stream_path(job_id), params={"token": forged.token})
        ).is_success

        # The stream token is no bearer token, anywhere.
        assert_error(await served.client.get("/api/me", headers=bearer(token)), 401)
        assert_error(await served.client.get(f"/api/generate/{job_id}", headers=bearer(token)), 401)
        assert_error(await served.client.get(stream_path(job_id), headers=bearer(token)), 401)
        assert_error(await post_job(served, token, 1), 401)
        assert (await served.client.get("/api/me", headers=bearer(owner))).status_code == 200


async def test_the_stream_token_lives_as_long_as_the_setting_says(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    async with make_app(
        images_stream_requires_auth=True, images_stream_token_seconds=10, jwt_leeway_seconds=0
    ) as served:
        _, owner = await create_user(served.client)
        created = await post_job(served, owner, 1)
        job_id, token = created.json()["job_id"], created.json()["stream_token"]
        issued = datetime.fromisoformat(created.json()["stream_token_expires_at"])
        assert 8 <= (issued - datetime.now(UTC)).total_seconds() <= 11
        check_story(await read_stream(served, job_id, params={"token": token}), 1)
        issuer = served.app.state.authenticator.issuer
        claims = issuer.verify_scoped(token, audience=STREAM_AUDIENCE, leeway=0)
        assert claims["job"] == job_id
        assert claims["exp"] - claims["iat"] == 10


# --- bounds --------------------------------------------------------------------------------------


async def test_out_of_bounds_requests_are_422_and_free(make_app: MakeApp) -> None:
    async with make_app(images_worker=False) as served:
        _, token = await create_user(served.client)
        for body, field in [
            ({"prompt": PROMPT, "num_images": 0}, "num_images"),
            ({"prompt": PROMPT, "num_images": -1}, "num_images"),
            ({"prompt": PROMPT, "num_images": 9}, "num_images"),
            ({"prompt": PROMPT, "num_images": "many"}, "num_images"),
            ({"prompt": "x" * 501, "num_images": 1}, "prompt"),
            ({"prompt": "", "num_images": 1}, "prompt"),
            ({"prompt": "   \n\t ", "num_images": 1}, "prompt"),
            ({"num_images": 1}, "prompt"),
        ]:
            response = await served.client.post("/api/generate/", json=body, headers=bearer(token))
            assert_error(response, 422)
            assert field in response.json()["detail"], (body, response.json())
        assert await images_left(served, token) == 50
        listed = await served.client.get("/api/generate/", headers=bearer(token))
        assert listed.json()["jobs"] == []


async def test_the_edges_of_the_bounds_are_accepted(make_app: MakeApp) -> None:
    async with make_app(images_worker=False) as served:
        _, token = await create_user(served.client)
        assert (await post_job(served, token, 8)).status_code == 202
        long = await post_job(served, token, 1, prompt="y" * 500)
        assert long.status_code == 202, long.text
        assert await images_left(served, token) == 50 - 9


async def test_the_per_job_maximum_follows_the_setting(make_app: MakeApp) -> None:
    async with make_app(images_worker=False, images_max_per_job=3) as served:
        _, token = await create_user(served.client)
        too_many = await post_job(served, token, 4)
        assert_error(too_many, 422)
        assert "num_images" in too_many.json()["detail"]
        assert "3" in too_many.json()["detail"]
        assert (await post_job(served, token, 3)).status_code == 202


async def test_a_job_needs_a_token(served: Served) -> None:
    response = await served.client.post("/api/generate/", json={"prompt": PROMPT, "num_images": 1})
    assert_error(response, 401)
    assert_error(await served.client.get("/api/generate/"), 401)


# --- quota, refunds and provider errors ---------------------------------------------------------


async def test_the_quota_is_reserved_per_image(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    async with make_app(images_daily_quota=5) as served:
        _, token = await create_user(served.client)
        _, other = await create_user(served.client)
        first = await start_job(served, token, 4)
        assert await images_left(served, token) == 1

        refused = await post_job(served, token, 2)

        assert_error(refused, 429, "quota_exceeded")
        retry_after = int(refused.headers["retry-after"])
        assert 0 < retry_after <= 24 * 3600
        assert await images_left(served, token) == 1
        listed = (await served.client.get("/api/generate/", headers=bearer(token))).json()
        assert [j["job_id"] for j in listed["jobs"]] == [first]
        assert (await post_job(served, token, 1)).status_code == 202
        assert await images_left(served, token) == 0
        assert_error(await post_job(served, token, 1), 429, "quota_exceeded")
        # More than a whole day's quota can never succeed: a 422 that says so, not "wait 24 h".
        more_than_a_day = await post_job(served, other, 6)  # their balance's first use
        assert_error(more_than_a_day, 422)
        assert more_than_a_day.json()["detail"].startswith("num_images")
        assert await images_left(served, other) == 5  # not started below zero
        assert (await post_job(served, other, 5)).status_code == 202  # each user has their own
        _, done = check_story(await read_stream(served, first), 4)
        assert done["succeeded"] == 4
        assert await images_left(served, token) == 0  # succeeded images stay charged


async def test_failed_predictions_fail_their_images_and_are_refunded(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.fail_predictions("NSFW content detected in the output")
    async with make_app(images_daily_quota=5) as served:
        _, token = await create_user(served.client)
        job_id = await start_job(served, token, 3)

        finals, done = check_story(await read_stream(served, job_id), 3)

        assert (done["job_status"], done["succeeded"], done["failed"]) == ("done", 0, 3)
        assert done["ttfi_ms"] is None
        for final in finals.values():
            assert final["status"] == "failed"
            assert "NSFW content detected in the output" in final["error"]
            assert final["url"] is None
            assert final["file_url"] is None
        assert len(fake_replicate.created) == 3  # a failed prediction is not tried again
        assert await images_left(served, token) == 5


async def test_a_rejected_prediction_fails_one_image_without_retry_and_refunds_it(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    async with make_app(images_daily_quota=10, images_max_retries=2) as served:
        _, token = await create_user(served.client)
        for status, left in [(422, 8), (400, 6)]:
            fake_replicate.reset()
            detail = f"prompt: flagged as sensitive ({status})"
            body = {"title": "Invalid input", "detail": detail, "status": status}
            fake_replicate.fail_with(status, body, times=1)
            job_id = await start_job(served, token, 3)

            finals, done = check_story(await read_stream(served, job_id), 3)

            assert (done["succeeded"], done["failed"]) == (2, 1)
            [failed] = [f for f in finals.values() if f["status"] == "failed"]
            assert failed["error"] == f"Replicate answered {status}: {detail}"
            assert len(fake_replicate.created) == 3  # not retried
            assert await images_left(served, token) == left  # the failed image came back


async def test_a_retryable_error_is_retried(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    async with make_app(images_max_retries=1) as served:
        _, token = await create_user(served.client)
        for status, left in [(503, 49), (429, 48)]:
            fake_replicate.reset()
            fake_replicate.fail_with(status, retry_after=0, times=1)
            job_id = await start_job(served, token, 1)

            finals, _ = check_story(await read_stream(served, job_id), 1)

            assert finals[0]["status"] == "succeeded", (status, finals)
            assert len(fake_replicate.created) == 2
            assert await images_left(served, token) == left


async def test_retries_are_bounded_and_the_image_refunded(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.fail_with(503)
    async with make_app(images_max_retries=1) as served:
        _, token = await create_user(served.client)
        job_id = await start_job(served, token, 1)

        finals, _ = check_story(await read_stream(served, job_id), 1)

        assert finals[0]["status"] == "failed"
        assert "503" in finals[0]["error"]
        assert len(fake_replicate.created) == 2  # the first try and one retry
        assert await images_left(served, token) == 50


async def test_an_image_past_its_deadline_fails_and_is_refunded(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 3.0
    async with make_app(images_timeout_seconds=0.3, images_max_retries=0) as served:
        _, token = await create_user(served.client)
        job_id = await start_job(served, token, 1)
        started = time.monotonic()

        finals, done = check_story(await read_stream(served, job_id), 1)

        assert time.monotonic() - started < 2.5
        assert finals[0]["status"] == "failed"
        assert finals[0]["error"] == "no image within 0.3 s"
        assert (done["succeeded"], done["failed"]) == (0, 1)
        assert await images_left(served, token) == 50


# --- in-flight cap and idempotency ---------------------------------------------------------------


async def test_jobs_in_flight_are_capped_per_user(make_app: MakeApp) -> None:
    async with make_app(images_worker=False, images_max_jobs_in_flight=2) as served:
        _, token = await create_user(served.client)
        _, other = await create_user(served.client)
        first = await start_job(served, token, 1)
        await start_job(served, token, 1)

        refused = await post_job(served, token, 1)

        assert_error(refused, 429, "too_many_jobs")
        assert refused.headers["retry-after"]
        assert await images_left(served, token) == 48  # the refused job cost nothing
        assert (await post_job(served, other, 1)).status_code == 202
        cancel = await served.client.delete(f"/api/generate/{first}", headers=bearer(token))
        assert cancel.status_code == 200
        assert (await post_job(served, token, 1)).status_code == 202


async def test_an_idempotent_retry_replays_the_job_and_charges_once(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    async with make_app(images_daily_quota=10) as served:
        _, token = await create_user(served.client)
        _, other = await create_user(served.client)
        key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}

        first = await post_job(served, token, 2, **key)
        again = await post_job(served, token, 2, **key)

        assert first.status_code == again.status_code == 202
        assert "idempotent-replayed" not in first.headers
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["job_id"] == first.json()["job_id"]
        assert again.json()["stream_url"] == first.json()["stream_url"]
        assert again.json()["num_images"] == 2
        assert await images_left(served, token) == 8
        listed = (await served.client.get("/api/generate/", headers=bearer(token))).json()
        assert [j["job_id"] for j in listed["jobs"]] == [first.json()["job_id"]]

        reused = await post_job(served, token, 3, **key)
        assert_error(reused, 422, "idempotency_key_reused")
        fresh = await post_job(served, token, 2, **{"Idempotency-Key": f"other-{uuid.uuid4()}"})
        assert fresh.status_code == 202
        assert fresh.json()["job_id"] != first.json()["job_id"]
        theirs = await post_job(served, other, 2, **key)  # keys are per user
        assert theirs.status_code == 202
        assert "idempotent-replayed" not in theirs.headers
        assert theirs.json()["job_id"] != first.json()["job_id"]
        assert await images_left(served, token) == 6
        for job in (first, fresh, theirs):
            check_story(await read_stream(served, job.json()["job_id"]), 2)
        assert len(fake_replicate.created) == 6  # the replay started nothing


# --- cancelling ----------------------------------------------------------------------------------


async def test_cancelling_a_queued_job_fails_its_images_and_refunds_them(make_app: MakeApp) -> None:
    async with make_app(images_worker=False, images_daily_quota=10) as served:
        _, token = await create_user(served.client)
        _, stranger = await create_user(served.client)
        job_id = await start_job(served, token, 3)
        assert await images_left(served, token) == 7
        path = f"/api/generate/{job_id}"
        assert_error(await served.client.delete(path, headers=bearer(stranger)), 404)
        assert (await served.client.get(path, headers=bearer(token))).json()["status"] == "queued"

        canceled = await served.client.delete(path, headers=bearer(token))

        assert canceled.status_code == 200, canceled.text
        body = canceled.json()
        assert body["status"] == "canceled"
        assert (body["succeeded"], body["failed"]) == (0, 3)
        assert body["finished_at"] is not None
        assert [(i["index"], i["status"], i["error"]) for i in body["images"]] == [
            (i, "failed", "canceled") for i in range(3)
        ]
        assert await images_left(served, token) == 10
        finals, done = check_story(await read_stream(served, job_id), 3, ran=False)
        assert done["job_status"] == "canceled"
        assert all(f["error"] == "canceled" for f in finals.values())

        again = await served.client.delete(path, headers=bearer(token))
        assert again.status_code == 200
        assert again.json() == body
        assert await images_left(served, token) == 10  # refunded once
        assert (await served.client.get(path, headers=bearer(token))).json() == body


async def wait_until_polled(fake: FakeReplicate, count: int) -> None:
    """Until `count` predictions exist and each has been polled at least once (the client
    holds its id and is waiting on it)."""

    async def polled() -> bool:
        if len(fake.predictions) < count:
            return False
        paths = {r.path for r in fake.requests if r.method == "GET"}
        return all(f"/v1/predictions/{p}" in paths for p in fake.predictions)

    assert await eventually(polled, timeout=STREAM_TIMEOUT)


async def cancel_mid_job(
    served: Served, fake: FakeReplicate, token: str, num_images: int, *, polled: bool
) -> tuple[list[NamedEvent], httpx.Response]:
    """Start a slow job, cancel it once every image is running upstream; the whole stream."""
    job_id = await start_job(served, token, num_images)
    received: list[NamedEvent] = []
    canceled: httpx.Response | None = None
    async with asyncio.timeout(STREAM_TIMEOUT), open_stream(served, job_id) as events:
        async for event in events:
            received.append(event)
            running = [
                e for e in received if e.event == "progress" and data(e)["status"] == "running"
            ]
            if canceled is None and len(running) == num_images:
                if polled:
                    await wait_until_polled(fake, num_images)
                else:
                    assert await eventually(lambda: _created(fake, num_images))
                canceled = await served.client.delete(
                    f"/api/generate/{job_id}", headers=bearer(token)
                )
    assert canceled is not None
    return received, canceled


async def _created(fake: FakeReplicate, count: int) -> bool:
    return len(fake.predictions) >= count


async def test_cancelling_a_running_job_cancels_its_predictions_and_ends_the_stream(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 3.0
    fake_replicate.prefer_wait_max = 0.05  # answered "processing" at once: the client polls
    async with make_app(images_daily_quota=10) as served:
        _, token = await create_user(served.client)
        started = time.monotonic()

        events, canceled = await cancel_mid_job(served, fake_replicate, token, 3, polled=True)

        assert time.monotonic() - started < 2.5  # the stream ended before the images would have
        assert canceled.status_code == 200, canceled.text
        assert canceled.json()["status"] == "canceled"
        finals, done = check_story(events, 3)
        assert done["job_status"] == "canceled"
        assert (done["succeeded"], done["failed"]) == (0, 3)
        assert all(f["error"] == "canceled" for f in finals.values())
        assert await images_left(served, token) == 10

        async def all_canceled() -> bool:
            return fake_replicate.cancellations == 3

        assert await eventually(all_canceled), fake_replicate.cancellations
        cancels = {r.path for r in fake_replicate.requests if r.path.endswith("/cancel")}
        assert cancels == {f"/v1/predictions/{p}/cancel" for p in fake_replicate.predictions}
        assert all(p.canceled for p in fake_replicate.predictions.values())
        # The worker wrote nothing after the cancel.
        await asyncio.sleep(0.3)
        job_id = canceled.json()["job_id"]
        assert comparable(await read_stream(served, job_id)) == comparable(events)


async def test_cancelling_while_replicate_holds_the_request_still_cancels_the_predictions(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    """Replicate holds a `Prefer: wait` request until the prediction ends (up to 60 s), which for
    a quick model is the prediction's whole life: a cancel then must not leave it running."""
    fake_replicate.image_delay = 2.0
    async with make_app(images_daily_quota=10) as served:
        _, token = await create_user(served.client)

        events, canceled = await cancel_mid_job(served, fake_replicate, token, 2, polled=False)

        assert canceled.status_code == 200
        _, done = check_story(events, 2)
        assert done["job_status"] == "canceled"
        assert await images_left(served, token) == 10

        async def all_canceled() -> bool:
            return all(p.canceled for p in fake_replicate.predictions.values())

        assert await eventually(all_canceled, timeout=3.0), (
            "predictions left running upstream after the job was cancelled: "
            f"{[p.status() for p in fake_replicate.predictions.values()]}"
        )


async def test_cancelling_a_finished_job_changes_nothing(
    served: Served, fake_replicate: FakeReplicate
) -> None:
    _, token = await create_user(served.client)
    job_id = await start_job(served, token, 2)
    before = await read_stream(served, job_id)
    snapshot = (await served.client.get(f"/api/generate/{job_id}", headers=bearer(token))).json()

    canceled = await served.client.delete(f"/api/generate/{job_id}", headers=bearer(token))

    assert canceled.status_code == 200
    body = canceled.json()
    assert body["status"] == "done"
    assert [i["status"] for i in body["images"]] == ["succeeded", "succeeded"]
    assert {k: v for k, v in body.items() if k != "images"} == {
        k: v for k, v in snapshot.items() if k != "images"
    }
    assert await images_left(served, token) == 48
    assert comparable(await read_stream(served, job_id)) == comparable(before)
    assert data(before[-1])["job_status"] == "done"


# --- reading and listing -------------------------------------------------------------------------


async def test_the_snapshot_is_the_owners_alone(
    served: Served, fake_replicate: FakeReplicate
) -> None:
    _, token = await create_user(served.client)
    _, stranger = await create_user(served.client)
    job_id = await start_job(served, token, 2)
    finals, _ = check_story(await read_stream(served, job_id), 2)
    path = f"/api/generate/{job_id}"

    response = await served.client.get(path, headers=bearer(token))

    assert response.status_code == 200
    job = response.json()
    assert job["job_id"] == job_id
    assert job["status"] == "done"
    assert job["prompt"] == PROMPT
    assert job["num_images"] == 2
    assert job["model"] == "replicate:black-forest-labs/flux-schnell"
    assert (job["succeeded"], job["failed"]) == (2, 0)
    assert job["ttfi_ms"] is not None
    assert job["total_ms"] is not None
    assert job["started_at"] is not None
    assert job["finished_at"] is not None
    for image in job["images"]:
        final = finals[image["index"]]
        assert image["status"] == "succeeded"
        assert image["url"] == final["url"]
        assert image["provider"] == "replicate"
        assert image["mime_type"] == "image/png"
        assert urlsplit(image["file_url"]).path == urlsplit(final["file_url"]).path
        opened = await served.client.get(image["file_url"])
        assert opened.status_code == 200
        assert opened.content == fake_replicate.png
    assert_error(await served.client.get(path, headers=bearer(stranger)), 404, "job_not_found")
    assert_error(await served.client.get(path), 401)


async def test_the_list_is_mine_newest_first_and_paginated(make_app: MakeApp) -> None:
    async with make_app(images_worker=False, images_max_jobs_in_flight=10) as served:
        _, token = await create_user(served.client)
        _, other = await create_user(served.client)
        mine = [await start_job(served, token, 1, prompt=p) for p in ("first", "second", "third")]
        theirs = await start_job(served, other, 1, prompt="someone else's")

        page = await served.client.get("/api/generate/", params={"limit": 2}, headers=bearer(token))

        assert page.status_code == 200
        assert [j["prompt"] for j in page.json()["jobs"]] == ["third", "second"]
        assert [j["job_id"] for j in page.json()["jobs"]] == mine[:0:-1]
        assert all(len(j["images"]) == 1 for j in page.json()["jobs"])
        cursor = page.json()["next_cursor"]
        assert cursor
        rest = await served.client.get(
            "/api/generate/", params={"limit": 2, "cursor": cursor}, headers=bearer(token)
        )
        assert [j["job_id"] for j in rest.json()["jobs"]] == [mine[0]]
        assert rest.json()["next_cursor"] is None
        everything = (await served.client.get("/api/generate/", headers=bearer(other))).json()
        assert [j["job_id"] for j in everything["jobs"]] == [theirs]
        bad = await served.client.get(
            "/api/generate/", params={"cursor": "zzz"}, headers=bearer(token)
        )
        assert_error(bad, 422)
        too_big = await served.client.get(
            "/api/generate/", params={"limit": 101}, headers=bearer(token)
        )
        assert_error(too_big, 422)


# --- stored copies -------------------------------------------------------------------------------


async def test_the_signed_file_url_opens_exactly_its_image(
    served: Served, fake_replicate: FakeReplicate
) -> None:
    _, token = await create_user(served.client)
    _, stranger = await create_user(served.client)
    job_id = await start_job(served, token, 2)
    finals, _ = check_story(await read_stream(served, job_id), 2)
    link = finals[0]["file_url"]
    parts = urlsplit(link)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}

    opened = await served.client.get(link)  # no token: the signature is the permission

    assert opened.status_code == 200
    assert opened.headers["content-type"] == "image/png"
    assert opened.headers["x-content-type-options"] == "nosniff"
    assert opened.content == fake_replicate.png

    def at(path: str, **params: Any) -> str:
        return f"{path}?{urlencode(params)}"

    path = parts.path
    other_index = f"/api/generate/{job_id}/images/1"
    signature = query["signature"]
    tampered = ("A" if signature[0] != "A" else "B") + signature[1:]
    for url in [
        at(path, expires=query["expires"], signature=tampered),
        at(path, expires=int(query["expires"]) + 1, signature=signature),
        at(other_index, **query),  # the signature opens index 0 only
        at(path, expires=query["expires"]),
        at(path, signature=signature),
    ]:
        assert_error(await served.client.get(url), 403)
    signer = served.app.state.url_signer
    expired = signer.query(path, expires_at=datetime.now(UTC) - timedelta(seconds=5))
    assert_error(await served.client.get(f"{path}?{expired}"), 403)

    assert_error(await served.client.get(path), 401)
    by_owner = await served.client.get(path, headers=bearer(token))
    assert by_owner.status_code == 200
    assert by_owner.content == fake_replicate.png
    assert_error(await served.client.get(path, headers=bearer(stranger)), 404)
    missing = await served.client.get(f"/api/generate/{job_id}/images/7", headers=bearer(token))
    assert_error(missing, 404)


async def test_the_public_base_url_makes_the_links(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    async with make_app(public_base_url="https://images.example.com/") as served:
        _, token = await create_user(served.client)
        created = await post_job(served, token, 1)
        job_id = created.json()["job_id"]
        assert created.json()["stream_url"] == (
            f"https://images.example.com/api/generate/{job_id}/stream"
        )
        finals, _ = check_story(await read_stream(served, job_id), 1)
        assert finals[0]["file_url"].startswith(
            f"https://images.example.com/api/generate/{job_id}/images/0?expires="
        )


async def test_offline_images_are_data_uris_with_a_stored_copy(
    make_app: MakeApp, fake_replicate: FakeReplicate
) -> None:
    async with make_app(replicate_api_token=None) as served:
        _, token = await create_user(served.client)
        job_id = await start_job(served, token, 2)

        finals, done = check_story(await read_stream(served, job_id), 2)

        assert done["succeeded"] == 2
        assert fake_replicate.requests == []
        for final in finals.values():
            assert final["provider"] == "offline"
            prefix = "data:image/png;base64,"
            assert final["url"].startswith(prefix)
            png = base64.b64decode(final["url"].removeprefix(prefix))
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            stored = await served.client.get(final["file_url"])
            assert stored.status_code == 200
            assert stored.content == png
        job = (await served.client.get(f"/api/generate/{job_id}", headers=bearer(token))).json()
        assert job["model"] == "offline:offline"


# --- metrics -------------------------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is not exposed"
    return float(match.group(1))


async def test_metrics_expose_time_to_first_image_and_batch_time(
    served: Served, fake_replicate: FakeReplicate
) -> None:
    fake_replicate.image_delay = 0.3
    names = ("aihub_image_time_to_first_image_seconds", "aihub_image_batch_seconds")
    before = (await served.client.get("/metrics")).text
    counts = {n: metric(before, f"{n}_count") for n in names}
    sums = {n: metric(before, f"{n}_sum") for n in names}
    _, token = await create_user(served.client)
    job_id = await start_job(served, token, 2)
    _, done = check_story(await read_stream(served, job_id), 2)

    async def observed() -> bool:
        text = (await served.client.get("/metrics")).text
        return all(metric(text, f"{n}_count") == counts[n] + 1 for n in names)

    assert await eventually(observed)
    after = (await served.client.get("/metrics")).text
    ttfi = metric(after, f"{names[0]}_sum") - sums[names[0]]
    batch = metric(after, f"{names[1]}_sum") - sums[names[1]]
    assert ttfi == pytest.approx(done["ttfi_ms"] / 1000, abs=0.002)
    assert batch == pytest.approx(done["total_ms"] / 1000, abs=0.002)
    assert 0.25 <= ttfi <= batch
