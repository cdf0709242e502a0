"""Structured logs with a request id on every line and secrets scrubbed from every line.

A line is formatted and written by a thread of its own (`logging.handlers.QueueListener`): the
event loop's thread only hands the record over. A write to stderr blocks while the pipe behind
it is full (a container's log driver that falls behind), and every request's access line cost
the loop its formatting and redaction besides.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# Patterns of credentials that must never reach a log line, whatever logged them.
_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"\br8_[A-Za-z0-9]{8,}"),
    re.compile(r"\bAIza[A-Za-z0-9_-]{20,}"),
    re.compile(r"\b(?:sk|pk)_(?:test|live)_[A-Za-z0-9]{8,}"),
    re.compile(r"\bwhsec_[A-Za-z0-9+/=]{8,}"),
    # An image job's id grants access to its stream: only its first characters are kept.
    re.compile(r"\b(job_[A-Za-z0-9_-]{6})[A-Za-z0-9_-]{18}(?![A-Za-z0-9_-])"),
    re.compile(
        r"(?i)((?:api[_-]?key|token|password|secret|signature)[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]+"
    ),
]

_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",
    "request_id",
}


def redact(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[REDACTED]", text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if request_id := _request_id(record):
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = orjson.dumps(entry, default=str).decode()
        return redact(line)


def _request_id(record: logging.LogRecord) -> str | None:
    """The id of the request the record was logged in: taken as it was handed over
    (`_Handoff`), or from the context when it is formatted where it was logged."""
    request_id: str | None = getattr(record, "request_id", None) or request_id_var.get()
    return request_id


class _Handoff(logging.handlers.QueueHandler):
    """Hands a record to the writing thread, with its request id (a context variable, which
    that thread does not see) and its message rendered (its arguments may change later). The
    formatting, redaction included, is the writing thread's."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.request_id = request_id_var.get()
        record.msg, record.args = record.getMessage(), None
        return record


_listener: logging.handlers.QueueListener | None = None


def flush_logs() -> None:
    """Write what was logged so far and stop the writing thread: from then on a line is
    written where it is logged. A server process calls it as its app shuts down: uvicorn's last
    lines come after, and so does the SIGTERM it raises again once it has stopped, which ends
    the process before `atexit` runs (so lines still queued then would be lost)."""
    global _listener
    if _listener is not None:
        listener, _listener = _listener, None
        root = logging.getLogger()
        if any(isinstance(handler, _Handoff) for handler in root.handlers):
            root.handlers[:] = listener.handlers
        listener.stop()  # after what was queued before the handlers changed


atexit.register(flush_logs)


_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = {
            k: v
            for k, v in record.__dict__.items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")
        }
        request_id = _request_id(record)
        head = f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        tail = " ".join(f"{k}={v}" for k, v in extras.items())
        line = " ".join(p for p in (head, tail, f"[{request_id}]" if request_id else "") if p)
        # One record, one line: a request's path or a client's text cannot start a forged line
        # or send the terminal escape sequences.
        line = line.translate(_CONTROL_ESCAPES)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class _GracePeriodOver(logging.Filter):
    """uvicorn logs the requests still running when its graceful-shutdown period ends as an
    error; aihub ends them on purpose (a stream tells its client and stores what it produced),
    so it is a warning, which says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Cancel %s running task(s), timeout graceful shutdown exceeded":
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = (
                "the grace period is over: ending %s requests still running "
                "(a stream tells its client and stores what it produced)"
            )
        return True


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Lines on stderr, as JSON or for a console, written by a thread of their own."""
    global _listener
    flush_logs()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, writer)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_Handoff(records)]
    root.setLevel(level)
    # aihub writes its own access log (request id, no query strings); uvicorn's would repeat it.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    server = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _GracePeriodOver) for f in server.filters):
        server.addFilter(_GracePeriodOver())
    noisy_loggers = ("httpx", "httpcore", "httpx2", "openai", "google_genai", "aiosqlite")
    for noisy in (*noisy_loggers, "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel("WARNING")
