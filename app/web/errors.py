"""One JSON error shape, ``{"error": {"code", "message"}}``, for every 4xx/5xx the proxy returns.

The one exception is the 402 challenge itself, whose body is the x402 v1 ``PaymentRequired`` object
that v1 clients parse; it still carries a reason code in its ``error`` field.
"""

from __future__ import annotations

import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from app.logs import note
from app.metrics import payment_outcome
from app.payments.answers import error_answer
from app.payments.errors import ApiError

log = logging.getLogger("x402.errors")


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """The one JSON error shape (``app.payments.answers.error_answer``) as a Flask response."""
    answer = error_answer(status, code, message, headers)
    return Response(answer.body, status=answer.status, headers=answer.headers)


def _http_code(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


def init_app(app: Flask) -> None:
    """Register the error handlers: ``ApiError``, any ``HTTPException`` and any other exception (500
    ``internal_error``) are all answered in the one JSON error shape."""

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
