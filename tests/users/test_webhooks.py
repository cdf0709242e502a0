"""Clerk's user-lifecycle webhooks over a real server: svix signatures, exactly-once delivery, and
what each event does to the database (including the cascade of a deleted user)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from svix.webhooks import Webhook

from aihub.challenges.models import Challenge
from aihub.chats.models import Chat
from aihub.core.db import Base
from aihub.ideas.models import Idea
from aihub.images.models import ImageJob
from aihub.storage.models import StoredFile
from aihub.usage.models import IdempotencyKey, Quota, UsageRecord
from aihub.usage.quotas import quota_policies
from aihub.users import service
from aihub.users.models import DeletedClerkUser, User, WebhookDelivery
from tests.conftest import MakeApp, Served
from tests.factories import bearer
from tests.fakes.clerk import FakeClerk
from tests.fakes.openai import FakeOpenAI
from tests.fakes.replicate import make_png
from tests.sse_clients import markdown_buffer


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


SECRET = new_secret()
PATHS = ("/webhooks/clerk", "/clerk-webhook")

CHALLENGE = json.dumps(
    {
        "title": "Which data structure gives O(1) average lookup by key?",
        "options": ["A linked list", "A hash map", "A binary heap", "A sorted array"],
        "correct_answer_id": 1,
        "explanation": "Hash maps hash the key to a bucket, so a lookup takes constant time.",
    }
)

_KEEP = object()


# --- payloads and deliveries -------------------------------------------------------------------


def new_clerk_id() -> str:
    return f"user_2x{secrets.token_hex(10)}"


def user_event(
    event_type: str,
    clerk_id: str,
    *,
    email: str = "ada@example.com",
    first_name: str | None = "Ada",
    last_name: str | None = "Lovelace",
    public_metadata: Any = _KEEP,
) -> dict[str, Any]:
    """A `user.created` / `user.updated` event as Clerk sends it."""
    data: dict[str, Any] = {
        "id": clerk_id,
        "object": "user",
        "email_addresses": [
            {"id": "idn_other", "email_address": "secondary@example.com"},
            {"id": "idn_1", "email_address": email},
        ],
        "primary_email_address_id": "idn_1",
        "first_name": first_name,
        "last_name": last_name,
        "public_metadata": {"plan": "pro"} if public_metadata is _KEEP else public_metadata,
    }
    if public_metadata is None:
        del data["public_metadata"]
    return {"type": event_type, "object": "event", "data": data}


def deleted_event(clerk_id: str) -> dict[str, Any]:
    return {
        "type": "user.deleted",
        "object": "event",
        "data": {"id": clerk_id, "object": "user", "deleted": True},
    }


@dataclass(frozen=True)
class Delivery:
    msg_id: str
    body: str
    headers: dict[str, str]


def sign(
    event: dict[str, Any] | list[Any] | str,
    *,
    msg_id: str | None = None,
    secret: str = SECRET,
    at: datetime | None = None,
) -> Delivery:
    """A delivery signed the way svix signs it (a str event is sent as is)."""
    body = event if isinstance(event, str) else json.dumps(event)
    msg_id = msg_id or f"msg_{secrets.token_hex(12)}"
    at = at or datetime.now(UTC)
    headers = {
        "svix-id": msg_id,
        "svix-timestamp": str(int(at.timestamp())),
        "svix-signature": Webhook(secret).sign(msg_id, at, body),
        "content-type": "application/json",
    }
    return Delivery(msg_id, body, headers)


async def deliver(
    client: httpx.AsyncClient, delivery: Delivery, path: str = PATHS[0]
) -> httpx.Response:
    return await client.post(path, content=delivery.body.encode(), headers=delivery.headers)


async def deliver_ok(served: Served, delivery: Delivery, path: str = PATHS[0]) -> str:
    response = await deliver(served.client, delivery, path)
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


# --- reading the database ----------------------------------------------------------------------


async def users_with(served: Served, clerk_id: str) -> list[User]:
    async with served.app.state.sessions() as session:
        return list((await session.scalars(select(User).where(User.clerk_id == clerk_id))).all())


async def the_user(served: Served, clerk_id: str) -> User:
    users = await users_with(served, clerk_id)
    assert len(users) == 1, f"{len(users)} user rows for {clerk_id}"
    return users[0]


async def quota_rows(served: Served, user_id: uuid.UUID) -> dict[str, int]:
    async with served.app.state.sessions() as session:
        rows = await session.scalars(select(Quota).where(Quota.user_id == user_id))
        return {row.product: row.remaining for row in rows}


def starting_balances(served: Served) -> dict[str, int]:
    """What `grant_initial` gives a new user: each product with a policy, at its start."""
    return {
        product: policy.initial
        for product, policy in quota_policies(served.settings).items()
        if policy is not None
    }


async def snapshot(served: Served, *, skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Every row of every table (but `skip`), comparable before and after."""
    async with served.app.state.sessions() as session:
        tables = {}
        for table in Base.metadata.sorted_tables:
            if table.name in skip:
                continue
            rows = (await session.execute(select(table))).all()
            tables[table.name] = sorted(repr(tuple(row)) for row in rows)
        return tables


