"""Image jobs: creating one (quota, limits), reading, listing, cancelling, and its event log.

The worker (`worker.py`) runs jobs; everything here runs in a request's transaction.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from aihub.core import metrics
from aihub.core.errors import AppError, NotFound, Unprocessable
from aihub.core.notify import Notifier
from aihub.core.pagination import page_newest_first
from aihub.images.models import ImageJob, JobEvent, JobImage
from aihub.usage import quotas
from aihub.users.models import User

JOB_ID_PREFIX = "job_"
JOB_ID_PATTERN = r"^job_[A-Za-z0-9_-]{24}$"

WORK_TOPIC = "image_work"
"""Wakes workers: there is a job to claim."""
JOB_TOPIC = "image_job"
"""Wakes a job's streams: it has new events."""
CANCEL_TOPIC = "image_cancel"
"""Wakes the worker running a job: stop it."""

UNFINISHED_JOB = ("queued", "running")
UNFINISHED_IMAGE = ("pending", "running")


class JobNotFound(NotFound):
    code = "job_not_found"
    default_message = "No such image job"


class TooManyJobs(AppError):
    status_code = 429
    code = "too_many_jobs"
    default_message = "Too many image jobs in progress"


def new_job_id() -> str:
    """`job_` and 144 random bits, URL- and path-safe."""
    return JOB_ID_PREFIX + secrets.token_urlsafe(18)


def elapsed_ms_since(created_at: datetime, now: datetime) -> int:
    return max(round((now - created_at).total_seconds() * 1000), 0)


def progress_data(image: JobImage, *, elapsed: int | None = None) -> dict[str, Any]:
    """A `progress` event's payload, as the original frontend reads it (`index`, `status`,
    `url`, `error`), with aihub's extras. `file` marks a stored copy: the stream turns it into a
    signed `file_url`."""
    data: dict[str, Any] = {
        "index": image.index,
        "status": image.status,
        "url": image.url,
        "error": image.error,
    }
    if image.status in ("succeeded", "failed"):
        data["elapsed_ms"] = elapsed
        data["provider"] = image.provider
        data["mime_type"] = image.mime_type
        data["file"] = image.storage_key is not None
    return data


def done_data(job: ImageJob) -> dict[str, Any]:
    """The `done` event's payload: the only clean end of a job's stream."""
    return {
        "status": "done",
        "job_status": job.status,
        "total": job.num_images,
        "succeeded": job.succeeded,
        "failed": job.failed,
        "ttfi_ms": job.ttfi_ms,
        "total_ms": job.total_ms,
    }


def data_uri(data: bytes, mime_type: str) -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


async def create_job(
    session: AsyncSession,
    notifier: Notifier,
    *,
    user_id: uuid.UUID,
    prompt: str,
    num_images: int,
    model: str,
    policy: quotas.QuotaPolicy | None,
    max_in_flight: int,
    now: datetime,
) -> ImageJob:
    """Queue a job: reserve one quota unit per image and wake a worker (after the commit)."""
    if policy is not None and num_images > max(policy.initial, policy.daily):
        raise Unprocessable(
            f"num_images: more than your whole image quota ({max(policy.initial, policy.daily)})"
        )
    # One user's job creations take turns (PostgreSQL row lock; SQLite writes one at a time),
    # so the in-flight count below cannot be raced past.
    await session.execute(select(User.id).where(User.id == user_id).with_for_update())
    in_flight = await session.scalar(
        select(func.count())
        .select_from(ImageJob)
        .where(ImageJob.user_id == user_id, ImageJob.status.in_(UNFINISHED_JOB))
    )
    if (in_flight or 0) >= max_in_flight:
        raise TooManyJobs(
            f"You already have {in_flight} image jobs in progress (at most {max_in_flight}); "
            "wait for one to finish or cancel it",
            headers={"Retry-After": "5"},
        )
    await quotas.reserve(
        session, user_id=user_id, product="images", policy=policy, now=now, units=num_images
    )
    job = ImageJob(
        id=new_job_id(),
        user_id=user_id,
        prompt=prompt,
        num_images=num_images,
        model=model,
        status="queued",
        created_at=now,
        last_event_id=num_images,
    )
    session.add(job)
    await session.flush()
    images = [
        JobImage(job_id=job.id, index=index, status="pending", seed=secrets.randbelow(2**31))
        for index in range(num_images)
    ]
    await session.execute(
        insert(JobImage),
        [
            {"job_id": i.job_id, "index": i.index, "status": i.status, "seed": i.seed}
            for i in images
        ],
    )
    await session.execute(
        insert(JobEvent),
        [
            {
                "job_id": job.id,
                "seq": image.index + 1,
                "name": "progress",
                "data": progress_data(image),
                "created_at": now,
            }
            for image in images
        ],
    )
    await notifier.notify(session, WORK_TOPIC)
    return job


