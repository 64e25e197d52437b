"""AMD SEV-SNP evidence checked without I/O (``app.tee.sev_snp``): a genuine Milan report and its
VCEK against AMD's pinned roots (``tests/data/sev-snp``, public test vector), and a chain of our own
(RSA-PSS SHA-384 ARK and ASK, a P-384 VCEK with AMD's TCB and hwID extensions) signing synthetic
reports, for every way evidence must fail."""

from __future__ import annotations

import datetime
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from app.tee.sev_snp import (
    OID_BOOTLOADER,
    OID_HWID,
    OID_MICROCODE,
    OID_SNP,
    OID_TEE,
    POLICY_DEBUG,
    POLICY_MIGRATE_MA,
    REPORT_SIZE,
    SIGNED_PART,
    EvidenceError,
    Tcb,
    Terms,
    check_terms,
    load_vcek,
    parse_report,
    spki_sha256,
    verify_chain,
    verify_report_signature,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "sev-snp"
# AMD's published SHA-256 of the ARKs' SubjectPublicKeyInfo (tests/data/sev-snp/README.md)
ARK_MILAN_SPKI = "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9"
ARK_GENOA_SPKI = "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831"
GENUINE_MEASUREMENT_OFFSET = 0x90


def pem(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((DATA / name).read_bytes())


def genuine() -> tuple[bytes, x509.Certificate]:
    return (DATA / "milan_report.bin").read_bytes(), load_vcek((DATA / "milan_vcek.der").read_bytes())


# -- AMD's real evidence --------------------------------------------------------------------------------


def test_the_pinned_roots_are_amds_published_keys() -> None:
    assert spki_sha256(pem("ark_milan.pem")) == ARK_MILAN_SPKI
    assert spki_sha256(pem("ark_genoa.pem")) == ARK_GENOA_SPKI


def test_a_genuine_milan_report_verifies_to_amds_root() -> None:
    raw, vcek = genuine()
    verify_chain(pem("ark_milan.pem"), pem("ask_milan.pem"), vcek, {ARK_MILAN_SPKI})
    report = parse_report(raw)
    verify_report_signature(report, vcek)
    assert report.version == 2 and report.product is None  # version 2: the chain names the product
    assert Tcb.of(report.reported_tcb_raw, "Milan") == Tcb(bootloader=2, tee=0, snp=5, microcode=68)
    # its guest policy (0xb0000) allows debugging: the evidence is genuine, the guest not private
    with pytest.raises(EvidenceError) as refused:
        check_terms(report, Terms(frozenset({report.measurement})), "Milan")
    assert refused.value.reason == "debug_enabled"


def test_one_flipped_bit_of_the_genuine_measurement_fails_the_signature() -> None:
    raw, vcek = genuine()
    flipped = bytearray(raw)
    flipped[GENUINE_MEASUREMENT_OFFSET] ^= 0x01
    with pytest.raises(EvidenceError) as refused:
        verify_report_signature(parse_report(bytes(flipped)), vcek)
    assert refused.value.reason == "signature_invalid"


def test_another_root_or_another_product_line_s_chain_is_refused() -> None:
    _raw, vcek = genuine()
    with pytest.raises(EvidenceError) as unpinned:
        verify_chain(pem("ark_milan.pem"), pem("ask_milan.pem"), vcek, {ARK_GENOA_SPKI})
    assert unpinned.value.reason == "root_not_pinned"
    with pytest.raises(EvidenceError) as crossed:  # Genoa's ASK is not signed by Milan's ARK
        verify_chain(pem("ark_milan.pem"), pem("ask_genoa.pem"), vcek, {ARK_MILAN_SPKI})
    assert crossed.value.reason == "chain_invalid"
    with pytest.raises(EvidenceError) as foreign:  # Milan's VCEK is not signed by Genoa's ASK
        verify_chain(pem("ark_genoa.pem"), pem("ask_genoa.pem"), vcek, {ARK_GENOA_SPKI})
    assert foreign.value.reason == "chain_invalid"


# -- a chain of our own ---------------------------------------------------------------------------------

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _certificate(
    name: str, key: object, issuer_name: str, issuer_key: rsa.RSAPrivateKey, extensions: list[x509.Extension]
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension in extensions:
        builder = builder.add_extension(extension.value, critical=False)
    return builder.sign(issuer_key, hashes.SHA384(), rsa_padding=PSS)


def _der_integer(value: int) -> bytes:
    return bytes([0x02, 1, value])


@dataclass
class Chain:
    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    chip_id: bytes
    tcb: Tcb

    @property
    def pinned(self) -> set[str]:
        return {spki_sha256(self.ark)}


CHAIN_TCB = Tcb(3, 0, 8, 115)


def make_chain(tcb: Tcb = CHAIN_TCB, chip_id: bytes = b"\x5a" * 64, product: str = "Milan") -> Chain:
    """An AMD-shaped chain (smaller RSA keys than AMD's 4096 bits, for speed; the scheme is AMD's),
    named as AMD names each product line's: ARK ``ARK-<product>``, ASK ``SEV-<product>``, VCEK
    ``SEV-VCEK``. ``chip_id``: 64 bytes (the VCEK's hwID); ``tcb``: the VCEK's TCB levels."""
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark_name, ask_name = f"ARK-{product}", f"SEV-{product}"
    ark = _certificate(ark_name, ark_key, ark_name, ark_key, [])
    ask = _certificate(ask_name, ask_key, ark_name, ark_key, [])

    def ext(oid: x509.ObjectIdentifier, value: bytes) -> x509.Extension:
        return x509.Extension(oid, False, x509.UnrecognizedExtension(oid, value))

    spls = [
        ext(OID_BOOTLOADER, _der_integer(tcb.bootloader)),
        ext(OID_TEE, _der_integer(tcb.tee)),
        ext(OID_SNP, _der_integer(tcb.snp)),
        ext(OID_MICROCODE, _der_integer(tcb.microcode)),
        ext(OID_HWID, chip_id),
    ]
    vcek = _certificate("SEV-VCEK", vcek_key, ask_name, ask_key, spls)
    return Chain(ark, ask, vcek, vcek_key, chip_id, tcb)


CHAIN = make_chain()
MEASUREMENT = bytes(range(48))


def make_report(
    chain: Chain = CHAIN,
    *,
    policy: int = 0x30000,
    vmpl: int = 0,
    measurement: bytes = MEASUREMENT,
    tcb: Tcb | None = None,
    chip_id: bytes | None = None,
    version: int = 3,
    signer: ec.EllipticCurvePrivateKey | None = None,
    report_data: bytes = bytes(64),
) -> bytes:
    """A report as a Milan chip writes it (version 3: CPUID family 0x19 model 0x01), signed."""
    tcb = tcb or chain.tcb
    raw = bytearray(REPORT_SIZE)
    struct.pack_into("<IIQ", raw, 0, version, 0, policy)
    struct.pack_into("<II", raw, 0x30, vmpl, 1)
    raw[0x50:0x90] = report_data
    raw[0x90:0xC0] = measurement
    raw[0x180:0x188] = bytes([tcb.bootloader, tcb.tee, 0, 0, 0, 0, tcb.snp, tcb.microcode])
    raw[0x188:0x18B] = bytes([0x19, 0x01, 0x01])
    raw[0x1A0:0x1E0] = chip_id or chain.chip_id
    der = (signer or chain.vcek_key).sign(bytes(raw[:SIGNED_PART]), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    raw[0x2A0 : 0x2A0 + 72] = r.to_bytes(72, "little")
    raw[0x2E8 : 0x2E8 + 72] = s.to_bytes(72, "little")
    return bytes(raw)


def verified(raw: bytes, chain: Chain = CHAIN, terms: Terms | None = None) -> None:
    verify_chain(chain.ark, chain.ask, chain.vcek, chain.pinned)
    report = parse_report(raw)
    verify_report_signature(report, chain.vcek)
    check_terms(report, terms or Terms(frozenset({MEASUREMENT})), report.product or "Milan")


def reason_of(raw: bytes, terms: Terms | None = None, chain: Chain = CHAIN) -> str:
    with pytest.raises(EvidenceError) as refused:
        verified(raw, chain, terms)
    return refused.value.reason


def test_a_report_of_our_chain_verifies_with_its_terms() -> None:
    verified(make_report())
    report = parse_report(make_report())
    assert report.product == "Milan" and report.vmpl == 0 and not report.debug
    floor = Tcb(3, 0, 8, 115)
    verified(make_report(), terms=Terms(frozenset({MEASUREMENT}), policy=0x30000, tcb_floor=floor))


@pytest.mark.parametrize(
    ("report", "terms", "reason"),
    [
        (make_report(policy=0x30000 | POLICY_DEBUG), None, "debug_enabled"),
        (make_report(vmpl=2), None, "vmpl"),
        (make_report(policy=0x30000 | POLICY_MIGRATE_MA), None, "migration_agent"),
        (make_report(policy=0x30000), Terms(frozenset({MEASUREMENT}), policy=0x31000), "policy_mismatch"),
        (make_report(measurement=b"\x01" * 48), None, "measurement_unknown"),
        (make_report(), Terms(frozenset({MEASUREMENT}), tcb_floor=Tcb(3, 0, 9, 0)), "tcb_below_floor"),
        (
            make_report(tcb=Tcb(3, 0, 7, 115)),
            None,
            "vcek_mismatch",
        ),  # signed, but another TCB than the VCEK's
        (make_report(chip_id=b"\x11" * 64), None, "vcek_mismatch"),  # another chip
        (make_report(signer=ec.generate_private_key(ec.SECP384R1())), None, "signature_invalid"),
    ],
    ids=["debug", "vmpl", "migration agent", "policy", "measurement", "tcb floor", "tcb", "chip", "signer"],
)
def test_every_way_evidence_fails_names_its_reason(report: bytes, terms: Terms | None, reason: str) -> None:
    assert reason_of(report, terms) == reason


def _common_name(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_our_chain_is_named_per_product_line_as_amd_names_its_own() -> None:
    """AMD's ARK and ASK say their product line in their CN (``ARK-Milan``, ``SEV-Milan``): ours too."""
    assert [_common_name(pem(f"{kind}_milan.pem").subject) for kind in ("ark", "ask")] == [
        "ARK-Milan",
        "SEV-Milan",
    ]
    assert _common_name(CHAIN.ark.subject) == _common_name(CHAIN.ask.issuer) == "ARK-Milan"
    assert _common_name(CHAIN.ask.subject) == _common_name(CHAIN.vcek.issuer) == "SEV-Milan"
    genoa = make_chain(product="Genoa")
    assert (_common_name(genoa.ark.subject), _common_name(genoa.ask.subject)) == ("ARK-Genoa", "SEV-Genoa")
    verify_chain(genoa.ark, genoa.ask, genoa.vcek, genoa.pinned)


def test_a_chain_whose_vcek_another_ask_signed_is_refused() -> None:
    other = make_chain()
    with pytest.raises(EvidenceError) as refused:
        verify_chain(CHAIN.ark, CHAIN.ask, other.vcek, CHAIN.pinned)
    assert refused.value.reason == "chain_invalid"


def test_the_tcb_floor_compares_each_level_on_its_own() -> None:
    reported = Tcb(bootloader=3, tee=0, snp=8, microcode=115)
    assert reported.at_least(Tcb(3, 0, 8, 115)) and reported.at_least(Tcb(0, 0, 0, 0))
    assert not reported.at_least(Tcb(4, 0, 0, 0))  # a higher microcode does not make up for it
    assert not reported.at_least(Tcb(0, 1, 0, 0))


def test_turin_lays_out_its_tcb_otherwise() -> None:
    raw = bytes([7, 3, 1, 9, 0, 0, 0, 200])
    assert Tcb.of(raw, "Turin") == Tcb(bootloader=3, tee=1, snp=9, microcode=200, fmc=7)
    assert Tcb.of(raw, "Milan") == Tcb(bootloader=7, tee=3, snp=0, microcode=200)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=REPORT_SIZE + 8))
def test_any_bytes_parse_or_are_refused_with_a_reason(raw: bytes) -> None:
    try:
        report = parse_report(raw)
    except EvidenceError as refused:
        assert refused.reason == "report_malformed"
        return
    assert len(raw) == REPORT_SIZE and report.version in range(2, 6)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, SIGNED_PART * 8 - 1))
def test_any_bit_of_the_signed_part_flipped_fails(bit: int) -> None:
    raw = bytearray(make_report())
    raw[bit // 8] ^= 1 << (bit % 8)
    try:
        report = parse_report(bytes(raw))
    except EvidenceError:
        return  # version or algorithm no longer valid: refused as malformed
    with pytest.raises(EvidenceError):
        verify_report_signature(report, CHAIN.vcek)


def test_report_sha384_is_what_the_signature_covers() -> None:
    """The signed part is bytes 0x000–0x29F: changing a byte after it does not change the digest."""
    raw = bytearray(make_report())
    digest = hashlib.sha384(bytes(raw[:SIGNED_PART])).digest()
    raw[SIGNED_PART + 200] ^= 0xFF  # reserved bytes after the signature's R and S
    assert hashlib.sha384(bytes(raw[:SIGNED_PART])).digest() == digest
    verify_report_signature(parse_report(bytes(raw)), CHAIN.vcek)


def test_the_packaged_amd_roots_are_pinned_and_verify_the_genuine_report() -> None:
    """AMD's chains ship with the package (``app/tee/roots``), each ARK pinned by its published key
    hash; the genuine Milan report verifies against them; Genoa's and Turin's load too."""
    from app.tee.amd import amd_roots

    milan = amd_roots("Milan")
    raw, vcek = genuine()
    verify_chain(milan.ark, milan.ask, vcek, set(milan.pinned))
    verify_report_signature(parse_report(raw), vcek, "Milan")
    assert ARK_MILAN_SPKI in milan.pinned
    assert amd_roots("Genoa").pinned == {ARK_GENOA_SPKI}
    for product in ("Genoa", "Turin"):  # their ARK and ASK check out; a Milan VCEK is not theirs
        roots = amd_roots(product)
        with pytest.raises(EvidenceError) as crossed:
            verify_chain(roots.ark, roots.ask, vcek, set(roots.pinned))
        assert crossed.value.reason == "chain_invalid" and "the VCEK" in crossed.value.detail
    with pytest.raises(EvidenceError):
        amd_roots("Naples")
