"""One structured JSON log line per request: what happened to the payment, never what was asked.

Fields: request id, method, route, status, duration, and — when the request carried a payment —
model, amount, payer, outcome, reason, tx hash, settlement and upstream times. Never the body, a
prompt, a completion, a header value, a key, or the client address (unless X402_LOG_CLIENT_IP=1).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from flask import Flask, Response, current_app, g, has_request_context, request

log = logging.getLogger("x402.access")


def note(**fields: Any) -> None:
    """Add facts about this request's payment to its log line (a no-op after the request, e.g.
    at the end of a stream, when the line has been written)."""
    if has_request_context():
        g.setdefault("x402_log", {}).update(fields)


def init_app(app: Flask) -> None:
    """Where the lines go is the deployment's choice (gunicorn.conf.py sends the ``x402`` loggers
    to stdout); the app only writes them."""

    @app.before_request
    def _begin() -> None:
        g.x402_request_id = uuid.uuid4().hex
        g.x402_began = time.perf_counter()

    @app.after_request
    def _line(response: Response) -> Response:
        record: dict[str, Any] = {
            "request_id": getattr(g, "x402_request_id", ""),
            "method": request.method,
            "route": request.url_rule.rule if request.url_rule is not None else "unmatched",
            "status": response.status_code,
            "ms": round((time.perf_counter() - getattr(g, "x402_began", time.perf_counter())) * 1000, 1),
        }
        record.update(getattr(g, "x402_log", {}))
        if current_app.config["X402_SETTINGS"].log_client_ip:
            record["client_ip"] = request.remote_addr
        response.headers["X-Request-Id"] = record["request_id"]
        log.info(json.dumps(record, separators=(",", ":")))
        return response
