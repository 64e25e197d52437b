"""``x402-proxy verify-evidence``: a buyer's own check of an attested model's RA-TLS evidence, which
trusts nothing the proxy says about it.

The bundle is what ``GET /v1/attestation/{model}`` answers (``app.backends.enclave.Evidence.public``),
fetched from ``--proxy`` or read from a saved ``--file``: a JSON object with ``certificate`` (base64
DER), ``report`` (base64, 1184 bytes), ``vcek`` (base64 DER), ``evidence_sha256`` (hex),
``certificate_sha256`` (hex) and ``verdict`` ``{measurement, policy, vmpl, reported_tcb, product,
…}``. Only the certificate, report and VCEK bytes are used as evidence; the rest is the proxy's claim,
compared with what is recomputed. The bundle's ``ark`` and ``ask`` are never used: the chain must reach
AMD's roots packaged with this program (``app.tee.amd``, each ARK pinned by its key's SHA-256), or
the roots of ``--roots FILE``, which replace them only with ``--allow-test-roots``.

Checked with the pure ``app.tee`` code, in order: the VCEK signed by the ASK, the ASK by the pinned ARK
of the report's product line (a version-2 report names none: each line's roots are tried); the
bundle's report signed by that VCEK, which is for the report's chip and reported TCB; that report the
one the certificate carries; then ``app.tee.ra_tls.verify`` (the certificate valid now, the report
bound to its key, debug off, VMPL ≤ 1, the measurement one of ``--measurement``); then the bundle's
``evidence_sha256``, ``certificate_sha256`` and ``verdict`` equal to what was recomputed. With
``--enclave``, one TLS handshake with the enclave's origin must show the bundle's certificate.

Exit codes: 0 verified; 1 refused (one line ``x402-proxy verify-evidence: <reason>: <words>`` on
standard error, the reason an ``app.tee`` code or one of this module's); 2 bad input (options, an
unreadable or malformed bundle or roots file); 3 the proxy or the enclave did not answer.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from app.cli.common import EXIT_BAD_INPUT, EXIT_UNREACHABLE

if TYPE_CHECKING:
    from cryptography import x509

    from app.tee.ra_tls import Roots, Verdict
    from app.tee.sev_snp import Report

EXIT_VERIFIED, EXIT_REFUSED = 0, 1
COMMAND = "x402-proxy verify-evidence"
TIMEOUT = 10.0  # seconds for the proxy's answer and for the enclave's TLS handshake
MEASUREMENT_BYTES = 48


class Stop(Exception):
    """The command ends without a verified bundle: ``reason`` a stable code, ``detail`` why in words,
    ``code`` the exit code (1 refused, 2 bad input, 3 unreachable)."""

    def __init__(self, code: int, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.code = code
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Bundle:
    """A bundle's parts: the evidence bytes (certificate DER, 1184-byte report, VCEK DER) and what the
    proxy claims about them, as written in the bundle: ``evidence_sha256`` and ``certificate_sha256``
    (hex; the latter "" when absent) and ``verdict`` (the JSON object)."""

    certificate: bytes
    report: bytes
    vcek: bytes
    evidence_sha256: str
    certificate_sha256: str
    verdict: dict[str, Any]


@dataclass(frozen=True)
class Checked:
    """A verified bundle: ``verdict`` what the evidence proved (``app.tee.ra_tls.Verdict``), ``roots``
    the chain it reached, ``compared`` whether its measurement was compared with the buyer's list."""

    verdict: Verdict
    roots: Roots
    compared: bool


def add_parser(sub: Any) -> None:
    """``verify-evidence`` on the ``x402-proxy`` subparsers ``sub``. Its options are checked by
    ``cmd_verify_evidence`` (one line and exit 2), not by argparse."""
    verify = sub.add_parser(
        "verify-evidence",
        help="verify an attested model's RA-TLS evidence yourself, against AMD's pinned roots",
        description="Verify an attested model's RA-TLS evidence bundle without trusting the proxy: the "
        "AMD chain to the pinned roots, the report's signature, its binding to the certificate, debug "
        "off, VMPL <= 1, the measurement, and the bundle's own claims. Exit 0 verified, 1 refused, "
        "2 bad input, 3 unreachable.",
    )
    verify.add_argument("--proxy", help="the proxy's base URL: fetch GET /v1/attestation/{model}")
    verify.add_argument("--model", help="the model's name (with --proxy)")
    verify.add_argument("--file", help="a saved bundle (the JSON of GET /v1/attestation/{model})")
    verify.add_argument(
        "--measurement",
        action="extend",
        nargs="+",
        default=[],
        metavar="HEX",
        help="launch measurements you accept (48 bytes, hex); without one it is printed, not compared",
    )
    verify.add_argument("--roots", help="a PEM file of ARK and ASK certificates replacing AMD's roots")
    verify.add_argument(
        "--allow-test-roots",
        action="store_true",
        help="required with --roots: trust roots that are not AMD's",
    )
    verify.add_argument(
        "--enclave", help="the enclave's https:// origin: check that it serves the bundle's certificate now"
    )
    verify.add_argument(
        "--evidence",
        metavar="SHA256",
        help="an answer's X-TEE-Evidence (or a receipt's teeEvidence): the bundle must be that one",
    )