# Every table with a user's rows, found from the schema, so that a product added later is
# covered by the deletion test without anyone remembering to list it.
OWNED = [table for table in Base.metadata.sorted_tables if "user_id" in table.c]


def test_the_owned_tables_include_every_product_s() -> None:
    names = {table.name for table in OWNED}
    for model in (Idea, Challenge, Quota, UsageRecord, IdempotencyKey, ImageJob, Chat, StoredFile):
        assert model.__tablename__ in names


async def owned_rows(served: Served, user_id: uuid.UUID) -> dict[str, list[str]]:
    """The user's rows in every table that belongs to a user."""
    async with served.app.state.sessions() as session:
        owned = {}
        for table in OWNED:
            rows = (await session.execute(select(table).where(table.c.user_id == user_id))).all()
            owned[table.name] = sorted(repr(tuple(row)) for row in rows)
        return owned


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
async def served_hooks(make_app: MakeApp) -> AsyncIterator[Served]:
    async with make_app(clerk_webhook_secret=SECRET) as served:
        yield served


# --- 1. user.created ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_user_created_makes_the_user_with_starting_quotas(
    served_hooks: Served, fake_clerk: FakeClerk, path: str
) -> None:
    clerk_id = new_clerk_id()
    response = await deliver(served_hooks.client, sign(user_event("user.created", clerk_id)), path)

    assert response.status_code == 200, response.text
    assert response.json() == {"status": "processed"}
    user = await the_user(served_hooks, clerk_id)
    assert (user.email, user.name, user.plan) == ("ada@example.com", "Ada Lovelace", "pro")
    expected = starting_balances(served_hooks)
    assert expected["challenges"] == 50
    assert await quota_rows(served_hooks, user.id) == expected

    token = fake_clerk.issue_token(sub=clerk_id)
    me = await served_hooks.client.get("/api/me", headers=bearer(token))
    assert me.status_code == 200, me.text
    assert me.json()["id"] == str(user.id)  # the webhook's user, not a second one
    quota = await served_hooks.client.get("/api/quota", headers=bearer(token))
    assert quota.status_code == 200, quota.text
    assert quota.json()["quota_remaining"] == 50
    assert len(await users_with(served_hooks, clerk_id)) == 1


# --- 2. user.updated ---------------------------------------------------------------------------


