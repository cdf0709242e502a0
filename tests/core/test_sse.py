import random

import pytest

from aihub.core.sse import (
    JSONEventEncoder,
    MarkdownEventEncoder,
    NDJSONEncoder,
    StreamEvent,
    TextEncoder,
)
from tests.sse_clients import event_source_events, fetch_event_source_messages, markdown_buffer

MARKDOWN = (
    "# Agent Ledger\n\n*Bookkeeping agents.*\n\n## The problem\n\n"
    "- one\n- two\n\n\n```python\nprint('<x>')\n```\n  indented\n"
)


def encode_markdown(chunks: list[str], *, end: StreamEvent | None = None) -> str:
    encoder = MarkdownEventEncoder()
    out = b"".join(encoder.encode(StreamEvent.delta(c)) for c in chunks)
    out += encoder.encode(end or StreamEvent("done", {}))
    return out.decode()


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randrange(1, min(40, len(text) - 1))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("seed", range(200))
def test_markdown_survives_any_chunking_byte_for_byte(seed: int) -> None:
    rng = random.Random(seed)
    chunks = random_chunks(MARKDOWN, rng)
    assert markdown_buffer(encode_markdown(chunks)) == MARKDOWN


@pytest.mark.parametrize(
    "chunks",
    [
        ["a", "\n", "\n", "b"],
        ["a\n\n", "\n\nb"],
        ["#", " Title", "\n\n", "##", " Sub", "\n\n", "- x", "\n"],
        ["x", "\n\n\n\n"],
        ["only"],
        ["  leading spaces", "\n  more"],
    ],
)
def test_markdown_tokens_that_start_or_are_newlines(chunks: list[str]) -> None:
    assert markdown_buffer(encode_markdown(chunks)) == "".join(chunks)


def test_markdown_stream_ends_with_done_carrying_empty_data() -> None:
    raw = encode_markdown(["Hello", " world"])
    assert raw.endswith("event: done\ndata:\n\n")
    last = fetch_event_source_messages(raw)[-1]
    assert (last.event, last.data) == ("done", "")
    assert "{" not in raw


def test_markdown_error_mid_stream_is_one_readable_line() -> None:
    raw = encode_markdown(
        ["Hello", " wor"], end=StreamEvent.error("provider_unavailable", "Provider down")
    )
    assert markdown_buffer(raw) == "Hello wor\n\n**Error:** Provider down\n"
    assert "event: done" not in raw


def test_carriage_returns_become_newlines() -> None:
    assert markdown_buffer(encode_markdown(["a\r\nb", "\rc"])) == "a\nb\nc"


def test_json_events_have_names_ids_and_one_line_data() -> None:
    encoder = JSONEventEncoder()
    raw = (
        encoder.encode(StreamEvent.delta("line\nbreak", id="1"))
        + encoder.encode(StreamEvent("done", {"idea_id": "x"}, id="2"))
    ).decode()
    events = event_source_events(raw)
    assert [(e.event, e.data, e.id) for e in events] == [
        ("delta", {"text": "line\nbreak"}, "1"),
        ("done", {"idea_id": "x"}, "2"),
    ]


def test_ndjson_lines_are_ascii_and_newline_terminated() -> None:
    encoder = NDJSONEncoder(lambda e: {"response": e.data} if e.kind == "delta" else None)
    line = encoder.encode(StreamEvent.delta("h\u00e9llo \u2603\n"))
    assert line == b'{"response":"h\\u00e9llo \\u2603\\n"}\n'
    assert encoder.encode(StreamEvent("done", {})) == b""


def test_text_encoder_marks_a_cut_reply() -> None:
    encoder = TextEncoder()
    assert encoder.encode(StreamEvent.delta("<b>'x'</b>")) == b"<b>'x'</b>"
    cut = encoder.encode(StreamEvent.error("provider_unavailable", "upstream failed"))
    assert b"cut short" in cut


def test_markdown_usage_event_releases_the_held_text() -> None:
    encoder = MarkdownEventEncoder()
    held = encoder.encode(StreamEvent.delta("Hello"))
    assert markdown_buffer(held.decode()) == "Hell"
    released = encoder.encode(StreamEvent("usage", {"input_tokens": 1, "output_tokens": 1}))
    assert markdown_buffer((held + released).decode()) == "Hello"
    assert encoder.encode(StreamEvent("done", {})) == b"event: done\ndata:\n\n"