def cmd_verify_evidence(args: argparse.Namespace) -> int:
    """``x402-proxy verify-evidence``: see the module docstring. Prints the summary on standard output
    (exit 0), or one line on standard error (exit 1, 2 or 3)."""
    try:
        if args.file and (args.proxy or args.model):
            raise Stop(EXIT_BAD_INPUT, "bad_options", "give --file, or --proxy with --model, not both")
        if args.enclave and not args.enclave.startswith("https://"):
            raise Stop(EXIT_BAD_INPUT, "bad_options", "--enclave takes the enclave's https:// origin")
        if args.evidence and not re.fullmatch(r"[0-9a-f]{64}", args.evidence.lower()):
            raise Stop(EXIT_BAD_INPUT, "bad_options", "--evidence takes a SHA-256 in hex (64 digits)")
        measurements = parse_measurements(args.measurement)
        trust, source = load_trust(args.roots, args.allow_test_roots)
        if args.file:
            document = read_bundle(Path(args.file))
        elif args.proxy and args.model:
            document = fetch_bundle(args.proxy, args.model)
        else:
            raise Stop(EXIT_BAD_INPUT, "bad_options", "give --proxy URL with --model NAME, or --file BUNDLE")
        bundle = parse_bundle(document)
        checked = verify_bundle(bundle, trust, measurements, datetime.datetime.now(datetime.UTC))
        compare_claims(bundle, checked.verdict)
        if args.evidence and args.evidence.lower() != checked.verdict.evidence_sha256:
            raise Stop(
                EXIT_REFUSED,
                "evidence_mismatch",
                f"you gave evidence {args.evidence.lower()} (an answer's X-TEE-Evidence or a receipt's "
                f"teeEvidence); this bundle is {checked.verdict.evidence_sha256}",
            )
        if args.enclave:
            check_enclave(args.enclave, bundle.certificate)
    except Stop as stop:
        print(f"{COMMAND}: {stop.reason}: {stop.detail}", file=sys.stderr)
        return stop.code
    sys.stdout.write(summary(checked, source, args.enclave))
    return EXIT_VERIFIED


def parse_measurements(texts: list[str]) -> frozenset[bytes]:
    """The ``--measurement`` values (hex, ``0x`` optional, any case) as 48-byte strings. Raises
    ``Stop`` (exit 2)."""
    measurements: set[bytes] = set()
    for text in texts:
        try:
            value = bytes.fromhex(text.removeprefix("0x").removeprefix("0X"))
        except ValueError:
            value = b""
        if len(value) != MEASUREMENT_BYTES:
            raise Stop(
                EXIT_BAD_INPUT, "measurement_malformed", f"{text!r} is not {MEASUREMENT_BYTES} bytes of hex"
            )
        measurements.add(value)
    return frozenset(measurements)


