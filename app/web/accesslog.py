"""One structured JSON log line per request: what happened to the payment, never what was asked.

Fields: request id, method, route, status, duration, and — when the request carried a payment —
model, amount, payer, outcome, reason, tx hash, settlement and upstream times. Never the body, a
prompt, a completion, a header value, a key, or the client address (unless X402_LOG_CLIENT_IP=1).
The request's context (its id and the facts :func:`app.logs.note` adds) lives in :mod:`app.logs`,
so every line written while the request runs carries its id.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from flask import Flask, Response, current_app, request

from app import logs

log = logging.getLogger("x402.access")


def init_app(app: Flask) -> None:
    """Where the lines go is the deployment's choice (the packaged gunicorn settings write every
    logger as JSON to standard error); the app only writes them."""

    @app.before_request
    def _begin() -> None:
        logs.begin(uuid.uuid4().hex)

    @app.after_request
    def _line(response: Response) -> Response:
        facts = logs.current() or logs.begin(uuid.uuid4().hex)  # a request refused before _begin ran
        fields: dict[str, Any] = {
            "request_id": facts.request_id,
            "method": request.method,
            "route": request.url_rule.rule if request.url_rule is not None else "unmatched",
            "status": response.status_code,
            "ms": round((time.perf_counter() - facts.began) * 1000, 1),  # milliseconds
        }
        fields.update(facts.fields)
        if current_app.config["X402_SETTINGS"].log_client_ip:
            fields["client_ip"] = request.remote_addr
        response.headers["X-Request-Id"] = facts.request_id
        log.info("%s %s %s", request.method, fields["route"], response.status_code, extra={"fields": fields})
        logs.end()
        return response

    @app.teardown_request
    def _end(_: BaseException | None) -> None:
        logs.end()  # also when a response was never made
