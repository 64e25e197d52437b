"""Fetching trusted-execution evidence (issue 18; checked by ``app.tee``): the RA-TLS certificate an
enclave serves, and AMD's VCEK for a report from its key distribution service (KDS).

- ``served_certificate``: one TLS handshake with the enclave's origin, without a CA check (an RA-TLS
  certificate is self-signed: what it carries is verified instead), returning the certificate's DER.
- ``Kds``: VCEKs by URL, cached on disk under ``cache_dir`` (one file per URL, shared by the workers,
  written atomically; a cache that cannot be written or read only costs a request), asked at most
  once per ``MIN_INTERVAL`` seconds per process (a caller waits its turn), and after a failure not
  again for that URL before a backoff that doubles up to ``MAX_BACKOFF`` seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from app.backends.http import Sessions
from app.tee.sev_snp import load_vcek

log = logging.getLogger("x402.tee")
MIN_INTERVAL = 1.0  # seconds between two requests to the KDS, per process
MAX_BACKOFF = 60.0  # seconds: the longest wait after failures
MAX_WAIT = 3.0  # seconds a caller waits for its turn to ask the KDS


class TeeUnavailable(RuntimeError):
    """The evidence could not be fetched now (the enclave or the KDS did not answer as expected)."""


def served_certificate(origin: str, timeout: float) -> bytes:
    """The DER of the TLS certificate ``origin`` (``https://host[:port]``) serves now. Raises
    ``TeeUnavailable``, whose words never name the origin (buyers read them in 503 answers)."""
    parts = urlsplit(origin)
    if parts.scheme != "https" or not parts.hostname:
        raise TeeUnavailable("the enclave's origin is not https")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed by design: its content is what gets verified
    try:
        with (
            socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=parts.hostname) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise TeeUnavailable(f"no TLS handshake with the enclave: {type(exc).__name__}") from None
    if not der:
        raise TeeUnavailable("the enclave served no certificate")
    return der


def _is_certificate(der: bytes) -> bool:
    """Whether ``der`` reads as an X.509 certificate (only those are cached)."""
    try:
        load_vcek(der)
    except ValueError:
        return False
    return True


class Kds:
    """AMD's key distribution service for VCEKs (``X402_AMD_KDS_URL``), cached on disk."""

    def __init__(self, base_url: str, cache_dir: Path, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = cache_dir
        self.timeout = timeout
        self._sessions = Sessions()
        self._lock = threading.Lock()
        self._next_at = 0.0  # monotonic time of this process's next turn to ask the KDS
        self._retry_at: dict[str, float] = {}  # URL → monotonic time before which it is not asked again
        self._backoff: dict[str, float] = {}  # URL → its current backoff, seconds

    def _path(self, url: str) -> Path:
        return self.cache_dir / (hashlib.sha256(url.encode()).hexdigest() + ".der")

    def vcek(self, url: str) -> bytes:
        """The VCEK's DER at ``url`` (one of ``self.base_url``): from the disk cache, else from the
        KDS, in this process's turn (at most one request per ``MIN_INTERVAL`` seconds: a caller waits
        up to ``MAX_WAIT`` for it) unless this URL failed within its backoff. Raises
        ``TeeUnavailable`` (not ours to ask, backing off, busy, an answer other than a certificate, no
        answer)."""
        if not url.startswith(self.base_url + "/"):
            raise TeeUnavailable("a VCEK URL outside the configured KDS")
        path = self._path(url)
        with contextlib.suppress(OSError):  # unreadable, or removed meanwhile: not cached
            return path.read_bytes()
        with self._lock:
            now = time.monotonic()
            if now < self._retry_at.get(url, 0.0):
                raise TeeUnavailable(f"the KDS is asked again in {self._retry_at[url] - now:.1f} s")
            wait = max(0.0, self._next_at - now)
            if wait > MAX_WAIT:
                raise TeeUnavailable("the KDS is busy: too many VCEKs asked at once")
            self._next_at = now + wait + MIN_INTERVAL
        time.sleep(wait)
        try:
            answer = self._sessions.get().get(url, timeout=self.timeout)
        except requests.RequestException as exc:
            self._failed(url)
            raise TeeUnavailable(f"the KDS did not answer: {type(exc).__name__}") from None
        if answer.status_code != 200 or not _is_certificate(answer.content):
            self._failed(url)
            raise TeeUnavailable(f"the KDS answered {answer.status_code} without a certificate")
        with self._lock:
            self._backoff.pop(url, None)
            self._retry_at.pop(url, None)
        try:
            self._keep(path, answer.content)
        except OSError as exc:  # a cache that cannot be written costs a KDS request next time, no more
            log.warning("VCEK not cached in %s: %s", self.cache_dir, type(exc).__name__)
        return answer.content

    def forget(self, url: str) -> None:
        """Drop the cached VCEK of ``url`` (it did not verify: the next check asks the KDS again)."""
        self._path(url).unlink(missing_ok=True)

    def _failed(self, url: str) -> None:
        """``url`` is not asked again before its backoff, which doubles with each failure."""
        with self._lock:
            backoff = min(self._backoff.get(url, MIN_INTERVAL) * 2, MAX_BACKOFF)
            self._backoff[url] = backoff
            self._retry_at[url] = time.monotonic() + backoff

    def _keep(self, path: Path, der: bytes) -> None:
        """Write the cache file atomically (a temporary file renamed), so a worker never reads half."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(der)
            os.replace(temporary, path)
        except OSError:
            Path(temporary).unlink(missing_ok=True)
            raise
