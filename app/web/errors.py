"""One JSON error shape, ``{"error": {"code", "message"}}``, for every 4xx/5xx the proxy returns.

The one exception is the 402 challenge itself, whose body is the x402 v1 ``PaymentRequired`` object
that v1 clients parse; it still carries a reason code in its ``error`` field.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from app.web.accesslog import note
from app.web.metrics import payment_outcome

log = logging.getLogger("x402.errors")


class ApiError(Exception):
    """Raised anywhere below a view to answer with the JSON error shape."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _http_code(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


def init_app(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        note(outcome="error", reason=exc.code)
        if exc.status == 503:
            payment_outcome("unavailable", exc.code)
        return json_error(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        headers = dict(exc.get_headers())
        headers.pop("Content-Type", None)
        return json_error(exc.code or 500, _http_code(exc), exc.description or "", headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # The type only: messages may quote request content, which is never logged.
        log.error("unexpected error: %s", type(exc).__name__)
        return json_error(500, "internal_error", "the proxy failed unexpectedly")
