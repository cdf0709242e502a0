import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
from markdown_it import MarkdownIt
from starlette.responses import Response
from starlette.types import Message

from aihub.core.sse import (
    BROKE,
    JSONEventEncoder,
    Linger,
    MarkdownEventEncoder,
    NDJSONEncoder,
    StreamEvent,
    TextEncoder,
    stream_response,
)
from tests.sse_clients import (
    event_source_events,
    fetch_event_source_messages,
    markdown_buffer,
)

PROSE = (
    "# Agent Ledger\n\n*Bookkeeping agents.*\n\n## The problem\n\nSmall firms  \n"
    "close books late.\\\nEvery month.\n\n- one\n- two\n\n\n> A quote\n> on two lines\n\n"
    "| plan | price |\n|---|---|\n| pro | 9 |\n\nSetext\n===\n\n---\n  indented\n"
    "```inline``` code\n\n"
)
CODE = (
    "Run it:\n\n```python\nprint('<x>')\ndef f(x):  \n    return x \\\n\n\n```\n\n"
    "1. Step\n\n   ~~~~sh\n   echo '```'\n   ~~~\n   ~~~~\n\nAfter `code`.\n"
)
MARKDOWN = PROSE + CODE
render = MarkdownIt("commonmark").enable("table").render


def encode_markdown(chunks: list[str], *, end: StreamEvent | None = None) -> str:
    encoder = MarkdownEventEncoder()
    out = b"".join(encoder.encode(StreamEvent.delta(c)) for c in chunks)
    out += encoder.encode(end or StreamEvent("done", {}))
    return out.decode()


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randrange(1, min(60, len(text) - 1))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("seed", range(200))
def test_markdown_arrives_byte_for_byte_however_it_is_chunked(seed: int) -> None:
    chunks = random_chunks(MARKDOWN, random.Random(seed))
    assert markdown_buffer(encode_markdown(chunks)) == MARKDOWN


def test_the_sample_is_rendered_with_its_code_blocks() -> None:
    html = render(MARKDOWN)
    assert html.count("<pre><code") == 2
    assert "<table>" in html
    assert "<br />\nclose books late.<br />" in html  # both hard line breaks
    assert "<code>inline</code>" in html


@pytest.mark.parametrize("seed", range(100))
def test_markdown_sends_each_delta_at_most_one_character_late(seed: int) -> None:
    chunks = random_chunks(MARKDOWN, random.Random(seed))
    encoder = MarkdownEventEncoder()
    sent = b""
    for count, chunk in enumerate(chunks, start=1):
        sent += encoder.encode(StreamEvent.delta(chunk))
        text_so_far = "".join(chunks[:count])
        buffer = markdown_buffer(sent.decode())
        assert text_so_far.startswith(buffer)
        assert len(buffer) >= len(text_so_far.rstrip("\n")) - 1


@pytest.mark.parametrize("first", ["#", "*", "`", "A"])
def test_a_first_delta_of_one_character_is_sent_at_once(first: str) -> None:
    encoder = MarkdownEventEncoder()
    assert markdown_buffer(encoder.encode(StreamEvent.delta(first)).decode()) == first


@pytest.mark.parametrize("first", [" ", "\t", "\\", "\n", "#\n"])
def test_a_first_space_tab_backslash_or_line_waits(first: str) -> None:
    assert MarkdownEventEncoder().encode(StreamEvent.delta(first)) == b""


@pytest.mark.parametrize(
    ("chunks", "buffer"),
    [
        # The one place the framing adds a character: a newline after a first character sent
        # whole ends the first line with a space (the original app's framing), which renders as
        # nothing.
        (["#", "\n\n", "x"], "# \n\nx"),
        (["A", "\n", "- b"], "A \n- b"),
        (["a", "\n", "\n", "b"], "a \n\nb"),
        (["x", "\n\n\n\n"], "x \n\n\n\n"),
        # Newlines before the first character render as nothing and are not sent.
        (["\n\n", "\n# Title"], "# Title"),
    ],
)
def test_where_the_buffer_differs_it_renders_the_same(chunks: list[str], buffer: str) -> None:
    assert markdown_buffer(encode_markdown(chunks)) == buffer
    assert render(buffer) == render("".join(chunks))


