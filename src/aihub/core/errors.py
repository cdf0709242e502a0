"""One error tree and the handlers that render it.

Services raise `AppError` subclasses; one handler renders `{"error": code, "detail": message}`.
A route whose client cannot parse JSON errors (the ideas event stream) installs another renderer
for its requests with `use_error_renderer`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from aihub.core.middleware import RESPONSE_STARTED

logger = logging.getLogger("aihub.errors")


class AppError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "Internal server error"

    def __init__(self, message: str | None = None, *, headers: Mapping[str, str] | None = None):
        self.message = message or self.default_message
        self.headers = dict(headers or {})
        super().__init__(self.message)


class BadRequest(AppError):
    status_code = 400
    code = "bad_request"
    default_message = "Bad request"


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"
    default_message = "Not authenticated"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"
    default_message = "Not allowed"


class NotFound(AppError):
    status_code = 404
    code = "not_found"
    default_message = "Not found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"
    default_message = "Conflict"


class Unprocessable(AppError):
    status_code = 422
    code = "validation_error"
    default_message = "Invalid request"


class ServiceUnavailable(AppError):
    status_code = 503
    code = "service_unavailable"
    default_message = "Service temporarily unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"
    default_message = "The database is unavailable; try again shortly"


class ErrorRead(BaseModel):
    """Every error aihub answers (the ideas stream's default format aside)."""

    error: str = Field(description="Machine-readable code, e.g. `not_found`")
    detail: str = Field(description="What went wrong, for people")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description='Where, e.g. `["body", "prompt"]`')
    msg: str = Field(description="What is wrong with it (never the submitted value)")
    type: str = Field(description="Machine-readable kind, e.g. `missing`")


class ValidationErrorRead(ErrorRead):
    """A 422: `detail` says what is wrong in one line. Replaces FastAPI's default body, which
    echoes the submitted values."""

    fields: list[FieldError] = Field(
        default_factory=list,
        description="A request that failed validation: each invalid field (absent for a request "
        "that was valid but cannot be processed, e.g. an upload refused on first use)",
    )


def error_responses(descriptions: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for the errors a route can answer."""
    return {
        code: {"model": ValidationErrorRead if code == 422 else ErrorRead, "description": text}
        for code, text in descriptions.items()
    }


_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def document_validation_errors(app: FastAPI) -> None:
    """Make the OpenAPI document show aihub's 422 body wherever FastAPI put its own default
    there (every route with inputs that does not declare a 422 of its own)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "ValidationErrorRead" not in components:
            defined = ValidationErrorRead.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components.update(defined.pop("$defs", {}))
            components["ValidationErrorRead"] = defined
        ours = {"$ref": "#/components/schemas/ValidationErrorRead"}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                content = operation.get("responses", {}).get("422", {}).get("content", {})
                for media in content.values():
                    if media.get("schema", {}).get("$ref") == _FASTAPI_422:
                        media["schema"] = ours
        if _FASTAPI_422 not in str(schema["paths"]):
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


ErrorRenderer = Callable[[int, str, str, Mapping[str, str]], Response]


def render_json(status_code: int, code: str, detail: str, headers: Mapping[str, str]) -> Response:
    return JSONResponse({"error": code, "detail": detail}, status_code, headers=dict(headers))


def use_error_renderer(request: Request, renderer: ErrorRenderer) -> None:
    """Make errors on this request render with `renderer` instead of JSON."""
    request.state.error_renderer = renderer


def _render(
    request: Request,
    status_code: int,
    code: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
) -> Response:
    renderer: ErrorRenderer = getattr(request.state, "error_renderer", render_json)
    return renderer(status_code, code, detail, headers or {})


# Pydantic messages that quote part of the input, replaced by ones that do not.
_QUOTING_MESSAGES = {
    "uuid_parsing": "Input should be a valid UUID",
    "url_parsing": "Input should be a valid URL",
    "json_invalid": "not valid JSON",
}


def _message(error: Any) -> str:
    """Pydantic's message, without its "Value error, " prefix and never quoting the input."""
    kind = error.get("type", "")
    message: str = _QUOTING_MESSAGES.get(kind) or error.get("msg", "invalid")
    return message.removeprefix("Value error, ")


def describe_validation_errors(errors: list[Any]) -> str:
    """A readable summary that never repeats what was submitted (it may be a secret)."""
    parts = []
    for error in errors:
        kind = error.get("type", "")
        message = _message(error)
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        if kind == "json_invalid":
            location = "body"
        parts.append(f"{location}: {message}")
    return "; ".join(parts) or "Invalid request"


async def handle_app_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return _render(request, exc.status_code, exc.code, exc.message, exc.headers)


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = describe_validation_errors(list(exc.errors()))
    renderer = getattr(request.state, "error_renderer", None)
    if renderer is not None:
        return _render(request, 422, "validation_error", detail)
    fields = [
        {
            "loc": list(e.get("loc", ())),
            "msg": _message(e),
            "type": e.get("type", ""),
        }
        for e in exc.errors()
    ]
    return JSONResponse(
        {"error": "validation_error", "detail": detail, "fields": fields}, status_code=422
    )


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        exc.status_code, "http_error"
    )
    detail = exc.detail if isinstance(exc.detail, str) else "Request failed"
    return _render(request, exc.status_code, code, detail, exc.headers)


class UnexpectedErrorMiddleware:
    """Turns an unexpected exception into a logged 500 in the request's error format.

    It sits inside CORS (so a browser can read the 500), inside `RequestContextMiddleware`
    (which marks the scope when the response starts), and swallows the exception once it is
    logged here with the request id (so it is not logged a second time by the server). An error
    after the response started cannot become a 500: it propagates, and the connection is cut.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            if scope.get(RESPONSE_STARTED):
                raise
            request = Request(scope, receive)
            if database_unreachable(exc):
                # Not a bug here: the database is down or refusing connections (as
                # `GET /api/ready` says). A 503 tells clients and load balancers to come back.
                logger.error("the database is unreachable: %s", type(exc).__name__)
                unavailable = DatabaseUnavailable(headers={"Retry-After": "5"})
                response = _render(
                    request, 503, unavailable.code, unavailable.message, unavailable.headers
                )
            else:
                logger.exception("unhandled error", exc_info=exc)
                response = _render(request, 500, AppError.code, AppError.default_message)
            await response(scope, receive, send)


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached, rather than that a statement is
    wrong: a refused or broken connection, or no free connection in the pool in time."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, ConnectionError) or (
        isinstance(exc, OSError) and exc.errno in _CONNECT_ERRNOS
    )


_CONNECT_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, handle_app_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_middleware(UnexpectedErrorMiddleware)
    document_validation_errors(app)
