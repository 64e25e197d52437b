"""AMD SEV-SNP attestation evidence, checked without I/O: the ATTESTATION_REPORT's fields, AMD's
certificate chain (ARK → ASK → VCEK), the report's signature by the VCEK, and the report's own
terms (debug, VMPL, policy, measurement, TCB floor).

Sources: AMD "SEV Secure Nested Paging Firmware ABI Specification" (56860), Table "ATTESTATION_REPORT
Structure" (offsets below) and "Guest Policy"; AMD "Versioned Chip Endorsement Key (VCEK) Certificate
and KDS Interface Specification" (57230) for the VCEK's extensions. The report is 1184 bytes; its
signature (ECDSA P-384 over SHA-384 of bytes 0x000–0x29F) holds R and S little-endian, 72 bytes each.
AMD's certificates are RSA-4096 with RSA-PSS (SHA-384); a VCEK has serial number 0.

Pure: the evidence (bytes, certificates) and the pinned roots are inputs; fetching a VCEK from AMD's
key distribution service is the caller's.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

REPORT_SIZE = 1184
SIGNED_PART = 0x2A0  # the signature covers bytes 0x000 up to here
SUPPORTED_VERSIONS = range(2, 6)  # report versions 2 to 5
POLICY_DEBUG = 1 << 19  # guest policy bit 19: the hypervisor may debug the guest (its memory is not private)
POLICY_MIGRATE_MA = 1 << 18  # bit 18: a migration agent may be bound to the guest (it can export its memory)
VMPL_MAX = 1  # the report must come from VMPL 0 or 1 (the guest's most privileged levels)

# VCEK extensions (57230): the TCB it certifies, one SPL each, and the chip's id
_AMD = "1.3.6.1.4.1.3704.1."
OID_BOOTLOADER, OID_TEE, OID_SNP, OID_MICROCODE, OID_FMC = (
    x509.ObjectIdentifier(_AMD + suffix) for suffix in ("3.1", "3.2", "3.3", "3.8", "3.9")
)
OID_HWID = x509.ObjectIdentifier(_AMD + "4")

# Product lines by CPUID family and the ranges of models that belong to them (report versions 3+
# carry both): Milan family 19h models 00h-0Fh; Genoa 19h 10h-1Fh and A0h-AFh (Bergamo, Siena);
# Turin 1Ah 00h-11h
PRODUCT_MODELS: dict[str, tuple[int, tuple[range, ...]]] = {
    "Milan": (0x19, (range(0x00, 0x10),)),
    "Genoa": (0x19, (range(0x10, 0x20), range(0xA0, 0xB0))),
    "Turin": (0x1A, (range(0x00, 0x12),)),
}
PRODUCTS = tuple(PRODUCT_MODELS)


def product_of(family: int, model: int) -> str | None:
    """The product line of a CPUID family and model, None for another CPU."""
    for product, (line_family, models) in PRODUCT_MODELS.items():
        if family == line_family and any(model in span for span in models):
            return product
    return None


class EvidenceError(ValueError):
    """The evidence does not verify; ``reason`` is a stable code, the message says why in words."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Tcb:
    """A TCB version's security patch levels (SPLs); ``fmc`` only on Turin (0 elsewhere)."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int = 0

    @classmethod
    def of(cls, raw: bytes, product: str) -> Tcb:
        """The 8-byte TCB_VERSION of a report: Milan and Genoa ``bl, tee, 0, 0, 0, 0, snp, ucode``;
        Turin ``fmc, bl, tee, snp, 0, 0, 0, ucode``."""
        if product == "Turin":
            return cls(bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def at_least(self, floor: Tcb) -> bool:
        """Every SPL at or above the floor's, each compared on its own."""
        return (
            self.bootloader >= floor.bootloader
            and self.tee >= floor.tee
            and self.snp >= floor.snp
            and self.microcode >= floor.microcode
            and self.fmc >= floor.fmc
        )


