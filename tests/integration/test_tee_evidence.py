"""Fetching RA-TLS evidence over real sockets (``app.backends.tee``): the certificate a local HTTPS
enclave stand-in serves (an RA-TLS certificate of our own chain, ``tests/unit/test_ra_tls.py``), and
VCEKs from a local stand-in of AMD's key distribution service, cached on disk and asked sparingly;
then the whole bundle verified (``app.tee.ra_tls.verify``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from app.backends.tee import Kds, TeeUnavailable, served_certificate
from app.devnet import free_port
from app.devnet.standin import StandinModel
from app.tee.ra_tls import Roots, verify
from app.tee.sev_snp import Terms
from tests.tee_support import KdsStandin, write_enclave_files
from tests.unit.test_ra_tls import NOW
from tests.unit.test_sev_snp import CHAIN, MEASUREMENT

pytestmark = pytest.mark.integration


@pytest.fixture
def enclave(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """The model stand-in over HTTPS on 127.0.0.1, serving an RA-TLS certificate: (origin, its DER)."""
    certificate, key, der = write_enclave_files(tmp_path / "enclave")
    with StandinModel(tls=(certificate, key)) as server:
        yield server.url, der


@pytest.fixture
def kds() -> Iterator[KdsStandin]:
    """A KDS stand-in answering our chain's VCEK (``tests/tee_support.py``)."""
    with KdsStandin() as service:
        yield service


def test_the_served_certificate_and_amd_s_vcek_verify_together(
    enclave: tuple[str, bytes], kds: KdsStandin, tmp_path: Path
) -> None:
    origin, served = enclave
    base, asked = kds.url, kds.asked
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


def test_the_kds_is_asked_sparingly_and_backs_off_after_failures(kds: KdsStandin, tmp_path: Path) -> None:
    base, asked = kds.url, kds.asked
    client = Kds(base, tmp_path, timeout=5)
    kds.status = 503
    started = time.monotonic()
    with pytest.raises(TeeUnavailable, match="503"):
        client.vcek(base + "/vcek/v1/Milan/aa")
    with pytest.raises(TeeUnavailable, match="asked again"):
        client.vcek(base + "/vcek/v1/Milan/aa")  # within its backoff: not asked
    assert len(asked) == 1
    kds.status = 200
    assert client.vcek(base + "/vcek/v1/Milan/bb") == kds.vcek_der  # another chip: asked in its turn
    assert len(asked) == 2 and time.monotonic() - started >= 1.0  # at most once a second
    with pytest.raises(TeeUnavailable, match="outside"):
        client.vcek("http://elsewhere/vcek/v1/Milan/aa")


def test_an_origin_that_is_not_https_or_does_not_answer_is_unavailable() -> None:
    with pytest.raises(TeeUnavailable):
        served_certificate("http://127.0.0.1:1", timeout=1)
    with pytest.raises(TeeUnavailable):
        served_certificate(f"https://127.0.0.1:{free_port()}", timeout=1)
