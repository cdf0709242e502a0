"""From `provider:model[,provider:model...]` settings to adapters, with fallback.

A chain is tried in order until one provider has produced its first output; after that the
stream belongs to that provider (a stream cannot switch models half-way through an answer).
Providers with no credentials are left out of a chain; a chain left empty runs on `offline`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request

from aihub.core import metrics
from aihub.core.config import Settings, parse_model_chain
from aihub.providers.base import (
    Accepted,
    Finish,
    GeneratedImage,
    ImageProvider,
    ImageRequest,
    ProviderError,
    TextDelta,
    TextEvent,
    TextProvider,
    TextRequest,
)
from aihub.providers.offline import OfflineProvider

if TYPE_CHECKING:
    from aihub.providers.openai import OpenAIProvider

logger = logging.getLogger("aihub.providers")

OFFLINE_MODEL = "offline"


@dataclass(frozen=True, slots=True)
class Candidate:
    provider: TextProvider
    model: str

    @property
    def label(self) -> str:
        return f"{self.provider.name}:{self.model}"


@dataclass(frozen=True, slots=True)
class FailedAttempt:
    """A candidate of a chain that failed before its first output (for the usage ledger)."""

    provider: str
    model: str
    error: str
    latency_ms: int

    @classmethod
    def record(cls, provider: str, model: str, exc: ProviderError, started: float) -> FailedAttempt:
        """Count and log a candidate's failure (`started`: its `perf_counter()` start)."""
        metrics.provider_requests.labels(provider, "failed").inc()
        metrics.provider_errors.labels(provider, exc.code).inc()
        logger.warning(
            "provider failed",
            extra={"provider": f"{provider}:{model}", "error": exc.code, "detail": exc.detail},
        )
        latency_ms = round((time.perf_counter() - started) * 1000)
        return cls(provider, model, exc.code, latency_ms)


class OpenedStream:
    """A provider stream that has already produced its first output.

    Iterate it for every event (those read while opening come first); `aclose()` closes the
    upstream request. `failed` lists the candidates tried before this one.
    """

    def __init__(
        self, candidate: Candidate, head: list[TextEvent], rest: AsyncGenerator[TextEvent, None]
    ) -> None:
        self.provider = candidate.provider.name
        self.model = candidate.model
        self.failed: list[FailedAttempt] = []
        self._head = head
        self._rest = rest

    def __aiter__(self) -> OpenedStream:
        return self

    async def __anext__(self) -> TextEvent:
        # A plain iterator, not a generator: one less frame on every event of every stream.
        if self._head:
            return self._head.pop(0)
        try:
            return await anext(self._rest)
        except ProviderError as exc:
            metrics.provider_errors.labels(self.provider, exc.code).inc()
            logger.warning(
                "provider failed mid-stream",
                extra={
                    "provider": f"{self.provider}:{self.model}",
                    "error": exc.code,
                    "detail": exc.detail,
                },
            )
            raise

    async def aclose(self) -> None:
        await self._rest.aclose()


@dataclass(frozen=True, slots=True)
class ModelChain:
    candidates: tuple[Candidate, ...]
    configured: str
    """The setting it was built from (it names providers that may have been left out)."""

    @property
    def label(self) -> str:
        return ",".join(c.label for c in self.candidates)

    @property
    def primary(self) -> Candidate:
        return self.candidates[0]

    async def open_stream(
        self, request: TextRequest, *, until: Literal["output", "accepted"] = "output"
    ) -> OpenedStream:
        """Open the first candidate that answers; raise the last error if none does (its
        `attempts` list every candidate that failed).

        A candidate has answered once it has produced its first output, or with
        `until="accepted"` once it has taken the request (when its adapter can tell): a stream
        that must start its response before a reasoning model's long silence, and that can
        therefore no longer fall back (its first byte is out)."""
        failed: list[FailedAttempt] = []
        for candidate in self.candidates:
            started = time.perf_counter()
            try:
                opened = await _open(candidate, request, until)
            except ProviderError as exc:
                failed.append(
                    FailedAttempt.record(candidate.provider.name, candidate.model, exc, started)
                )
                if not exc.fallback or candidate is self.candidates[-1]:
                    exc.attempts = failed
                    raise
            else:
                metrics.provider_requests.labels(candidate.provider.name, "opened").inc()
                opened.failed = failed
                return opened
        raise AssertionError("a chain has at least one candidate")


async def _open(
    candidate: Candidate, request: TextRequest, until: Literal["output", "accepted"]
) -> OpenedStream:
    events = candidate.provider.stream_text(request, model=candidate.model)
    assert isinstance(events, AsyncGenerator)
    head: list[TextEvent] = []
    try:
        async for event in events:
            if isinstance(event, Accepted):
                if until == "accepted":
                    break
                continue
            head.append(event)
            if isinstance(event, TextDelta | Finish):
                break
    except BaseException:
        await events.aclose()
        raise
    return OpenedStream(candidate, head, events)


