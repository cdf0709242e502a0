"""A loopback fake of Replicate's HTTP API (predictions), in its documented wire format.

It answers `POST /v1/models/{owner}/{name}/predictions` (honouring `Prefer: wait`),
`POST /v1/predictions`, `GET /v1/predictions/{id}` and `POST /v1/predictions/{id}/cancel`, and
serves each prediction's output, a real PNG, from its own `/files/...` URL. `replicate.Client`
works against it unmodified with `base_url=fake.base_url`.

Standalone, for benchmarks::

    uv run python -m tests.fakes.replicate --port 9102 --delay-ms 800
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pytest_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.openai import ReceivedRequest, ScriptedError, record
from tests.fakes.server import SetsCookies, serve, serve_forever

Outcome = Literal["succeeded", "failed", "canceled"]


def make_png(width: int = 64, height: int = 64, rgb: tuple[int, int, int] = (40, 90, 160)) -> bytes:
    """A valid, solid-colour RGB PNG."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


@dataclass(slots=True)
class FakePrediction:
    id: str
    model: str
    input: dict[str, Any]
    created: float
    delay: float
    outcome: Outcome
    error: str | None
    canceled: bool = False
    ready: bool = False
    """Set once a `Prefer: wait` hold has covered the whole delay (timers may wake early)."""

    def status(self) -> str:
        if self.canceled:
            return "canceled"
        if not self.ready and time.monotonic() - self.created < self.delay:
            return "processing"
        return self.outcome

    def as_json(self, base_url: str) -> dict[str, Any]:
        status = self.status()
        output = None
        if status == "succeeded":
            output = [f"{base_url}/files/{self.id}/out-0.png"]
        terminal = status in ("succeeded", "failed", "canceled")
        return {
            "id": self.id,
            "model": self.model,
            "version": "hidden",
            "input": self.input,
            "logs": "",
            "output": output,
            "data_removed": False,
            "error": self.error if status == "failed" else None,
            "status": status,
            "created_at": _iso(self.created),
            "started_at": _iso(self.created),
            "completed_at": _iso(self.created + self.delay) if terminal else None,
            "metrics": {"predict_time": self.delay} if terminal else {},
            "urls": {
                "get": f"{base_url}/v1/predictions/{self.id}",
                "cancel": f"{base_url}/v1/predictions/{self.id}/cancel",
                "web": f"https://replicate.com/p/{self.id}",
            },
        }


