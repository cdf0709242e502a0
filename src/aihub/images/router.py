from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Annotated, Any

import jwt
import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi import Path as PathParam
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import Response

from aihub.core.auth import (
    AUTH_ERRORS,
    Authenticator,
    AuthenticatorDep,
    CurrentUser,
    OptionalUser,
    bearer_scheme,
    get_current_user,
)
from aihub.core.clock import Now
from aihub.core.config import Settings, SettingsDep
from aihub.core.db import SessionDep, Sessions
from aihub.core.errors import Unauthorized, Unprocessable, error_responses
from aihub.core.notify import Notifier
from aihub.core.sse import JSONEventEncoder, StreamEvent, stream_response
from aihub.images import service
from aihub.images.models import ImageJob, JobImage
from aihub.images.schemas import (
    ImageJobCreate,
    ImageJobCreated,
    ImageJobList,
    ImageJobRead,
    JobImageRead,
)
from aihub.providers.routing import ImageChain
from aihub.storage.base import ObjectNotFound
from aihub.storage.dependencies import (
    SignerDep,
    StorageDep,
    public_base_url,
    reader_of,
    stored_response,
)
from aihub.storage.signing import UrlSigner
from aihub.usage import quotas
from aihub.usage.idempotency import IDEMPOTENCY_ERRORS, IdempotencyKeyHeader, IdempotentRequest

router = APIRouter(tags=["images"])

STREAM_AUDIENCE = "aihub:image-job-stream"
_JOB_ID = re.compile(service.JOB_ID_PATTERN)

JobId = Annotated[str, PathParam(description="The id `POST /api/generate/` gave")]


async def get_notifier(request: Request) -> Notifier:
    notifier: Notifier = request.app.state.notifier
    return notifier


async def get_image_chain(request: Request) -> ImageChain:
    chain: ImageChain = request.app.state.image_chain
    return chain


NotifierDep = Annotated[Notifier, Depends(get_notifier)]
ImageChainDep = Annotated[ImageChain, Depends(get_image_chain)]


def _job_id(job_id: str) -> str:
    """A well-formed id, or the same 404 as an unknown one."""
    if not _JOB_ID.fullmatch(job_id):
        raise service.JobNotFound()
    return job_id


# --- creating ----------------------------------------------------------------------------------