async def test_user_updated_changes_email_name_and_plan(served_hooks: Served) -> None:
    clerk_id = new_clerk_id()
    assert await deliver_ok(served_hooks, sign(user_event("user.created", clerk_id))) == "processed"
    created = await the_user(served_hooks, clerk_id)
    balances = await quota_rows(served_hooks, created.id)

    updated = user_event(
        "user.updated",
        clerk_id,
        email="Countess@Example.com",
        first_name="Augusta Ada",
        last_name="King",
        public_metadata={"plan": "team"},
    )
    assert await deliver_ok(served_hooks, sign(updated), PATHS[1]) == "processed"

    user = await the_user(served_hooks, clerk_id)
    assert user.id == created.id
    assert (user.email, user.name, user.plan) == (
        "countess@example.com",
        "Augusta Ada King",
        "team",
    )
    assert await quota_rows(served_hooks, user.id) == balances  # an update grants nothing new


@pytest.mark.parametrize(
    "public_metadata", [{}, {"tier": "gold"}, None], ids=["empty", "other-keys", "absent"]
)
async def test_user_updated_without_a_plan_keeps_the_plan(
    served_hooks: Served, public_metadata: Any
) -> None:
    clerk_id = new_clerk_id()
    assert await deliver_ok(served_hooks, sign(user_event("user.created", clerk_id))) == "processed"

    updated = user_event(
        "user.updated", clerk_id, email="ada@lovelace.test", public_metadata=public_metadata
    )
    assert await deliver_ok(served_hooks, sign(updated)) == "processed"

    user = await the_user(served_hooks, clerk_id)
    assert (user.email, user.plan) == ("ada@lovelace.test", "pro")


async def test_user_updated_for_an_unseen_user_creates_them(served_hooks: Served) -> None:
    clerk_id = new_clerk_id()
    assert await users_with(served_hooks, clerk_id) == []

    updated = user_event("user.updated", clerk_id, first_name="Grace", last_name="Hopper")
    assert await deliver_ok(served_hooks, sign(updated)) == "processed"

    user = await the_user(served_hooks, clerk_id)
    assert (user.email, user.name, user.plan) == ("ada@example.com", "Grace Hopper", "pro")
    assert await quota_rows(served_hooks, user.id) == starting_balances(served_hooks)


async def test_odd_but_signed_profile_fields_are_stored_as_far_as_they_make_sense(
    served_hooks: Served,
) -> None:
    clerk_id = new_clerk_id()
    event = user_event("user.created", clerk_id)
    event["data"].update(email_addresses=5, first_name=["Ada"], last_name="Lo\u0000velace")

    assert await deliver_ok(served_hooks, sign(event)) == "processed"

    user = await the_user(served_hooks, clerk_id)
    assert (user.email, user.name, user.plan) == (None, "Lovelace", "pro")


# --- 3. refused deliveries ---------------------------------------------------------------------


def _without(name: str) -> Callable[[Delivery], Delivery]:
    def change(d: Delivery) -> Delivery:
        return replace(d, headers={k: v for k, v in d.headers.items() if k != name})

    return change


def _header(name: str, value: str) -> Callable[[Delivery], Delivery]:
    def change(d: Delivery) -> Delivery:
        return replace(d, headers={**d.headers, name: value})

    return change


def _body(body: str) -> Callable[[Delivery], Delivery]:
    return lambda d: replace(d, body=body)


def _resigned(event: Any, **kwargs: Any) -> Callable[[Delivery], Delivery]:
    """The same message id, correctly signed over another body or time."""
    return lambda d: sign(event, msg_id=d.msg_id, **kwargs)


def _signature_bytes(d: Delivery) -> bytes:
    return base64.b64decode(d.headers["svix-signature"].removeprefix("v1,"))


