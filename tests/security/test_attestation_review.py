"""What a security review of issue 18 (RA-TLS attestation of enclaves) found, kept as regression
tests: each ``test_found_*`` failed on the code as reviewed and passes since its fix; each
``test_holds_*`` covers a property that held up and that the other tests did not pin down.

Unit tests use no chain or Redis: an ``Attestor`` whose ``served_certificate`` is replaced, a local
KDS stand-in, scripted Aleph answers. Integration tests run the proxy against the HTTPS enclave
stand-in (``enclave``, ``kds`` fixtures of ``tests/conftest.py``)."""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.server
import json
import ssl
import tempfile
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.backends import enclave as enclave_module
from app.backends.aleph import Measurements
from app.backends.enclave import Admission, AttestationFailed, Attestor, Evidence
from app.backends.tee import Kds, TeeUnavailable
from app.backends.upstream import Upstream
from app.catalog import Model
from app.devnet.standin import StandinModel
from app.payments.receipts import Receipt
from app.settings import Settings
from app.tee.ra_tls import OID_REPORT, Roots
from app.tee.sev_snp import parse_report
from tests.integration.test_attested_hosts import attested_proxy, evidence_of
from tests.support import CHAT_BODY, Proxy, moved_since, settle_response
from tests.tee_support import ATTESTED_MODEL, Enclave, KdsStandin
from tests.unit.test_aleph import PUBLISHER, aggregate, manifest, program
from tests.unit.test_ra_tls import _octet_string, enclave_certificate
from tests.unit.test_sev_snp import CHAIN, MEASUREMENT, make_report

ROOTS = {"Milan": Roots("Milan", CHAIN.ark, CHAIN.ask, frozenset(CHAIN.pinned))}
SECOND_EXTENSION = x509.ObjectIdentifier("1.3.6.1.4.1.60000.1.2")  # same DER length as OID_REPORT


# -- helpers ---------------------------------------------------------------------------------------------


def bound_report(key: ec.EllipticCurvePrivateKey, **report: Any) -> bytes:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    data = hashlib.sha384(b"aleph-attest-tls-key-v1\x00" + point).digest() + bytes(16)
    return make_report(report_data=data, **report)


