"""Replicate image models through the official client (which runs on httpx).

A prediction is created with `Prefer: wait=N` (Replicate holds the request up to N seconds, so a
fast model answers in one round trip), polled if it is still running when that answer comes
back, and its output file is fetched. Cancelling `generate_image` (a deadline, a shutdown, a
client gone away) cancels the prediction upstream too, so nobody pays for an orphan: also while
the creating request is still held, in which case the request is let finish in the background
(at most N seconds) to learn the prediction's id, and the prediction is cancelled then.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from typing import Any

import httpx
from replicate.client import Client, RetryTransport
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput
from replicate.prediction import Prediction

from aihub.providers.base import (
    GeneratedImage,
    ImageProvider,
    ImageRequest,
    NoCookies,
    ProviderError,
    ProviderUnavailable,
    error_for_status,
    parse_retry_after,
)

logger = logging.getLogger("aihub.providers.replicate")

_TERMINAL = frozenset({"succeeded", "failed", "canceled"})

# Replicate's errors do not keep the response, so a response hook notes the Retry-After of the
# latest response of the current call here (the context is the calling task's own).
_last_retry_after: ContextVar[list[str | None] | None] = ContextVar(
    "aihub_replicate_retry_after", default=None
)


class ReplicateProvider(ImageProvider):
    name = "replicate"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        poll_interval: float = 0.5,
        deadline: float = 300.0,
        hold_seconds: int = 1,
    ) -> None:
        self._client = Client(
            api_token=api_key,
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            cookies=NoCookies(),  # one client serves every user (see `NoCookies`)
            event_hooks={"response": [_note_retry_after]},
        )
        self._client.poll_interval = poll_interval
        self._http = self._client._async_client
        # The client retries throttled GETs (polls, files) up to 10 times; honour max_retries.
        if isinstance(self._http._transport, RetryTransport):
            self._http._transport.max_attempts = max_retries + 1
        self._deadline = deadline
        self._hold = hold_seconds
        self._orphans: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"ReplicateProvider(base_url={str(self._http.base_url)!r})"

    async def aclose(self) -> None:
        if self._orphans:
            await asyncio.wait(self._orphans, timeout=self._hold + 5)
        await self._http.aclose()

    async def generate_image(self, request: ImageRequest, *, model: str) -> GeneratedImage:
        noted: list[str | None] = [None]
        token = _last_retry_after.set(noted)
        try:
            async with asyncio.timeout(self._deadline):
                return await self._generate(request, model=model)
        except ReplicateError as exc:
            raise _status_error(exc.status, exc.detail or exc.title, noted[0]) from exc
        except httpx.HTTPStatusError as exc:
            # The output file, not the model: a 404 here is a file gone, not an unknown model.
            status = exc.response.status_code
            kind = ProviderUnavailable if status >= 500 or status in (408, 429) else ProviderError
            raise kind(
                f"Replicate's output file could not be fetched ({status})",
                provider=self.name,
                upstream_status=status,
                retry_after=parse_retry_after(exc.response.headers.get("retry-after")),
                detail=exc.response.reason_phrase,
            ) from exc
        except (httpx.TransportError, TimeoutError) as exc:
            raise ProviderUnavailable(
                f"Replicate did not answer in time or the connection failed: {type(exc).__name__}",
                provider=self.name,
            ) from exc
        finally:
            _last_retry_after.reset(token)

    async def _generate(self, request: ImageRequest, *, model: str) -> GeneratedImage:
        creating = asyncio.ensure_future(self._create(request, model=model))
        try:
            prediction = await asyncio.shield(creating)
        except asyncio.CancelledError:
            orphan = asyncio.create_task(self._cancel_once_created(creating))
            self._orphans.add(orphan)
            orphan.add_done_callback(self._orphans.discard)
            raise
        try:
            if prediction.status not in _TERMINAL:
                await prediction.async_wait()
        except asyncio.CancelledError:
            await self._cancel(prediction)
            raise
        if prediction.status != "succeeded":
            detail = str(prediction.error or "no detail")[:500]
            raise ProviderError(
                f"Replicate prediction {prediction.status}: {detail}", provider=self.name
            )
        url = _output_url(prediction.output)
        data = await FileOutput(url, self._client).aread()
        if (mime_type := _sniff_image_type(data)) is None:
            # An error page, or a model whose output is something else: never stored or
            # served as the image it is not.
            raise ProviderError(
                "Replicate's output is not an image",
                provider=self.name,
                detail=f"{len(data)} bytes from {url}, starting {data[:16]!r}",
            )
        return GeneratedImage(url, data, mime_type, extra={"prediction_id": prediction.id})

    async def _create(self, request: ImageRequest, *, model: str) -> Prediction:
        model_input: dict[str, Any] = {
            "prompt": request.prompt,
            "num_outputs": 1,
            "aspect_ratio": request.aspect_ratio,
            "output_format": request.output_format,
        }
        if request.seed is not None:
            model_input["seed"] = request.seed
        name, _, version = model.partition(":")
        if version:
            return await self._client.predictions.async_create(
                version=version, input=model_input, wait=self._hold
            )
        return await self._client.models.predictions.async_create(
            model=name, input=model_input, wait=self._hold
        )

    async def _cancel_once_created(self, creating: asyncio.Future[Prediction]) -> None:
        try:
            async with asyncio.timeout(self._hold + 10):
                prediction = await creating
        except (ReplicateError, httpx.HTTPError, TimeoutError, asyncio.CancelledError):
            return
        if prediction.status not in _TERMINAL:
            await self._cancel(prediction)

    async def _cancel(self, prediction: Prediction) -> None:
        try:
            async with asyncio.timeout(5):
                await self._client.predictions.async_cancel(prediction.id)
        except (ReplicateError, httpx.HTTPError, TimeoutError) as exc:
            logger.warning("could not cancel prediction %s: %s", prediction.id, type(exc).__name__)


async def _note_retry_after(response: httpx.Response) -> None:
    noted = _last_retry_after.get()
    if noted is not None:
        noted[0] = response.headers.get("retry-after")


def _status_error(status: int | None, detail: str | None, retry_after: str | None) -> ProviderError:
    return error_for_status(
        status or 502,
        provider=ReplicateProvider.name,
        label="Replicate",
        detail=detail,
        retry_after=parse_retry_after(retry_after),
    )


def _output_url(output: Any) -> str:
    if isinstance(output, list) and output:
        output = output[0]
    if isinstance(output, str) and output:
        return output
    raise ProviderError(
        "Replicate's prediction succeeded without an output file", provider=ReplicateProvider.name
    )


def _sniff_image_type(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