def test_an_error_inside_a_code_block_closes_it_first() -> None:
    raw = encode_markdown(
        ["Try:\n\n", "~~~~", "sh\n", "echo hi"], end=StreamEvent.error("x", "Provider down")
    )
    buffer = markdown_buffer(raw)
    assert buffer == "Try:\n\n~~~~sh\necho hi\n~~~~\n\n**Error:** Provider down\n"
    assert "<p><strong>Error:</strong> Provider down</p>" in render(buffer)


@pytest.mark.parametrize(
    "chunks",
    [
        ["ab", "\n", "\n", "c"],
        ["a\n\n", "\n\nb"],
        ["#", " Title", "\n\n", "##", " Sub", "\n\n", "- x", "\n"],
        ["# Title", "\n\n", "\n##", " Sub", "\n", "- a", "\n\n\n", "x", "\n"],
        ["xy", "\n\n\n\n"],
        ["only"],
        ["  leading spaces", "\n  more"],
        ["word ", "\n", "next"],
        ["two  ", "\n", "lines"],
        ["back\\", "\n", "slash"],
        ["  ", "\n", "x"],
        ["```", "py\n", "x = 1  ", "\n", "```"],
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
    sent = encoder.encode(StreamEvent.delta("Hello  "))
    assert markdown_buffer(sent.decode()) == "Hello "
    released = encoder.encode(StreamEvent("usage", {"input_tokens": 1, "output_tokens": 1}))
    assert markdown_buffer((sent + released).decode()) == "Hello  "
    assert encoder.encode(StreamEvent("done", {})) == b"event: done\ndata:\n\n"


@pytest.mark.parametrize("seed", range(40))
def test_a_client_cut_off_after_any_event_gets_the_rest_from_its_last_id(seed: int) -> None:
    """What the client has plus what `resuming` frames from its `Last-Event-ID` is the text."""
    rng = random.Random(seed)
    text = MARKDOWN if seed % 2 else "\n\n#" + MARKDOWN[1:].replace("\n## ", "\n\n\n## ")
    chunks = random_chunks(text, rng)
    encoder = MarkdownEventEncoder(ids="idea")
    events = [encoder.encode(StreamEvent.delta(c)).decode() for c in chunks]
    events.append(encoder.encode(StreamEvent("done", {})).decode())
    for cut in range(len(events)):
        had = fetch_event_source_messages("".join(events[:cut]))
        last_id = next((m.id for m in reversed(had) if m.id), None)
        if last_id is None:
            continue  # no id yet: the client asks for a new idea
        prefix, _, count = last_id.partition(":")
        assert prefix == "idea"
        sent = MarkdownEventEncoder.normalised(text)[: int(count)]
        resumed = MarkdownEventEncoder.resuming("idea", sent)
        rest = resumed.encode(StreamEvent.delta(text[int(count) :]))
        rest += resumed.encode(StreamEvent("done", {}))
        buffer = "".join(m.data for m in had) + markdown_buffer(rest.decode())
        assert buffer == text.lstrip("\n"), (seed, cut)


def test_the_id_follows_the_data_it_counts() -> None:
    encoder = MarkdownEventEncoder(ids="i")
    assert encoder.encode(StreamEvent.delta("#")) == b"data: #\nid: i:1\n\n"
    assert encoder.encode(StreamEvent.delta(" Hi\n\n")) == b"data:  H\nid: i:3\n\n"
    assert encoder.encode(StreamEvent("done", {})) == (
        b"data: i\ndata: \ndata: \nid: i:6\n\nevent: done\ndata:\n\n"
    )


# --- the response -------------------------------------------------------------------------------


class _Client:
    """The ASGI server's side of one response: what was sent, and a disconnect on demand."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.times: list[float] = []
        self._left = asyncio.Event()

    async def receive(self) -> Message:
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self.times.append(time.monotonic())

    def leave(self) -> None:
        self._left.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def _respond(response: Response, client: _Client) -> None:
    await response({"type": "http", "method": "GET"}, client.receive, client.send)


async def test_the_response_sends_each_chunk_at_once_and_ends_the_body() -> None:
    async def events() -> AsyncIterator[StreamEvent]:
        for text in ["Hello", " world"]:
            yield StreamEvent.delta(text)
            await asyncio.sleep(0.05)

    client = _Client()
    await _respond(stream_response(events(), TextEncoder(), product="test"), client)

    start = client.sent[0]
    assert start["type"] == "http.response.start"
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"cache-control"] == b"no-cache, no-transform"
    assert headers[b"x-accel-buffering"] == b"no"
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    bodies = client.sent[1:]
    assert [m.get("body") for m in bodies] == [b"Hello", b" world", b""]
    assert [m.get("more_body") for m in bodies] == [True, True, False]
    assert client.times[2] - client.times[1] >= 0.04  # sent as produced, not gathered


async def test_keepalives_are_sent_only_after_a_silence() -> None:
    async def events() -> AsyncIterator[StreamEvent]:
        for _ in range(8):  # steady output: no keep-alive needed
            yield StreamEvent.delta("x")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.35)  # a silence: keep-alives fill it
        yield StreamEvent.delta("y")

    client = _Client()
    response = stream_response(events(), JSONEventEncoder(), product="test", keepalive_seconds=0.1)
    await _respond(response, client)

    body = client.body.decode()
    steady = body[: body.rindex('{"text":"x"}')]
    assert ": keep-alive" not in steady
    assert 2 <= body.count(": keep-alive\n\n") <= 4, body
    assert body.index(": keep-alive") > body.rindex('{"text":"x"}')
    assert body.endswith('data: {"text":"y"}\n\n')


async def test_a_client_that_leaves_stops_the_producer_and_its_cleanup_runs() -> None:
    cleaned_up = asyncio.Event()

    async def events() -> AsyncIterator[StreamEvent]:
        try:
            yield StreamEvent.delta("first")
            await asyncio.sleep(30)  # an upstream that has nothing more yet
            yield StreamEvent.delta("never")
        finally:
            cleaned_up.set()

    client = _Client()
    responding = asyncio.create_task(
        _respond(stream_response(events(), TextEncoder(), product="test"), client)
    )
    await asyncio.sleep(0.05)
    client.leave()

    await asyncio.wait_for(responding, timeout=2)  # ends quietly: nobody to answer
    assert cleaned_up.is_set()
    assert client.body == b"first"
    assert not any(m.get("more_body") is False for m in client.sent)


async def test_a_client_that_leaves_as_the_first_delta_goes_out_ends_the_stream_quietly() -> None:
    """The first delta goes out from the request's task and the rest from a task of its own: a
    client that leaves in between stops the producer all the same, and the request ends as if
    the stream had (not with the cancelled task's error)."""
    cleaned_up = asyncio.Event()

    async def events() -> AsyncIterator[StreamEvent]:
        try:
            yield StreamEvent.delta("first")
            await asyncio.sleep(30)
            yield StreamEvent.delta("never")
        finally:
            cleaned_up.set()

    client = _Client()

    async def send(message: Message) -> None:
        await client.send(message)
        if message.get("body"):
            client.leave()  # gone by the time the rest is to be sent

    response = stream_response(events(), TextEncoder(), product="test")
    await asyncio.wait_for(response({"type": "http"}, client.receive, send), timeout=2)

    assert cleaned_up.is_set()
    assert client.body == b"first"


async def test_a_producer_that_breaks_mid_stream_ends_the_reply_with_an_error() -> None:
    async def events() -> AsyncIterator[StreamEvent]:
        yield StreamEvent.delta("Half an ans")
        raise RuntimeError("a bug")

    client = _Client()
    await _respond(stream_response(events(), MarkdownEventEncoder(), product="test"), client)

    assert markdown_buffer(client.body.decode()) == f"Half an ans\n\n**Error:** {BROKE}\n"
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


@pytest.mark.parametrize("comes_back", [False, True])
async def test_a_lingering_stream_waits_for_its_client_to_come_back(comes_back: bool) -> None:
    produced: list[str] = []

    async def events() -> AsyncIterator[StreamEvent]:
        for text in ["a", "b", "c", "d"]:
            produced.append(text)
            yield StreamEvent.delta(text)
            await asyncio.sleep(0.2)  # "b" at 0.2 s, "c" at 0.4 s

    linger = Linger(0.25, asyncio.Event())  # the client leaves at 0.05 s: stopped at 0.3 s
    client = _Client()
    responding = asyncio.create_task(
        _respond(stream_response(events(), TextEncoder(), product="test", linger=linger), client)
    )
    await asyncio.sleep(0.05)
    client.leave()
    if comes_back:
        await asyncio.sleep(0.1)
        linger.resumed.set()  # another request follows it now

    await asyncio.wait_for(responding, timeout=2)
    assert produced == (["a", "b", "c", "d"] if comes_back else ["a", "b"])