@dataclass(frozen=True)
class Report:
    """The fields of an ATTESTATION_REPORT this proxy checks (raw bytes kept in ``raw``)."""

    raw: bytes
    version: int
    policy: int
    vmpl: int
    signature_algo: int
    report_data: bytes  # 64 bytes the guest chose (the RA-TLS key binding)
    measurement: bytes  # 48 bytes: the launch digest
    reported_tcb_raw: bytes  # 8 bytes
    cpuid: tuple[int, int, int] | None  # family, model, stepping (report version 3+)
    chip_id: bytes  # 64 bytes

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def product(self) -> str | None:
        """Milan, Genoa or Turin from the CPUID fields; None for a version 2 report (the VCEK's
        chain then tells) or an unknown CPU."""
        if self.cpuid is None:
            return None
        return product_of(self.cpuid[0], self.cpuid[1])

    def signature(self) -> bytes:
        """The signature as DER (R and S are 72-byte little-endian integers at 0x2A0 and 0x2E8)."""
        r = int.from_bytes(self.raw[0x2A0 : 0x2A0 + 72], "little")
        s = int.from_bytes(self.raw[0x2E8 : 0x2E8 + 72], "little")
        return encode_dss_signature(r, s)


def parse_report(raw: bytes) -> Report:
    """The report's fields. Raises ``EvidenceError`` (``report_malformed``) for a wrong size or a
    version outside 2–5, or a signature algorithm other than ECDSA P-384 with SHA-384 (1)."""
    if len(raw) != REPORT_SIZE:
        raise EvidenceError("report_malformed", f"{len(raw)} bytes, not {REPORT_SIZE}")
    version, _guest_svn, policy = struct.unpack_from("<IIQ", raw, 0)
    if version not in SUPPORTED_VERSIONS:
        raise EvidenceError("report_malformed", f"report version {version} is not 2 to 5")
    vmpl, signature_algo = struct.unpack_from("<II", raw, 0x30)
    if signature_algo != 1:
        raise EvidenceError("report_malformed", f"signature algorithm {signature_algo}, not ECDSA P-384")
    return Report(
        raw=bytes(raw),
        version=version,
        policy=policy,
        vmpl=vmpl,
        signature_algo=signature_algo,
        report_data=bytes(raw[0x50:0x90]),
        measurement=bytes(raw[0x90:0xC0]),
        reported_tcb_raw=bytes(raw[0x180:0x188]),
        cpuid=(raw[0x188], raw[0x189], raw[0x18A]) if version >= 3 else None,
        chip_id=bytes(raw[0x1A0:0x1E0]),
    )


