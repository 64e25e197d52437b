"""Forwarding to the model host with the operator's key, over one pooled session per thread and process.

Only the priced JSON body and a fixed set of headers go upstream: the buyer's ``Authorization``,
cookies and payment headers never leave the proxy, and the operator's key is never echoed back.
Streams are relayed chunk by chunk as they arrive.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from app.backends.enclave import Admission, AttestationFailed, Evidence
from app.backends.http import Sessions
from app.catalog import Model
from app.settings import Settings

CONNECT_TIMEOUT = 5.0
# A connection error or a 5xx before any byte of the answer is tried once more before the buyer
# hears of it: agent SDKs retry a 5xx without the payment header, which makes their wallet pay again.
ATTEMPTS = 2
ROUTE_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# Response headers of the model host that are passed to the buyer; everything else is dropped.
PASSED_RESPONSE_HEADERS = ("Content-Type",)


# A host's 4xx that is about the buyer's body is told to the buyer with that status and its scrubbed
# message; any other 4xx (the operator's key, a wrong path, rate limits) is a 502 without a message.
BUYER_ERRORS = frozenset({400, 404, 413, 422})
ERROR_MESSAGE_LIMIT = 300  # characters of a host's error message a buyer may see
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_BEARER = re.compile(r"(?i)bearer\s+\S+")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")
_HOSTNAME = re.compile(r"\b(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?::\d+)?\b")
_TOKEN = re.compile(r"\b(?=[A-Za-z_\-]*[0-9])[A-Za-z0-9_\-]{24,}")  # a credential (or a piece of one)


def abandoned_after(settings: Settings) -> float:
    """Seconds after which a payment still "settling" has lost its request (a worker killed
    mid-call): the receipt wait, every try at the model host (connect and read timeouts), and 30 s."""
    return settings.receipt_timeout + ATTEMPTS * (CONNECT_TIMEOUT + settings.upstream_timeout) + 30


def host_error_message(content: bytes, secrets: Iterable[str], hosts: Iterable[str]) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message"}}``, ``{"message"}`` or
    ``{"detail"}``), scrubbed for a buyer: every secret and configured host, URLs, bearer
    credentials, IP addresses, host names and long tokens replaced; printable, at most
    ``ERROR_MESSAGE_LIMIT`` characters. "" when the body carries no message."""
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    candidates = [error.get("message") if isinstance(error, dict) else error]
    if isinstance(data, dict):
        candidates += [data.get("message"), data.get("detail")]
    message = next((m for m in candidates if isinstance(m, str) and m), "")
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        message = message.replace(secret, "[redacted]")
    for host in {urlsplit(h).hostname or "" for h in hosts if h} - {""}:
        message = re.sub(re.escape(host), "[model host]", message, flags=re.IGNORECASE)
    for pattern, mark in (
        (_URL, "[url]"),
        (_BEARER, "[redacted]"),
        (_IPV4, "[address]"),
        (_HOSTNAME, "[host]"),
    ):
        message = pattern.sub(mark, message)
    message = _TOKEN.sub("[redacted]", message)
    return "".join(c if c.isprintable() else " " for c in message)[:ERROR_MESSAGE_LIMIT].strip()


class UpstreamFailed(RuntimeError):
    """The model host could not be reached or answered with a server error: the buyer hears
    ``status``, ``code`` and ``told()``, and may retry after ``retry_after`` seconds."""

    status = 502
    code = "upstream_unavailable"
    retry_after = 1

    def told(self) -> str:
        """What the buyer is told of the failure, in words (never the host's address)."""
        return "the model host failed"


class Unattested(UpstreamFailed):
    """An attested model's enclave served a certificate that does not verify: nothing was sent. It
    is verified again within ``app.backends.enclave.RETRY_FAILED`` (5) seconds."""

    status = 503
    code = "attestation_failed"
    retry_after = 5

    def told(self) -> str:
        return f"the model host's enclave failed attestation ({self})"


