"""The image worker: claims queued jobs and generates their images concurrently.

Every worker (one inside each `aihub serve`, or alone as `aihub worker`) claims jobs with one
atomic statement (`FOR UPDATE SKIP LOCKED` on PostgreSQL), so no job runs twice. A running job's
row carries its worker's heartbeat; a job whose worker stopped beating is claimed again by any
worker, and only its unfinished images are generated. Every change to a job is written, with its
event, in one short transaction guarded by "this worker still owns the job": a worker that lost
its job (cancelled by its owner, taken over after a stall, deleted with its user) cannot write
over anyone else's work, and stops.

Images run as asyncio tasks under one concurrency limit per worker, each with a deadline and
bounded retries of retryable provider errors. A worker takes a new job only while it has room
for more images, so several instances share the queue instead of one hoarding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aihub.core import metrics
from aihub.core.config import Settings
from aihub.core.db import utcnow
from aihub.core.notify import Notifier
from aihub.images import service
from aihub.images.models import ImageJob, JobEvent, JobImage
from aihub.providers.base import ImageRequest, ProviderError, ProviderUnavailable
from aihub.providers.routing import ImageChain, ImageResult
from aihub.storage.base import Storage
from aihub.usage import quotas
from aihub.usage.service import record_failed_attempts, record_usage

logger = logging.getLogger("aihub.images.worker")

MAX_CLAIMS = 5
"""A job claimed this many times without finishing (its workers keep dying on it) is finished
with its remaining images failed, rather than taking workers down forever."""

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class LostJob(Exception):
    """This worker no longer owns the job."""


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: str
    user_id: Any
    prompt: str
    created_at: datetime
    claims: int
    images: list[tuple[int, int]]
    """(index, seed) of each image still to generate."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    concurrency: int = 10
    timeout: float = 120.0
    max_retries: int = 2
    heartbeat: float = 5.0
    stale_after: float = 30.0
    poll: float = 5.0
    retry_backoff: float = 0.5

    @classmethod
    def of(cls, settings: Settings) -> WorkerSettings:
        return cls(
            concurrency=settings.images_concurrency,
            timeout=settings.images_timeout_seconds,
            max_retries=settings.images_max_retries,
            heartbeat=settings.images_heartbeat_seconds,
            stale_after=settings.images_stale_seconds,
            poll=settings.images_poll_seconds,
        )