class FakeReplicate:
    """Scriptable fake of Replicate predictions. Call `reset()` to restore the defaults."""

    def __init__(self) -> None:
        self.base_url = ""
        """`http://127.0.0.1:PORT` once served: what `replicate.Client(base_url=...)` expects."""
        self.app = SetsCookies(
            Starlette(
                routes=[
                    Route("/v1/models/{owner}/{name}/predictions", self._create, methods=["POST"]),
                    Route("/v1/predictions", self._create, methods=["POST"]),
                    Route("/v1/predictions/{id}", self._get, methods=["GET"]),
                    Route("/v1/predictions/{id}/cancel", self._cancel, methods=["POST"]),
                    Route("/files/{id}/{filename}", self._file, methods=["GET"]),
                ]
            ),
            lambda: self.set_cookie,
        )
        self.reset()

    # --- scripting ------------------------------------------------------------------------------

    def reset(self) -> None:
        self.set_cookie: str | None = None
        """A `Set-Cookie` for every response (as a load balancer in front of the API sends)."""
        self.image_delay = 0.0
        """Seconds from creation until a prediction ends."""
        self.prefer_wait_max = 60.0
        """How long a `Prefer: wait` request is held before answering "processing"."""
        self.outcome: Outcome = "succeeded"
        self.prediction_error = "The fake model failed."
        self.png = make_png()
        self.require_api_token: str | None = None
        self.error: ScriptedError | None = None
        """Scripted HTTP error for prediction creation."""
        self.poll_error: ScriptedError | None = None
        """Scripted HTTP error for `GET /v1/predictions/{id}`."""
        self.file_error: ScriptedError | None = None
        """Scripted HTTP error for output files."""
        self.requests: list[ReceivedRequest] = []
        self.predictions: dict[str, FakePrediction] = {}
        self.polls = 0
        self.file_downloads = 0
        self.cancellations = 0

    def fail_with(
        self,
        status: int,
        body: Any = None,
        *,
        retry_after: int | str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer the next `times` prediction creations (all when None) with this HTTP error."""
        self.error = _scripted(status, body, retry_after, times)

    def fail_polls_with(self, status: int, *, times: int | None = None) -> None:
        self.poll_error = _scripted(status, None, None, times)

    def fail_files_with(self, status: int, *, times: int | None = None) -> None:
        self.file_error = _scripted(status, None, None, times)

    def fail_predictions(self, error: str = "The fake model failed.") -> None:
        """Predictions end "failed" with this error text."""
        self.outcome = "failed"
        self.prediction_error = error

    # --- records --------------------------------------------------------------------------------

    @property
    def last_request(self) -> ReceivedRequest:
        return self.requests[-1]

    @property
    def created(self) -> list[ReceivedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/predictions")]

    # --- HTTP -----------------------------------------------------------------------------------

    async def _create(self, request: Request) -> Response:
        received = await record(request)
        self.requests.append(received)
        if self.require_api_token is not None:
            auth = received.headers.get("authorization", "")
            if auth != f"Bearer {self.require_api_token}":
                return JSONResponse(
                    _problem(401, "You did not pass a valid authentication token"), 401
                )
        if self.error is not None and self.error.take():
            return self.error.response()
        body = received.json or {}
        if not isinstance(body.get("input"), dict) or not body["input"].get("prompt"):
            return JSONResponse(_problem(422, "input: prompt is required"), 422)
        owner, name = request.path_params.get("owner"), request.path_params.get("name")
        model = f"{owner}/{name}" if owner else str(body.get("version", "unknown"))
        prediction = FakePrediction(
            id=uuid.uuid4().hex[:26],
            model=model,
            input=body["input"],
            created=time.monotonic(),
            delay=self.image_delay,
            outcome=self.outcome,
            error=self.prediction_error,
        )
        self.predictions[prediction.id] = prediction
        if received.headers.get("prefer", "").startswith("wait"):
            await self._hold(prediction, received.headers["prefer"])
        return JSONResponse(prediction.as_json(self.base_url), 201)

    async def _hold(self, prediction: FakePrediction, prefer: str) -> None:
        _, _, seconds = prefer.partition("=")
        limit = min(float(seconds), self.prefer_wait_max) if seconds else self.prefer_wait_max
        remaining = prediction.delay - (time.monotonic() - prediction.created)
        if remaining > 0:
            await asyncio.sleep(min(remaining, limit))
        prediction.ready = remaining <= limit

    async def _get(self, request: Request) -> Response:
        self.requests.append(await record(request))
        self.polls += 1
        if self.poll_error is not None and self.poll_error.take():
            return self.poll_error.response()
        prediction = self.predictions.get(request.path_params["id"])
        if prediction is None:
            return JSONResponse(_problem(404, "Prediction not found"), 404)
        return JSONResponse(prediction.as_json(self.base_url))

    async def _cancel(self, request: Request) -> Response:
        self.requests.append(await record(request))
        prediction = self.predictions.get(request.path_params["id"])
        if prediction is None:
            return JSONResponse(_problem(404, "Prediction not found"), 404)
        if prediction.status() == "processing":
            prediction.canceled = True
            self.cancellations += 1
        return JSONResponse(prediction.as_json(self.base_url))

    async def _file(self, request: Request) -> Response:
        self.requests.append(await record(request))
        if self.file_error is not None and self.file_error.take():
            return self.file_error.response()
        prediction = self.predictions.get(request.path_params["id"])
        if prediction is None or prediction.status() != "succeeded":
            return Response(b"not found", 404)
        self.file_downloads += 1
        return Response(self.png, media_type="image/png")


_TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    402: "Insufficient credit",
    403: "Forbidden",
    404: "Not found",
    422: "Input validation failed",
    429: "Request was throttled",
}


def _problem(status: int, detail: str) -> dict[str, Any]:
    return {"title": _TITLES.get(status, "Server error"), "detail": detail, "status": status}


def _scripted(
    status: int, body: Any, retry_after: int | str | None, times: int | None
) -> ScriptedError:
    if body is None:
        body = _problem(status, f"The fake answered {status}.")
    after = None if retry_after is None else str(retry_after)
    return ScriptedError(status, body, after, times)


def _iso(monotonic: float) -> str:
    wall = time.time() - (time.monotonic() - monotonic)
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


# --- pytest fixtures ----------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def fake_replicate_server() -> AsyncIterator[FakeReplicate]:
    """One fake served for the whole test session."""
    fake = FakeReplicate()
    async with serve(fake.app) as url:
        fake.base_url = url
        yield fake


@pytest_asyncio.fixture(loop_scope="session")
async def fake_replicate(fake_replicate_server: FakeReplicate) -> FakeReplicate:
    """The session's fake, reset to its defaults for this test."""
    fake_replicate_server.reset()
    return fake_replicate_server


# --- standalone ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake Replicate API on a loopback port.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9102)
    parser.add_argument("--delay-ms", type=float, default=800.0, help="time to make one image")
    args = parser.parse_args()
    fake = FakeReplicate()
    fake.base_url = f"http://{args.host}:{args.port}"
    fake.image_delay = args.delay_ms / 1000
    serve_forever(fake.app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
