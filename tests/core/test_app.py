"""Cross-cutting behaviour every route shares: error shapes, limits, CORS, ids, operations."""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from aihub.core.config import Settings
from aihub.core.server import uvicorn_options
from aihub.core.sse import EventStream
from aihub.main import GC_FULL_PASS_AFTER, create_app
from tests.conftest import MakeApp, Served
from tests.factories import bearer, create_user
from tests.fakes.server import serve


async def test_body_over_the_limit_is_413_json(make_app: MakeApp) -> None:
    async with make_app(max_request_body_bytes=2048) as served:
        big = {"email": "a@example.com", "password": "x" * 4096}
        declared = await served.client.post("/api/auth/login", json=big)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"x" * 1024

        streamed = await served.client.post(
            "/api/auth/login", content=chunks(), headers={"content-type": "application/json"}
        )
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"] == "payload_too_large"
        assert isinstance(response.json()["detail"], str)


async def test_validation_errors_are_strings_and_never_echo_input(served: Served) -> None:
    secret = "hunter2-but-longer-secret-value" * 3
    response = await served.client.post(
        "/api/auth/login", json={"email": secret, "password": 12345}
    )
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "validation_error"
    assert isinstance(body["detail"], str)
    assert "password" in body["detail"]
    assert secret not in response.text