@router.post(
    "/api/generate/",
    status_code=202,
    summary="Start an image job",
    response_model=ImageJobCreated,
    responses=error_responses(
        {
            **AUTH_ERRORS,
            **IDEMPOTENCY_ERRORS,
            422: "Empty or over-long prompt, or num_images out of bounds",
            429: "Image quota exceeded, or too many jobs in progress (see Retry-After)",
        }
    ),
)
async def create_job(
    request: Request,
    body: ImageJobCreate,
    user: CurrentUser,
    settings: SettingsDep,
    sessions: Sessions,
    notifier: NotifierDep,
    chain: ImageChainDep,
    authenticator: AuthenticatorDep,
    now: Now,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Queues the job and answers at once (202); its images are generated concurrently by a
    worker. Each image costs one unit of the image quota, refunded if it fails or is cancelled.
    Follow it with `GET /api/generate/{job_id}/stream`."""
    if body.num_images > settings.images_max_per_job:
        raise Unprocessable(f"num_images: must be at most {settings.images_max_per_job}")
    async with IdempotentRequest(
        sessions,
        user_id=user.id,
        scope="images.generate",
        key=idempotency_key,
        fingerprint=body.model_dump_json(),
        now=now,
    ) as idempotent:
        if idempotent.replay is not None:
            job_id = orjson.loads(idempotent.replay.body)["job_id"]
            async with sessions() as session:
                job = await service.get_job(session, user_id=user.id, job_id=job_id)
            created = _created(request, settings, authenticator, job)
            return _json(created, 202, headers={"Idempotent-Replayed": "true"})
        async with sessions.begin() as session:
            job = await service.create_job(
                session,
                notifier,
                user_id=user.id,
                prompt=body.prompt,
                num_images=body.num_images,
                model=chain.label,
                policy=quotas.policy_for(settings, "images"),
                max_in_flight=settings.images_max_jobs_in_flight,
                now=now,
            )
            # Only the id is kept: a replay gets a fresh stream token, none is ever stored.
            body_bytes = orjson.dumps({"job_id": job.id})
            await idempotent.complete(session, status_code=202, body=body_bytes)
    return _json(_created(request, settings, authenticator, job), 202)


def _created(
    request: Request, settings: Settings, authenticator: Authenticator, job: ImageJob
) -> ImageJobCreated:
    created = ImageJobCreated(
        job_id=job.id,
        status=job.status,
        num_images=job.num_images,
        stream_url=f"{public_base_url(request, settings)}/api/generate/{job.id}/stream",
    )
    if settings.images_stream_requires_auth:
        issued = authenticator.issuer.issue_scoped(
            job.user_id,
            audience=STREAM_AUDIENCE,
            ttl_seconds=settings.images_stream_token_seconds,
            job=job.id,
        )
        created.stream_token, created.stream_token_expires_at = issued.token, issued.expires_at
    return created


def _json(model: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        model.model_dump_json(),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


# --- streaming ---------------------------------------------------------------------------------

_STREAM_DESCRIPTION = """Server-Sent Events, as the original frontend's `EventSource` reads them:

- `progress` `{index, status, url, error, file_url, ...}` for each image as it changes
  (`pending`, `running`, `succeeded`, `failed`);
- `done` `{status: "done", job_status, total, succeeded, failed, ttfi_ms, total_ms}`: the one
  clean end (also for a cancelled job);
- `error` `{error, job_id}` if the job disappears (its owner was deleted);
- `keepalive` during silences.

Every event has an `id`: reconnect with `Last-Event-ID` (or `?last_event_id=`) to get exactly
what was missed. A late subscriber gets the whole story so far, `done` included.

The job id grants access (an `EventSource` cannot send a token). With
`IMAGES_STREAM_REQUIRES_AUTH=true` the stream needs the owner's bearer token or the job's
`?token=` from `POST /api/generate/`."""


@router.get(
    "/api/generate/{job_id}/stream",
    summary="Stream an image job's progress",
    description=_STREAM_DESCRIPTION,
    response_class=Response,
    responses={
        200: {"content": {"text/event-stream": {}}},
        204: {"description": "Resumed after the last event (`done` included): nothing is left"},
        **error_responses(
            {401: "Strict mode: no valid token", 404: "No such job", 422: "Bad Last-Event-ID"}
        ),
    },
)
async def stream_job(
    request: Request,
    job_id: JobId,
    settings: SettingsDep,
    sessions: Sessions,
    notifier: NotifierDep,
    signer: SignerDep,
    authenticator: AuthenticatorDep,
    now: Now,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
    last_event_id_query: Annotated[
        int | None, Query(alias="last_event_id", ge=0, description="As the Last-Event-ID header")
    ] = None,
    token: Annotated[
        str | None, Query(max_length=4096, description="Strict mode: the job's stream token")
    ] = None,
) -> Response:
    after = _resume_point(last_event_id, last_event_id_query)
    async with sessions() as session:
        job = await service.find_job(session, _job_id(job_id))
    if settings.images_stream_requires_auth:
        await _check_stream_access(request, authenticator, job, token)
    if after >= job.last_event_id and job.status not in service.UNFINISHED_JOB:
        # Everything was seen, `done` included: 204 tells an EventSource not to reconnect.
        return Response(status_code=204, headers={"Cache-Control": "no-cache"})
    if after > job.last_event_id:
        raise Unprocessable("Last-Event-ID: this stream has not sent that event yet")
    files = _links(request, settings, signer, now)
    return stream_response(
        _job_events(sessions, notifier, job.id, after, files, settings.images_poll_seconds),
        JSONEventEncoder(keepalive_event="keepalive"),
        product="images",
        keepalive_seconds=settings.sse_keepalive_seconds,
        # Here `error` says the job failed; a server that stops just ends this view of a job
        # that goes on (an EventSource reconnects, with Last-Event-ID, to another instance).
        say_interrupted=False,
    )


_EVENT_ID = re.compile(r"[0-9]{1,9}")


def _resume_point(header: str | None, query: int | None) -> int:
    if header is not None and header.strip():
        if not _EVENT_ID.fullmatch(header.strip()):
            raise Unprocessable("Last-Event-ID: must be an event id this stream sent")
        return int(header.strip())
    return query or 0


async def _check_stream_access(
    request: Request, authenticator: Authenticator, job: ImageJob, token: str | None
) -> None:
    if token is not None:
        try:
            claims = authenticator.issuer.verify_scoped(
                token, audience=STREAM_AUDIENCE, leeway=authenticator.settings.jwt_leeway_seconds
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("The stream token has expired") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("Invalid stream token") from None
        if claims.get("job") != job.id or claims.get("sub") != str(job.user_id):
            raise Unauthorized("The stream token is for another job")
        return
    if "authorization" not in request.headers:
        raise Unauthorized("This stream needs the owner's bearer token or the job's ?token=")
    user = await get_current_user(request, await bearer_scheme(request))
    if user.id != job.user_id:
        raise service.JobNotFound()


class _FileLinks:
    """Signed links to aihub's stored copies, made as events are sent (so they are fresh)."""

    def __init__(self, base_url: str, signer: UrlSigner, now: datetime, ttl: int) -> None:
        self.base_url, self.signer = base_url, signer
        self.expires_at = now + timedelta(seconds=ttl)

    def url(self, job_id: str, index: int) -> str:
        return self.signer.link(
            self.base_url, image_path(job_id, index), expires_at=self.expires_at
        )

    def progress(self, job_id: str, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        stored = data.pop("file", False)
        data["file_url"] = self.url(job_id, data["index"]) if stored else None
        return data


def image_path(job_id: str, index: int) -> str:
    return f"/api/generate/{job_id}/images/{index}"


async def _job_events(
    sessions: async_sessionmaker[AsyncSession],
    notifier: Notifier,
    job_id: str,
    after: int,
    files: _FileLinks,
    poll: float,
) -> AsyncIterator[StreamEvent]:
    async with notifier.subscribe(service.JOB_TOPIC, job_id) as wake:
        while True:
            async with sessions() as session:
                events = await service.events_after(session, job_id, after)
                gone = not events and await session.get(ImageJob, job_id) is None
            for event in events:
                after = event.seq
                data = (
                    files.progress(job_id, event.data) if event.name == "progress" else event.data
                )
                yield StreamEvent(event.name, data, id=str(event.seq))  # type: ignore[arg-type]
                if event.name == "done":
                    return
            if gone:
                yield StreamEvent("error", {"error": "The job no longer exists", "job_id": job_id})
                return
            if not events:
                await wake.wait(poll)


# --- reading, listing, cancelling --------------------------------------------------------------


async def _read(
    session: AsyncSession, job: ImageJob, files: _FileLinks, images: list[JobImage] | None = None
) -> ImageJobRead:
    if images is None:
        images = await service.job_images(session, job.id)
    return ImageJobRead(
        job_id=job.id,
        status=job.status,
        prompt=job.prompt,
        num_images=job.num_images,
        model=job.model,
        succeeded=job.succeeded,
        failed=job.failed,
        ttfi_ms=job.ttfi_ms,
        total_ms=job.total_ms,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        images=[
            JobImageRead(
                index=i.index,
                status=i.status,
                url=i.url,
                file_url=files.url(job.id, i.index) if i.storage_key else None,
                error=i.error,
                mime_type=i.mime_type,
                provider=i.provider,
                started_at=i.started_at,
                finished_at=i.finished_at,
            )
            for i in images
        ],
    )


def _links(request: Request, settings: Settings, signer: UrlSigner, now: datetime) -> _FileLinks:
    return _FileLinks(
        public_base_url(request, settings), signer, now, settings.storage_url_ttl_seconds
    )


_OWNER_ERRORS = error_responses({**AUTH_ERRORS, 404: "No such job of yours"})


@router.get("/api/generate/", summary="My image jobs, newest first", responses=_OWNER_ERRORS)
async def list_jobs(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    signer: SignerDep,
    now: Now,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> ImageJobList:
    jobs, next_cursor = await service.list_jobs(
        session, user_id=user.id, limit=limit, cursor=cursor
    )
    images = await service.images_of(session, [job.id for job in jobs])
    files = _links(request, settings, signer, now)
    return ImageJobList(
        jobs=[await _read(session, job, files, images.get(job.id, [])) for job in jobs],
        next_cursor=next_cursor,
    )


@router.get(
    "/api/generate/{job_id}",
    summary="One of my image jobs, with its images",
    responses=_OWNER_ERRORS,
)
async def read_job(
    request: Request,
    job_id: JobId,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    signer: SignerDep,
    now: Now,
) -> ImageJobRead:
    job = await service.get_job(session, user_id=user.id, job_id=_job_id(job_id))
    return await _read(session, job, _links(request, settings, signer, now))


@router.delete(
    "/api/generate/{job_id}",
    summary="Cancel one of my image jobs",
    responses=_OWNER_ERRORS,
)
async def cancel_job(
    request: Request,
    job_id: JobId,
    user: CurrentUser,
    sessions: Sessions,
    notifier: NotifierDep,
    settings: SettingsDep,
    signer: SignerDep,
    now: Now,
) -> ImageJobRead:
    """Unfinished images stop and fail as `canceled`, and their quota comes back; the stream
    ends with `done`. A job that has already finished is returned unchanged."""
    async with sessions.begin() as session:
        job = await service.cancel_job(
            session, notifier, user_id=user.id, job_id=_job_id(job_id), now=now
        )
        return await _read(session, job, _links(request, settings, signer, now))


@router.get(
    "/api/generate/{job_id}/images/{index}",
    summary="An image of one of my jobs (aihub's own copy)",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        **error_responses(
            {401: "No token and no signature", 403: "Invalid or expired link", 404: "No such image"}
        ),
    },
)
async def read_image(
    job_id: JobId,
    index: Annotated[int, PathParam(ge=0, le=1000)],
    sessions: Sessions,
    storage: StorageDep,
    signer: SignerDep,
    user: OptionalUser,
    now: Now,
    expires: Annotated[int | None, Query()] = None,
    signature: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """With the owner's bearer token, or with the signed link from `file_url` until it expires."""
    _job_id(job_id)
    owner = reader_of(
        signer,
        image_path(job_id, index),
        expires=expires,
        signature=signature,
        user=user,
        now=now,
    )
    async with sessions() as session:
        job = await service.find_job(session, job_id)
        image = await session.get(JobImage, (job_id, index))
    if (owner is not None and job.user_id != owner) or image is None or not image.storage_key:
        raise ObjectNotFound("No such image")
    stored = await storage.get(image.storage_key)
    return stored_response(stored.data, stored.content_type)
