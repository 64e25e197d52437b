"""Pieces for TEE tests on real sockets and processes (issue 18), around the AMD-shaped chain of our own
(``tests/unit/test_sev_snp.py``) and its RA-TLS certificates (``tests/unit/test_ra_tls.py``):

- ``write_enclave_files``: an enclave's RA-TLS certificate and key as PEM files, for
  ``StandinModel(tls=...)`` (``app.devnet.standin``) or ``--tls-cert``/``--tls-key``;
- ``KdsStandin``: a local stand-in of AMD's key distribution service answering VCEK requests;
- ``write_roots``: an operator's roots file (``X402_ATTESTATION_ROOTS``) for a chain of ours.
"""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from app.devnet.standin import StandinModel
from tests.unit.test_ra_tls import enclave_certificate
from tests.unit.test_sev_snp import CHAIN, Chain

VCEK_PREFIX = "/vcek/v1/"


def write_enclave_files(directory: Path, **certificate: Any) -> tuple[Path, Path, bytes]:
    """Write an RA-TLS certificate of our chain (``enclave_certificate(**certificate)``: ``key``,
    ``report``, ``bound_to``, ``days``) into ``directory`` as ``cert.pem`` and ``key.pem`` (PKCS#8,
    unencrypted); return (certificate path, key path, certificate DER). Files already there are
    replaced, so call it with another directory to keep both of two certificates."""
    der, key = enclave_certificate(**certificate)
    directory.mkdir(parents=True, exist_ok=True)
    certificate_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    certificate_path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certificate_path, key_path, der


def write_roots(path: Path, chain: Chain = CHAIN) -> Path:
    """Write ``chain``'s ASK then its ARK (PEM, in that order: a roots file's order must not matter)
    to ``path``; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (chain.ask, chain.ark)))
    return path


class _KdsHandler(http.server.BaseHTTPRequestHandler):
    server: _KdsServer

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_GET(self) -> None:
        standin = self.server.standin
        with standin._lock:
            standin.asked.append(self.path)
            status = standin.status
        if not self.path.startswith(VCEK_PREFIX):
            status = 404
        body = standin.vcek_der if status == 200 else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _KdsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, standin: KdsStandin) -> None:
        self.standin = standin
        super().__init__(("127.0.0.1", 0), _KdsHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: a client hanging up is no test failure."""


class KdsStandin:
    """AMD's key distribution service on 127.0.0.1 (plain HTTP, a free port), serving as soon as it
    is built: every ``GET /vcek/v1/...`` is answered with ``chain``'s VCEK (DER), whatever the chip
    and TCB asked, or with ``status`` and no body when a test sets another one (503: an outage);
    other paths get 404. Every path asked (query string included) is appended to ``asked``, in order.
    ``url`` has no trailing slash; ``close()`` (or leaving a ``with`` block) stops it."""

    def __init__(self, chain: Chain = CHAIN) -> None:
        self.vcek_der: bytes = chain.vcek.public_bytes(serialization.Encoding.DER)
        self.asked: list[str] = []
        self.status: int = 200
        self._lock = threading.Lock()
        self._server = _KdsServer(self)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"kds-standin-{self._server.server_port}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    def close(self) -> None:
        """Stop serving and free the port; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> KdsStandin:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


ATTESTED_MODEL = "hermes-3-8b-tee"
STATED_MODEL = "stated-tee"


def attested_catalog(path: Path, origin: str, measurement: str, terms: str = "") -> Path:
    """Write a catalog to ``path``: the packaged ``ATTESTED_MODEL`` entry served by the enclave at
    ``origin`` with ``attestation = "sev-snp"``, ``measurement`` (hex) accepted and ``terms`` (TOML
    lines) added, and ``STATED_MODEL``, a TEE on its operator's word from the shared host."""
    from app.settings import DEFAULT_CATALOG

    path.write_text(
        DEFAULT_CATALOG.read_text()
        + f'upstream_url = "{origin}"\nattestation = "sev-snp"\n'
        + f'measurements = ["{measurement}"]\n{terms}\n'
        + f'\n[models."{STATED_MODEL}"]\ndescription = "a TEE on its operator\'s word"\n'
        + 'tee = true\npricing = "per_call"\nprice = 1000\n'
    )
    return path


@dataclass
class Enclave:
    """An HTTPS enclave stand-in (``StandinModel`` serving an RA-TLS certificate of our chain), the
    directory its certificates are written to, and the DER of the one it started with."""

    host: StandinModel
    directory: Path
    der: bytes

    def restart_with(self, name: str, **certificate: Any) -> bytes:
        """The enclave restarts serving another RA-TLS certificate (``enclave_certificate``'s
        arguments), written under ``directory / name``: open connections close, new ones get it.
        Returns its DER."""
        path, key, der = write_enclave_files(self.directory / name, **certificate)
        self.host.reload_certificate(path, key, restart=True)
        return der
