"""A loopback fake of the Gemini API (generativelanguage), in its documented wire format.

It answers `POST /{version}/models/{model}:streamGenerateContent?alt=sse` (server-sent `data:`
events of `GenerateContentResponse` JSON) and `:generateContent`, so the google-genai SDK works
against it unmodified with `HttpOptions(base_url=fake.base_url)`. Grounding sources come back in
`candidates[].groundingMetadata.groundingChunks[].web` when the request asks for the
`googleSearch` tool.

The file API, as `client.aio.files.upload(...)` and `.get(...)` use it:

- `POST /upload/{version}/files` with `X-Goog-Upload-Protocol: resumable`,
  `X-Goog-Upload-Command: start`, `X-Goog-Upload-Header-Content-Length` / `-Content-Type` and a
  JSON body `{"file": {"displayName", "mimeType", "sizeBytes"}}` (the SDK sends the proto names,
  `display_name` ...; both spellings are read) opens an upload session: an empty 200 whose
  `X-Goog-Upload-URL` header is where the bytes go (the same path with
  `?upload_id=...&upload_protocol=resumable`), with `X-Goog-Upload-Status: active`.
- `POST` to that URL with `X-Goog-Upload-Command: upload` (more to come, answered `active` with
  an empty body) or `upload, finalize` (the last chunk), and `X-Goog-Upload-Offset`: the finalize
  is answered `X-Goog-Upload-Status: final` with `{"file": File}`. Every answer of an upload
  request carries `X-Goog-Upload-Status`, errors included (`final`): without it the SDK retries
  the chunk after 1, 2 and 4 seconds.
- `GET /{version}/files/{id}` answers the `File` resource: `name` ("files/{id}"), `displayName`,
  `mimeType`, `sizeBytes` (an int64, so a JSON string), `createTime`, `updateTime`,
  `expirationTime` (48 hours on), `uri` ("{base}/{version}/files/{id}"), `state` (PROCESSING,
  ACTIVE or FAILED, with `error: {code, message}` when FAILED) and `source` ("UPLOADED").
  Not modelled: the `query` upload command (resuming a broken upload), `files.list`, `delete`.

A `fileData` part of a `generateContent` request is recorded as sent (the SDK writes its fields in
snake_case, `file_uri` and `mime_type`: both spellings are read); when its URI names a file of
this fake, the file must exist (403 PERMISSION_DENIED otherwise) and be ACTIVE (400
FAILED_PRECONDITION otherwise), as the real API answers.

Standalone, for benchmarks::

    uv run python -m tests.fakes.gemini --port 9101 --tokens 100 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
import pytest_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.openai import (
    DEFAULT_TEXT,
    FailMode,
    ReceivedRequest,
    ScriptedError,
    StreamStats,
    TrackedStream,
    paced,
    record,
    tokenize,
    tokens_of_length,
)
from tests.fakes.server import SetsCookies, serve, serve_forever

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

FileStage = Literal["start", "upload", "get"]
"""Where a scripted file API error answers: opening the upload, sending bytes, or `files.get`."""


@dataclass(slots=True)
class FakeFile:
    """A file of the fake's file API, from its upload session on."""

    id: str
    display_name: str | None
    mime_type: str
    declared_size: int
    uri: str
    upload_id: str
    created: datetime
    expires: datetime
    data: bytearray = field(default_factory=bytearray)
    finalized: bool = False
    processing_left: int = 0
    """How many more `files.get` answers say PROCESSING."""
    failure: str | None = None
    """When set, the file ends FAILED with this message instead of ACTIVE."""
    gets: int = 0

    @property
    def name(self) -> str:
        return f"files/{self.id}"

    @property
    def state(self) -> str:
        if self.processing_left > 0:
            return "PROCESSING"
        return "FAILED" if self.failure is not None else "ACTIVE"

    def resource(self) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "name": self.name,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": _timestamp(self.created),
            "updateTime": _timestamp(self.created),
            "expirationTime": _timestamp(self.expires),
            "uri": self.uri,
            "state": self.state,
            "source": "UPLOADED",
        }
        if self.display_name is not None:
            resource["displayName"] = self.display_name
        if self.state == "FAILED":
            resource["error"] = {"code": 3, "message": self.failure}
        return resource


