"""RA-TLS evidence checked without I/O (``app.tee.ra_tls``): an enclave's self-signed P-384
certificate carrying a report of our own chain (``tests/unit/test_sev_snp.py``), bound to its key;
every way the bundle must fail; the VCEK's URL at AMD's key distribution service; the bundle's hash."""

from __future__ import annotations

import datetime
import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.tee.ra_tls import OID_REPORT, Roots, binding, evidence_sha256, report_of, vcek_url, verify
from app.tee.sev_snp import EvidenceError, Tcb, Terms, parse_report
from tests.unit.test_sev_snp import CHAIN, MEASUREMENT, genuine, make_report

NOW = datetime.datetime.now(datetime.UTC)
ROOTS = Roots("Milan", CHAIN.ark, CHAIN.ask, frozenset(CHAIN.pinned))
TERMS = Terms(frozenset({MEASUREMENT}))


def _octet_string(content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([0x04, length]) + content
    size = (length.bit_length() + 7) // 8
    return bytes([0x04, 0x80 | size]) + length.to_bytes(size, "big") + content


def enclave_certificate(
    key: ec.EllipticCurvePrivateKey | None = None,
    report: bytes | None = None,
    bound_to: ec.EllipticCurvePrivateKey | None = None,
    days: int = 1,
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A self-signed P-384 certificate with the report extension; the report (of our chain) is bound
    to ``bound_to``'s key (default: the certificate's own)."""
    key = key or ec.generate_private_key(ec.SECP384R1())
    bound = bound_to or key
    point = bound.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    report_data = hashlib.sha384(b"aleph-attest-tls-key-v1\x00" + point).digest() + bytes(16)
    raw = report if report is not None else make_report(report_data=report_data)
    document = json.dumps({"tee_type": "sev-snp", "data": raw.hex()}).encode()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclave")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - datetime.timedelta(days=2))
        .not_valid_after(NOW + datetime.timedelta(days=days))
        .add_extension(x509.UnrecognizedExtension(OID_REPORT, _octet_string(document)), critical=False)
        .sign(key, hashes.SHA384())
    )
    return certificate.public_bytes(serialization.Encoding.DER), key


VCEK_DER = CHAIN.vcek.public_bytes(serialization.Encoding.DER)


def test_a_bound_report_in_the_certificate_verifies() -> None:
    der, _key = enclave_certificate()
    verdict = verify(der, CHAIN.vcek, VCEK_DER, ROOTS, TERMS, NOW)
    assert verdict.measurement == MEASUREMENT.hex() and verdict.product == "Milan" and verdict.vmpl == 0
    assert verdict.reported_tcb == CHAIN.tcb
    report = report_of(x509.load_der_x509_certificate(der))
    assert verdict.evidence_sha256 == hashlib.sha256(der + report + VCEK_DER).hexdigest()
    assert verify(der, CHAIN.vcek, VCEK_DER, ROOTS, TERMS, NOW).evidence_sha256 == verdict.evidence_sha256


def test_the_binding_is_sha384_of_the_label_and_the_certificate_s_point() -> None:
    der, key = enclave_certificate()
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert len(point) == 97
    expected = hashlib.sha384(b"aleph-attest-tls-key-v1\x00" + point).digest() + bytes(16)
    assert binding(x509.load_der_x509_certificate(der)) == expected


def reason(der: bytes, terms: Terms = TERMS, now: datetime.datetime = NOW, roots: Roots = ROOTS) -> str:
    with pytest.raises(EvidenceError) as refused:
        verify(der, CHAIN.vcek, VCEK_DER, roots, terms, now)
    return refused.value.reason


def test_a_report_bound_to_another_key_is_refused() -> None:
    der, _ = enclave_certificate(bound_to=ec.generate_private_key(ec.SECP384R1()))
    assert reason(der) == "key_not_bound"


def test_a_report_copied_into_another_certificate_is_refused() -> None:
    original, _ = enclave_certificate()
    report = report_of(x509.load_der_x509_certificate(original))
    swapped, _ = enclave_certificate(report=report)  # another key, the same (genuinely signed) report
    assert reason(swapped) == "key_not_bound"


def test_an_expired_certificate_or_other_terms_are_refused() -> None:
    der, _ = enclave_certificate()
    assert reason(der, now=NOW + datetime.timedelta(days=3)) == "certificate_expired"
    lasting, _ = enclave_certificate(days=10)  # outlives the test chain (valid one day from now)
    assert reason(lasting, now=NOW + datetime.timedelta(days=3)) == "chain_expired"
    assert reason(der, terms=Terms(frozenset({b"\x00" * 48}))) == "measurement_unknown"
    assert reason(der, terms=Terms(frozenset({MEASUREMENT}), tcb_floor=Tcb(9, 0, 0, 0))) == "tcb_below_floor"
    genoa_roots = Roots("Genoa", CHAIN.ark, CHAIN.ask, frozenset(CHAIN.pinned))
    assert reason(der, roots=genoa_roots) == "product_mismatch"  # a Milan CPUID, Genoa's chain


def test_a_certificate_without_a_report_or_with_garbage_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")])
    plain = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    assert reason(plain.public_bytes(serialization.Encoding.DER)) == "certificate_malformed"
    short, _ = enclave_certificate(report=b"\x02" * 100)
    assert reason(short) == "report_malformed"


def test_the_vcek_url_names_the_chip_and_the_reported_tcb() -> None:
    raw, _vcek = genuine()
    report = parse_report(raw)
    url = vcek_url("https://kdsintf.amd.com/", report, "Milan")
    assert url == (
        f"https://kdsintf.amd.com/vcek/v1/Milan/{report.chip_id.hex()}?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68"
    )
    turin = vcek_url("https://kds.test", report, "Turin")
    assert f"/vcek/v1/Turin/{report.chip_id[:8].hex()}?" in turin and turin.endswith("&fmcSPL=2")


def test_evidence_sha256_depends_on_every_part() -> None:
    base = evidence_sha256(b"c", b"r", b"v")
    assert base == hashlib.sha256(b"crv").hexdigest()
    assert len({base, evidence_sha256(b"C", b"r", b"v"), evidence_sha256(b"c", b"R", b"v")}) == 3
