"""Uploads through the local backend, end to end as a browser does them: ask for a URL, answer
the CORS preflight, PUT the raw bytes with no token, load the link; and every way that fails."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from aihub.providers.offline import gradient_png
from aihub.storage import files
from aihub.storage.models import StoredFile
from tests.clocks import FakeClock
from tests.conftest import MakeApp, Served
from tests.factories import bearer, create_user

PNG = gradient_png(7, size=32)
ORIGIN = "http://localhost:3000"


async def upload_url(client: httpx.AsyncClient, token: str, **body: object) -> httpx.Response:
    return await client.post("/api/upload-url", json=body, headers=bearer(token))


async def ask(client: httpx.AsyncClient, token: str, **body: object) -> dict[str, Any]:
    response = await upload_url(client, token, **body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def relative(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def test_a_browser_uploads_and_loads_a_file(served: Served) -> None:
    client = served.client
    _, token = await create_user(client)
    answer = await ask(client, token, filename="Holiday photo.png", contentType="image/png")
    assert answer["url"].startswith(served.base_url)  # absolute: the browser goes straight there
    assert answer["gcs_url"].startswith(served.base_url)
    assert answer["headers"] == {"Content-Type": "image/png"}

    preflight = await client.options(
        relative(answer["url"]),
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "PUT" in preflight.headers["access-control-allow-methods"]

    put = await client.put(
        relative(answer["url"]),
        content=PNG,
        headers={"Content-Type": "image/png", "Origin": ORIGIN},
    )
    assert put.status_code == 200, put.text
    assert put.json() == {"file_id": answer["file_id"], "size": len(PNG)}

    loaded = await client.get(relative(answer["gcs_url"]))  # no token: the link is the authority
    assert loaded.status_code == 200
    assert loaded.content == PNG
    assert loaded.headers["content-type"] == "image/png"
    assert loaded.headers["x-content-type-options"] == "nosniff"
    owner = await client.get(f"/api/files/{answer['file_id']}", headers=bearer(token))
    assert owner.content == PNG
    stored = list((served.settings.data_dir / "files" / "uploads").rglob("*Holiday_photo.png"))
    assert len(stored) == 1


@pytest.mark.parametrize(
    ("filename", "declared", "expected"),
    [
        ("notes.md", "", "text/markdown"),
        ("scan.PDF", "", "application/pdf"),
        ("a.png", "IMAGE/PNG; charset=binary", "image/png"),
    ],
)
async def test_the_type_comes_from_the_name_when_none_is_given(
    served: Served, filename: str, declared: str, expected: str
) -> None:
    _, token = await create_user(served.client)
    answer = await ask(served.client, token, filename=filename, content_type=declared)
    assert answer["content_type"] == expected


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"filename": "mystery", "contentType": ""}, "contentType"),
        ({"filename": "tool.exe", "contentType": "application/x-msdownload"}, "contentType"),
        ({"filename": "big.png", "contentType": "image/png", "size": 21 * 1024 * 1024}, "size"),
        ({"filename": "", "contentType": "image/png"}, "filename"),
    ],
)
async def test_refused_uploads_say_why(served: Served, body: dict[str, object], field: str) -> None:
    _, token = await create_user(served.client)
    response = await upload_url(served.client, token, **body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(field)


async def test_a_refused_type_is_named_only_when_it_is_a_media_type(served: Served) -> None:
    _, token = await create_user(served.client)
    named = await upload_url(
        served.client, token, filename="tool.exe", contentType="application/x-msdownload"
    )
    assert "application/x-msdownload files are not accepted" in named.json()["detail"]
    reflected = await upload_url(
        served.client, token, filename="f", contentType="<b>ZQMARKERZQ</b> text"
    )
    assert reflected.status_code == 422
    assert "zqmarkerzq" not in reflected.text.lower()


async def test_upload_url_needs_a_token(served: Served) -> None:
    response = await served.client.post(
        "/api/upload-url", json={"filename": "a.png", "contentType": "image/png"}
    )
    assert response.status_code == 401


async def test_a_put_with_another_content_type_is_refused(served: Served) -> None:
    _, token = await create_user(served.client)
    answer = await ask(served.client, token, filename="a.png", contentType="image/png")
    put = await served.client.put(
        relative(answer["url"]), content=PNG, headers={"Content-Type": "text/html"}
    )
    assert put.status_code == 403
    assert put.json()["error"] == "forbidden"


async def test_a_tampered_signature_is_refused(served: Served) -> None:
    _, token = await create_user(served.client)
    answer = await ask(served.client, token, filename="a.png", contentType="image/png")
    parts = urlsplit(answer["url"])
    query = parse_qs(parts.query)
    signature = query["signature"][0]
    forged = signature[:-2] + ("AA" if not signature.endswith("AA") else "BB")
    tampered = f"{parts.path}?{urlencode({'expires': query['expires'][0], 'signature': forged})}"
    put = await served.client.put(tampered, content=PNG, headers={"Content-Type": "image/png"})
    assert put.status_code == 403
    # A link to one file does not open another.
    other = f"/api/files/{uuid.uuid4()}?{parts.query}"
    assert (
        await served.client.put(other, content=PNG, headers={"Content-Type": "image/png"})
    ).status_code == 403
    # Nor does the download link upload.
    download = relative(answer["gcs_url"])
    assert (
        await served.client.put(download, content=PNG, headers={"Content-Type": "image/png"})
    ).status_code == 403


async def test_an_expired_upload_url_is_refused(make_app: MakeApp) -> None:
    clock = FakeClock(datetime(2026, 11, 22, 12, 0, tzinfo=UTC))
    async with make_app(clock=clock, upload_url_ttl_seconds=60) as served:
        _, token = await create_user(served.client)
        answer = await ask(served.client, token, filename="a.png", contentType="image/png")
        clock.advance(seconds=61)
        put = await served.client.put(
            relative(answer["url"]), content=PNG, headers={"Content-Type": "image/png"}
        )
        assert put.status_code == 403
        assert "expired" in put.json()["detail"]


async def test_a_file_larger_than_the_limit_is_refused(make_app: MakeApp) -> None:
    async with make_app(upload_max_bytes=1000) as served:
        _, token = await create_user(served.client)
        answer = await ask(served.client, token, filename="a.png", contentType="image/png")
        put = await served.client.put(
            relative(answer["url"]),
            content=b"\x89PNG\r\n\x1a\n" + b"0" * 2000,
            headers={"Content-Type": "image/png"},
        )
        assert put.status_code == 413
        assert not list((served.settings.data_dir / "files").rglob("*.png"))


async def test_uploads_larger_than_the_json_body_limit_go_through(make_app: MakeApp) -> None:
    big = b"\x89PNG\r\n\x1a\n" + b"0" * 8000  # over MAX_REQUEST_BODY_BYTES below
    async with make_app(max_request_body_bytes=2048) as served:
        _, token = await create_user(served.client)
        answer = await ask(served.client, token, filename="a.png", contentType="image/png")
        put = await served.client.put(
            relative(answer["url"]), content=big, headers={"Content-Type": "image/png"}
        )
        assert put.status_code == 200, put.text
        # Everything else keeps the small limit.
        huge = await served.client.post(
            "/api/upload-url",
            json={"filename": "x" * 4000, "contentType": "image/png"},
            headers=bearer(token),
        )
        assert huge.status_code == 413


async def test_another_user_s_file_is_not_found(served: Served) -> None:
    client = served.client
    _, owner = await create_user(client)
    _, stranger = await create_user(client)
    answer = await ask(client, owner, filename="a.png", contentType="image/png")
    await client.put(relative(answer["url"]), content=PNG, headers={"Content-Type": "image/png"})

    by_token = await client.get(f"/api/files/{answer['file_id']}", headers=bearer(stranger))
    assert by_token.status_code == 404
    assert (await client.get(f"/api/files/{answer['file_id']}")).status_code == 401
    assert (
        await client.get(f"/api/files/{uuid.uuid4()}", headers=bearer(owner))
    ).status_code == 404


def test_references_are_found_in_every_link_this_api_hands_out() -> None:
    file_id = uuid.uuid4()
    assert files.reference_id(f"http://h/api/files/{file_id}?expires=1&signature=x") == file_id
    gcs = f"https://storage.googleapis.com/b/uploads/{uuid.uuid4()}/{file_id}-a.png?X-Goog-Date=1"
    assert files.reference_id(gcs) == file_id
    assert files.reference_id("https://example.com/cat.png") is None


@pytest.mark.parametrize(
    ("content_type", "data", "matches"),
    [
        ("image/png", PNG, True),
        ("image/png", b"<html>", False),
        ("image/jpeg", b"\xff\xd8\xff\xe0rest", True),
        ("application/pdf", b"%PDF-1.7", True),
        ("application/pdf", b"PK\x03\x04", False),
        ("image/webp", b"RIFF\x00\x00\x00\x00WEBPVP8 ", True),
        ("video/mp4", b"\x00\x00\x00\x18ftypmp42", True),
        ("text/plain", "héllo".encode(), True),
        ("text/plain", b"\x00\x01\x02", False),
        ("text/plain", b"\xff\xfe\xfa", False),
        ("image/png", b"", False),
    ],
)
def test_first_bytes_must_match_the_type(content_type: str, data: bytes, matches: bool) -> None:
    assert files.sniff_matches(content_type, data) is matches


def test_file_names_are_made_safe_for_keys() -> None:
    assert files.safe_filename("../../etc/passwd") == "passwd"
    assert files.safe_filename("Été 2025 (1).jpg") == "Ete_2025_1_.jpg"
    assert files.safe_filename("...") == "file"


async def test_uploads_no_message_used_are_removed_after_a_while(served: Served) -> None:
    client = served.client
    _, token = await create_user(client)
    answer = await ask(client, token, filename="a.png", contentType="image/png")
    await client.put(relative(answer["url"]), content=PNG, headers={"Content-Type": "image/png"})
    sessions, storage = served.app.state.sessions, served.app.state.storage

    kept = await files.remove_orphans(
        sessions, storage, older_than=datetime.now(UTC) - timedelta(hours=1)
    )
    assert kept == 0
    removed = await files.remove_orphans(
        sessions, storage, older_than=datetime.now(UTC) + timedelta(seconds=1)
    )
    assert removed == 1
    async with sessions() as session:
        assert await session.get(StoredFile, uuid.UUID(answer["file_id"])) is None
    assert not list((served.settings.data_dir / "files").rglob("*.png"))