REFUSED: dict[str, Callable[[Delivery], Delivery]] = {
    "signed-with-another-secret": lambda d: sign(d.body, msg_id=d.msg_id, secret=new_secret()),
    "body-changed-after-signing": _body(
        json.dumps(user_event("user.created", "user_2xmallory", email="mallory@example.com"))
    ),
    "body-with-a-trailing-space": lambda d: replace(d, body=d.body + " "),
    "svix-id-changed-after-signing": _header("svix-id", "msg_another"),
    "timestamp-changed-after-signing": lambda d: replace(
        d, headers={**d.headers, "svix-timestamp": str(int(d.headers["svix-timestamp"]) - 1)}
    ),
    "missing-svix-id": _without("svix-id"),
    "missing-svix-timestamp": _without("svix-timestamp"),
    "missing-svix-signature": _without("svix-signature"),
    "empty-svix-id": _header("svix-id", ""),
    "empty-svix-timestamp": _header("svix-timestamp", ""),
    "empty-svix-signature": _header("svix-signature", ""),
    "signature-words": _header("svix-signature", "v1 , v1\tnope"),
    "svix-id-too-long": lambda d: sign(d.body, msg_id="m" * 201),
    "non-numeric-timestamp": _header("svix-timestamp", "yesterday"),
    "fractional-timestamp": lambda d: _header("svix-timestamp", d.headers["svix-timestamp"] + ".5")(
        d
    ),
    "huge-timestamp": _header("svix-timestamp", "9" * 400),
    "huge-negative-timestamp": _header("svix-timestamp", "-" + "9" * 400),
    "signature-without-version": lambda d: _header(
        "svix-signature", base64.b64encode(_signature_bytes(d)).decode()
    )(d),
    "signature-of-another-version": lambda d: _header(
        "svix-signature", "v2," + base64.b64encode(_signature_bytes(d)).decode()
    )(d),
    "signature-not-base64": _header("svix-signature", "v1,this is not base64!!"),
    "signature-truncated": lambda d: _header(
        "svix-signature", "v1," + base64.b64encode(_signature_bytes(d)[:16]).decode()
    )(d),
    "signature-only-the-version": _header("svix-signature", "v1,"),
    "timestamp-6-minutes-old": lambda d: sign(
        d.body, msg_id=d.msg_id, at=datetime.now(UTC) - timedelta(minutes=6)
    ),
    "timestamp-6-minutes-ahead": lambda d: sign(
        d.body, msg_id=d.msg_id, at=datetime.now(UTC) + timedelta(minutes=6)
    ),
    "signed-body-not-json": _resigned("this is not JSON"),
    "signed-empty-body": _resigned(""),
    "signed-json-array": _resigned([1, 2, 3]),
    "signed-json-string": _resigned('"user.created"'),
    "signed-event-without-data": _resigned({"type": "user.created", "object": "event"}),
    "signed-event-without-type": _resigned({"data": {"id": "user_2xnope"}}),
    "signed-event-type-not-a-string": _resigned({"type": 7, "data": {"id": "user_2xnope"}}),
    "signed-event-data-not-an-object": _resigned({"type": "user.created", "data": ["user"]}),
    "signed-user-created-without-an-id": _resigned(
        {"type": "user.created", "data": {"id": 42, "first_name": "Ada"}}
    ),
    "signed-user-deleted-without-an-id": _resigned({"type": "user.deleted", "data": {}}),
    "signed-type-with-a-nul": _resigned({"type": "user.\u0000created", "data": {"id": "user_x"}}),
    "signed-user-created-id-with-a-nul": _resigned(
        {"type": "user.created", "data": {"id": "user_\u0000x"}}
    ),
    "signed-user-deleted-id-with-a-nul": _resigned(
        {"type": "user.deleted", "data": {"id": "user_\u0000x"}}
    ),
}


