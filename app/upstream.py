"""Forwarding to the model host with the operator's key, over one pooled session per process.

Only the priced JSON body and a fixed set of headers go upstream: the buyer's ``Authorization``,
cookies and payment headers never leave the proxy, and the operator's key is never echoed back.
Streams are relayed chunk by chunk as they arrive.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import requests
from flask import Flask, current_app

from .catalog import Model
from .settings import Settings

CONNECT_TIMEOUT = 5.0
ROUTE_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# Response headers of the model host that are passed to the buyer; everything else is dropped.
PASSED_RESPONSE_HEADERS = ("Content-Type",)


class UpstreamFailed(RuntimeError):
    """The model host could not be reached or answered with a server error."""


@dataclass
class UpstreamAnswer:
    status: int
    headers: dict[str, str]
    response: requests.Response

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives (raises ``UpstreamFailed`` if the host cuts it short)."""
        try:
            yield from self.response.iter_content(chunk_size=None)
        except requests.RequestException as exc:
            raise UpstreamFailed(type(exc).__name__) from exc
        finally:
            self.response.close()

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def close(self) -> None:
        """Drop the answer unread (its payment did not settle)."""
        self.response.close()


class Upstream:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None or getattr(self._local, "pid", None) != os.getpid():
            session = requests.Session()
            session.trust_env = False
            self._local.session, self._local.pid = session, os.getpid()
        return session

    def forward(self, route: str, body: dict[str, object], model: Model | None = None) -> UpstreamAnswer:
        """POST the priced body to the model's host; raise ``UpstreamFailed`` on connection errors and 5xx."""
        return self._request("POST", route_path=ROUTE_PATHS[route], body=body, model=model)

    def probe(self, model: Model | None = None) -> UpstreamAnswer:
        """GET the model host's model list (the paid ping, and readiness)."""
        return self._request("GET", route_path="/v1/models", body=None, model=model)

    def _request(
        self, method: str, route_path: str, body: dict[str, object] | None, model: Model | None
    ) -> UpstreamAnswer:
        """The model's own host and key when the catalog names them (a direct TEE host), else the
        shared upstream with the operator's key."""
        base = (model.upstream_url if model else "") or self.settings.upstream_url
        key = (
            self.settings.upstream_keys[model.upstream_key]
            if model and model.upstream_key
            else self.settings.upstream_api_key
        )
        url = base + route_path
        headers = {"Accept": "application/json, text/event-stream"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            response = self._session().request(
                method,
                url,
                json=body,
                headers=headers,
                stream=True,
                timeout=(CONNECT_TIMEOUT, self.settings.upstream_timeout),
            )
        except requests.RequestException as exc:
            raise UpstreamFailed(type(exc).__name__) from exc
        if response.status_code >= 500:
            response.close()
            raise UpstreamFailed(f"status {response.status_code}")
        passed = {k: v for k, v in response.headers.items() if k in PASSED_RESPONSE_HEADERS}
        return UpstreamAnswer(response.status_code, passed, response)


def init_app(app: Flask) -> None:
    app.extensions["x402.upstream"] = Upstream(app.config["X402_SETTINGS"])


def get_upstream() -> Upstream:
    upstream: Upstream = current_app.extensions["x402.upstream"]
    return upstream
