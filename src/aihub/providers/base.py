"""The provider interface: one event model, one small abstract class per capability.

Products talk to this module (through `routing`), never to an SDK. Adapters turn each SDK's stream
into `TextEvent`s and each SDK's errors into `ProviderError`s at the boundary. A stream is an async
generator: closing it (`aclose()`) closes the upstream request, so a client that goes away stops
the spend.
"""

from __future__ import annotations

import http.cookiejar
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Literal

from aihub.core.errors import AppError
from aihub.core.logging import redact


class NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing, for the providers' shared HTTP clients.

    One client serves every user (and, with bring-your-own-key, every caller's key): a cookie
    that one answer sets (a load balancer's, a proxy's session) must not ride along on anybody
    else's request. httpx, httpx2 and the SDKs built on them keep cookies by default."""

    def __init__(self) -> None:
        super().__init__(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


# --- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class MediaPart:
    """Inline bytes (an uploaded image, a PDF, ...)."""

    data: bytes
    mime_type: str


@dataclass(frozen=True, slots=True)
class FileRefPart:
    """A file the provider already holds (for example one uploaded through Gemini's file API)."""

    uri: str
    mime_type: str


Part = TextPart | MediaPart | FileRefPart
Role = Literal["user", "assistant"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    @classmethod
    def user(cls, text: str) -> Message:
        return cls("user", (TextPart(text),))

    @classmethod
    def assistant(cls, text: str) -> Message:
        return cls("assistant", (TextPart(text),))


@dataclass(frozen=True, slots=True)
class TextRequest:
    messages: tuple[Message, ...]
    system: str | None = None
    temperature: float | None = None
    max_output_tokens: int | None = None
    json_schema: dict[str, Any] | None = None
    """When set, the model must answer with one JSON object of this (JSON Schema) shape."""
    grounding: bool = False
    """Let the model search the web (Gemini's Google Search grounding); sources come back as
    `Citation` events."""


@dataclass(frozen=True, slots=True)
class ImageRequest:
    prompt: str
    aspect_ratio: str = "1:1"
    output_format: Literal["png", "webp", "jpg"] = "png"
    seed: int | None = None


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """The provider took the request (a success status came back): its output follows, maybe
    only after a long silence (a reasoning model thinks first). Adapters that know it before
    the first output say so; `ModelChain.open_stream(until="accepted")` returns on it."""


@dataclass(slots=True)
class TextDelta:
    """Not frozen (nothing changes one): one is built for every chunk of every stream, and a
    frozen dataclass costs three times as much to build."""

    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Citation:
    url: str
    title: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str = "stop"
    """Normalised: "stop", "length", "content_filter", or the provider's own word."""


TextEvent = Accepted | TextDelta | Usage | Citation | Finish


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    url: str | None
    """The provider's own URL (it may expire), or None when only bytes exist."""
    data: bytes
    mime_type: str
    extra: dict[str, Any] = field(default_factory=dict)


# --- errors -----------------------------------------------------------------------------------


class ProviderError(AppError):
    """A provider failed. `retryable` errors may succeed on retry or on the next provider.

    `message` is what the client is told; `detail`, the provider's own words, goes to the logs
    only. With the server's key, those words describe the operator's account (an OpenAI rate
    limit names the organisation, a 404 which models the key may use): an adapter passes them
    on in `message` only where they are about the caller's request (a refused prompt) or the
    caller's own key."""

    status_code = 502
    code = "provider_error"
    default_message = "The model provider failed"
    retryable: ClassVar[bool] = False
    fallback: ClassVar[bool] = True
    """Whether the next provider of a fallback chain should be tried."""

    def __init__(
        self,
        message: str | None = None,
        *,
        provider: str = "",
        upstream_status: int | None = None,
        retry_after: int | None = None,
        detail: str | None = None,
    ) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        # Upstream messages can echo a credential back: scrub whatever an adapter passes on.
        super().__init__(redact(message) if message else None, headers=headers)
        self.detail = redact(detail) if detail else None
        self.provider = provider
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        self.attempts: list[Any] = []
        """Set by a fallback chain: every candidate that failed (`routing.FailedAttempt`)."""


class ProviderUnavailable(ProviderError):
    """Timeouts, connection failures and 5xx answers."""

    status_code = 503
    code = "provider_unavailable"
    default_message = "The model provider is unavailable; try again shortly"
    retryable = True


class ProviderRateLimited(ProviderError):
    status_code = 429
    code = "provider_rate_limited"
    default_message = "The model provider is rate limiting requests; try again shortly"
    retryable = True


class ProviderAuthError(ProviderError):
    """The provider refused the credentials (a server key, or a caller's own key)."""

    code = "provider_auth_failed"
    default_message = "The model provider rejected the API key"


class ProviderNotFound(ProviderError):
    code = "provider_model_not_found"
    default_message = "The model provider does not know this model"


class ProviderBadRequest(ProviderError):
    """The request itself was refused (too long, unsupported content, blocked by a filter):
    the caller's to change, so a 422 rather than a 502."""

    status_code = 422
    code = "provider_bad_request"
    default_message = "The model provider refused the request"
    fallback = False


class ProviderEmptyAnswer(ProviderError):
    code = "provider_empty_answer"
    default_message = "The model answered with no text; try again"
    retryable = True


class ProviderContentFiltered(ProviderError):
    status_code = 422
    code = "provider_content_filtered"
    default_message = "The provider's content filter stopped the answer"
    fallback = False


def unusable_answer(text: str, finish_reason: str | None, *, provider: str) -> ProviderError | None:
    """What is wrong with a whole answer that a product must not pass off as one: stopped by
    the provider's content filter, or nothing but whitespace."""
    if finish_reason == "content_filter":
        return ProviderContentFiltered(provider=provider)
    if not text.strip():
        return ProviderEmptyAnswer(provider=provider)
    return None


_STATUS_ERRORS: dict[int, type[ProviderError]] = {
    400: ProviderBadRequest,
    401: ProviderAuthError,
    403: ProviderAuthError,
    404: ProviderNotFound,
    408: ProviderUnavailable,
    413: ProviderBadRequest,
    422: ProviderBadRequest,
    429: ProviderRateLimited,
}


def error_for_status(
    status: int,
    *,
    provider: str,
    label: str,
    detail: str | None,
    retry_after: int | None = None,
    kind: type[ProviderError] | None = None,
    callers_key: bool = False,
) -> ProviderError:
    """The aihub error for an upstream HTTP status; `kind` overrides the class the status
    implies. The provider's words (`detail`) reach the client when they are about the request
    itself (`ProviderBadRequest`: a refused prompt is the caller's to change) or about the
    caller's own key (`callers_key`), never when they may quote a key (authentication); the logs
    always have them (`ProviderError.detail`)."""
    if kind is None:
        kind = ProviderUnavailable if status >= 500 else _STATUS_ERRORS.get(status, ProviderError)
    words = (detail or "no detail")[:500]
    if kind is ProviderAuthError:
        message = f"{label} rejected the API key ({status})"
    elif callers_key or issubclass(kind, ProviderBadRequest):
        message = f"{label} answered {status}: {words}"
    else:
        message = f"{kind.default_message} ({label} answered {status})"
    wait = retry_after if status in (429, 503) else None
    return kind(message, provider=provider, upstream_status=status, retry_after=wait, detail=words)


def parse_retry_after(value: str | None) -> int | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    value = (value or "").strip()
    if not value:
        return None
    if value.isdigit():
        return int(value)
    try:
        return max(0, round(parsedate_to_datetime(value).timestamp() - time.time()))
    except (TypeError, ValueError):
        return None


# --- capabilities -----------------------------------------------------------------------------


class TextProvider(ABC):
    name: ClassVar[str]

    def accepts(self, mime_type: str) -> bool:
        """Whether the provider can read a file of this type in a message."""
        return True

    @abstractmethod
    def stream_text(self, request: TextRequest, *, model: str) -> AsyncIterator[TextEvent]:
        """Stream the model's answer. Raises `ProviderError` (before or during the stream)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release long-lived clients."""


class ImageProvider(ABC):
    name: ClassVar[str]

    @abstractmethod
    async def generate_image(self, request: ImageRequest, *, model: str) -> GeneratedImage:
        """Generate one image and return its bytes. Raises `ProviderError`."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release long-lived clients."""
