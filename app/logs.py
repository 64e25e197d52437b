"""One log format for every logger: each line a JSON object, and the facts of the request it belongs to.

A line carries ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message`` and ``pid``, the
``request_id`` when it is written while a request runs, and the fields the code attached to it
(``extra={"fields": {...}}``) — for the access line, what happened to the payment. A traceback, when
there is one, goes in ``exc``. Never the body, a prompt, a header value or a key: the code logs
facts, not requests.

This module imports no Flask, so the money path (``app.payments``) can call :func:`note`; the web
layer (``app.web.accesslog``) opens and closes the request's context around each request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass
class RequestFacts:
    """What one request's access line will say, gathered while the request runs."""

    request_id: str
    began: float = field(default_factory=time.perf_counter)  # time.perf_counter() seconds
    fields: dict[str, Any] = field(default_factory=dict)


_current: contextvars.ContextVar[RequestFacts | None] = contextvars.ContextVar("x402_request", default=None)


def begin(request_id: str) -> RequestFacts:
    """Open a request's context in this thread (a worker thread runs one request at a time)."""
    facts = RequestFacts(request_id)
    _current.set(facts)
    return facts


def current() -> RequestFacts | None:
    """The running request's facts, or None outside a request (or after its line was written)."""
    return _current.get()


def end() -> None:
    """Close this thread's request context: later :func:`note` calls (a stream's end) are no-ops and
    later lines carry no request id."""
    _current.set(None)


def note(**fields: Any) -> None:
    """Add facts about this request's payment to its log line (a no-op after the request, e.g.
    at the end of a stream, when the line has been written)."""
    facts = _current.get()
    if facts is not None:
        facts.fields.update(fields)


class JsonFormatter(logging.Formatter):
    """A record → one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line: time, level, logger, message, pid, the request id within a request, the record's
        ``fields`` (never overriding those keys), and ``exc`` / ``stack`` when the record has them."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        facts = _current.get()
        if facts is not None:
            line["request_id"] = facts.request_id
        attached = getattr(record, "fields", None)
        if isinstance(attached, dict):
            line.update({key: value for key, value in attached.items() if key not in line})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, separators=(",", ":"), default=str)


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dictionary (gunicorn's ``logconfig_dict``): every logger writes
    JSON lines to standard error through the root logger. ``gunicorn.error`` loses the text handler
    gunicorn gave it and propagates; its level stays gunicorn's ``--log-level``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "json": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "json"},
        },
        "root": {"level": level, "handlers": ["json"]},
        "loggers": {"gunicorn.error": {"handlers": [], "propagate": True}},
    }


def configure(level: int = logging.INFO) -> None:
    """Every logger writes JSON lines to standard error, Python's warnings included (the CLI and
    ``x402-proxy devnet``). Leaves a root logger that already has handlers alone (a test run's)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