@pytest.mark.parametrize("mutate", REFUSED.values(), ids=REFUSED.keys())
async def test_refused_deliveries_are_400_and_change_nothing(
    served_hooks: Served, mutate: Callable[[Delivery], Delivery]
) -> None:
    existing = new_clerk_id()
    assert await deliver_ok(served_hooks, sign(user_event("user.created", existing))) == "processed"
    before = await snapshot(served_hooks)

    clerk_id = new_clerk_id()
    good = sign(user_event("user.created", clerk_id, email="eve@example.com"))
    bad = mutate(good)
    for path in PATHS:
        response = await deliver(served_hooks.client, bad, path)
        assert response.status_code == 400, (path, response.status_code, response.text)
        body = response.json()
        assert body["error"] == "invalid_webhook"
        assert isinstance(body["detail"], str)
        assert body["detail"]
        assert SECRET not in response.text

    assert await snapshot(served_hooks) == before
    # Nothing of the refused delivery was remembered: the genuine one is still applied.
    assert await deliver_ok(served_hooks, good) == "processed"
    assert (await the_user(served_hooks, clerk_id)).email == "eve@example.com"


async def test_a_rotated_secret_signature_among_several_is_accepted(served_hooks: Served) -> None:
    """During a rotation svix sends several space-separated signatures: one matching is enough
    (the counterpart of the refusals above: they fail for the reason they claim)."""
    clerk_id = new_clerk_id()
    good = sign(user_event("user.created", clerk_id))
    other = sign(good.body, msg_id=good.msg_id, secret=new_secret())
    signatures = f"{other.headers['svix-signature']} {good.headers['svix-signature']}"
    delivery = replace(good, headers={**good.headers, "svix-signature": signatures})
    assert await deliver_ok(served_hooks, delivery) == "processed"
    assert len(await users_with(served_hooks, clerk_id)) == 1


# --- 4. exactly once ---------------------------------------------------------------------------


async def test_concurrent_redeliveries_are_applied_once(served_hooks: Served) -> None:
    clerk_id = new_clerk_id()
    delivery = sign(user_event("user.created", clerk_id))

    responses = await asyncio.gather(
        *(deliver(served_hooks.client, delivery, PATHS[i % 2]) for i in range(20))
    )

    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    statuses = sorted(r.json()["status"] for r in responses)
    assert statuses == ["duplicate"] * 19 + ["processed"]
    user = await the_user(served_hooks, clerk_id)
    assert await quota_rows(served_hooks, user.id) == starting_balances(served_hooks)
    async with served_hooks.app.state.sessions() as session:
        quota_count = len((await session.scalars(select(Quota))).all())
        deliveries = (await session.scalars(select(WebhookDelivery))).all()
    assert quota_count == len(starting_balances(served_hooks))
    assert [(d.id, d.event_type) for d in deliveries] == [(delivery.msg_id, "user.created")]


async def test_a_late_redelivery_does_not_undo_a_later_update(served_hooks: Served) -> None:
    clerk_id = new_clerk_id()
    created = sign(user_event("user.created", clerk_id))
    assert await deliver_ok(served_hooks, created) == "processed"
    renamed = user_event("user.updated", clerk_id, first_name="Augusta", public_metadata={})
    assert await deliver_ok(served_hooks, sign(renamed)) == "processed"
    assert (await the_user(served_hooks, clerk_id)).name == "Augusta Lovelace"
    before = await snapshot(served_hooks)

    # svix retries the original message (same svix-id and body, a fresh timestamp and signature).
    retried = sign(created.body, msg_id=created.msg_id)
    for path in PATHS:
        assert await deliver_ok(served_hooks, retried, path) == "duplicate"

    assert (await the_user(served_hooks, clerk_id)).name == "Augusta Lovelace"
    assert await snapshot(served_hooks) == before


# --- 5. user.deleted ---------------------------------------------------------------------------