async def test_malformed_json_is_a_clear_422(served: Served) -> None:
    response = await served.client.post(
        "/api/auth/login", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"] == "body: not valid JSON"


async def test_a_bad_id_is_a_422_that_does_not_quote_it(served: Served) -> None:
    response = await served.client.get("/api/ideas/secret-looking-value")
    # Authentication comes first for a private resource; with a token the id is checked.
    assert response.status_code == 401
    _, token = await create_user(served.client)
    response = await served.client.get("/api/ideas/sXcret-looking-value", headers=bearer(token))
    assert response.status_code == 422
    assert "sXcret" not in response.text
    assert "`s`" not in response.text
    assert "`X`" not in response.text


async def test_unknown_route_and_method(served: Served) -> None:
    missing = await served.client.get("/api/nope")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    wrong = await served.client.delete("/api/health")
    assert (wrong.status_code, wrong.json()["error"]) == (405, "method_not_allowed")


async def test_cors_preflight_from_configured_origins_only(served: Served) -> None:
    headers = {
        "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = await served.client.options("/api/ideas", headers=headers)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "PATCH" in allowed.headers["access-control-allow-methods"]
    evil = await served.client.options(
        "/api/ideas", headers={**headers, "Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in evil.headers


async def test_request_ids(served: Served) -> None:
    generated = await served.client.get("/api/health")
    assert len(generated.headers["x-request-id"]) == 16
    kept = await served.client.get("/api/health", headers={"X-Request-ID": "abc-123"})
    assert kept.headers["x-request-id"] == "abc-123"
    replaced = await served.client.get("/api/health", headers={"X-Request-ID": "<script>"})
    assert replaced.headers["x-request-id"] != "<script>"


async def test_health_ready_and_metrics(served: Served) -> None:
    health = (await served.client.get("/api/health")).json()
    assert health["status"] == "ok"
    assert health["products"]["ideas"] == {
        "provider": "openai",
        "model": "gpt-5-nano",
        "chain": "openai:gpt-5-nano",
        "configured": "openai:gpt-5-nano",
        "offline": False,
    }
    assert health["products"]["byok"] == {
        "enabled": True,
        "provider": "openai",
        "model": "gpt-4.1-mini",
        "models": ["gpt-4.1-mini", "gpt-4o-mini", "gpt-3.5-turbo"],
        "keys": "caller",
        "offline": False,
    }
    ready = await served.client.get("/api/ready")
    assert ready.json() == {"status": "ready", "database": "ok"}
    metrics = await served.client.get("/metrics")
    assert "aihub_http_request_duration_seconds" in metrics.text
    assert "aihub_active_streams" in metrics.text


async def test_metrics_want_the_token_when_one_is_set(make_app: MakeApp) -> None:
    async with make_app(metrics_token="scrape-0123456789") as served:
        missing = await served.client.get("/metrics")
        wrong = await served.client.get("/metrics", headers={"Authorization": "Bearer nope"})
        right = await served.client.get(
            "/metrics", headers={"Authorization": "Bearer scrape-0123456789"}
        )
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.json()["error"] == "unauthorized"
        assert "scrape-0123456789" not in refused.text
    assert right.status_code == 200
    assert right.headers["content-type"].startswith("text/plain")
    assert "aihub_active_streams" in right.text


async def test_ready_answers_503_when_the_database_is_gone(make_app: MakeApp) -> None:
    async with make_app(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none") as served:
        response = await served.client.get("/api/ready")
    assert response.status_code == 503
    assert response.json()["error"] == "database_unavailable"


async def test_a_database_that_cannot_be_reached_is_a_503_not_a_500(make_app: MakeApp) -> None:
    async with make_app(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none") as served:
        body = {"email": "ada@example.com", "password": "correct horse battery"}
        register = await served.client.post("/api/auth/register", json=body)
        token = served.app.state.authenticator.issuer.issue(uuid.uuid4()).token
        idea = await served.client.get("/api", headers=bearer(token))

    assert register.status_code == 503
    assert register.json()["error"] == "database_unavailable"
    assert register.headers["retry-after"] == "5"
    assert idea.status_code == 503  # the ideas client's own error format
    assert idea.headers["content-type"].startswith("text/event-stream")
    assert "database is unavailable" in idea.text


async def test_docs_tag_every_route(served: Served) -> None:
    spec = (await served.client.get("/openapi.json")).json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("tags"), f"{method.upper()} {path} has no tag"
    assert (await served.client.get("/docs")).status_code == 200
    error_schema = spec["paths"]["/api/ideas"]["get"]["responses"]["401"]
    assert error_schema["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorRead")
    # The idea stream's caller is one dependency of its own (`IdeaCaller`): its token is shown
    # as every other route's is.
    assert (
        spec["paths"]["/api"]["get"]["security"] == spec["paths"]["/api/ideas"]["get"]["security"]
    )
    assert spec["paths"]["/api"]["get"]["security"] == [{"HTTPBearer": []}]


@pytest.mark.parametrize(
    "path", ["/api/chats", "/api/chats/{chat_id}", "/api/my-history"], ids=lambda p: p
)
async def test_lists_the_original_clients_read_unpaged_are_whole_by_default(
    served: Served, path: str
) -> None:
    """The original frontends read these lists without paging: their default page is the
    largest one, so a heavy user loses nothing short of that."""
    spec = (await served.client.get("/openapi.json")).json()
    (limit,) = [p for p in spec["paths"][path]["get"]["parameters"] if p["name"] == "limit"]
    assert limit["schema"]["default"] == limit["schema"]["maximum"] >= 500


async def test_every_documented_422_is_the_body_aihub_sends(served: Served) -> None:
    """FastAPI documents its own 422 body (which echoes input) on every route with inputs that
    does not declare one; aihub never sends that body, so the document must not show it."""
    spec = (await served.client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    documented = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            content = operation.get("responses", {}).get("422", {}).get("content", {})
            if "application/json" in content:
                schema = content["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ValidationErrorRead"}, (
                    f"{method.upper()} {path}"
                )
                documented += 1
    assert documented > 20
    read = spec["components"]["schemas"]["ValidationErrorRead"]
    _, token = await create_user(served.client)
    sent = await served.client.post(
        "/api/generate/", json={"prompt": 12, "sXcret": 1}, headers=bearer(token)
    )
    assert sent.status_code == 422
    assert set(sent.json()) == set(read["properties"])
    assert set(read["required"]) == {"error", "detail"}  # `fields` only for invalid requests
    assert all(set(f) == {"loc", "msg", "type"} for f in sent.json()["fields"])


async def test_a_stream_carries_every_layer_s_headers(served: Served) -> None:
    """CORS and the request id reach a browser's stream as they reach any other answer."""
    _, token = await create_user(served.client)
    headers = {"Origin": "http://localhost:3000", "X-Request-ID": "stream-1", **bearer(token)}
    response = await served.client.get("/api?format=json", headers=headers)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert response.headers["x-request-id"] == "stream-1"
    events = [block for block in response.text.split("\n\n") if block]
    assert events[0].startswith("event: delta")
    assert events[-1].startswith("event: done")


async def test_unexpected_error_is_one_logged_500_that_browsers_can_read(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    served.app.add_api_route("/test/broken", broken)
    with caplog.at_level(logging.ERROR):
        response = await served.client.get(
            "/test/broken", headers={"Origin": "http://localhost:3000"}
        )
    assert response.status_code == 500
    assert response.json() == {"error": "internal_error", "detail": "Internal server error"}
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None


async def test_requests_leave_no_reference_cycle_behind(served: Served) -> None:
    """A request's objects, its connection's included, are freed as it ends: garbage in
    reference cycles waits for the garbage collector's full passes, which stop the event loop
    for as long as they take (tens of milliseconds with a few hundred streams open)."""
    _, token = await create_user(served.client)
    stream = {"Accept": "text/event-stream", **bearer(token)}
    await served.client.get("/api/health")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):  # one connection: each request's cycle replaces the one before
            assert (await served.client.get("/api/health")).status_code == 200
            assert (await served.client.get("/api", headers=stream)).status_code == 200
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, RequestResponseCycle | EventStream)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


async def test_a_server_process_freezes_its_start_up_and_makes_full_collections_rare(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    thresholds = gc.get_threshold()
    callbacks = list(gc.callbacks)
    try:
        async with (
            serve(create_app(settings, freeze_gc=True), **uvicorn_options(settings)) as base,
            httpx.AsyncClient(base_url=base) as client,
        ):
            assert gc.get_freeze_count() > 10_000  # the loaded libraries, out of its sight
            assert gc.get_threshold() == (*thresholds[:2], GC_FULL_PASS_AFTER)
            before = _full_passes((await client.get("/metrics")).text)
            gc.collect()
            assert _full_passes((await client.get("/metrics")).text) >= before + 1
        assert gc.callbacks == callbacks  # its pauses are timed while it serves, not after
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def _full_passes(metrics: str) -> float:
    """How many full passes of the garbage collector `GET /metrics` has timed."""
    prefix = 'aihub_gc_pause_seconds_count{generation="2"} '
    return next(
        float(line[len(prefix) :]) for line in metrics.splitlines() if line.startswith(prefix)
    )
