"""Attested model hosts (issue 18): a catalog model with ``attestation = "sev-snp"`` is sold only
while the RA-TLS certificate its enclave serves verifies, and a buyer's request reaches it only over a
connection pinned to that certificate.

- ``Attestor.evidence(model)``: the model's verified ``Evidence``, or ``AttestationFailed`` with a
  stable reason. The first check of a process fetches the certificate (one TLS handshake) and the
  VCEK (``app.backends.tee.Kds``: disk, else AMD's KDS) and verifies the bundle
  (``app.tee.ra_tls.verify``). A result is trusted for ``X402_ATTESTATION_TTL`` seconds, then redone
  in a background thread while the last result keeps answering (a failure is retried after
  ``RETRY_FAILED`` seconds at most), so a request does not wait on the KDS unless the certificate
  changed.
- ``Attestor.session(model, evidence)``: a ``requests.Session`` whose TLS connections are accepted
  only when the server's certificate has the evidence's SHA-256 (urllib3's ``assert_fingerprint``,
  checked after the handshake, before any byte of the request is written). ``Upstream`` calls
  ``Attestor.renewed`` when a pinned connection fails its TLS: the certificate served now is
  verified first, and only then is the request sent to it.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from requests.adapters import HTTPAdapter

from app import metrics
from app.backends.aleph import Measurements
from app.backends.http import Sessions
from app.backends.tee import Kds, TeeUnavailable, served_certificate
from app.catalog import Model
from app.settings import Settings
from app.tee.amd import ARK_SPKI_SHA256
from app.tee.ra_tls import Roots, Verdict, report_of, vcek_url, verify
from app.tee.sev_snp import EvidenceError, load_vcek, parse_report

log = logging.getLogger("x402.enclave")
AMD_PINS = {product: frozenset({pin}) for product, pin in ARK_SPKI_SHA256.items()}
TEST_ROOTS = "test (X402_ATTESTATION_ROOTS: not AMD's)"
RETRY_FAILED = 5.0  # seconds: a failed verification is tried again this soon at most (in the background)
HANDSHAKE_TIMEOUT = 5.0  # seconds for the TLS handshake that reads the served certificate
MEASUREMENT_HEADER = "X-TEE-Measurement"
EVIDENCE_HEADER = "X-TEE-Evidence"


def _verifier() -> str:
    try:
        return f"x402-tee-proxy {version('x402-tee-proxy')}"
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "x402-tee-proxy (not installed)"


VERIFIER = _verifier()


class AttestationFailed(EvidenceError):
    """The model's enclave is not verified now: ``reason`` a stable code (``app.tee.sev_snp`` and
    ``app.tee.aleph`` codes, ``evidence_unavailable``, ``certificate_expired``…), ``detail`` why in
    words."""


@dataclass(frozen=True)
class Evidence:
    """A verified RA-TLS bundle: the certificate's, report's and VCEK's bytes (DER, raw 1184 bytes,
    DER), where the VCEK came from, the roots it chains to, what it proved, and when (unix seconds)."""

    model: str
    certificate: bytes
    report: bytes
    vcek: bytes
    vcek_url: str
    roots: Roots
    verdict: Verdict
    verified_at: int
    not_after: float  # unix seconds: the certificate's end of validity

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the certificate's DER: what connections are pinned to."""
        return hashlib.sha256(self.certificate).hexdigest()

    def public(self) -> dict[str, Any]:
        """The bundle as ``GET /v1/attestation/{model}`` shows it, enough to verify it again without
        trusting the proxy: base64 of the certificate, report and VCEK, the AMD chain in PEM, the
        verdict and ``evidence_sha256`` (SHA-256 of certificate ‖ report ‖ VCEK)."""

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        def pem(certificate: x509.Certificate) -> str:
            return certificate.public_bytes(serialization.Encoding.PEM).decode()

        verdict = self.verdict
        return {
            "model": self.model,
            "attestation": "sev-snp",
            "certificate": b64(self.certificate),
            "certificate_sha256": self.fingerprint,
            "report": b64(self.report),
            "vcek": b64(self.vcek),
            "vcek_url": self.vcek_url,
            "ask": pem(self.roots.ask),
            "ark": pem(self.roots.ark),
            "verdict": {
                "measurement": verdict.measurement,
                "policy": verdict.policy,
                "vmpl": verdict.vmpl,
                "reported_tcb": {
                    "bootloader": verdict.reported_tcb.bootloader,
                    "tee": verdict.reported_tcb.tee,
                    "snp": verdict.reported_tcb.snp,
                    "microcode": verdict.reported_tcb.microcode,
                    "fmc": verdict.reported_tcb.fmc,
                },
                "product": verdict.product,
                "roots": "AMD" if self.roots.pinned == AMD_PINS.get(verdict.product) else TEST_ROOTS,
                "verified_at": self.verified_at,
                "verifier": VERIFIER,
            },
            "evidence_sha256": verdict.evidence_sha256,
        }


