"""Accounts: local users with bcrypt passwords, and Clerk users created on first sight.

bcrypt is CPU-heavy (about a quarter of a second per hash), so it runs on threads of its own, a
few at a time (a flood of logins queues behind itself, not in front of the file I/O and other work
that shares the default executor), and never while a database connection is held (a flood of
logins would otherwise hold the whole pool while it hashes).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import bcrypt
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from aihub.core.db import AppSessions, insert_if_absent, utcnow
from aihub.core.errors import Conflict, Forbidden, Unauthorized, Unprocessable
from aihub.users.models import DeletedClerkUser, LocalCredential, User

PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_BYTES = 72  # bcrypt's limit; longer passwords are refused, never truncated
EMAIL_MAX_LENGTH = 320
BCRYPT_ROUNDS = 12
_EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
# A hash of a random password with the same cost, checked when the email is unknown so that an
# unknown email takes as long as a wrong password.
_TIMING_HASH = b"$2b$12$vPLD2lZXXbOAHctR/8CrsO7qNdoVMHHITkzYHmuLIo9njx.7/IVgC"


class EmailTaken(Conflict):
    code = "email_taken"
    default_message = "An account with this email already exists"


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"
    default_message = "Invalid email or password"


class AccountDeleted(Unauthorized):
    code = "account_deleted"
    default_message = "This account has been deleted"


class RegistrationClosed(Forbidden):
    code = "registration_closed"
    default_message = "Registration is closed on this server"


def normalize_email(email: str) -> str:
    """Stripped and lower-cased; `ValueError` when it is not a plausible address."""
    normalized = email.strip().lower()
    if len(normalized) > EMAIL_MAX_LENGTH or not _EMAIL_PATTERN.match(normalized):
        raise ValueError("not a valid email address")
    return normalized


def check_password(password: str) -> str:
    """`ValueError` unless the password is between 8 characters and bcrypt's 72 bytes."""
    if len(password) < PASSWORD_MIN_LENGTH:
        raise ValueError(f"must be at least {PASSWORD_MIN_LENGTH} characters")
    if len(password.encode()) > PASSWORD_MAX_BYTES:
        raise ValueError(f"must be at most {PASSWORD_MAX_BYTES} bytes")
    return password


@functools.cache
def _hashing() -> ThreadPoolExecutor:
    """bcrypt's threads: one a core (it releases the GIL), at least two."""
    return ThreadPoolExecutor(max(2, os.cpu_count() or 1), thread_name_prefix="aihub-bcrypt")


async def hash_password(password: str) -> str:
    salt = bcrypt.gensalt(BCRYPT_ROUNDS)
    loop = asyncio.get_running_loop()
    hashed = await loop.run_in_executor(_hashing(), bcrypt.hashpw, password.encode(), salt)
    return hashed.decode()


async def verify_password(password: str, password_hash: str | bytes) -> bool:
    encoded = password.encode()
    if len(encoded) > PASSWORD_MAX_BYTES:
        encoded = b""  # can never match; still spends the same time
    stored = password_hash.encode() if isinstance(password_hash, str) else password_hash
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_hashing(), bcrypt.checkpw, encoded, stored)


async def create_local_user(session: AsyncSession, *, email: str, password: str) -> User:
    """A new local account; `EmailTaken` (409) when the email already has one.

    The password is hashed before `session` is first used, so no connection is held meanwhile."""
    try:
        email = normalize_email(email)
        check_password(password)
    except ValueError as exc:
        raise Unprocessable(str(exc)) from None
    password_hash = await hash_password(password)
    if await _credential_for(session, email) is not None:
        raise EmailTaken()
    user = User(id=uuid.uuid4(), email=email)
    session.add(user)
    try:
        await session.flush()  # the user row first: the credential's foreign key needs it
        session.add(LocalCredential(user_id=user.id, email=email, password_hash=password_hash))
        await session.flush()
    except IntegrityError as exc:
        raise EmailTaken() from exc
    return user


async def authenticate_local(sessions: AppSessions, *, email: str, password: str) -> User:
    """The account these credentials open; `InvalidCredentials` (401) otherwise, same timing.

    The account is read in a session of its own, closed before the password is checked."""
    async with sessions() as session:
        credential = await _credential_for(session, email.strip().lower())
        user = None if credential is None else await session.get(User, credential.user_id)
    if credential is None or user is None:
        await verify_password(password, _TIMING_HASH)
        raise InvalidCredentials()
    if not await verify_password(password, credential.password_hash):
        raise InvalidCredentials()
    return user


async def get_or_create_clerk_user(
    session: AsyncSession,
    *,
    clerk_id: str,
    email: str | None,
    name: str | None,
    plan: str | None,
) -> User:
    """The user behind a Clerk id, created if absent (safe under concurrency); `AccountDeleted`
    (401) when Clerk deleted them.

    Non-None `email`, `name` and `plan` are written when they differ; None leaves a field as is.
    """
    user = await _user_by_clerk_id(session, clerk_id)
    if user is None:
        if await session.get(DeletedClerkUser, clerk_id) is not None:
            raise AccountDeleted()
        await insert_if_absent(
            session,
            User,
            id=uuid.uuid4(),
            clerk_id=clerk_id,
            email=email,
            name=name,
            plan=plan,
            created_at=utcnow(),
            updated_at=utcnow(),
        )
        user = await _user_by_clerk_id(session, clerk_id)
        assert user is not None, "the insert or a concurrent one made the row"
    changes = {
        field: value
        for field, value in (("email", email), ("name", name), ("plan", plan))
        if value is not None and getattr(user, field) != value
    }
    if changes:
        for field, value in changes.items():
            setattr(user, field, value)
        await session.flush()
    return user


async def _user_by_clerk_id(session: AsyncSession, clerk_id: str) -> User | None:
    result = await session.execute(select(User).where(User.clerk_id == clerk_id))
    return result.scalar_one_or_none()


async def _credential_for(session: AsyncSession, email: str) -> LocalCredential | None:
    result = await session.execute(select(LocalCredential).where(LocalCredential.email == email))
    return result.scalar_one_or_none()


async def upsert_clerk_user(
    session: AsyncSession,
    *,
    clerk_id: str,
    email: str | None,
    name: str | None,
    plan: str | None,
    set_plan: bool = True,
) -> User:
    """The user behind a Clerk id with exactly this email and name (None clears one), and this
    plan when `set_plan`."""
    user = await get_or_create_clerk_user(
        session, clerk_id=clerk_id, email=email, name=name, plan=plan
    )
    wanted = (email, name, plan if set_plan else user.plan)
    if (user.email, user.name, user.plan) != wanted:
        user.email, user.name, user.plan = wanted
        await session.flush()
    return user


async def delete_clerk_user(session: AsyncSession, *, clerk_id: str) -> uuid.UUID | None:
    """Delete the user and, by the foreign keys' cascades, everything they own, and remember
    the Clerk id as deleted; their id, or None when there was no such user."""
    result = await session.execute(delete(User).where(User.clerk_id == clerk_id).returning(User.id))
    await insert_if_absent(session, DeletedClerkUser, clerk_id=clerk_id, deleted_at=utcnow())
    return result.scalar_one_or_none()