async def find_job(session: AsyncSession, job_id: str) -> ImageJob:
    """Anyone's job by its id (the id is the capability); `JobNotFound` otherwise."""
    job = await session.get(ImageJob, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound()
    return job


async def get_job(session: AsyncSession, *, user_id: uuid.UUID, job_id: str) -> ImageJob:
    """The caller's own job: another user's is as unknown as a job that does not exist."""
    job = await find_job(session, job_id)
    if job.user_id != user_id:
        raise JobNotFound()
    return job


async def job_images(session: AsyncSession, job_id: str) -> list[JobImage]:
    query = select(JobImage).where(JobImage.job_id == job_id).order_by(JobImage.index)
    return list((await session.scalars(query)).all())


async def images_of(session: AsyncSession, job_ids: list[str]) -> dict[str, list[JobImage]]:
    """The images of several jobs, by job, in one query."""
    by_job: dict[str, list[JobImage]] = {job_id: [] for job_id in job_ids}
    if job_ids:
        query = select(JobImage).where(JobImage.job_id.in_(job_ids)).order_by(JobImage.index)
        for image in await session.scalars(query):
            by_job[image.job_id].append(image)
    return by_job


async def list_jobs(
    session: AsyncSession, *, user_id: uuid.UUID, limit: int, cursor: str | None
) -> tuple[list[ImageJob], str | None]:
    return await page_newest_first(
        session,
        ImageJob,
        where=ImageJob.user_id == user_id,
        limit=limit,
        cursor=cursor,
        id_type=str,
    )


async def events_after(
    session: AsyncSession, job_id: str, after: int, *, limit: int = 500
) -> list[JobEvent]:
    query = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > after)
        .order_by(JobEvent.seq)
        .limit(limit)
    )
    return list((await session.scalars(query)).all())


async def cancel_job(
    session: AsyncSession,
    notifier: Notifier,
    *,
    user_id: uuid.UUID,
    job_id: str,
    now: datetime,
) -> ImageJob:
    """Stop the job: its unfinished images fail as canceled and their quota comes back. A job
    that has already finished is left as it is."""
    job = await session.scalar(
        select(ImageJob)
        .where(ImageJob.id == job_id, ImageJob.user_id == user_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if job is None:
        raise JobNotFound()
    if job.status not in UNFINISHED_JOB:
        return job
    unfinished = [i for i in await job_images(session, job_id) if i.status in UNFINISHED_IMAGE]
    elapsed = elapsed_ms_since(job.created_at, now)
    events: list[dict[str, Any]] = []
    for image in unfinished:
        image.status, image.error, image.finished_at = "failed", "canceled", now
        job.last_event_id += 1
        events.append(_event(job, "progress", progress_data(image, elapsed=elapsed), now))
    job.status, job.finished_at, job.worker_id = "canceled", now, None
    job.failed += len(unfinished)
    job.total_ms = elapsed
    job.last_event_id += 1
    events.append(_event(job, "done", done_data(job), now))
    await session.flush()
    await session.execute(insert(JobEvent), events)
    if unfinished:
        await quotas.refund(session, user_id=user_id, product="images", units=len(unfinished))
    await notifier.notify(session, JOB_TOPIC, job_id)
    await notifier.notify(session, CANCEL_TOPIC, job_id)
    metrics.image_jobs.labels("canceled").inc()
    return job


def _event(job: ImageJob, name: str, data: dict[str, Any], now: datetime) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "seq": job.last_event_id,
        "name": name,
        "data": data,
        "created_at": now,
    }
