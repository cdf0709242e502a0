"""The application factory."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta

import anyio
from fastapi import FastAPI
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from starlette.middleware.cors import CORSMiddleware

from aihub import __version__
from aihub.api import include_routers
from aihub.chats.router import load_system_prompt
from aihub.chats.service import Replying, Summaries
from aihub.core import metrics
from aihub.core.auth import Authenticator, handle_integrity_error
from aihub.core.clock import Clock
from aihub.core.config import Settings
from aihub.core.db import create_engine, create_sessionmaker, utcnow
from aihub.core.errors import install_error_handlers
from aihub.core.logging import flush_logs
from aihub.core.middleware import BodySizeLimitMiddleware, InFlight, RequestContextMiddleware
from aihub.core.notify import create_notifier
from aihub.core.ratelimit import MemoryRateLimiter, RedisRateLimiter, parse_networks
from aihub.ideas.dependencies import Ideas
from aihub.images.worker import ImageWorker, WorkerSettings
from aihub.providers.routing import ImageChain, ModelChain, ProviderRegistry
from aihub.storage import create_storage
from aihub.storage.files import remove_orphans
from aihub.storage.signing import UrlSigner

logger = logging.getLogger("aihub")

TAGS = [
    {"name": "ideas", "description": "Business ideas, streamed as Markdown (seed 1)."},
    {
        "name": "challenges",
        "description": "Multiple-choice coding challenges with a daily quota (seed 2).",
    },
    {
        "name": "images",
        "description": "Image-generation jobs, streamed as they progress (seed 3).",
    },
    {
        "name": "chats",
        "description": "Conversations with Gemini (or any text model), with files (seed 4).",
    },
    {"name": "files", "description": "Uploads through signed URLs, and stored files."},
    {
        "name": "byok",
        "description": "Chat relayed to OpenAI with the caller's own key (seed 5).",
    },
    {"name": "auth", "description": "Local accounts, aihub's tokens and the caller's profile."},
    {"name": "usage", "description": "The caller's quotas and usage, per product."},
    {"name": "webhooks", "description": "Clerk's user events, verified by their svix signature."},
    {"name": "health", "description": "Liveness, readiness and metrics."},
]


EXPOSED_HEADERS = [
    "X-Request-ID",
    "Retry-After",
    "X-AIHub-Provider",
    "Idempotent-Replayed",
    "X-Next-Cursor",  # the next page of `GET /api/chats` and `GET /api/chats/{id}`
    "X-Chat-Id",  # the chat a `POST /chat` reply belongs to
]
"""The response headers a script on another allowed origin may read (beyond the CORS-safelisted
ones): every header a product sends for its client to read belongs here."""

CONVERSATION_BODY_BYTES = 16 * 1024 * 1024
"""The body limit (at least) of the routes whose clients send their whole conversation with every
message (`POST /chat`, `POST /api/chat`): a long chat must not become one nobody can write to."""

SHUTDOWN_CLEAN_UP_SECONDS = 5.0
"""How long a stopping server waits for cancelled requests to store what they had."""


GC_FULL_PASS_AFTER = 100
"""How many of the garbage collector's middle-generation passes a full pass waits for (Python's
default: 10). Requests make no reference cycles (tests/core/test_app.py), so what lives long
enough to reach the oldest generation (a stream's objects, for its seconds) is freed by
reference counting, and a full pass finds next to nothing. Yet it walks every live stream's
objects, stopping the event loop meanwhile: 20-60 ms with 200 streams open, every ~7 s at 100
new streams a second. Now every ~70 s; cycles among young objects are still collected as
often as before."""


def create_app(settings: Settings, *, freeze_gc: bool = False, clock: Clock = utcnow) -> FastAPI:
    """The app. `freeze_gc` (for a server process, not tests): after start-up, move every object
    that exists then out of the garbage collector's sight, so that a full collection no longer
    walks the ~200,000 objects of the loaded libraries: that walk took 50-180 ms, and every
    stream stood still meanwhile; and make full collections rarer (`GC_FULL_PASS_AFTER`).
    `clock` gives the time quotas and webhooks go by."""
    app = FastAPI(
        title="aihub",
        version=__version__,
        summary="Five AI products behind one production-grade backend.",
        openapi_tags=TAGS,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.freeze_gc = freeze_gc
    app.state.clock = clock
    include_routers(app, settings)
    install_error_handlers(app)  # innermost: its 500s pass through CORS
    app.add_exception_handler(IntegrityError, handle_integrity_error)
    conversation_bytes = max(settings.max_request_body_bytes, CONVERSATION_BODY_BYTES)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_request_body_bytes,
        larger={
            # The browser's upload of a file's bytes, checked again by the route itself.
            ("PUT", "/api/files/"): settings.upload_max_bytes,
            # The chats and bring-your-own-key clients send the whole conversation with every
            # message and never trim it.
            ("POST", "/chat"): conversation_bytes,
            ("POST", "/api/chat"): conversation_bytes,
        },
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=True,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )
    app.state.in_flight = InFlight()
    app.add_middleware(RequestContextMiddleware, in_flight=app.state.in_flight)
    return app


def _log_products(chains: Mapping[str, ModelChain | ImageChain]) -> None:
    for product, chain in chains.items():
        offline = chain.primary.provider.name == "offline"
        logger.log(
            logging.WARNING if offline and chain.configured != chain.label else logging.INFO,
            "%s runs on %s%s",
            product,
            chain.label,
            " (offline: no credentials for the configured providers)" if offline else "",
            extra={"product": product, "chain": chain.label, "configured": chain.configured},
        )


def _log_byok(settings: Settings) -> None:
    if not settings.byok_enabled:
        logger.info("byok is switched off (BYOK_ENABLED=false)", extra={"product": "byok"})
        return
    upstream = settings.byok_base_url or "OpenAI's API"
    # OPENAI_BASE_URL is for the server's own key: callers' keys do not follow it.
    aside = " (OPENAI_BASE_URL does not apply to it)" if settings.openai_base_url else ""
    logger.info(
        "byok relays callers' own keys to %s%s",
        upstream,
        aside,
        extra={"product": "byok", "upstream": upstream},
    )


def create_app_from_environment() -> FastAPI:
    """The app as `aihub serve --workers N` starts it in each worker process."""
    from aihub.core.config import load_settings
    from aihub.core.logging import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings, freeze_gc=True)


async def _remove_orphan_uploads(app: FastAPI) -> None:
    """Uploads no message used within `UPLOAD_ORPHAN_HOURS` are removed (checked hourly)."""
    settings: Settings = app.state.settings
    while True:
        try:
            older_than = app.state.clock() - timedelta(hours=settings.upload_orphan_hours)
            removed = await remove_orphans(
                app.state.sessions, app.state.storage, older_than=older_than
            )
            if removed:
                logger.info("removed %d uploads no message used", removed)
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("could not remove unused uploads: %s", type(exc).__name__)
        await asyncio.sleep(3600)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    await anyio.Path(settings.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = create_engine(
        settings.resolved_database_url,
        pool_size=settings.database_pool_size,
        echo=settings.database_echo,
    )
    # Off the loop: building the SDK clients reads CA bundles from disk.
    providers = await asyncio.to_thread(ProviderRegistry, settings)
    app.state.engine = engine
    app.state.sessions = create_sessionmaker(engine)
    app.state.providers = providers
    app.state.chains = {
        "ideas": providers.text_chain(settings.ideas_model),
        "challenges": providers.text_chain(settings.challenges_model),
        "chats": providers.text_chain(settings.chat_model),
    }
    app.state.chat_summary_chain = (
        providers.text_chain(settings.chat_summary_model)
        if settings.chat_summary_model
        else app.state.chains["chats"]
    )
    app.state.chat_system_prompt = await asyncio.to_thread(load_system_prompt, settings)
    app.state.chat_summaries = Summaries()
    app.state.chat_replying = Replying()
    app.state.ideas = Ideas.of(
        settings,
        sessions=app.state.sessions,
        chain=app.state.chains["ideas"],
        clock=app.state.clock,
    )
    app.state.image_chain = providers.image_chain(settings.images_model)
    _log_products({**app.state.chains, "images": app.state.image_chain})
    if settings.chat_summary_model:
        _log_products({"chats (summaries)": app.state.chat_summary_chain})
    _log_byok(settings)
    app.state.authenticator = await Authenticator.create(settings)
    app.state.storage = create_storage(settings)
    app.state.url_signer = UrlSigner(
        settings.storage_signing_key.get_secret_value().encode()
        if settings.storage_signing_key
        else app.state.authenticator.issuer.derive_key("signed-urls")
    )
    app.state.notifier = notifier = create_notifier(settings.resolved_database_url)
    await notifier.start()
    worker: ImageWorker | None = None
    if settings.images_worker:
        worker = ImageWorker(
            sessions=app.state.sessions,
            notifier=notifier,
            chain=app.state.image_chain,
            storage=app.state.storage,
            options=WorkerSettings.of(settings),
            clock=app.state.clock,
        )
        worker.start()
    app.state.image_worker = worker
    janitor = asyncio.create_task(_remove_orphan_uploads(app), name="aihub-orphan-uploads")
    app.state.trusted_proxies = parse_networks(settings.trusted_proxies)
    app.state.rate_limiter = (
        RedisRateLimiter.from_url(settings.redis_url) if settings.redis_url else MemoryRateLimiter()
    )
    gc_pauses = metrics.GCPauses()
    if app.state.freeze_gc:
        gc.collect()
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, GC_FULL_PASS_AFTER)
        gc_pauses.install()
    try:
        yield
    finally:
        gc_pauses.remove()
        # Requests the server cancelled on its way out are still storing what they had.
        if unfinished := await app.state.in_flight.drained(SHUTDOWN_CLEAN_UP_SECONDS):
            logger.warning("stopping with %d requests still cleaning up", unfinished)
        janitor.cancel()
        await app.state.chat_summaries.aclose()
        if worker is not None:
            await worker.stop()
        await notifier.aclose()
        await app.state.storage.aclose()
        await app.state.rate_limiter.aclose()
        await app.state.authenticator.aclose()
        await providers.aclose()
        await app.state.sessions.aclose()
        await engine.dispose()
        await asyncio.to_thread(flush_logs)
