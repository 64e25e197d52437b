"""RA-TLS: an enclave's self-signed TLS certificate that carries its AMD SEV-SNP attestation report,
bound to the certificate's key (the format LibertAI's and Aleph's confidential deployments serve).
Checked without I/O: the report is read from the certificate, the binding recomputed, the AMD
evidence verified (``app.tee.sev_snp``), and the bundle a buyer can check again is hashed.

- The report travels in the extension ``1.3.6.1.4.1.60000.1.1``: a DER OCTET STRING holding JSON
  ``{"tee_type": "sev-snp", "data": "<hex of the 1184-byte report>"}``.
- Binding: ``REPORT_DATA[0:48] = SHA-384(b"aleph-attest-tls-key-v1\\x00" ‖ K)`` and
  ``REPORT_DATA[48:64]`` zero, where K is the certificate's subjectPublicKey bit string (P-384,
  uncompressed: 97 bytes).
- The VCEK that signed the report is AMD's for the report's chip and reported TCB: its URL at AMD's
  key distribution service is ``vcek_url`` (57230; Turin names the chip by its first 8 bytes and adds
  ``fmcSPL``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .sev_snp import (
    EvidenceError,
    Report,
    Tcb,
    Terms,
    check_terms,
    parse_report,
    verify_chain,
    verify_report_signature,
)

OID_REPORT = x509.ObjectIdentifier("1.3.6.1.4.1.60000.1.1")
BINDING_LABEL = b"aleph-attest-tls-key-v1\x00"


def report_of(certificate: x509.Certificate) -> bytes:
    """The SEV-SNP report a certificate carries. Raises ``EvidenceError`` (``certificate_malformed``)."""
    try:
        value = certificate.extensions.get_extension_for_oid(OID_REPORT).value
    except x509.ExtensionNotFound:
        raise EvidenceError(
            "certificate_malformed", "the certificate carries no attestation report"
        ) from None
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    body = _octet_string(raw)
    try:
        document = json.loads(body)
    except ValueError:
        raise EvidenceError("certificate_malformed", "the report extension is not JSON") from None
    if not isinstance(document, dict) or document.get("tee_type") != "sev-snp":
        raise EvidenceError("certificate_malformed", "the report extension is not an SEV-SNP report")
    data = document.get("data")
    try:
        return bytes.fromhex(data) if isinstance(data, str) else b""
    except ValueError:
        raise EvidenceError("certificate_malformed", "the report is not hex") from None


def _octet_string(raw: bytes) -> bytes:
    """The content of a DER OCTET STRING (short or long length form)."""
    if len(raw) < 2 or raw[0] != 0x04:
        raise EvidenceError("certificate_malformed", "the report extension is not an OCTET STRING")
    length, offset = raw[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, offset = int.from_bytes(raw[2 : 2 + count], "big"), 2 + count
    if offset + length != len(raw):
        raise EvidenceError("certificate_malformed", "the report extension's length is wrong")
    return raw[offset:]


def public_key_bits(certificate: x509.Certificate) -> bytes:
    """K: the certificate's subjectPublicKey bit string, a P-384 point uncompressed (97 bytes).
    Raises ``EvidenceError``."""
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EvidenceError("certificate_malformed", "the certificate's key is not P-384")
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def binding(certificate: x509.Certificate) -> bytes:
    """The REPORT_DATA a report bound to this certificate's key holds (64 bytes)."""
    return hashlib.sha384(BINDING_LABEL + public_key_bits(certificate)).digest() + bytes(16)


def vcek_url(kds: str, report: Report, product: str) -> str:
    """The URL of the VCEK for the report's chip and reported TCB at AMD's key distribution service
    ``kds`` (e.g. ``https://kdsintf.amd.com``)."""
    tcb = Tcb.of(report.reported_tcb_raw, product)
    chip = report.chip_id[:8] if product == "Turin" else report.chip_id
    query = f"blSPL={tcb.bootloader}&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    if product == "Turin":
        query += f"&fmcSPL={tcb.fmc}"
    return f"{kds.rstrip('/')}/vcek/v1/{product}/{chip.hex()}?{query}"


def evidence_sha256(certificate_der: bytes, report: bytes, vcek_der: bytes) -> str:
    """Hex SHA-256 of certificate DER ‖ report ‖ VCEK DER: one bundle's name, the same whenever it is
    verified."""
    return hashlib.sha256(certificate_der + report + vcek_der).hexdigest()


@dataclass(frozen=True)
class Verdict:
    """What the evidence proved: the launch ``measurement`` (hex), guest ``policy``, ``vmpl``, the
    ``reported_tcb``, the ``product`` line, and the bundle's ``evidence_sha256``."""

    measurement: str
    policy: int
    vmpl: int
    reported_tcb: Tcb
    product: str
    evidence_sha256: str


@dataclass(frozen=True)
class Roots:
    """A product line's AMD certificates (its ARK and ASK) and the ARK keys accepted (SHA-256 of
    their SubjectPublicKeyInfo)."""

    product: str
    ark: x509.Certificate
    ask: x509.Certificate
    pinned: frozenset[str]


def verify(
    certificate_der: bytes,
    vcek: x509.Certificate,
    vcek_der: bytes,
    roots: Roots,
    terms: Terms,
    now: datetime.datetime,
) -> Verdict:
    """Everything the RA-TLS evidence must show, in order: the certificate valid at ``now``; its
    report; the AMD chain to a pinned root, each of its certificates valid at ``now``; the report
    signed by the VCEK, which is for its chip and TCB; the report's product line (its CPUID, when it
    has one) the roots'; the key binding; the report's terms. Raises ``EvidenceError`` with the
    first reason."""
    certificate = x509.load_der_x509_certificate(certificate_der)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise EvidenceError("certificate_expired", "the certificate is not valid now")
    raw = report_of(certificate)
    report = parse_report(raw)
    verify_chain(roots.ark, roots.ask, vcek, set(roots.pinned))
    for name, part in (("ARK", roots.ark), ("ASK", roots.ask), ("VCEK", vcek)):
        if not part.not_valid_before_utc <= now <= part.not_valid_after_utc:
            raise EvidenceError("chain_expired", f"AMD's {name} is not valid now")
    if report.product is not None and report.product != roots.product:
        raise EvidenceError("product_mismatch", f"a {report.product} report, {roots.product} roots")
    verify_report_signature(report, vcek, roots.product)
    if report.report_data != binding(certificate):
        raise EvidenceError("key_not_bound", "the report is not bound to this certificate's key")
    check_terms(report, terms, roots.product)
    return Verdict(
        measurement=report.measurement.hex(),
        policy=report.policy,
        vmpl=report.vmpl,
        reported_tcb=Tcb.of(report.reported_tcb_raw, roots.product),
        product=roots.product,
        evidence_sha256=evidence_sha256(certificate_der, raw, vcek_der),
    )