class ImageWorker:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        notifier: Notifier,
        chain: ImageChain,
        storage: Storage,
        options: WorkerSettings,
        clock: Callable[[], datetime] = utcnow,
        worker_id: str | None = None,
    ) -> None:
        self.sessions = sessions
        self.notifier = notifier
        self.chain = chain
        self.storage = storage
        self.options = options
        self.clock = clock
        self.id = worker_id or f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._slots = asyncio.Semaphore(options.concurrency)
        self._claimed = 0
        """Images of claimed jobs not finished yet."""
        self._room = asyncio.Event()
        self._room.set()
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._revoked: set[str] = set()
        self._main: asyncio.Task[None] | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._main = asyncio.create_task(self.run(), name=f"image-worker {self.id}")

    async def stop(self) -> None:
        """Stop claiming, stop the running jobs and hand them back to the queue at once (their
        finished images stay finished), so a restarted or another instance resumes them."""
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        tasks = list(self._jobs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._release()
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("could not hand jobs back: %s", type(exc).__name__)

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            async with self.notifier.subscribe(service.WORK_TOPIC) as work:
                while True:
                    await self._room.wait()
                    try:
                        job = await self._claim()
                    except (SQLAlchemyError, OSError) as exc:
                        logger.warning("claiming a job failed: %s", type(exc).__name__)
                        job = None
                    if job is None:
                        await work.wait(self.options.poll)
                        continue
                    self._take(len(job.images))
                    task = asyncio.create_task(self._run_job(job), name=f"image-job {job.id}")
                    self._jobs[job.id] = task
                    task.add_done_callback(functools.partial(self._forget, job))
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    def _take(self, images: int) -> None:
        self._claimed += images
        if self._claimed >= self.options.concurrency:
            self._room.clear()

    def _forget(self, job: ClaimedJob, _task: asyncio.Task[None]) -> None:
        self._jobs.pop(job.id, None)
        self._revoked.discard(job.id)
        self._claimed -= len(job.images)
        if self._claimed < self.options.concurrency:
            self._room.set()

    # --- claiming ------------------------------------------------------------------------------

    def _claimable(self, now: datetime) -> ColumnElement[bool]:
        stale = now - timedelta(seconds=self.options.stale_after)
        return or_(
            ImageJob.status == "queued",
            and_(ImageJob.status == "running", ImageJob.heartbeat_at < stale),
        )

    async def _claim(self) -> ClaimedJob | None:
        now = self.clock()
        claimable = self._claimable(now)
        candidate = (
            select(ImageJob.id)
            .where(claimable)
            .order_by(ImageJob.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        async with self.sessions.begin() as session:
            row = (
                await session.execute(
                    update(ImageJob)
                    .where(ImageJob.id == candidate, claimable)
                    .values(
                        status="running",
                        worker_id=self.id,
                        heartbeat_at=now,
                        started_at=func.coalesce(ImageJob.started_at, now),
                        claims=ImageJob.claims + 1,
                    )
                    .returning(
                        ImageJob.id,
                        ImageJob.user_id,
                        ImageJob.prompt,
                        ImageJob.created_at,
                        ImageJob.claims,
                    )
                )
            ).one_or_none()
            if row is None:
                return None
            images = (
                await session.execute(
                    select(JobImage.index, JobImage.seed)
                    .where(JobImage.job_id == row.id, JobImage.status.in_(service.UNFINISHED_IMAGE))
                    .order_by(JobImage.index)
                )
            ).all()
        logger.info("claimed image job", extra={"job_id": row.id, "claims": row.claims})
        return ClaimedJob(
            row.id, row.user_id, row.prompt, row.created_at, row.claims, [(i, s) for i, s in images]
        )

    async def _release(self) -> None:
        async with self.sessions.begin() as session:
            mine = select(ImageJob.id).where(
                ImageJob.worker_id == self.id, ImageJob.status == "running"
            )
            await session.execute(
                update(JobImage)
                .where(JobImage.job_id.in_(mine), JobImage.status == "running")
                .values(status="pending")
            )
            released = await session.execute(
                update(ImageJob)
                .where(ImageJob.worker_id == self.id, ImageJob.status == "running")
                .values(status="queued", worker_id=None, heartbeat_at=None)
                .returning(ImageJob.id)
            )
            if released.first() is not None:
                await self.notifier.notify(session, service.WORK_TOPIC)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat)
            if not self._jobs:
                continue
            live = list(self._jobs)
            try:
                async with self.sessions.begin() as session:
                    kept = set(
                        (
                            await session.scalars(
                                update(ImageJob)
                                .where(
                                    ImageJob.id.in_(live),
                                    ImageJob.worker_id == self.id,
                                    ImageJob.status == "running",
                                )
                                .values(heartbeat_at=self.clock())
                                .returning(ImageJob.id)
                            )
                        ).all()
                    )
            except (SQLAlchemyError, OSError) as exc:
                logger.warning("heartbeat failed: %s", type(exc).__name__)
                continue
            for job_id in set(live) - kept:
                self._revoke(job_id, "no longer this worker's")

    def _revoke(self, job_id: str, reason: str) -> None:
        task = self._jobs.get(job_id)
        if task is not None and job_id not in self._revoked:
            logger.info("stopping image job: %s", reason, extra={"job_id": job_id})
            self._revoked.add(job_id)
            task.cancel()

    # --- running a job -------------------------------------------------------------------------

    async def _run_job(self, job: ClaimedJob) -> None:
        async def watch_cancel() -> None:
            async with self.notifier.subscribe(service.CANCEL_TOPIC, job.id) as wake:
                await wake.wait()
            self._revoke(job.id, "cancelled")

        watcher = asyncio.create_task(watch_cancel())
        try:
            await self._work(job)
        except asyncio.CancelledError:
            if job.id not in self._revoked:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except Exception as exc:
            if _only(exc, LostJob):
                logger.info("image job lost to another owner", extra={"job_id": job.id})
            else:
                # Left without a heartbeat: the job is claimed again once it is stale.
                logger.exception("image job failed", extra={"job_id": job.id})
        finally:
            watcher.cancel()

    async def _work(self, job: ClaimedJob) -> None:
        if job.claims > MAX_CLAIMS:
            for index, _seed in job.images:
                await self._fail(job, index, f"gave up after {MAX_CLAIMS} attempts to run it")
        else:
            async with asyncio.TaskGroup() as group:
                for index, seed in job.images:
                    group.create_task(self._run_image(job, index, seed))
        await self._finish(job)

    async def _run_image(self, job: ClaimedJob, index: int, seed: int) -> None:
        async with self._slots:
            await self._start(job, index)
            request = ImageRequest(prompt=job.prompt, seed=seed)
            result: ImageResult | None = None
            for attempt in range(self.options.max_retries + 1):
                try:
                    async with asyncio.timeout(self.options.timeout):
                        result = await self.chain.generate(request)
                    break
                except TimeoutError:
                    error: ProviderError = ProviderUnavailable(
                        f"no image within {self.options.timeout:g} s",
                        provider=self.chain.primary.provider.name,
                    )
                    error.attempts = []
                except ProviderError as exc:
                    error = exc
                except Exception:  # a bug must fail this image, not its siblings
                    logger.exception("image generation failed", extra={"job_id": job.id})
                    error = ProviderError(
                        "the image could not be generated (internal error)",
                        provider=self.chain.primary.provider.name,
                    )
                await self._record_failures(job, error)
                if not error.retryable or attempt == self.options.max_retries:
                    await self._fail(job, index, error.message)
                    return
                await asyncio.sleep(
                    min(error.retry_after or self.options.retry_backoff * 2**attempt, 10)
                )
            assert result is not None
            await self._succeed(job, index, result)

    async def _succeed(self, job: ClaimedJob, index: int, result: ImageResult) -> None:
        image = result.image
        ext = _EXTENSIONS.get(image.mime_type, "bin")
        key: str | None = None
        try:
            path = f"images/{job.user_id}/{job.id}/{index}.{ext}"
            await self.storage.put(path, image.data, content_type=image.mime_type)
            key = path
        except OSError as exc:  # the provider's URL still works for a while: keep the image
            logger.warning("could not store an image: %s", type(exc).__name__)
        url = image.url or service.data_uri(image.data, image.mime_type)
        now = self.clock()
        elapsed = service.elapsed_ms_since(job.created_at, now)

        async def write(session: AsyncSession) -> None:
            record_failed_attempts(
                session, user_id=job.user_id, product="images", attempts=result.failed
            )
            record_usage(
                session,
                user_id=job.user_id,
                product="images",
                provider=result.provider,
                model=result.model,
                latency_ms=result.latency_ms,
                outcome="succeeded",
                images=1,
            )

        try:
            await self._change(
                job,
                index,
                image={
                    "status": "succeeded",
                    "url": url,
                    "storage_key": key,
                    "mime_type": image.mime_type,
                    "provider": result.provider,
                    "model": result.model,
                    "finished_at": now,
                },
                job_values={
                    "succeeded": ImageJob.succeeded + 1,
                    "ttfi_ms": func.coalesce(ImageJob.ttfi_ms, elapsed),
                },
                elapsed=elapsed,
                extra=write,
            )
        except BaseException:
            if key is not None:
                await asyncio.shield(self.storage.delete(key))
            raise

    async def _fail(self, job: ClaimedJob, index: int, message: str) -> None:
        """The image failed: its quota unit comes back."""
        now = self.clock()

        async def write(session: AsyncSession) -> None:
            await quotas.refund(session, user_id=job.user_id, product="images")

        await self._change(
            job,
            index,
            image={"status": "failed", "error": message, "finished_at": now},
            job_values={"failed": ImageJob.failed + 1},
            elapsed=service.elapsed_ms_since(job.created_at, now),
            extra=write,
        )

    async def _start(self, job: ClaimedJob, index: int) -> None:
        await self._change(
            job,
            index,
            image={
                "status": "running",
                "started_at": self.clock(),
                "attempts": JobImage.attempts + 1,
            },
            job_values={},
            elapsed=None,
        )

    async def _record_failures(self, job: ClaimedJob, error: ProviderError) -> None:
        """The usage rows of a failed try (the image may still succeed on a retry)."""
        async with self.sessions.begin() as session:
            record_failed_attempts(
                session, user_id=job.user_id, product="images", attempts=error.attempts
            )

    async def _change(
        self,
        job: ClaimedJob,
        index: int,
        *,
        image: dict[str, Any],
        job_values: dict[str, Any],
        elapsed: int | None,
        extra: Callable[[AsyncSession], Awaitable[None]] | None = None,
    ) -> None:
        """One image's new state, its `progress` event and the job's counters, in one
        transaction that only goes through while this worker owns the job."""
        async with self.sessions.begin() as session:
            seq = await self._next_seq(session, job, job_values)
            changed = await session.scalar(
                update(JobImage)
                .where(JobImage.job_id == job.id, JobImage.index == index)
                .values(**image)
                .returning(JobImage)
            )
            assert changed is not None
            await self._event(
                session, job, seq, "progress", service.progress_data(changed, elapsed=elapsed)
            )
            if extra is not None:
                await extra(session)

    async def _finish(self, job: ClaimedJob) -> None:
        now = self.clock()
        total = service.elapsed_ms_since(job.created_at, now)
        async with self.sessions.begin() as session:
            seq = await self._next_seq(
                session,
                job,
                {"status": "done", "finished_at": now, "total_ms": total, "worker_id": None},
            )
            finished = await session.get(ImageJob, job.id, populate_existing=True)
            assert finished is not None
            await self._event(session, job, seq, "done", service.done_data(finished))
        if finished.ttfi_ms is not None:
            metrics.image_time_to_first_image.observe(finished.ttfi_ms / 1000)
        metrics.image_batch_time.observe(total / 1000)
        metrics.image_jobs.labels("done").inc()

    async def _next_seq(
        self,
        session: AsyncSession,
        job: ClaimedJob,
        values: dict[str, Any],
    ) -> int:
        seq = await session.scalar(
            update(ImageJob)
            .where(
                ImageJob.id == job.id,
                ImageJob.worker_id == self.id,
                ImageJob.status == "running",
            )
            .values(last_event_id=ImageJob.last_event_id + 1, heartbeat_at=self.clock(), **values)
            .returning(ImageJob.last_event_id)
        )
        if seq is None:
            raise LostJob(job.id)
        return int(seq)

    async def _event(
        self, session: AsyncSession, job: ClaimedJob, seq: int, name: str, data: dict[str, Any]
    ) -> None:
        await session.execute(
            insert(JobEvent).values(
                job_id=job.id, seq=seq, name=name, data=data, created_at=self.clock()
            )
        )
        await self.notifier.notify(session, service.JOB_TOPIC, job.id)


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `exc` is `kind`, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(kind)[1] is None
    return isinstance(exc, kind)