def repeated_extension_certificate(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An RA-TLS certificate of our chain, its report genuine and bound to ``key``, that carries the
    report extension twice (DER patched after signing: nobody checks a self-signed certificate's own
    signature, and a TLS handshake only needs the key)."""
    document = json.dumps({"tee_type": "sev-snp", "data": bound_report(key).hex()}).encode()
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclave")])
    der = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(OID_REPORT, _octet_string(document)), critical=False)
        .add_extension(x509.UnrecognizedExtension(SECOND_EXTENSION, b"\x04\x00"), critical=False)
        .sign(key, hashes.SHA384())
        .public_bytes(serialization.Encoding.DER)
    )
    second = bytes.fromhex("060a2b0601040183d4600102")
    assert der.count(second) == 1
    return der.replace(second, bytes.fromhex("060a2b0601040183d4600101"))


def write_pair(directory: Path, der: bytes, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    lines = textwrap.wrap(base64.b64encode(der).decode(), 64)
    pem = "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"
    (directory / "cert.pem").write_text(pem)
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return directory / "cert.pem", directory / "key.pem"


def attested_model(**changes: Any) -> Model:
    fields: dict[str, Any] = {
        "name": "enclave",
        "description": "",
        "tee": True,
        "pricing": "per_call",
        "price": 1,
        "upstream_url": "https://127.0.0.1:1",
        "attestation": "sev-snp",
        "measurements": (MEASUREMENT.hex(),),
    }
    return Model(**{**fields, **changes})


def attestor(cache: Path, kds_url: str = "http://127.0.0.1:9") -> Attestor:
    settings = types.SimpleNamespace(
        amd_kds_url=kds_url, vcek_cache_dir=cache, rpc_timeout=2.0, attestation_ttl=600.0
    )
    return Attestor(settings, ROOTS)  # type: ignore[arg-type]


def serving(monkeypatch: pytest.MonkeyPatch, der: bytes) -> None:
    """The enclave's origin serves ``der`` from now on (``served_certificate`` replaced)."""
    monkeypatch.setattr(enclave_module, "served_certificate", lambda origin, timeout: der)


def verified_or_refused(check: Any) -> Evidence | AttestationFailed:
    try:
        return check()  # type: ignore[no-any-return]
    except AttestationFailed as failure:
        return failure


# -- unit: parsing and the verification's own failures ----------------------------------------------------


def test_found_a_certificate_repeating_an_extension_fails_attestation_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``cryptography`` raises ``DuplicateExtension`` (not a ValueError) for it; ``Attestor._verify``
    only catches TeeUnavailable, EvidenceError and ValueError, so the exception escapes."""
    serving(monkeypatch, repeated_extension_certificate(ec.generate_private_key(ec.SECP384R1())))
    result = verified_or_refused(lambda: attestor(tmp_path / "vcek").evidence(attested_model()))
    assert isinstance(result, AttestationFailed)


def test_found_an_unwritable_vcek_cache_does_not_break_verification(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The VCEK came from the KDS and verifies; only keeping it on disk fails (a read-only or
    misconfigured ``X402_VCEK_CACHE_DIR``). ``Kds._keep`` raises the OSError through ``_verify``."""
    der, _key = enclave_certificate()
    serving(monkeypatch, der)
    (tmp_path / "file").write_text("not a directory")
    with KdsStandin() as kds:
        check = attestor(tmp_path / "file" / "vcek", kds.url)
        result = verified_or_refused(lambda: check.evidence(attested_model()))
    assert isinstance(result, Evidence | AttestationFailed)
    assert isinstance(result, Evidence)  # a cache is an optimisation: the verified VCEK is usable


def test_found_a_report_failing_its_signature_does_not_evict_the_genuine_vcek(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``signature_invalid`` is raised after ``verify_chain`` proved the VCEK is AMD's (here: the
    chain's): the fault is the report's, yet the shared cache file is deleted, so every later check
    (every worker, every 5 s while it fails) asks the KDS again."""
    with KdsStandin() as kds:
        check = attestor(tmp_path / "vcek", kds.url)
        good, key = enclave_certificate()
        serving(monkeypatch, good)
        assert isinstance(check.evidence(attested_model()), Evidence)
        cached = list((tmp_path / "vcek").glob("*.der"))
        assert len(cached) == 1 and len(kds.asked) == 1

        flipped = bytearray(bound_report(key))
        flipped[0x90] ^= 1  # one measurement bit: the signature no longer covers the report
        bad, _ = enclave_certificate(key=key, report=bytes(flipped))
        serving(monkeypatch, bad)
        refused = verified_or_refused(
            lambda: check.renewed(attested_model(), check.evidence(attested_model()))
        )
        assert isinstance(refused, AttestationFailed) and refused.reason == "signature_invalid"
        assert cached[0].is_file(), "the VCEK that chains to the pinned root was thrown away"


def test_found_one_chip_s_kds_failure_does_not_hold_back_another_chip_s_vcek(tmp_path: Path) -> None:
    """The throttle and its backoff are one per process, whatever the URL: a 404 for one chip (or
    TCB) delays every other model's first VCEK, doubling up to 60 s while the failing one retries."""
    with KdsStandin() as kds:
        client = Kds(kds.url, tmp_path / "vcek", timeout=2.0)
        kds.status = 404
        with pytest.raises(TeeUnavailable):
            client.vcek(f"{kds.url}/vcek/v1/Milan/{'aa' * 64}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115")
        kds.status = 200
        time.sleep(1.2)  # past MIN_INTERVAL (1 s)
        other = f"{kds.url}/vcek/v1/Milan/{'bb' * 64}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115"
        assert client.vcek(other) == kds.vcek_der


@pytest.mark.parametrize(
    ("family", "model", "product"),
    [(0x19, 0x10, "Genoa"), (0x19, 0xA0, "Genoa"), (0x1A, 0x11, "Turin")],
)
def test_found_every_cpu_model_of_a_product_line_names_it(family: int, model: int, product: str) -> None:
    """``PRODUCTS`` knows one CPUID model per line (Milan 0x01, Genoa 0x11, Turin 0x02); virtee/sev's
    ``Generation::identify_cpu`` maps Genoa 0x10-0x1F and 0xA0-0xAF (Bergamo, Siena),
    Turin 0x00-0x11. Such a version 3+ report is refused ``product_unknown`` ("the report names no
    product line") unless the catalog names ``product``, documented as being for version 2 reports."""
    raw = bytearray(make_report())
    raw[0x188], raw[0x189] = family, model
    assert parse_report(bytes(raw)).product == product


# -- unit: the Aleph manifest path -----------------------------------------------------------------------


class ScriptedNode(Measurements):
    """An Aleph API node answering from ``aggregates`` (AGGREGATE listings) and ``programs``."""

    def __init__(self) -> None:
        super().__init__(ttl=0.0, timeout=1.0)
        self.aggregates: list[Any] = []
        self.programs: dict[str, Any] = {}

    def _messages(self, api: str, params: dict[str, Any]) -> list[Any]:
        if "addresses" in params:
            return list(self.aggregates)
        wanted = self.programs.get(params["hashes"])
        return [wanted] if wanted is not None else []


def test_found_an_older_signed_manifest_does_not_roll_back_a_newer_one(tmp_path: Path) -> None:
    """The publisher retires deployment A (launch ``aa…``) by publishing a newer manifest (time 2)
    naming only B. A node (or anyone on an ``http://`` ``aleph_api``) that later lists only the
    older, still validly signed manifest (time 1) and A's program gets A accepted again: the newest
    manifest is chosen per answer, never against what this process already accepted."""
    old_launch, new_launch = "aa" * 48, "bb" * 48
    old_program, new_program = program([old_launch]), program([new_launch])
    old_manifest = aggregate(manifest({"m": [(old_program["item_hash"], "active")]}), time=1.0)
    new_manifest = aggregate(manifest({"m": [(new_program["item_hash"], "active")]}), time=2.0)
    node = ScriptedNode()
    node.programs = {old_program["item_hash"]: old_program, new_program["item_hash"]: new_program}
    model = attested_model(
        measurements=(), aleph_publisher=PUBLISHER.address, aleph_model="m", aleph_api="https://node"
    )

    node.aggregates = [new_manifest, old_manifest]
    assert node.published(model).measurements == (new_launch,)
    node.aggregates = [old_manifest]  # the newer one withheld
    assert node.published(model, background=True).measurements == (new_launch,)


# -- unit: properties that held ------------------------------------------------------------------------


@contextlib.contextmanager
def https_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[tuple[str, bytes]]:
    """An HTTPS server on 127.0.0.1 with a fresh self-signed P-384 certificate: (origin, its DER)."""
    der, key = enclave_certificate()
    directory = Path(tempfile.mkdtemp(prefix="review-tls-"))
    certificate, key_path = write_pair(directory, der, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_port}", der
    finally:
        server.shutdown()
        server.server_close()


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        return None

    def _answer(self) -> None:
        _Recorder.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_CONNECT = _answer


class _Redirecting(http.server.BaseHTTPRequestHandler):
    target = ""

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(307)
        self.send_header("Location", _Redirecting.target)
        self.send_header("Content-Length", "0")
        self.end_headers()


def upstream_settings() -> Settings:
    return Settings(pay_to="0x" + "22" * 20, relayer_key="0x" + "33" * 32, redis_url="redis://127.0.0.1:9")


def test_holds_a_pinned_session_sends_nothing_to_another_certificate_nor_through_a_proxy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``session.verify = False`` with urllib3's ``assert_fingerprint``: a server with another
    certificate completes the handshake but gets no request byte; HTTPS_PROXY/ALL_PROXY from the
    environment are not used."""
    _Recorder.seen = []
    with https_server(_Recorder) as (origin, der), https_server(_Recorder) as (proxy_origin, _):
        monkeypatch.setenv("HTTPS_PROXY", proxy_origin.replace("https", "http"))
        monkeypatch.setenv("ALL_PROXY", proxy_origin.replace("https", "http"))
        check = attestor(tmp_path)
        model = attested_model(upstream_url=origin)
        other = types.SimpleNamespace(fingerprint=hashlib.sha256(b"another certificate").hexdigest())
        with pytest.raises(requests.exceptions.SSLError):
            check.session(model, other).post(origin + "/v1/chat/completions", json={"secret": 1}, timeout=5)  # type: ignore[arg-type]
        assert _Recorder.seen == []
        pinned = types.SimpleNamespace(fingerprint=hashlib.sha256(der).hexdigest())
        assert check.session(model, pinned).get(origin + "/v1/models", timeout=5).status_code == 200  # type: ignore[arg-type]
        assert _Recorder.seen == ["/v1/models"]  # direct, not through the proxy from the environment


def test_holds_an_enclave_s_redirect_is_not_followed(tmp_path: Path) -> None:
    _Recorder.seen = []
    with https_server(_Recorder) as (elsewhere, _), https_server(_Redirecting) as (origin, der):
        _Redirecting.target = elsewhere + "/steal"
        check = attestor(tmp_path)
        model = attested_model(upstream_url=origin)
        pin = types.SimpleNamespace(fingerprint=hashlib.sha256(der).hexdigest())
        answer = Upstream(upstream_settings()).forward(
            "chat",
            {"model": "enclave", "messages": []},
            model,
            Admission(check, model, pin),  # type: ignore[arg-type]
        )
        assert answer.status == 307 and _Recorder.seen == []
        answer.close()


# -- integration: the proxy on real sockets ---------------------------------------------------------------

MODEL = ATTESTED_MODEL


def serve_repeated_extension(enclave: Enclave) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path, key_path = write_pair(enclave.directory / "repeated", repeated_extension_certificate(key), key)
    enclave.host.reload_certificate(path, key_path, restart=True)


@pytest.mark.integration
def test_found_a_certificate_change_that_raises_mid_call_is_a_503_and_the_payment_stays_redeemable(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    """The pinned connection fails, ``Upstream._renewed`` verifies the certificate served now, and
    the ``DuplicateExtension`` escapes ``serve``: a 500 after the payment was taken, which is never
    marked redeemable (its retry is refused as already presented until STALE_SETTLED, 15 min)."""
    with attested_proxy(proxy, tmp_path, enclave, kds, attestation_ttl=600.0) as shop:
        assert shop.pay(shop.payment(shop.requirement())).status_code == 200
        payment = shop.payment(shop.requirement())
        before = proxy.balances()
        serve_repeated_extension(enclave)
        refused = shop.pay(payment)
        moved = moved_since(proxy, before)
        retried = shop.pay(payment)  # the same payment header, at once
        assert (refused.status_code, moved) != (500, int(payment.to_wire()["accepted"]["amount"])), (
            f"charged {moved}, answered 500; its retry: {retried.status_code} {retried.text[:160]}"
        )
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "attestation_failed"
        assert settle_response(refused)["success"] is True  # the payment is redeemable
        assert retried.status_code == 503 and "attestation_failed" in retried.text


@pytest.mark.integration
def test_found_a_background_check_that_raises_keeps_selling_on_the_old_evidence(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    """The background refresh thread dies on the exception, the old entry stays: the model keeps
    being sold (402, evidence 200, /readyz verified) while its enclave serves a certificate that
    does not verify, and every paid call then fails after the payment (previous test)."""
    with attested_proxy(proxy, tmp_path, enclave, kds, attestation_ttl=1.0) as shop:
        assert evidence_of(shop).status_code == 200
        serve_repeated_extension(enclave)
        deadline = time.monotonic() + 12  # TTL 1 s, failures retried within 5 s
        while evidence_of(shop).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert evidence_of(shop).status_code == 503, "still sold on the certificate it no longer serves"
        assert shop.post().status_code == 503


def signed_header(proxy: Proxy, payment_id: str) -> str:
    from tests.integration.test_payment_identifier import signed_header as official

    return official(proxy, CHAT_BODY, payment_id)


def post(proxy: Proxy, header: str) -> requests.Response:
    return requests.post(
        proxy.url + "/v1/chat/completions", json=CHAT_BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=30
    )


@pytest.mark.integration
def test_found_a_replayed_answer_names_the_evidence_its_receipt_binds(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    """A kept answer (payment-identifier) is replayed with its own X-Receipt, but routes._paid adds
    X-TEE-Measurement/X-TEE-Evidence of the evidence verified NOW: after a certificate change the
    headers name a certificate the answer never came over, and disagree with the signed receipt."""
    with attested_proxy(proxy, tmp_path, enclave, kds, attestation_ttl=1.0) as shop:
        header = signed_header(shop, "review-replay-0001-abcdef")
        first = post(shop, header)
        assert first.status_code == 200
        old = first.headers["X-TEE-Evidence"]
        enclave.restart_with("renewed")
        deadline = time.monotonic() + 12
        while evidence_of(shop).json().get("evidence_sha256") == old and time.monotonic() < deadline:
            time.sleep(0.3)
        again = post(shop, header)
        assert again.status_code == 200 and again.content == first.content
        assert again.headers["X-Receipt"] == first.headers["X-Receipt"]
        assert Receipt.from_header(again.headers["X-Receipt"]).tee_evidence == old
        assert again.headers["X-TEE-Evidence"] == old


@pytest.mark.integration
def test_found_a_kept_answer_is_handed_back_while_the_enclave_fails(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    """The answer was paid for and produced by a verified enclave; its replay needs no enclave, yet
    ``_admitted`` refuses it with 503 while the enclave does not verify (the buyer cannot get what
    it paid for until the enclave is back, or ever if it is retired)."""
    with attested_proxy(proxy, tmp_path, enclave, kds, attestation_ttl=1.0) as shop:
        header = signed_header(shop, "review-kept-0001-abcdef")
        first = post(shop, header)
        assert first.status_code == 200
        enclave.restart_with("impostor", bound_to=ec.generate_private_key(ec.SECP384R1()))
        deadline = time.monotonic() + 12
        while evidence_of(shop).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert evidence_of(shop).status_code == 503
        again = post(shop, header)
        assert again.status_code == 200 and again.content == first.content