async def use_the_api(served: Served, token: str) -> str:
    """Everything that leaves rows behind: the user's id."""
    client = served.client
    me = await client.get("/api/me", headers=bearer(token))
    assert me.status_code == 200, me.text
    assert (await client.get("/api/quota", headers=bearer(token))).status_code == 200
    challenge = await client.post(
        "/api/generate-challenge",
        json={"difficulty": "easy"},
        headers={**bearer(token), "Idempotency-Key": str(uuid.uuid4())},
    )
    assert challenge.status_code == 200, challenge.text
    assert challenge.json()["is_fallback"] is False
    idea = await client.get(
        "/api", params={"format": "json"}, headers={**bearer(token), "Accept": "text/event-stream"}
    )
    assert idea.status_code == 200, idea.text
    assert "event: done" in idea.text
    job = await client.post(
        "/api/generate/", json={"prompt": "a lighthouse", "num_images": 2}, headers=bearer(token)
    )
    assert job.status_code == 202, job.text
    images = await client.get(f"/api/generate/{job.json()['job_id']}/stream")
    assert '"succeeded":2' in images.text, images.text
    upload = await client.post(
        "/api/upload-url",
        json={"filename": "cat.png", "contentType": "image/png"},
        headers=bearer(token),
    )
    assert upload.status_code == 200, upload.text
    put = await client.put(
        upload.json()["url"], content=make_png(), headers={"Content-Type": "image/png"}
    )
    assert put.status_code == 200, put.text
    reply = await client.post(
        "/chat",
        json={
            "messages": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "What is this?"},
                        {"text": upload.json()["gcs_url"], "type": "image"},
                    ],
                }
            ]
        },
        headers=bearer(token),
    )
    assert reply.status_code == 200, reply.text
    assert '"done":true' in reply.text, reply.text
    user_id: str = me.json()["id"]
    return user_id


async def test_user_deleted_deletes_everything_they_own(
    served_hooks: Served, fake_clerk: FakeClerk, fake_openai: FakeOpenAI
) -> None:
    fake_openai.text = CHALLENGE
    doomed_clerk_id, other_clerk_id = new_clerk_id(), new_clerk_id()
    doomed_token = fake_clerk.issue_token(sub=doomed_clerk_id, lifetime=300)
    other_token = fake_clerk.issue_token(sub=other_clerk_id, lifetime=300)
    doomed_id = uuid.UUID(await use_the_api(served_hooks, doomed_token))
    other_id = uuid.UUID(await use_the_api(served_hooks, other_token))

    doomed_before = await owned_rows(served_hooks, doomed_id)
    other_before = await owned_rows(served_hooks, other_id)
    for rows in (doomed_before, other_before):
        # A Clerk user has no local password: every other table holds some of their rows.
        assert all(r for t, r in rows.items() if t != "local_credential"), {
            table: len(r) for table, r in rows.items()
        }
    images = served_hooks.settings.data_dir / "files" / "images"
    uploads = served_hooks.settings.data_dir / "files" / "uploads"
    assert len(list((images / str(doomed_id)).rglob("*.png"))) == 2
    assert len(list((uploads / str(doomed_id)).rglob("*.png"))) == 1

    response = await deliver(served_hooks.client, sign(deleted_event(doomed_clerk_id)), PATHS[1])

    assert response.status_code == 200, response.text
    assert response.json() == {"status": "processed"}
    assert await users_with(served_hooks, doomed_clerk_id) == []
    assert await owned_rows(served_hooks, doomed_id) == {t.name: [] for t in OWNED}
    assert (await the_user(served_hooks, other_clerk_id)).id == other_id
    assert await owned_rows(served_hooks, other_id) == other_before
    assert not (images / str(doomed_id)).exists()  # their stored files went with them
    assert not (uploads / str(doomed_id)).exists()
    assert len(list((images / str(other_id)).rglob("*.png"))) == 2
    assert len(list((uploads / str(other_id)).rglob("*.png"))) == 1

    # Their token (still valid, and cached a moment ago) no longer opens anything, and does not
    # bring the account back; neither does a late event about them.
    for path in ("/api/me", "/api/quota", "/api/my-history"):
        refused = await served_hooks.client.get(path, headers=bearer(doomed_token))
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"] == "account_deleted"
    late = sign(user_event("user.updated", doomed_clerk_id))
    assert await deliver_ok(served_hooks, late) == "ignored"
    assert await users_with(served_hooks, doomed_clerk_id) == []
    assert (await served_hooks.client.get("/api/me", headers=bearer(other_token))).is_success