@dataclass(frozen=True, slots=True)
class ImageCandidate:
    provider: ImageProvider
    model: str

    @property
    def label(self) -> str:
        return f"{self.provider.name}:{self.model}"


@dataclass(frozen=True, slots=True)
class ImageResult:
    image: GeneratedImage
    provider: str
    model: str
    latency_ms: int
    failed: list[FailedAttempt]
    """The candidates tried before this one."""


@dataclass(frozen=True, slots=True)
class ImageChain:
    """Image models tried in order until one returns an image."""

    candidates: tuple[ImageCandidate, ...]
    configured: str

    @property
    def label(self) -> str:
        return ",".join(c.label for c in self.candidates)

    @property
    def primary(self) -> ImageCandidate:
        return self.candidates[0]

    async def generate(self, request: ImageRequest) -> ImageResult:
        """The first candidate's image; the last error if none gives one (its `attempts` list
        every candidate that failed)."""
        failed: list[FailedAttempt] = []
        for candidate in self.candidates:
            name = candidate.provider.name
            started = time.perf_counter()
            try:
                image = await candidate.provider.generate_image(request, model=candidate.model)
            except ProviderError as exc:
                failed.append(FailedAttempt.record(name, candidate.model, exc, started))
                if not exc.fallback or candidate is self.candidates[-1]:
                    exc.attempts = failed
                    raise
            else:
                metrics.provider_requests.labels(name, "opened").inc()
                latency_ms = round((time.perf_counter() - started) * 1000)
                return ImageResult(image, name, candidate.model, latency_ms, failed)
        raise AssertionError("a chain has at least one candidate")


def text_chain(product: str) -> Callable[[Request], Awaitable[ModelChain]]:
    """A dependency giving `product`'s model chain (built once, in the lifespan)."""

    async def dependency(request: Request) -> ModelChain:
        chain: ModelChain = request.app.state.chains[product]
        return chain

    return dependency


class ProviderRegistry:
    """One long-lived adapter per configured provider, built in the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.offline = OfflineProvider(token_delay=settings.offline_token_delay_ms / 1000)
        self.text: dict[str, TextProvider] = {"offline": self.offline}
        self.image: dict[str, ImageProvider] = {"offline": self.offline}
        common: dict[str, Any] = {
            "timeout": settings.provider_timeout_seconds,
            "max_retries": settings.provider_max_retries,
        }
        if settings.openai_api_key:
            from aihub.providers.openai import OpenAIProvider

            self.text["openai"] = OpenAIProvider(
                api_key=settings.openai_api_key.get_secret_value(),
                base_url=settings.openai_base_url,
                **common,
            )
        self.byok: OpenAIProvider | None = None
        """Bring-your-own-key chat: `BYOK_BASE_URL` (OpenAI's API unless set) with each caller's
        key, never the server's; None when `BYOK_ENABLED` is off."""
        if settings.byok_enabled:
            from aihub.providers.openai import OPENAI_API_URL, OpenAIProvider

            self.byok = OpenAIProvider(
                api_key="unused-every-request-brings-its-own-key",
                base_url=settings.byok_base_url or OPENAI_API_URL,
                **common,
            )
        if settings.gemini_api_key:
            from aihub.providers.gemini import GeminiProvider

            self.text["gemini"] = GeminiProvider(
                api_key=settings.gemini_api_key.get_secret_value(),
                base_url=settings.gemini_base_url,
                **common,
            )
        if settings.replicate_api_token:
            from aihub.providers.replicate import ReplicateProvider

            self.image["replicate"] = ReplicateProvider(
                api_key=settings.replicate_api_token.get_secret_value(),
                base_url=settings.replicate_base_url,
                **common,
            )

    def text_chain(self, spec: str) -> ModelChain:
        candidates = tuple(
            Candidate(self.text[provider], model)
            for provider, model in parse_model_chain(spec)
            if provider in self.text
        )
        return ModelChain(candidates or (Candidate(self.offline, OFFLINE_MODEL),), spec)

    def image_chain(self, spec: str) -> ImageChain:
        candidates = tuple(
            ImageCandidate(self.image[provider], model)
            for provider, model in parse_model_chain(spec)
            if provider in self.image
        )
        return ImageChain(candidates or (ImageCandidate(self.offline, OFFLINE_MODEL),), spec)

    async def aclose(self) -> None:
        providers: list[TextProvider | ImageProvider] = [*self.text.values()]
        if self.byok is not None:
            providers.append(self.byok)
        providers += [p for p in self.image.values() if p not in providers]
        for provider in providers:
            await provider.aclose()
