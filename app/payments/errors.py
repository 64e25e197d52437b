"""The one exception the money path raises to answer with an error (the web layer shapes it as
``{"error": {"code", "message"}}``): an HTTP status, a stable code, a message and extra headers."""

from __future__ import annotations


class ApiError(Exception):
    """Raised anywhere below a view to answer with the JSON error shape."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