async def test_a_user_another_instance_deleted_is_refused_here_not_a_500(
    served_hooks: Served, fake_clerk: FakeClerk, fake_openai: FakeOpenAI
) -> None:
    """This instance cached the user a moment ago; Clerk's `user.deleted` reached another one,
    which deleted them from the shared database. Their next write here finds no user row: 401
    `account_deleted`, in the format of the request's client, and not cached any more."""
    clerk_id = new_clerk_id()
    token = fake_clerk.issue_token(sub=clerk_id, lifetime=300)
    assert (await served_hooks.client.get("/api/me", headers=bearer(token))).is_success
    async with served_hooks.app.state.sessions.begin() as session:  # the other instance's work
        assert await service.delete_clerk_user(session, clerk_id=clerk_id) is not None
    client = served_hooks.client

    markdown = await client.get("/api", headers={**bearer(token), "Accept": "text/event-stream"})
    assert markdown.status_code == 401
    assert markdown.headers["content-type"].startswith("text/event-stream")
    assert "deleted" in markdown_buffer(markdown.text)
    writes = [
        client.get("/api", params={"format": "json"}, headers=bearer(token)),
        client.post("/api/chats/create", json={"title": None}, headers=bearer(token)),
        client.post("/api/generate-challenge", json={"difficulty": "easy"}, headers=bearer(token)),
    ]
    for refused in await asyncio.gather(*writes):
        assert refused.status_code == 401, refused.text
        assert refused.json() == {
            "error": "account_deleted",
            "detail": "This account has been deleted",
        }
    me = await client.get("/api/me", headers=bearer(token))  # no longer served from the cache
    assert (me.status_code, me.json()["error"]) == (401, "account_deleted")
    assert await users_with(served_hooks, clerk_id) == []
    assert fake_openai.requests == []


async def test_user_deleted_for_an_unknown_user_changes_nothing(served_hooks: Served) -> None:
    known = new_clerk_id()
    assert await deliver_ok(served_hooks, sign(user_event("user.created", known))) == "processed"
    skip = (WebhookDelivery.__tablename__, DeletedClerkUser.__tablename__)
    before = await snapshot(served_hooks, skip=skip)
    unknown = new_clerk_id()

    assert await deliver_ok(served_hooks, sign(deleted_event(unknown))) == "processed"

    assert await snapshot(served_hooks, skip=skip) == before
    # Remembered all the same: a user.created that svix delivers late does not resurrect them.
    assert await deliver_ok(served_hooks, sign(user_event("user.created", unknown))) == "ignored"
    assert await users_with(served_hooks, unknown) == []
    assert len(await users_with(served_hooks, known)) == 1


# --- 6. configuration and other events ---------------------------------------------------------


async def test_unconfigured_secret_is_503(make_app: MakeApp) -> None:
    async with make_app() as served:
        assert served.settings.clerk_webhook_secret is None
        clerk_id = new_clerk_id()
        for path in PATHS:
            response = await deliver(
                served.client, sign(user_event("user.created", clerk_id)), path
            )
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["error"] == "webhooks_not_configured"
            assert isinstance(body["detail"], str)
        assert body["detail"]
        assert await users_with(served, clerk_id) == []


async def test_other_event_types_are_acknowledged_and_ignored(served_hooks: Served) -> None:
    before = await snapshot(served_hooks, skip=(WebhookDelivery.__tablename__,))
    session_created = {
        "type": "session.created",
        "object": "event",
        "data": {"id": "sess_2x", "object": "session", "user_id": new_clerk_id()},
    }
    for path in PATHS:
        response = await deliver(served_hooks.client, sign(session_created), path)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "ignored"}
    assert await snapshot(served_hooks, skip=(WebhookDelivery.__tablename__,)) == before
