"""Fetching RA-TLS evidence over real sockets (``app.backends.tee``): the certificate a local HTTPS
enclave stand-in serves (an RA-TLS certificate of our own chain, ``tests/unit/test_ra_tls.py``), and
VCEKs from a local stand-in of AMD's key distribution service, cached on disk and asked sparingly;
then the whole bundle verified (``app.tee.ra_tls.verify``)."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from app.backends.tee import Kds, TeeUnavailable, served_certificate
from app.devnet import free_port
from app.tee.ra_tls import Roots, verify
from app.tee.sev_snp import Terms
from tests.unit.test_ra_tls import NOW, enclave_certificate
from tests.unit.test_sev_snp import CHAIN, MEASUREMENT

pytestmark = pytest.mark.integration


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def enclave(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """An HTTPS server on 127.0.0.1 serving an RA-TLS certificate: (origin, its DER)."""
    der, key = enclave_certificate()
    certificate = tmp_path / "cert.pem"
    private = tmp_path / "key.pem"
    certificate.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    class Enclave(_Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Enclave)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, private)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_port}", der
    server.shutdown()


@pytest.fixture
def kds() -> Iterator[tuple[str, list[str], dict[str, int]]]:
    """A KDS stand-in: ``/vcek/v1/...`` answers our chain's VCEK, or the status set in ``answers``;
    every path asked is recorded."""
    asked: list[str] = []
    answers: dict[str, int] = {}
    vcek = CHAIN.vcek.public_bytes(serialization.Encoding.DER)

    class Service(_Quiet):
        def do_GET(self) -> None:
            asked.append(self.path)
            status = answers.get("status", 200)
            self.send_response(status)
            self.end_headers()
            if status == 200:
                self.wfile.write(vcek)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", asked, answers
    server.shutdown()


def test_the_served_certificate_and_amd_s_vcek_verify_together(
    enclave: tuple[str, bytes], kds: tuple[str, list[str], dict[str, int]], tmp_path: Path
) -> None:
    origin, served = enclave
    base, asked, _ = kds
    der = served_certificate(origin, timeout=5)
    assert der == served
    client = Kds(base, tmp_path / "vcek", timeout=5)
    url = base + "/vcek/v1/Milan/" + CHAIN.chip_id.hex() + "?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115"
    vcek_der = client.vcek(url)
    roots = Roots("Milan", CHAIN.ark, CHAIN.ask, frozenset(CHAIN.pinned))
    verdict = verify(
        der, x509.load_der_x509_certificate(vcek_der), vcek_der, roots, Terms(frozenset({MEASUREMENT})), NOW
    )
    assert verdict.measurement == MEASUREMENT.hex()
    assert client.vcek(url) == vcek_der and len(asked) == 1  # the second time from the disk cache
    assert Kds(base, tmp_path / "vcek", timeout=5).vcek(url) == vcek_der and len(asked) == 1  # another worker


def test_the_kds_is_asked_sparingly_and_backs_off_after_failures(
    kds: tuple[str, list[str], dict[str, int]], tmp_path: Path
) -> None:
    base, asked, answers = kds
    client = Kds(base, tmp_path, timeout=5)
    answers["status"] = 503
    with pytest.raises(TeeUnavailable, match="503"):
        client.vcek(base + "/vcek/v1/Milan/aa")
    with pytest.raises(TeeUnavailable, match="asked again"):
        client.vcek(base + "/vcek/v1/Milan/bb")  # within the backoff: not asked
    assert len(asked) == 1
    with pytest.raises(TeeUnavailable, match="outside"):
        client.vcek("http://elsewhere/vcek/v1/Milan/aa")


def test_an_origin_that_is_not_https_or_does_not_answer_is_unavailable() -> None:
    with pytest.raises(TeeUnavailable):
        served_certificate("http://127.0.0.1:1", timeout=1)
    with pytest.raises(TeeUnavailable):
        served_certificate(f"https://127.0.0.1:{free_port()}", timeout=1)