@dataclass
class UpstreamAnswer:
    """The model host's answer, below 500, its body not read yet: ``status`` is its HTTP status,
    ``headers`` only those in ``PASSED_RESPONSE_HEADERS``."""

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
        """The whole body (raises ``UpstreamFailed`` if the host cuts it short)."""
        return b"".join(self.chunks())

    def close(self) -> None:
        """Drop the answer unread (its payment did not settle)."""
        self.response.close()


class Upstream:
    """The model hosts: the shared ``X402_UPSTREAM_URL``, or a catalog model's own host and key."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sessions = Sessions()

    def forward(
        self,
        route: str,
        body: dict[str, object],
        model: Model | None = None,
        admission: Admission | None = None,
    ) -> UpstreamAnswer:
        """POST the priced JSON ``body`` to the model's host at the path of ``route`` ("chat" or
        "completions"); the answer streams. With an ``admission`` (an attested model) the request
        goes only over a connection pinned to its evidence's certificate (``_pinned``). Raises
        ``UpstreamFailed`` when a connection error or 5xx happens on both of ``ATTEMPTS`` tries, or
        at once when the host takes longer than ``X402_UPSTREAM_TIMEOUT`` seconds to answer;
        ``Unattested`` when the enclave now serves a certificate that does not verify."""
        return self._request("POST", ROUTE_PATHS[route], body, model, admission)

    def probe(self, model: Model | None = None, admission: Admission | None = None) -> UpstreamAnswer:
        """GET the model host's model list (the paid ping, and readiness); raises ``UpstreamFailed``
        as ``forward`` does."""
        return self._request("GET", "/v1/models", None, model, admission)

    def _session(self, admission: Admission | None) -> requests.Session:
        if admission is None:
            return self._sessions.get()
        assert admission.evidence is not None, "a call to an attested model is admitted first"
        return admission.attestor.session(admission.model, admission.evidence)

    def _request(
        self,
        method: str,
        route_path: str,
        body: dict[str, object] | None,
        model: Model | None,
        admission: Admission | None,
    ) -> UpstreamAnswer:
        """The model's own host and key when the catalog names them (a direct TEE host), else the
        shared upstream with the operator's key. A pinned connection whose TLS fails (another
        certificate, or a broken handshake) has the certificate served now verified before the next
        try: a new one that verifies replaces ``admission.evidence``; one that does not raises
        ``Unattested``."""
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
        failure = UpstreamFailed("no attempt")
        tries, spare = ATTEMPTS, 1  # spare: one more try for a certificate renewed on the last one
        while tries > 0:
            tries -= 1
            try:
                response = self._session(admission).request(
                    method,
                    url,
                    json=body,
                    headers=headers,
                    stream=True,
                    timeout=(CONNECT_TIMEOUT, self.settings.upstream_timeout),
                    allow_redirects=admission is None,  # an enclave's answer comes from the enclave
                )
            except requests.exceptions.SSLError as exc:
                failure = UpstreamFailed(type(exc).__name__)
                if admission is not None:
                    seen = admission.evidence.fingerprint
                    admission.evidence = self._renewed(admission)
                    if admission.evidence.fingerprint != seen and tries == 0 and spare:
                        tries, spare = 1, 0
                continue
            except requests.ConnectionError as exc:  # refused, reset, or no connection in time
                failure = UpstreamFailed(type(exc).__name__)
                failure.__cause__ = exc
                continue
            except requests.RequestException as exc:  # a host that took too long is not asked twice
                raise UpstreamFailed(type(exc).__name__) from exc
            except Exception as exc:  # anything else the HTTP stack raises: a failed host, never a 500
                raise UpstreamFailed(type(exc).__name__) from exc
            if response.status_code >= 500:
                response.close()
                failure = UpstreamFailed(f"status {response.status_code}")
                continue
            passed = {k: v for k, v in response.headers.items() if k in PASSED_RESPONSE_HEADERS}
            return UpstreamAnswer(response.status_code, passed, response)
        raise failure

    def _renewed(self, admission: Admission) -> Evidence:
        assert admission.evidence is not None
        try:
            return admission.attestor.renewed(admission.model, admission.evidence)
        except AttestationFailed as exc:
            raise Unattested(f"{exc.reason}: {exc.detail}") from None