class FakeGemini:
    """Scriptable fake of `models/*:streamGenerateContent` and of the file API. Call `reset()`
    to restore defaults."""

    def __init__(self) -> None:
        self.base_url = ""
        """`http://127.0.0.1:PORT` once served: what `HttpOptions(base_url=...)` expects."""
        self.app = SetsCookies(
            Starlette(
                routes=[
                    Route("/{version}/models/{call:path}", self._models, methods=["POST"]),
                    Route("/upload/{version}/files", self._upload, methods=["POST"]),
                    Route("/{version}/files/{file_id}", self._get_file, methods=["GET"]),
                    Route("/{version}/files/{file_id}", self._delete_file, methods=["DELETE"]),
                ]
            ),
            lambda: self.set_cookie,
        )
        self.reset()

    # --- scripting ------------------------------------------------------------------------------

    def reset(self) -> None:
        self.set_cookie: str | None = None
        """A `Set-Cookie` for every response (as a load balancer in front of the API sends)."""
        self.tokens: list[str] = tokenize(DEFAULT_TEXT)
        self.token_delay = 0.0
        """Seconds between two streamed tokens (one token per event)."""
        self.prompt_tokens = 17
        self.completion_tokens: int | None = None
        """None: the number of tokens streamed."""
        self.thoughts_tokens: int | None = None
        self.finish_reason = "STOP"
        self.citations: list[tuple[str, str | None]] = []
        """(uri, title) grounding sources, sent when the request enables `googleSearch`."""
        self.block_reason: str | None = None
        """When set, the prompt is blocked: one event with `promptFeedback`, no candidates."""
        self.require_api_key: str | None = None
        self.error: ScriptedError | None = None
        self.fail_after: int | None = None
        self.fail_mode: FailMode = "error"
        self.requests: list[ReceivedRequest] = []
        self.stats = StreamStats()
        # --- file API
        self.processing_polls = 0
        """How many `files.get` answers of each new file say PROCESSING before its final state
        (and whether the finalize answer says PROCESSING: it does when this is above 0)."""
        self.processing_failure: str | None = None
        """When set, each new file ends FAILED with this message instead of ACTIVE."""
        self.file_ttl = timedelta(hours=48)
        self.upload_origin: str | None = None
        """`scheme://host[:port]` of the upload URLs handed out; None: the fake's own. The real
        API hands out its own host, which a client behind a proxy must rewrite."""
        self.file_errors: dict[FileStage, ScriptedError] = {}
        self.files: dict[str, FakeFile] = {}
        self.deleted_files: list[FakeFile] = []
        """Finalized uploads by name ("files/{id}")."""
        self.file_requests: list[ReceivedRequest] = []
        """Every file API request (upload bodies are bytes: their `json` is None)."""
        self.file_parts: list[dict[str, Any]] = []
        """Every `fileData` part of the `generateContent` requests, as sent."""
        self._sessions: dict[str, FakeFile] = {}

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @text.setter
    def text(self, value: str) -> None:
        self.tokens = tokenize(value)

    def fail_with(
        self,
        status: int,
        body: Any = None,
        *,
        retry_after: int | str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer the next `times` requests (all when None) with this HTTP error.

        With `retry_after`, a 429 also carries Google's `RetryInfo` detail, as the real API does.
        """
        if body is None:
            body = _error_body(status, retry_after=retry_after)
        after = None if retry_after is None else str(retry_after)
        self.error = ScriptedError(status, body, after, times)

    def fail_mid_stream(self, after_tokens: int, *, mode: FailMode = "error") -> None:
        """Stream `after_tokens` tokens, then send an error event or drop the connection."""
        self.fail_after = after_tokens
        self.fail_mode = mode

    def fail_files_with(
        self,
        status: int,
        body: Any = None,
        *,
        at: FileStage,
        retry_after: int | str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer the next `times` file API requests of stage `at` (all when None) with this
        HTTP error. Upload answers still carry `X-Goog-Upload-Status: final`, as Google's do."""
        if body is None:
            body = _error_body(status, retry_after=retry_after)
        after = None if retry_after is None else str(retry_after)
        self.file_errors[at] = ScriptedError(status, body, after, times)

    # --- records --------------------------------------------------------------------------------

    def file_at(self, uri: str) -> FakeFile:
        """The uploaded file this fake issued `uri` for."""
        return next(file for file in self.files.values() if file.uri == uri)

    @property
    def uploads(self) -> int:
        """How many uploads were finalized."""
        return len(self.files)

    @property
    def last_request(self) -> ReceivedRequest:
        return self.requests[-1]

    @property
    def disconnects(self) -> int:
        return self.stats.disconnects

    @property
    def disconnected(self) -> asyncio.Event:
        return self.stats.disconnected

    # --- HTTP -----------------------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        received = await record(request)
        self.requests.append(received)
        if self.require_api_key is not None and (
            received.headers.get("x-goog-api-key") != self.require_api_key
        ):
            return JSONResponse(_invalid_key_body(), 400)
        if self.error is not None and self.error.take():
            return self.error.response()
        model, _, method = request.path_params["call"].partition(":")
        body = received.json or {}
        refused = self._check_file_parts(body)
        if refused is not None:
            return refused
        grounded = any("googleSearch" in tool for tool in body.get("tools") or ())
        if method == "generateContent":
            return JSONResponse(self._whole_answer(model, grounded=grounded))
        if method != "streamGenerateContent":
            return JSONResponse(_error_body(404), 404)
        drop = self.fail_after is not None and self.fail_mode == "drop"
        return TrackedStream(self._events(model, grounded=grounded), stats=self.stats, drop=drop)

    def _check_file_parts(self, body: dict[str, Any]) -> Response | None:
        """Record the `fileData` parts; refuse one that names a missing or unready file of ours."""
        refused: Response | None = None
        for content in body.get("contents") or ():
            for part in content.get("parts") or ():
                file_data = _field(part, "fileData")
                if file_data is None:
                    continue
                self.file_parts.append(file_data)
                uri = str(_field(file_data, "fileUri") or "")
                if refused is not None or not self.base_url or not uri.startswith(self.base_url):
                    continue
                file = next((f for f in self.files.values() if f.uri == uri), None)
                if file is None:
                    refused = _no_such_file(uri.rsplit("/", 1)[-1])
                elif file.state != "ACTIVE":
                    message = (
                        f"The File {file.id} is not in an ACTIVE state and usage is not allowed."
                    )
                    refused = JSONResponse(
                        _error_body(400, message=message, status_name="FAILED_PRECONDITION"), 400
                    )
        return refused

    # --- file API -------------------------------------------------------------------------------

    async def _upload(self, request: Request) -> Response:
        raw = await request.body()
        command = request.headers.get("x-goog-upload-command", "")
        commands = {word.strip().lower() for word in command.split(",")}
        received = _received(request, raw if "start" in commands else b"")
        self.file_requests.append(received)
        upload_id = request.query_params.get("upload_id")
        if upload_id is None:
            if commands != {"start"}:
                return _upload_error(400, "An upload session starts with `start`.")
            return self._start(request, received)
        return self._receive_chunk(upload_id, commands, request, raw)

    def _start(self, request: Request, received: ReceivedRequest) -> Response:
        if self.require_api_key is not None and (
            received.headers.get("x-goog-api-key") != self.require_api_key
        ):
            return JSONResponse(_invalid_key_body(), 400)
        scripted = self.file_errors.get("start")
        if scripted is not None and scripted.take():
            return scripted.response()
        if received.headers.get("x-goog-upload-protocol") != "resumable":
            return JSONResponse(_error_body(400, message="Only resumable uploads here."), 400)
        metadata = (received.json or {}).get("file") or {}
        mime_type = received.headers.get("x-goog-upload-header-content-type") or _field(
            metadata, "mimeType"
        )
        size = received.headers.get("x-goog-upload-header-content-length")
        if not mime_type or size is None or not size.isdigit():
            message = "X-Goog-Upload-Header-Content-Length and -Content-Type are required."
            return JSONResponse(_error_body(400, message=message), 400)
        version = request.path_params["version"]
        own = self.base_url or str(request.base_url).rstrip("/")
        file_id = uuid.uuid4().hex[:12]
        now = datetime.now(UTC)
        file = FakeFile(
            id=file_id,
            display_name=_field(metadata, "displayName"),
            mime_type=mime_type,
            declared_size=int(size),
            uri=f"{own}/{version}/files/{file_id}",
            upload_id=uuid.uuid4().hex,
            created=now,
            expires=now + self.file_ttl,
            processing_left=self.processing_polls,
            failure=self.processing_failure,
        )
        self._sessions[file.upload_id] = file
        origin = self.upload_origin or own
        upload_url = (
            f"{origin}/upload/{version}/files?upload_id={file.upload_id}&upload_protocol=resumable"
        )
        return Response(
            status_code=200,
            headers={
                "X-Goog-Upload-URL": upload_url,
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Chunk-Granularity": str(8 * 1024 * 1024),
            },
        )

    def _receive_chunk(
        self, upload_id: str, commands: set[str], request: Request, raw: bytes
    ) -> Response:
        file = self._sessions.get(upload_id)
        if file is None or file.finalized:
            return _upload_error(404, "No such upload session.")
        scripted = self.file_errors.get("upload")
        if scripted is not None and scripted.take():
            response = scripted.response()
            response.headers["X-Goog-Upload-Status"] = "final"
            return response
        if "upload" not in commands or not commands <= {"upload", "finalize"}:
            return _upload_error(400, f"Unsupported upload command: {sorted(commands)}.")
        offset = request.headers.get("x-goog-upload-offset", "")
        if offset != str(len(file.data)):
            return _upload_error(400, f"Expected offset {len(file.data)}, got {offset!r}.")
        file.data.extend(raw)
        if "finalize" not in commands:
            return Response(status_code=200, headers={"X-Goog-Upload-Status": "active"})
        if len(file.data) != file.declared_size:
            message = f"Received {len(file.data)} bytes, {file.declared_size} were declared."
            return _upload_error(400, message)
        file.finalized = True
        del self._sessions[upload_id]
        self.files[file.name] = file
        return JSONResponse({"file": file.resource()}, headers={"X-Goog-Upload-Status": "final"})

    async def _delete_file(self, request: Request) -> Response:
        self.file_requests.append(_received(request, b""))
        file = self.files.pop(f"files/{request.path_params['file_id']}", None)
        if file is None:
            return _no_such_file(request.path_params["file_id"])
        self.deleted_files.append(file)
        return JSONResponse({})

    async def _get_file(self, request: Request) -> Response:
        self.file_requests.append(_received(request, b""))
        if self.require_api_key is not None and (
            request.headers.get("x-goog-api-key") != self.require_api_key
        ):
            return JSONResponse(_invalid_key_body(), 400)
        scripted = self.file_errors.get("get")
        if scripted is not None and scripted.take():
            return scripted.response()
        file = self.files.get(f"files/{request.path_params['file_id']}")
        if file is None:
            return _no_such_file(request.path_params["file_id"])
        file.gets += 1
        resource = file.resource()
        if file.processing_left > 0:
            file.processing_left -= 1
        return JSONResponse(resource)

    # --- generation -----------------------------------------------------------------------------

    def _usage(self, streamed: int) -> dict[str, int]:
        output = streamed if self.completion_tokens is None else self.completion_tokens
        usage = {
            "promptTokenCount": self.prompt_tokens,
            "candidatesTokenCount": output,
            "totalTokenCount": self.prompt_tokens + output + (self.thoughts_tokens or 0),
        }
        if self.thoughts_tokens is not None:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        return usage

    def _grounding(self) -> dict[str, Any]:
        chunks = [{"web": {"uri": uri, "title": title}} for uri, title in self.citations]
        if chunks:
            chunks.append(chunks[0])  # real answers cite the same source more than once
        return {"groundingChunks": chunks, "webSearchQueries": ["fake search"]}

    def _whole_answer(self, model: str, *, grounded: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": self.text}], "role": "model"},
            "finishReason": self.finish_reason,
            "index": 0,
        }
        if grounded and self.citations:
            candidate["groundingMetadata"] = self._grounding()
        return {
            "candidates": [candidate],
            "usageMetadata": self._usage(len(self.tokens)),
            "modelVersion": model,
            "responseId": uuid.uuid4().hex[:22],
        }

    async def _events(self, model: str, *, grounded: bool) -> AsyncIterator[bytes]:
        response_id = uuid.uuid4().hex[:22]
        if self.block_reason is not None:
            feedback = {"promptFeedback": {"blockReason": self.block_reason}}
            yield _sse({**feedback, "usageMetadata": self._usage(0), "responseId": response_id})
            return
        tokens = self.tokens[: self.fail_after] if self.fail_after is not None else self.tokens
        last = len(tokens) - 1
        async for index, token in paced(tokens, self.token_delay):
            candidate: dict[str, Any] = {
                "content": {"parts": [{"text": token}], "role": "model"},
                "index": 0,
            }
            if grounded and self.citations and index == last // 2:
                uri, title = self.citations[0]
                candidate["groundingMetadata"] = {"groundingChunks": [{"web": _web(uri, title)}]}
            if index == last and self.fail_after is None:
                candidate["finishReason"] = self.finish_reason
                if grounded and self.citations:
                    candidate["groundingMetadata"] = self._grounding()
            yield _sse(
                {
                    "candidates": [candidate],
                    "usageMetadata": self._usage(index + 1),
                    "modelVersion": model,
                    "responseId": response_id,
                }
            )
        if self.fail_after is not None and self.fail_mode == "error":
            yield _sse(_error_body(500))


def _web(uri: str, title: str | None) -> dict[str, Any]:
    return {"uri": uri, "title": title} if title is not None else {"uri": uri}


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"


def _timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, as Google's JSON timestamps."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _received(request: Request, body: bytes) -> ReceivedRequest:
    """A file API request, its JSON body parsed only when there is one (not upload bytes)."""
    return ReceivedRequest(
        method=request.method,
        path=request.url.path,
        query=dict(request.query_params),
        headers={name.lower(): value for name, value in request.headers.items()},
        json=orjson.loads(body) if body else None,
    )


def _field(message: dict[str, Any], name: str) -> Any:
    """A field of a JSON request body by its lowerCamelCase name or its proto (snake_case) name:
    Google's JSON parsers accept both, and the SDK sends the file metadata in snake_case."""
    if name in message:
        return message[name]
    return message.get("".join(f"_{c.lower()}" if c.isupper() else c for c in name))


def _no_such_file(file_id: str) -> Response:
    """Gemini's answer for a file it does not hold (never uploaded, deleted or expired)."""
    message = f"You do not have permission to access the File {file_id} or it may not exist."
    return JSONResponse(_error_body(403, message=message), 403)


def _upload_error(status: int, message: str) -> Response:
    return JSONResponse(
        _error_body(status, message=message), status, headers={"X-Goog-Upload-Status": "final"}
    )


def _error_body(
    status: int,
    *,
    retry_after: int | str | None = None,
    message: str | None = None,
    status_name: str | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": status,
        "message": message or f"The fake answered {status}.",
        "status": status_name or _STATUS_NAMES.get(status, "UNKNOWN"),
    }
    if status == 429 and retry_after is not None:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after}s"}
        ]
    return {"error": error}


def _invalid_key_body() -> dict[str, Any]:
    """What Gemini answers for a wrong key: a 400, not a 401."""
    return {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ],
        }
    }


# --- pytest fixtures ----------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def fake_gemini_server() -> AsyncIterator[FakeGemini]:
    """One fake served for the whole test session."""
    fake = FakeGemini()
    async with serve(fake.app) as url:
        fake.base_url = url
        yield fake


@pytest_asyncio.fixture(loop_scope="session")
async def fake_gemini(fake_gemini_server: FakeGemini) -> FakeGemini:
    """The session's fake, reset to its defaults for this test."""
    fake_gemini_server.reset()
    return fake_gemini_server


# --- standalone ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake Gemini API on a loopback port.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--tokens", type=int, default=100, help="tokens per streamed answer")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="pause between tokens")
    args = parser.parse_args()
    fake = FakeGemini()
    fake.tokens = tokens_of_length(args.tokens)
    fake.token_delay = args.delay_ms / 1000
    serve_forever(fake.app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