def load_trust(roots_file: str | None, allowed: bool) -> tuple[dict[str, Roots], str]:
    """The chains to verify against, by product line, and how to name them: AMD's packaged and pinned
    ones, or those of ``roots_file`` (``app.tee.amd.roots_from_pem``) when ``allowed``. Raises
    ``Stop`` (exit 2)."""
    from app.tee.amd import amd_trust, roots_from_pem

    if roots_file is None:
        if allowed:
            raise Stop(EXIT_BAD_INPUT, "bad_options", "--allow-test-roots goes with --roots FILE")
        return amd_trust(), "AMD's roots (packaged, pinned)"
    if not allowed:
        raise Stop(
            EXIT_BAD_INPUT,
            "roots_not_allowed",
            "--roots replaces AMD's roots, so anyone holding them can forge evidence: add --allow-test-roots",
        )
    try:
        trust = roots_from_pem(Path(roots_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise Stop(EXIT_BAD_INPUT, "roots_unusable", f"{roots_file}: {exc}") from None
    return trust, f"TEST roots from {roots_file} (not AMD's)"


def read_bundle(path: Path) -> Any:
    """The JSON document saved in ``path``. Raises ``Stop`` (exit 2)."""
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise Stop(EXIT_BAD_INPUT, "bundle_unreadable", str(exc)) from None
    except ValueError:
        raise Stop(EXIT_BAD_INPUT, "bundle_malformed", f"{path} is not JSON") from None


def fetch_bundle(proxy: str, model: str) -> Any:
    """The JSON of ``GET {proxy}/v1/attestation/{model}``. Raises ``Stop``: exit 1 when the proxy has
    no verified evidence for the model (503 ``attestation_failed``, a 403, or a model sold on its
    operator's word), 2 for another 4xx (an unknown model) or an answer that is not JSON, 3 when the
    proxy does not answer or answers otherwise."""
    import requests

    url = f"{proxy.rstrip('/')}/v1/attestation/{quote(model, safe='')}"
    try:
        answer = requests.get(url, timeout=TIMEOUT)
    except requests.RequestException as exc:
        words = f"no answer from {url} ({type(exc).__name__})"
        raise Stop(EXIT_UNREACHABLE, "proxy_unreachable", words) from None
    try:
        document = answer.json()
    except ValueError:
        document = None
    error = document.get("error") if isinstance(document, dict) else None
    if answer.status_code != 200 and isinstance(error, dict):
        reason, words = str(error.get("code", "error")), str(error.get("message", ""))
        if answer.status_code == 403 or reason == "attestation_failed":
            raise Stop(EXIT_REFUSED, reason, f"the proxy has no verified evidence for {model}: {words}")
        if 400 <= answer.status_code < 500:
            raise Stop(EXIT_BAD_INPUT, reason, words)
    if answer.status_code != 200:
        raise Stop(EXIT_UNREACHABLE, "proxy_unavailable", f"{url} answered HTTP {answer.status_code}")
    if not isinstance(document, dict):
        raise Stop(EXIT_BAD_INPUT, "bundle_malformed", f"{url} did not answer a JSON object")
    if document.get("attested") is False:
        trust = document.get("trust", "not attested")
        words = f"{model} is sold as {trust}: there is no evidence to verify"
        raise Stop(EXIT_REFUSED, "not_attested", words)
    return document


def parse_bundle(document: Any) -> Bundle:
    """The bundle's parts, decoded. Raises ``Stop`` (exit 2, ``bundle_malformed``) for a document
    that is not a bundle."""

    def b64(key: str) -> bytes:
        value = document.get(key)
        try:
            return base64.b64decode(value, validate=True) if isinstance(value, str) else b""
        except (binascii.Error, ValueError):
            return b""

    if not isinstance(document, dict):
        raise Stop(EXIT_BAD_INPUT, "bundle_malformed", "the bundle is not a JSON object")
    certificate, report, vcek = b64("certificate"), b64("report"), b64("vcek")
    digest, verdict = document.get("evidence_sha256"), document.get("verdict")
    missing = [k for k, v in (("certificate", certificate), ("report", report), ("vcek", vcek)) if not v]
    if not isinstance(digest, str):
        missing.append("evidence_sha256")
    if not isinstance(verdict, dict):
        missing.append("verdict")
    if missing:
        raise Stop(EXIT_BAD_INPUT, "bundle_malformed", f"no usable {', '.join(missing)} in the bundle")
    fingerprint = document.get("certificate_sha256")
    return Bundle(
        certificate=certificate,
        report=report,
        vcek=vcek,
        evidence_sha256=str(digest),
        certificate_sha256=fingerprint if isinstance(fingerprint, str) else "",
        verdict=dict(verdict),
    )


def verify_bundle(
    bundle: Bundle, trust: dict[str, Roots], measurements: frozenset[bytes], now: datetime.datetime
) -> Checked:
    """Verify the evidence bytes (see the module docstring for the order) with ``trust``'s roots and
    the accepted ``measurements`` (empty: the report's own, so it is shown, not compared), at ``now``.
    Raises ``Stop`` (exit 1) with the ``app.tee`` reason of the first failure."""
    from cryptography import x509

    from app.tee.ra_tls import report_of, verify
    from app.tee.sev_snp import EvidenceError, Terms, load_vcek, parse_report, verify_report_signature

    try:
        try:
            certificate = x509.load_der_x509_certificate(bundle.certificate)
        except ValueError:
            raise EvidenceError("certificate_malformed", "the certificate does not parse") from None
        try:
            vcek = load_vcek(bundle.vcek)
        except ValueError:
            raise EvidenceError("vcek_malformed", "the VCEK does not parse") from None
        report = parse_report(bundle.report)
        roots = _chain(report, vcek, trust)
        verify_report_signature(report, vcek, roots.product)
        if report.raw != report_of(certificate):
            words = "the bundle's report is not the one its certificate carries"
            raise EvidenceError("report_mismatch", words)
        terms = Terms(measurements or frozenset({report.measurement}))
        verdict = verify(bundle.certificate, vcek, bundle.vcek, roots, terms, now)
    except EvidenceError as exc:
        raise Stop(EXIT_REFUSED, exc.reason, exc.detail) from None
    return Checked(verdict, roots, bool(measurements))


def _chain(report: Report, vcek: x509.Certificate, trust: dict[str, Roots]) -> Roots:
    """The roots the VCEK chains to: the report's product line's, or (a report that names none) the
    first of ``trust``'s that verifies. Raises ``EvidenceError`` (the first failure)."""
    from app.tee.sev_snp import EvidenceError, verify_chain

    failure: EvidenceError | None = None
    for product in [report.product] if report.product else list(trust):
        roots = trust.get(product)
        try:
            if roots is None:
                raise EvidenceError("root_not_pinned", f"no roots for {product}")
            verify_chain(roots.ark, roots.ask, vcek, set(roots.pinned))
        except EvidenceError as exc:
            failure = failure or exc
            continue
        return roots
    raise failure or EvidenceError("root_not_pinned", "no roots")


def compare_claims(bundle: Bundle, verdict: Verdict) -> None:
    """The proxy's claims about the bundle equal what its evidence proved: ``evidence_sha256``,
    ``certificate_sha256`` (when given) and the verdict's measurement, policy, VMPL, reported TCB and
    product. Raises ``Stop`` (exit 1, ``evidence_mismatch`` or ``verdict_mismatch``)."""
    if bundle.evidence_sha256 != verdict.evidence_sha256:
        raise Stop(
            EXIT_REFUSED,
            "evidence_mismatch",
            f"the bundle says evidence_sha256 {bundle.evidence_sha256}, its content hashes to "
            f"{verdict.evidence_sha256}",
        )
    fingerprint = hashlib.sha256(bundle.certificate).hexdigest()
    if bundle.certificate_sha256 and bundle.certificate_sha256 != fingerprint:
        raise Stop(
            EXIT_REFUSED,
            "evidence_mismatch",
            f"the bundle says certificate_sha256 {bundle.certificate_sha256}, its certificate hashes to "
            f"{fingerprint}",
        )
    tcb = verdict.reported_tcb
    proved = {
        "measurement": verdict.measurement,
        "policy": verdict.policy,
        "vmpl": verdict.vmpl,
        "reported_tcb": {
            "bootloader": tcb.bootloader,
            "tee": tcb.tee,
            "snp": tcb.snp,
            "microcode": tcb.microcode,
            "fmc": tcb.fmc,
        },
        "product": verdict.product,
    }
    for key, value in proved.items():
        claimed = bundle.verdict.get(key)
        if claimed != value or type(claimed) is not type(value):
            raise Stop(
                EXIT_REFUSED,
                "verdict_mismatch",
                f"the bundle's verdict says {key} {claimed!r}, the evidence shows {value!r}",
            )


def check_enclave(origin: str, certificate: bytes) -> None:
    """One TLS handshake with the enclave's ``origin`` (``https://host[:port]``) must show
    ``certificate``. Raises ``Stop``: exit 3 without a handshake, 1 (``certificate_mismatch``) for
    another certificate."""
    from app.backends.tee import TeeUnavailable, served_certificate

    try:
        served = served_certificate(origin, TIMEOUT)
    except TeeUnavailable as exc:
        raise Stop(EXIT_UNREACHABLE, "enclave_unreachable", f"{origin}: {exc}") from None
    if served != certificate:
        raise Stop(
            EXIT_REFUSED,
            "certificate_mismatch",
            f"{origin} serves the certificate of SHA-256 {hashlib.sha256(served).hexdigest()}, the "
            f"bundle's is {hashlib.sha256(certificate).hexdigest()}",
        )


def summary(checked: Checked, source: str, enclave: str | None) -> str:
    """The few lines printed for a verified bundle."""
    verdict, tcb = checked.verdict, checked.verdict.reported_tcb
    levels = f"bootloader {tcb.bootloader}, tee {tcb.tee}, snp {tcb.snp}, microcode {tcb.microcode}"
    if verdict.product == "Turin":
        levels += f", fmc {tcb.fmc}"
    measured = (
        "(one of those you gave)"
        if checked.compared
        else "NOT COMPARED with anything: no --measurement given; compare it with the one you expect"
    )
    lines = [
        f"verified: {verdict.product} evidence, chained to {source}",
        f"  measurement   {verdict.measurement} {measured}",
        f"  product       {verdict.product} (policy {verdict.policy:#x}, VMPL {verdict.vmpl})",
        f"  reported TCB  {levels}",
        f"  evidence      sha256 {verdict.evidence_sha256}",
    ]
    if enclave:
        lines.append(f"  enclave       {enclave} serves this certificate now")
    return "\n".join(lines) + "\n"