def load_vcek(der: bytes) -> x509.Certificate:
    """A VCEK from its DER (AMD issues them with serial number 0, which ``cryptography`` warns
    about: silenced here, for this certificate only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x509.load_der_x509_certificate(der)


def spki_sha256(certificate: x509.Certificate) -> str:
    """Hex SHA-256 of a certificate's SubjectPublicKeyInfo (what a root is pinned by)."""
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def pss_signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``certificate`` is signed by ``issuer``'s RSA key with RSA-PSS SHA-384 (AMD's scheme)."""
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        key.verify(
            certificate.signature,
            certificate.tbs_certificate_bytes,
            padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
            hashes.SHA384(),
        )
    except InvalidSignature:
        return False
    return True


def verify_chain(
    ark: x509.Certificate, ask: x509.Certificate, vcek: x509.Certificate, pinned: set[str]
) -> None:
    """ARK (pinned by its SubjectPublicKeyInfo's SHA-256, in ``pinned``) self-signed, ASK signed by
    the ARK, VCEK signed by the ASK, each with RSA-PSS SHA-384. Raises ``EvidenceError``
    (``root_not_pinned``, ``chain_invalid``)."""
    if spki_sha256(ark) not in pinned:
        raise EvidenceError("root_not_pinned", "the ARK is not one of the pinned roots")
    for certificate, issuer, name in ((ark, ark, "ARK"), (ask, ark, "ASK"), (vcek, ask, "VCEK")):
        if not pss_signed_by(certificate, issuer):
            raise EvidenceError("chain_invalid", f"the {name} is not signed by its issuer")


def _spl(vcek: x509.Certificate, oid: x509.ObjectIdentifier) -> int | None:
    """An SPL extension of the VCEK: a DER INTEGER of one byte's range; None when absent."""
    try:
        value = vcek.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2:
        raise EvidenceError("vcek_malformed", f"extension {oid.dotted_string} is not a DER INTEGER")
    return int.from_bytes(raw[2:], "big")


def vcek_tcb(vcek: x509.Certificate) -> Tcb:
    """The TCB a VCEK certifies (its SPL extensions). Raises ``EvidenceError``."""
    levels = {}
    for name, oid in (
        ("bootloader", OID_BOOTLOADER),
        ("tee", OID_TEE),
        ("snp", OID_SNP),
        ("microcode", OID_MICROCODE),
    ):
        level = _spl(vcek, oid)
        if level is None:
            raise EvidenceError("vcek_malformed", f"the VCEK has no {name} SPL")
        levels[name] = level
    return Tcb(**levels, fmc=_spl(vcek, OID_FMC) or 0)


def vcek_hwid(vcek: x509.Certificate) -> bytes:
    """The chip id a VCEK is for (its hwID extension, 64 bytes). Raises ``EvidenceError``."""
    try:
        value = vcek.extensions.get_extension_for_oid(OID_HWID).value
    except x509.ExtensionNotFound:
        raise EvidenceError("vcek_malformed", "the VCEK has no hwID") from None
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    if len(raw) == 66 and raw[:2] == b"\x04\x40":  # a DER OCTET STRING around it
        raw = raw[2:]
    if len(raw) != 64:
        raise EvidenceError("vcek_malformed", "the VCEK's hwID is not 64 bytes")
    return raw


def verify_report_signature(report: Report, vcek: x509.Certificate, product: str | None = None) -> None:
    """The report is signed by the VCEK (ECDSA P-384, SHA-384 of bytes 0x000–0x29F), and the VCEK is
    for this chip at this TCB: its hwID equals CHIP_ID (Turin: the first 8 bytes) and its SPLs the
    REPORTED_TCB's, read as ``product``'s (default: the report's CPUID, else Milan's layout). Raises
    ``EvidenceError`` (``signature_invalid``, ``vcek_mismatch``)."""
    product = product or report.product or "Milan"
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EvidenceError("vcek_malformed", "the VCEK's key is not P-384")
    try:
        key.verify(report.signature(), report.raw[:SIGNED_PART], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError("signature_invalid", "the report is not signed by this VCEK") from None
    hwid, chip = vcek_hwid(vcek), report.chip_id
    if (hwid[:8] != chip[:8]) if product == "Turin" else (hwid != chip):
        raise EvidenceError("vcek_mismatch", "the VCEK is for another chip")
    if vcek_tcb(vcek) != Tcb.of(report.reported_tcb_raw, product):
        raise EvidenceError("vcek_mismatch", "the VCEK certifies another TCB than the report's")


@dataclass(frozen=True)
class Terms:
    """What a model's catalog entry accepts: launch ``measurements`` (48 bytes each), the exact
    guest ``policy`` (None: any without debug), and the ``tcb_floor`` (None: none)."""

    measurements: frozenset[bytes]
    policy: int | None = None
    tcb_floor: Tcb | None = None


def check_terms(report: Report, terms: Terms, product: str) -> None:
    """The report's own terms (guest policy bits: AMD SEV-SNP ABI, 56860, table 9): debug off (bit
    19), no migration agent (bit 18), VMPL ≤ 1, the policy, a measurement in the list, the reported
    TCB at or above the floor. Raises ``EvidenceError`` (``debug_enabled``, ``migration_agent``,
    ``vmpl``, ``policy_mismatch``, ``measurement_unknown``, ``tcb_below_floor``)."""
    if report.debug:
        raise EvidenceError("debug_enabled", "the guest policy allows debugging (its memory is readable)")
    if report.policy & POLICY_MIGRATE_MA:
        raise EvidenceError("migration_agent", "the guest policy lets a migration agent export its memory")
    if report.vmpl > VMPL_MAX:
        raise EvidenceError("vmpl", f"the report comes from VMPL {report.vmpl}, above {VMPL_MAX}")
    if terms.policy is not None and report.policy != terms.policy:
        raise EvidenceError("policy_mismatch", f"guest policy {report.policy:#x}, not {terms.policy:#x}")
    if report.measurement not in terms.measurements:
        raise EvidenceError("measurement_unknown", f"measurement {report.measurement.hex()} is not accepted")
    if terms.tcb_floor is not None and not Tcb.of(report.reported_tcb_raw, product).at_least(terms.tcb_floor):
        raise EvidenceError("tcb_below_floor", "the reported TCB is below the floor")