@dataclass
class Admission:
    """One paid call's tie to an attested enclave: ``admit`` verifies it (before any 402 or
    payment); ``evidence`` is then what the call's connection is pinned to (changed by ``Upstream``
    when the enclave's certificate changed and the new one verified)."""

    attestor: Attestor
    model: Model
    evidence: Evidence | None = None

    def admit(self) -> Evidence:
        """The model's verified evidence, kept as this call's. Raises ``AttestationFailed``."""
        self.evidence = self.attestor.evidence(self.model)
        return self.evidence


@dataclass
class _Entry:
    result: Evidence | AttestationFailed
    checked: float  # monotonic seconds
    refreshing: bool = False


def _pin(fingerprint: str, session: requests.Session) -> None:
    """Accept only the certificate of SHA-256 ``fingerprint``: that pin is the check, since an RA-TLS
    certificate is self-signed by design (no CA, no host name)."""
    session.verify = False
    session.mount("https://", _PinnedAdapter(fingerprint))


class _PinnedAdapter(HTTPAdapter):
    """Connections accepted only from a server presenting the certificate of one SHA-256."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        super().__init__()

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs.update(assert_fingerprint=self.fingerprint, assert_hostname=False)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


class Attestor:
    """Verifies attested models' enclaves for one process; thread-safe."""

    def __init__(self, settings: Settings, trust: dict[str, Roots], kds: Kds | None = None) -> None:
        self.settings = settings
        self.trust = trust
        self.kds = kds or Kds(settings.amd_kds_url, settings.vcek_cache_dir, settings.rpc_timeout)
        self.aleph = Measurements(settings.attestation_ttl, settings.rpc_timeout)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._pinned: dict[str, tuple[str, Sessions]] = {}  # model → (fingerprint, its sessions)

    # --- what requests ask ------------------------------------------------------------------------

    def evidence(self, model: Model) -> Evidence:
        """The model's verified evidence. Raises ``AttestationFailed``. Waits for a verification only
        when this process has none yet; an old result starts a background one and is used meanwhile."""
        with self._lock:
            entry = self._entries.get(model.name)
        if entry is None:
            entry = self._check_now(model, None)
        else:
            self._refresh_if_due(model, entry)
        return _valid(entry.result)

    def state(self, model: Model) -> str:
        """What this process last found, without checking: "verified", "failing: <reason>", or
        "not checked yet"."""
        with self._lock:
            entry = self._entries.get(model.name)
        if entry is None:
            return "not checked yet"
        if isinstance(entry.result, AttestationFailed):
            return f"failing: {entry.result.reason}"
        return "verified" if time.time() <= entry.result.not_after else "failing: certificate_expired"

    def renewed(self, model: Model, seen: Evidence) -> Evidence:
        """The enclave's certificate is not (or no longer) ``seen``'s: verify the one served now,
        before anything is sent to it. Raises ``AttestationFailed``."""
        return _valid(self._check_now(model, seen).result)

    def session(self, model: Model, evidence: Evidence) -> requests.Session:
        """This thread's session for ``model``, its connections pinned to ``evidence``'s certificate
        (``Sessions``: one per thread and process; those pinned to an earlier certificate are
        dropped)."""
        fingerprint = evidence.fingerprint
        with self._lock:
            pinned = self._pinned.get(model.name)
            if pinned is None or pinned[0] != fingerprint:
                pinned = self._pinned[model.name] = (fingerprint, Sessions(partial(_pin, fingerprint)))
        return pinned[1].get()

    # --- verification -------------------------------------------------------------------------

    def _check_now(self, model: Model, seen: Evidence | None) -> _Entry:
        """Verify now, one thread per model at a time; a thread that waited for another's check uses
        its result when it is newer than what made this one ask (none, or ``seen``)."""
        with self._lock:
            lock = self._model_locks.setdefault(model.name, threading.Lock())
        with lock:
            with self._lock:
                entry = self._entries.get(model.name)
            stale = entry is None or (
                seen is not None
                and isinstance(entry.result, Evidence)
                and entry.result.fingerprint == seen.fingerprint
            )
            if not stale and entry is not None:
                return entry
            entry = _Entry(self._verify(model), time.monotonic())
            self._store(model, entry, None)
            return entry

    def _refresh_if_due(self, model: Model, entry: _Entry) -> None:
        ttl = self.settings.attestation_ttl
        due = ttl if isinstance(entry.result, Evidence) else min(ttl, RETRY_FAILED)
        with self._lock:
            if entry.refreshing or time.monotonic() - entry.checked < due:
                return
            entry.refreshing = True

        def refresh() -> None:
            try:
                self._store(model, _Entry(self._verify(model, background=True), time.monotonic()), entry)
            finally:
                entry.refreshing = False

        threading.Thread(target=refresh, name=f"attest-{model.name}", daemon=True).start()

    def _store(self, model: Model, entry: _Entry, replacing: _Entry | None) -> None:
        """Keep ``entry`` as the model's result (a background refresh only if nothing newer came
        first: ``replacing`` is what it refreshed), count it, and log a change of outcome."""
        with self._lock:
            previous = self._entries.get(model.name)
            if replacing is not None and previous is not replacing:
                return
            self._entries[model.name] = entry
        result = entry.result
        outcome = "verified" if isinstance(result, Evidence) else result.reason
        metrics.ATTESTATIONS.labels(model.name, outcome).inc()
        metrics.ATTESTED.labels(model.name).set(1 if isinstance(result, Evidence) else 0)
        before = previous.result if previous is not None else None
        if isinstance(result, AttestationFailed):
            if not isinstance(before, AttestationFailed) or before.reason != result.reason:
                log.warning("enclave of %s not verified: %s", model.name, result)
        elif not isinstance(before, Evidence) or before.fingerprint != result.fingerprint:
            log.info(
                "enclave of %s verified: measurement %s, evidence %s",
                model.name,
                result.verdict.measurement,
                result.verdict.evidence_sha256,
            )

    def _verify(self, model: Model, background: bool = False) -> Evidence | AttestationFailed:
        """One whole verification of the certificate the enclave serves now; never raises. A model
        whose measurements are published on Aleph is checked against them (``app.backends.aleph``:
        fetched again only by a ``background`` check, or when none are cached yet)."""
        url = ""
        try:
            terms = self.aleph.terms(model, background) if model.aleph_publisher else model.terms
            der = served_certificate(model.upstream_url, HANDSHAKE_TIMEOUT)
            certificate = x509.load_der_x509_certificate(der)
            raw = report_of(certificate)
            report = parse_report(raw)
            product = report.product or model.product
            if not product:
                raise EvidenceError(
                    "product_unknown", "the report names no product line: set product in the catalog"
                )
            roots = self.trust.get(product)
            if roots is None:
                raise EvidenceError("root_not_pinned", f"no roots for {product}")
            url = vcek_url(self.settings.amd_kds_url, report, product)
            vcek_der = self.kds.vcek(url)
            now = datetime.datetime.now(datetime.UTC)
            verdict = verify(der, load_vcek(vcek_der), vcek_der, roots, terms, now)
        except TeeUnavailable as exc:
            return AttestationFailed("evidence_unavailable", str(exc))
        except EvidenceError as exc:
            if url and exc.reason == "chain_invalid":
                self.kds.forget(url)  # a VCEK that is not AMD's is not kept (a report at fault is no reason)
            return AttestationFailed(exc.reason, exc.detail)
        except ValueError as exc:  # a certificate that does not parse
            return AttestationFailed("certificate_malformed", f"the certificate does not parse: {exc}")
        except Exception as exc:  # whatever else a hostile certificate makes a parser raise: fail closed
            log.warning("enclave of %s: verification raised %s", model.name, type(exc).__name__)
            return AttestationFailed(
                "evidence_malformed", f"the evidence could not be read ({type(exc).__name__})"
            )
        return Evidence(
            model=model.name,
            certificate=der,
            report=raw,
            vcek=vcek_der,
            vcek_url=url,
            roots=roots,
            verdict=verdict,
            verified_at=int(now.timestamp()),
            not_after=certificate.not_valid_after_utc.timestamp(),
        )


def _valid(result: Evidence | AttestationFailed) -> Evidence:
    """The evidence, if its certificate is still valid now; raises the failure otherwise."""
    if isinstance(result, AttestationFailed):
        raise result
    if time.time() > result.not_after:
        raise AttestationFailed("certificate_expired", "the enclave's certificate has expired")
    return result
