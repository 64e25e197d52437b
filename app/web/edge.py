"""The HTTP edge, before routing: one canonical path per resource, and CORS for browser wallets.

Path variants (``//v1//chat/completions``, a trailing slash, ``/v1/./chat/../chat/completions``,
percent-encoded letters or slashes) are rewritten to their canonical form *before* the URL map sees
them, so the paid-route decision is made on exactly the path that is priced, and no spelling of a
paid path can land anywhere else.
"""

from __future__ import annotations

import posixpath
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote

from flask import Flask, Response, request

from app.x402.challenge import EXPOSED_HEADERS

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_SLASHES = re.compile(r"/{2,}")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": EXPOSED_HEADERS,
}
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": (
        "Content-Type, Authorization, PAYMENT-SIGNATURE, X-PAYMENT, Payment-Retry, SIGN-IN-WITH-X"
    ),
    "Access-Control-Max-Age": "600",
}


def canonical_path(path: str) -> str:
    """Decode leftover percent-escapes (repeatedly), collapse slashes, resolve dot segments,
    drop a trailing slash."""
    for _ in range(3):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = posixpath.normpath("/" + _SLASHES.sub("/", path))
    return "/" if path in ("", ".", "//") else _SLASHES.sub("/", path)


class CanonicalPaths:
    """WSGI middleware rewriting ``PATH_INFO`` to its canonical form."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["PATH_INFO"] = canonical_path(environ.get("PATH_INFO", "/") or "/")
        return self.app(environ, start_response)


def init_app(app: Flask) -> None:
    """Wrap the WSGI app in ``CanonicalPaths``; register a before_request hook answering every CORS
    preflight (OPTIONS) with 204, free, and an after_request hook adding the CORS headers a response lacks."""
    app.wsgi_app = CanonicalPaths(app.wsgi_app)  # type: ignore[method-assign]

    @app.before_request
    def _preflight() -> Response | None:
        """Answer CORS preflights free, for every route, without reaching a view."""
        if request.method == "OPTIONS":
            response = Response(status=204)
            response.headers.update(PREFLIGHT_HEADERS)
            return response
        return None

    @app.after_request
    def _cors(response: Response) -> Response:
        for name, value in CORS_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def client_gone(environ: Mapping[str, Any]) -> bool:
    """Whether the buyer closed the connection (gunicorn or werkzeug's socket read without
    blocking and without consuming: end of stream or a reset). False when it cannot tell."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if not isinstance(sock, socket.socket):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # connected, nothing more sent
    except (ValueError, OSError) as exc:  # reset by the peer, or a TLS socket that cannot peek
        return isinstance(exc, ConnectionError)
