"""Clerk's user-lifecycle webhooks, delivered by svix.

Verification follows svix's documented scheme: the signed content is
`{svix-id}.{svix-timestamp}.{body}`, signed with HMAC-SHA256 under the base64 secret after
`whsec_`; `svix-signature` holds one or more space-separated `v1,<base64>` signatures (several
during a secret rotation); a timestamp more than five minutes away from now is refused. Every
failure is a 400, so svix retries nothing that cannot succeed and nothing here can be a 500.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aihub.core.auth import ClerkIdentity, clerk_identity
from aihub.core.db import insert_if_absent
from aihub.core.errors import BadRequest, Unauthorized
from aihub.usage import quotas
from aihub.usage.quotas import Product, QuotaPolicy
from aihub.users import service
from aihub.users.models import WebhookDelivery

TOLERANCE_SECONDS = 5 * 60
SECRET_PREFIX = "whsec_"


class InvalidWebhook(BadRequest):
    code = "invalid_webhook"
    default_message = "Webhook verification failed"


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a `whsec_...` secret; `ValueError` when it is not one."""
    encoded = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be a svix signing secret (whsec_ followed by base64)") from None
    if not key:
        raise ValueError("must be a svix signing secret (whsec_ followed by base64)")
    return key


@dataclass(frozen=True, slots=True)
class ClerkEvent:
    delivery_id: str
    """The `svix-id`: the same for every redelivery of one message."""
    type: str
    data: dict[str, Any]


def verify_webhook(
    body: bytes, headers: Mapping[str, str], *, key: bytes, now: datetime
) -> ClerkEvent:
    """The verified event; `InvalidWebhook` (400) for any missing, malformed or wrong part."""
    message_id = _header(headers, "id")
    timestamp = _header(headers, "timestamp")
    signatures = _header(headers, "signature")
    if not message_id.isprintable() or len(message_id) > 200:
        raise InvalidWebhook("Malformed svix-id header")
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        raise InvalidWebhook("Malformed svix-timestamp header")
    if abs(int(now.timestamp()) - int(timestamp)) > TOLERANCE_SECONDS:
        raise InvalidWebhook("Webhook timestamp too old or in the future")
    signed = message_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = hmac.new(key, signed, hashlib.sha256).digest()
    if not any(_matches(candidate, expected) for candidate in signatures.split()):
        raise InvalidWebhook("No matching signature")
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidWebhook("The body is not JSON") from None
    if (
        not isinstance(event, dict)
        or not _is_name(event.get("type"), 100)
        or not isinstance(event.get("data"), dict)
    ):
        raise InvalidWebhook("The body is not a Clerk event")
    return ClerkEvent(message_id, event["type"], event["data"])


def _is_name(value: object, max_length: int) -> bool:
    """A short, printable string (NUL and other controls are refused: PostgreSQL stores no NUL)."""
    return isinstance(value, str) and 0 < len(value) <= max_length and value.isprintable()


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(f"svix-{name}") or headers.get(f"webhook-{name}")
    if not value:
        raise InvalidWebhook(f"Missing svix-{name} header")
    return value


def _matches(candidate: str, expected: bytes) -> bool:
    version, _, encoded = candidate.partition(",")
    if version != "v1":
        return False
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(signature, expected)


# --- applying events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Applied:
    status: Literal["processed", "duplicate", "ignored"]
    user_id: uuid.UUID | None = None
    """The user the event changed or deleted (their cached copies must be forgotten)."""
    deleted: bool = False
    """The user was deleted (their stored files must go too)."""


async def receive_clerk_webhook(
    sessions: async_sessionmaker[AsyncSession],
    *,
    body: bytes,
    headers: Mapping[str, str],
    key: bytes,
    policies: Mapping[Product, QuotaPolicy | None],
    now: datetime,
) -> Applied:
    """Verify a delivery and apply it in one transaction of its own."""
    event = verify_webhook(body, headers, key=key, now=now)
    async with sessions.begin() as session:
        return await apply_clerk_event(session, event=event, policies=policies, now=now)


async def apply_clerk_event(
    session: AsyncSession,
    *,
    event: ClerkEvent,
    policies: Mapping[Product, QuotaPolicy | None],
    now: datetime,
) -> Applied:
    """Apply one verified event, exactly once per delivery (in one transaction: the delivery
    row is written first, so a concurrent duplicate waits for it, then skips)."""
    event_type, data = event.type, event.data
    first = await insert_if_absent(
        session, WebhookDelivery, id=event.delivery_id, event_type=event_type, received_at=now
    )
    if not first:
        return Applied("duplicate")
    if event_type in ("user.created", "user.updated"):
        profile = _profile(data)
        metadata = data.get("public_metadata")
        try:
            user = await service.upsert_clerk_user(
                session,
                clerk_id=profile.clerk_id,
                email=profile.email,
                name=profile.name,
                plan=profile.plan,
                # A plan is Clerk's to say where the metadata has one; else the tokens' `pla` rules.
                set_plan=isinstance(metadata, dict) and "plan" in metadata,
            )
        except service.AccountDeleted:
            return Applied("ignored")  # a late event about a user Clerk has since deleted
        await quotas.grant_initial(session, user_id=user.id, policies=policies, now=now)
        return Applied("processed", user.id)
    if event_type == "user.deleted":
        clerk_id = data.get("id")
        if not _is_name(clerk_id, 64):
            raise InvalidWebhook("The event names no valid user id")
        assert isinstance(clerk_id, str)
        deleted = await service.delete_clerk_user(session, clerk_id=clerk_id)
        return Applied("processed", deleted, deleted=deleted is not None)
    return Applied("ignored")


def _profile(data: dict[str, Any]) -> ClerkIdentity:
    """A Clerk user object as the same profile a token would give."""
    listed = data.get("email_addresses")
    addresses = [a for a in listed if isinstance(a, dict)] if isinstance(listed, list) else []
    primary = next(
        (a for a in addresses if a.get("id") == data.get("primary_email_address_id")),
        addresses[0] if addresses else {},
    )
    metadata = data.get("public_metadata")
    claims = {
        "sub": data.get("id"),
        "email": primary.get("email_address"),
        "first_name": data.get("first_name"),
        "last_name": data.get("last_name"),
        "plan": metadata.get("plan") if isinstance(metadata, dict) else None,
    }
    try:
        return clerk_identity(claims)
    except Unauthorized:
        raise InvalidWebhook("The event names no valid user id") from None
