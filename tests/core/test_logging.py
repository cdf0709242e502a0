"""Log lines are JSON with the request id, and never carry a credential."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading

import pytest

from aihub.core.logging import (
    ConsoleFormatter,
    JsonFormatter,
    configure_logging,
    flush_logs,
    redact,
    request_id_var,
)

SECRETS = [
    "Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJl",
    "key sk-proj-abcdefghijklmnop1234",
    "token r8_abcdefghijklmnop",
    "gemini AIzaSyA1234567890abcdefghijklmnopqrstu",
    "clerk sk_live_abcdefghijklmnop",
    "webhook whsec_abcdefghijklmnop",
    '{"api_key": "anything-at-all"}',
    "password=hunter2hunter2",
]


@pytest.mark.parametrize("line", SECRETS)
def test_credentials_are_redacted(line: str) -> None:
    secret = line.split()[-1].strip('"}').split("=")[-1]
    assert secret not in redact(line)
    assert "[REDACTED]" in redact(line)


def test_an_image_job_id_keeps_only_its_first_characters() -> None:
    line = "GET /api/generate/job_AbCdEfGhIjKlMnOpQrStUvWx/stream 200"
    assert redact(line) == "GET /api/generate/job_AbCdEf[REDACTED]/stream 200"


def test_ordinary_text_is_left_alone() -> None:
    text = "GET /api/ideas 200 in 3.2 ms; 12 tokens; skipping"
    assert redact(text) == text


def test_a_console_line_cannot_forge_another_or_steer_the_terminal() -> None:
    record = logging.makeLogRecord(
        {"name": "aihub.access", "levelname": "INFO", "levelno": 20, "msg": "%s %s"}
    )
    record.args = ("GET", "/api/x\nERROR aihub.auth: admin login succeeded\x1b[31m")
    line = ConsoleFormatter().format(record)
    assert "\n" not in line
    assert "\x1b" not in line
    assert line.endswith("/api/x\\x0aERROR aihub.auth: admin login succeeded\\x1b[31m")


def test_json_lines_carry_the_request_id_and_extras() -> None:
    token = request_id_var.set("abc123")
    try:
        record = logging.makeLogRecord(
            {"name": "aihub.test", "levelname": "INFO", "levelno": 20, "msg": "hello %s"}
        )
        record.args = ("Bearer eyJabcdefgh.eyJabcdefgh.sig",)
        record.idea_id = "i-1"
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "abc123"
    assert line["idea_id"] == "i-1"
    assert "eyJabcdefgh" not in line["msg"]


def test_requests_ended_after_the_grace_period_are_a_warning_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("INFO", "console")
    root.addHandler(caplog.handler)
    try:
        # What uvicorn's server logs when streams outlive `timeout_graceful_shutdown`.
        logging.getLogger("uvicorn.error").error(
            "Cancel %s running task(s), timeout graceful shutdown exceeded", 3
        )
    finally:
        root.handlers[:], root.level = handlers, level
    [record] = [r for r in caplog.records if r.name == "uvicorn.error"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("the grace period is over: ending 3 requests")


def test_lines_are_formatted_and_written_by_a_thread_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The event loop's thread only hands records over: a full pipe behind stderr must not
    stop it. Each line keeps the request id it was logged in."""
    written: list[tuple[int, str]] = []

    class Stderr:
        def write(self, text: str) -> None:
            written.append((threading.get_ident(), text))

        def flush(self) -> None:
            pass

    def log() -> None:
        request_id_var.set("req-1")
        logger = logging.getLogger("aihub.test")
        logger.info("hello %s", "world", extra={"idea_id": "i-1"})
        try:
            raise ValueError("sk-proj-abcdefghijklmnop1234")
        except ValueError:
            logger.exception("it failed")

    monkeypatch.setattr(sys, "stderr", Stderr())
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json")
        contextvars.copy_context().run(log)
    finally:
        flush_logs()
        root.handlers[:], root.level = handlers, level

    assert {thread for thread, _ in written} - {threading.get_ident()} == {
        thread for thread, _ in written
    }
    hello, failed = (json.loads(text) for _, text in written)
    assert (hello["msg"], hello["request_id"], hello["idea_id"]) == ("hello world", "req-1", "i-1")
    assert failed["request_id"] == "req-1"
    assert "ValueError" in failed["exc"]
    assert "sk-proj-abcdefghijklmnop1234" not in failed["exc"]
