"""Text that JSON can carry but nothing behind aihub can take (NUL, which PostgreSQL's text
refuses; lone surrogates, which have no UTF-8) is a 422 naming the field, on every route that
takes text, never a 500 from the database or an SDK."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aihub.core.text import plain_text
from tests.conftest import MakeApp
from tests.factories import bearer, create_user_in_app

KEY = "sk-" + "a" * 40
NUL, SURROGATE = "a\x00b", "a\ud800b"


def bodies(bad: str) -> list[tuple[str, dict[str, Any], str]]:
    """(path, body, the field the 422 must name) for each route that takes a client's text."""
    return [
        ("/api/chats/create", {"title": bad}, "title"),
        ("/chat", {"messages": [{"role": "user", "parts": [{"text": bad}]}]}, "body"),
        ("/api/generate/", {"prompt": bad, "num_images": 1}, "prompt"),
        ("/api/upload-url", {"filename": bad, "contentType": "image/png"}, "filename"),
        ("/api/chat", {"user_message": bad, "api_key": KEY}, "user_message"),
        (
            "/api/chat",
            {
                "user_message": "hi",
                "chat_history": [{"role": "ai", "content": bad}],
                "api_key": KEY,
            },
            "chat_history.0.content",
        ),
        ("/api/auth/register", {"email": "nul@example.com", "password": bad * 4}, "password"),
    ]


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "lone-surrogate"])
async def test_text_nothing_can_store_is_a_422_naming_the_field(
    make_app: MakeApp, bad: str
) -> None:
    async with make_app(auth_allow_registration=True, byok_rate_limit="unlimited") as served:
        _, token = await create_user_in_app(served.app)
        for path, body, field in bodies(bad):
            response = await served.client.post(
                path,
                content=json.dumps(body).encode(),  # ASCII, escapes as a browser's JSON has them
                headers={**bearer(token), "Content-Type": "application/json"},
            )

            assert response.status_code == 422, (path, response.text)
            answer = response.json()
            assert answer["error"] == "validation_error"
            assert answer["detail"].startswith(f"{field}: "), (path, answer["detail"])
        renamed = await served.client.post(
            "/api/chats/create", json={"title": "fine"}, headers=bearer(token)
        )
        chat_id = renamed.json()["chat_id"]
        patched = await served.client.patch(
            f"/api/chats/{chat_id}",
            content=json.dumps({"title": bad}).encode(),
            headers={**bearer(token), "Content-Type": "application/json"},
        )
        assert patched.status_code == 422


def test_plain_text_passes_everything_else() -> None:
    text = "Grüße, 世界 🌍\n\ttabs, \\u0000 as written text, and \ud83c\udf0d joined".encode(
        "utf-16", "surrogatepass"
    ).decode("utf-16")
    assert plain_text(text) == text
    assert plain_text("") == ""
