"""Attested models on real sockets (issue 18): the proxy, an HTTPS enclave stand-in serving an RA-TLS
certificate of our own AMD-shaped chain, a stand-in of AMD's key distribution service, a real chain
and Redis. A model is sold only while its enclave verifies; buyers' requests go only over connections
pinned to the verified certificate; every paid answer names the evidence, which anyone can fetch and
verify again."""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app import create_checked_app
from app.devnet.standin import StandinModel
from app.payments.receipts import Receipt
from app.tee.ra_tls import Roots, verify
from app.tee.sev_snp import POLICY_DEBUG, Terms, load_vcek, spki_sha256
from app.x402.codec import decode_header
from tests.support import CHAT_BODY, Proxy, approve_permit2, moved_since, serve, settle_response, upto_session
from tests.tee_support import (
    ATTESTED_MODEL,
    STATED_MODEL,
    Enclave,
    KdsStandin,
    attested_catalog,
    write_roots,
)
from tests.unit.test_sev_snp import CHAIN, MEASUREMENT, make_report

pytestmark = pytest.mark.integration
MODEL, STATED = ATTESTED_MODEL, STATED_MODEL


def bound_report(key: ec.EllipticCurvePrivateKey, **report: Any) -> bytes:
    """A report of our chain bound to ``key``'s certificate (``make_report``'s arguments)."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return make_report(
        report_data=hashlib.sha384(b"aleph-attest-tls-key-v1\x00" + point).digest() + bytes(16), **report
    )


@contextlib.contextmanager
def attested_proxy(
    proxy: Proxy,
    tmp_path: Path,
    enclave: Enclave,
    kds: KdsStandin,
    terms: str = "",
    test_roots: bool = True,
    measurement: str = MEASUREMENT.hex(),
    **changes: Any,
) -> Iterator[Proxy]:
    """The proxy selling ``MODEL`` from ``enclave`` (attested, ``measurement`` accepted, ``terms``
    added to its entry) and ``STATED`` from the shared host, the test roots allowed unless
    ``test_roots`` is False (AMD's), VCEKs from ``kds``, verifications trusted 2 s."""
    catalog = attested_catalog(tmp_path / "attested.toml", enclave.host.url, measurement, terms)
    settings = proxy.settings.with_overrides(
        **{
            "catalog_path": catalog,
            "amd_kds_url": kds.url,
            "vcek_cache_dir": tmp_path / "vcek",
            "attestation_roots": write_roots(tmp_path / "roots.pem") if test_roots else None,
            "attestation_ttl": 2.0,
            **changes,
        }
    )
    server = serve(create_checked_app(settings))
    try:
        yield Proxy(f"http://127.0.0.1:{server.server_port}", settings, proxy.wallets, proxy.chain, server)
    finally:
        server.shutdown()


def evidence_of(proxy: Proxy) -> requests.Response:
    return requests.get(f"{proxy.url}/v1/attestation/{MODEL}", timeout=10)


def described(challenge: requests.Response) -> str:
    """The 402's resource description (v2 ``PAYMENT-REQUIRED``; the v1 body's is the same)."""
    description = decode_header(challenge.headers["PAYMENT-REQUIRED"])["resource"]["description"]
    assert challenge.json()["accepts"][0]["description"] == description
    return str(description)


def error_code(response: requests.Response) -> str:
    return str(response.json()["error"]["code"])


def test_a_verified_enclave_is_sold_and_every_answer_names_its_evidence(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        unpaid = attested.post()
        assert unpaid.status_code == 402
        assert "AMD SEV-SNP, verified by the proxy" in described(unpaid)
        response = attested.pay(attested.payment(attested.requirement()))
        assert response.status_code == 200 and settle_response(response)["success"] is True
        bundle = evidence_of(attested).json()

        # the answer came from the enclave, over TLS, and names the evidence it was pinned to
        assert [r.path for r in enclave.host.received] == ["/v1/chat/completions"] and standin.received == []
        assert response.headers["X-TEE-Measurement"] == MEASUREMENT.hex()
        assert response.headers["X-TEE-Evidence"] == bundle["evidence_sha256"]
        receipt = Receipt.from_header(response.headers["X-Receipt"])
        assert receipt.tee_measurement == MEASUREMENT.hex()
        assert receipt.tee_evidence == bundle["evidence_sha256"]
        (tmp_path / "request.json").write_bytes(response.request.body)  # type: ignore[arg-type]
        (tmp_path / "response.json").write_bytes(response.content)
        files = ["--request", str(tmp_path / "request.json"), "--response", str(tmp_path / "response.json")]
        given = ["--proxy", attested.url, "--receipt", response.headers["X-Receipt"]]
        checked = subprocess.run(
            [sys.executable, "-m", "app.cli", "verify-receipt", *files, *given],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stderr
        assert (
            f"enclave measurement {MEASUREMENT.hex()}, evidence {bundle['evidence_sha256']}" in checked.stdout
        )

        # the bundle: the certificate served, its report, AMD's VCEK and chain, what they proved
        certificate = base64.b64decode(bundle["certificate"])
        report = base64.b64decode(bundle["report"])
        vcek = base64.b64decode(bundle["vcek"])
        assert certificate == enclave.der and len(report) == 1184 and vcek == kds.vcek_der
        assert bundle["evidence_sha256"] == hashlib.sha256(certificate + report + vcek).hexdigest()
        assert bundle["vcek_url"].startswith(kds.url + "/vcek/v1/Milan/" + CHAIN.chip_id.hex() + "?blSPL=3&")
        assert bundle["ark"] == CHAIN.ark.public_bytes(serialization.Encoding.PEM).decode()
        assert bundle["ask"] == CHAIN.ask.public_bytes(serialization.Encoding.PEM).decode()
        verdict = bundle["verdict"]
        assert verdict["measurement"] == MEASUREMENT.hex() and verdict["product"] == "Milan"
        assert verdict["vmpl"] == 0 and verdict["policy"] == 0x30000
        assert verdict["reported_tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115, "fmc": 0}
        assert verdict["verifier"].startswith("x402-tee-proxy") and verdict["verified_at"] <= time.time()
        assert verdict["roots"] == "test (X402_ATTESTATION_ROOTS: not AMD's)"

        # a buyer verifies it again with nothing from the proxy but the bundle, pinning the root
        ark = x509.load_pem_x509_certificate(bundle["ark"].encode())
        ask = x509.load_pem_x509_certificate(bundle["ask"].encode())
        pinned = frozenset({spki_sha256(CHAIN.ark)})  # the buyer's own pin, not the bundle's
        again = verify(
            certificate,
            load_vcek(vcek),
            vcek,
            Roots("Milan", ark, ask, pinned),
            Terms(frozenset({MEASUREMENT})),
            datetime.datetime.now(datetime.UTC),
        )
        assert again.evidence_sha256 == bundle["evidence_sha256"]

        # verified again once the TTL passed, in the background: the same bundle, a later time
        deadline = time.monotonic() + 15
        while evidence_of(attested).json()["verdict"]["verified_at"] == verdict["verified_at"]:
            assert time.monotonic() < deadline, "never verified again"
            time.sleep(0.3)
        assert evidence_of(attested).json()["evidence_sha256"] == bundle["evidence_sha256"]
        assert len(kds.asked) == 1  # the VCEK came from the disk cache ever after


def _flipped_measurement_bit() -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP384R1())
    report = bytearray(bound_report(key))
    report[0x90] ^= 0x01  # one bit of the measurement: the signature no longer covers the report
    return {"key": key, "report": bytes(report)}


def _debug_policy() -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP384R1())
    return {"key": key, "report": bound_report(key, policy=0x30000 | POLICY_DEBUG)}


FAULTS: dict[str, tuple[Any, dict[str, Any], str]] = {
    # name: (certificate arguments, attested_proxy arguments, reason)
    "one flipped report bit": (_flipped_measurement_bit, {}, "signature_invalid"),
    "debug policy": (_debug_policy, {}, "debug_enabled"),
    "wrong measurement": (dict, {"measurement": "cd" * 48}, "measurement_unknown"),
    "low tcb": (dict, {"terms": "tcb_floor = { snp = 9 }"}, "tcb_below_floor"),
    "bound to another key": (
        lambda: {"bound_to": ec.generate_private_key(ec.SECP384R1())},
        {},
        "key_not_bound",
    ),
    "expired certificate": (lambda: {"days": -1}, {}, "certificate_expired"),
    "the default AMD roots": (dict, {"test_roots": False}, "chain_invalid"),  # ours is not AMD's VCEK
}


@pytest.mark.parametrize("fault", FAULTS)
def test_an_enclave_that_does_not_verify_is_refused_before_any_payment(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path, fault: str
) -> None:
    certificate, arguments, reason = FAULTS[fault]
    enclave.restart_with("faulty", **certificate())
    payment = proxy.payment(proxy.requirement())  # what the same body costs where it is sold
    before = proxy.balances()
    with attested_proxy(proxy, tmp_path, enclave, kds, **arguments) as attested:
        unpaid = attested.post()
        paid = attested.pay(payment)
        shown = evidence_of(attested)
        for refused in (unpaid, paid, shown):
            assert refused.status_code == 503 and error_code(refused) == "attestation_failed"
            assert reason in refused.json()["error"]["message"] and refused.headers["Retry-After"] == "5"
        assert "nothing was charged" in paid.json()["error"]["message"]
        assert moved_since(proxy, before) == 0 and enclave.host.received == []
        if reason == "chain_invalid":  # a VCEK that is not AMD's does not stay cached
            assert kds.asked and not list((tmp_path / "vcek").glob("*.der"))
        # the operator's other model keeps being sold
        other = attested.post(body={**CHAT_BODY, "model": STATED})
        assert other.status_code == 402 and "TEE (operator's statement)" in described(other)


def test_a_changed_certificate_is_verified_before_any_byte_of_a_request_reaches_it(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    # a long TTL: only the pinned connection can notice the change, mid-call
    with attested_proxy(proxy, tmp_path, enclave, kds, attestation_ttl=600.0) as attested:
        first = attested.pay(attested.payment(attested.requirement()))
        assert first.status_code == 200

        # the enclave restarts with a new key and a report bound to it: verified, then served
        renewed = enclave.restart_with("renewed")
        second = attested.pay(attested.payment(attested.requirement()))
        assert second.status_code == 200 and len(enclave.host.received) == 2
        assert second.headers["X-TEE-Evidence"] != first.headers["X-TEE-Evidence"]
        bundle = evidence_of(attested).json()
        assert base64.b64decode(bundle["certificate"]) == renewed
        assert second.headers["X-TEE-Evidence"] == bundle["evidence_sha256"]

        # someone else's certificate (its report bound to another key): nothing is sent to it
        payment = attested.payment(attested.requirement())
        before = proxy.balances()
        handshakes = enclave.host.handshakes
        enclave.restart_with("impostor", bound_to=ec.generate_private_key(ec.SECP384R1()))
        refused = attested.pay(payment)
        assert refused.status_code == 503 and error_code(refused) == "attestation_failed"
        assert "key_not_bound" in refused.json()["error"]["message"]
        assert len(enclave.host.received) == 2  # handshakes only, no request
        assert enclave.host.handshakes > handshakes
        assert refused.headers["x-should-retry"] == "false" and refused.headers["Retry-After"] == "5"
        assert "after your payment settled" in refused.json()["error"]["message"]
        assert settle_response(refused)["success"] is True  # paid just before the change was seen
        assert attested.post().status_code == 503  # no 402 while it fails

        # the enclave is back with a verified certificate: the same payment is served, once
        enclave.restart_with("back")
        deadline = time.monotonic() + 15  # a failure is verified again within RETRY_FAILED seconds
        while attested.post().status_code != 402:
            assert time.monotonic() < deadline, "never verified again"
            time.sleep(0.3)
        served = attested.pay(payment)
        assert served.status_code == 200 and len(enclave.host.received) == 3
        assert moved_since(proxy, before) == int(payment.to_wire()["accepted"]["amount"])


def test_the_evidence_is_verified_again_in_the_background(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        assert evidence_of(attested).status_code == 200
        enclave.restart_with("impostor", bound_to=ec.generate_private_key(ec.SECP384R1()))
        deadline = time.monotonic() + 15  # TTL 2 s: no buyer request is needed to notice
        while (shown := evidence_of(attested)).status_code == 200:
            assert time.monotonic() < deadline, "the change was never noticed"
            time.sleep(0.3)
        assert error_code(shown) == "attestation_failed" and "key_not_bound" in shown.text
        assert enclave.host.received == []
        ready = requests.get(attested.url + "/readyz", timeout=10).json()
        assert ready["checks"]["attestation"][MODEL] == {
            "verified": False,
            "reason": "key_not_bound",
            "detail": "the report is not bound to this certificate's key",
        }
        assert ready["checks"]["attestation"]["ok"] is True  # the other models are still sold
        listed = requests.get(attested.url + "/v1/models", timeout=10).json()["data"]
        assert [m["attestation_state"] for m in listed if m["id"] == MODEL] == ["failing: key_not_bound"]
        exposed = requests.get(attested.url + "/metrics", timeout=10).text
        assert f'x402_attestations_total{{model="{MODEL}",result="key_not_bound"}}' in exposed
        assert f'x402_attested{{model="{MODEL}"}} 0.0' in exposed
        enclave.restart_with("back")
        deadline = time.monotonic() + 15  # a failure is tried again within RETRY_FAILED seconds
        while evidence_of(attested).status_code != 200:
            assert time.monotonic() < deadline, "never verified again"
            time.sleep(0.3)
        assert attested.pay(attested.payment(attested.requirement())).status_code == 200
        deadline = time.monotonic() + 10  # /readyz answers from a 2 s cache
        while (
            not (ready := requests.get(attested.url + "/readyz", timeout=10).json())["ready"]
            or not ready["checks"]["attestation"][MODEL]["verified"]
        ):
            assert time.monotonic() < deadline, ready
            time.sleep(0.5)
        assert ready["checks"]["attestation"][MODEL]["measurement"] == MEASUREMENT.hex()


def test_vcek_s_come_from_the_kds_once_then_from_the_disk_the_workers_share(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    with attested_proxy(proxy, tmp_path, enclave, kds) as first:
        assert evidence_of(first).status_code == 200
    assert len(kds.asked) == 1 and kds.asked[0].startswith("/vcek/v1/Milan/")
    assert "&snpSPL=8&ucodeSPL=115" in kds.asked[0]
    kds.status = 503  # the KDS is down: a second process still verifies from the shared cache
    with attested_proxy(proxy, tmp_path, enclave, kds) as second:
        assert evidence_of(second).status_code == 200
        assert second.pay(second.payment(second.requirement())).status_code == 200
    assert len(kds.asked) == 1


def test_without_a_vcek_the_model_waits_for_the_kds_and_nothing_is_free(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    kds.status = 503
    payment = proxy.payment(proxy.requirement())
    before = proxy.balances()
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        refused = attested.pay(payment)
        assert refused.status_code == 503 and "evidence_unavailable" in refused.text
        assert moved_since(proxy, before) == 0 and enclave.host.received == []
        asked = len(kds.asked)
        for _ in range(5):  # asked again only after its backoff, however many buyers ask
            attested.post()
        assert len(kds.asked) == asked
        kds.status = 200
        deadline = time.monotonic() + 20
        while attested.post().status_code != 402:
            assert time.monotonic() < deadline, "never recovered"
            time.sleep(0.5)
        assert attested.pay(payment).status_code == 200


def test_models_sold_on_the_operator_s_word_say_so_and_can_be_withheld(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        listed = {m["id"]: m for m in requests.get(attested.url + "/v1/models", timeout=10).json()["data"]}
        assert listed[STATED]["trust"] == "TEE (operator's statement)" and not listed[STATED]["attested"]
        assert listed[MODEL]["attested"] and "verified by the proxy" in listed[MODEL]["trust"]
        assert listed[MODEL]["attestation_state"] in ("verified", "not checked yet")
        assert "attestation_state" not in listed[STATED]
        discovered = requests.get(attested.url + "/.well-known/x402", timeout=10).json()
        models = {m["id"]: m for m in discovered["listing"][0]["models"]}
        assert models[STATED]["trust"] == "TEE (operator's statement)"
        page = requests.get(attested.url + "/", headers={"Accept": "text/html"}, timeout=10).text
        assert f'<a href="/v1/attestation/{MODEL}">TEE, verified</a>' in page
        assert "TEE (operator&#39;s statement)</span>" in page
        shown = requests.get(f"{attested.url}/v1/attestation/{STATED}", timeout=10).json()
        assert shown == {
            "model": STATED,
            "tee": True,
            "attested": False,
            "trust": "TEE (operator's statement)",
        }
    with attested_proxy(proxy, tmp_path, enclave, kds, require_attestation=True) as strict:
        listed = [m["id"] for m in requests.get(strict.url + "/v1/models", timeout=10).json()["data"]]
        assert listed == [MODEL]
        refused = strict.post(body={**CHAT_BODY, "model": STATED})
        assert refused.status_code == 403 and error_code(refused) == "model_not_attested"
        assert strict.post().status_code == 402


def test_upto_and_streamed_answers_bind_the_enclave_s_evidence_too(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        evidence = evidence_of(attested).json()["evidence_sha256"]
        approve_permit2(attested.chain, attested.wallets.payer)
        session = upto_session(attested.wallets.payer_key)
        metered = session.post(attested.url + "/v1/chat/completions", json=CHAT_BODY, timeout=60)
        assert metered.status_code == 200 and metered.headers["X-TEE-Evidence"] == evidence
        receipt = Receipt.from_header(metered.headers["X-Receipt"])
        assert receipt.usage and (receipt.tee_measurement, receipt.tee_evidence) == (
            MEASUREMENT.hex(),
            evidence,
        )

        body = {**CHAT_BODY, "stream": True}
        streamed = attested.pay(attested.payment(attested.requirement(body)), body=body)
        assert streamed.status_code == 200 and streamed.headers["X-TEE-Evidence"] == evidence
        (closing,) = [line for line in streamed.text.splitlines() if line.startswith(": x402-receipt ")]
        receipt = Receipt.from_header(closing.removeprefix(": x402-receipt "))
        assert receipt.response_sha256 and receipt.tee_evidence == evidence
        assert [r.path for r in enclave.host.received] == ["/v1/chat/completions"] * 2


def test_an_enclave_that_does_not_answer_is_refused_without_naming_where_it_runs(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    origin = enclave.host.url
    enclave.host.stop()
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        for refused in (attested.post(), evidence_of(attested)):
            assert refused.status_code == 503 and error_code(refused) == "attestation_failed"
            assert "evidence_unavailable" in refused.text
            assert origin.removeprefix("https://") not in refused.text and "127.0.0.1" not in refused.text


def test_a_version_2_report_is_verified_for_the_product_line_the_catalog_names(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    enclave.restart_with("version-2", key=key, report=bound_report(key, version=2))  # no CPUID fields
    with attested_proxy(proxy, tmp_path, enclave, kds) as unnamed:
        refused = unnamed.post()
        assert refused.status_code == 503 and "product_unknown" in refused.text
    with attested_proxy(proxy, tmp_path, enclave, kds, terms='product = "Milan"') as named:
        assert named.pay(named.payment(named.requirement())).status_code == 200
        assert evidence_of(named).json()["verdict"]["product"] == "Milan"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``x402-proxy args`` as a buyer runs it."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_buyer_with_the_cli_redeems_a_payment_the_enclave_change_left_unserved_and_checks_its_receipt(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    saved = tmp_path / "call"
    url = "/v1/chat/completions"
    with attested_proxy(proxy, tmp_path, enclave, kds, attestation_ttl=600.0) as attested:
        assert attested.post().status_code == 402  # verified, before the change
        enclave.restart_with("impostor", bound_to=ec.generate_private_key(ec.SECP384R1()))
        key = ["--key", attested.wallets.payer_key, "--json", json.dumps(CHAT_BODY)]
        failed = cli("pay", attested.url + url, *key, "--save", str(saved))
        assert failed.returncode == 1 and "attestation_failed" in failed.stdout
        assert f"send it again with --payment {saved}/payment.json" in failed.stderr
        assert enclave.host.received == []

        enclave.restart_with("back")
        deadline = time.monotonic() + 15
        while attested.post().status_code != 402:
            assert time.monotonic() < deadline, "never verified again"
            time.sleep(0.3)
        before = proxy.balances()
        served = cli(
            "pay", attested.url + url, *key, "--payment", str(saved / "payment.json"), "--save", str(saved)
        )
        assert served.returncode == 0, served.stderr
        assert "paid before" in served.stderr and "enclave measurement " + MEASUREMENT.hex() in served.stderr
        assert moved_since(proxy, before) == 0 and len(enclave.host.received) == 1

        files = ["--request", str(saved / "request.json"), "--response", str(saved / "response.body")]
        checked = cli(
            "verify-receipt", *files, "--receipt", str(saved / "receipt.txt"), "--proxy", attested.url
        )
        assert checked.returncode == 0 and "enclave measurement " + MEASUREMENT.hex() in checked.stdout


def test_a_batch_channel_is_refunded_at_another_model_while_the_enclave_fails(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    """The failing model answers 503 before any 402, so the official client's refund (which reads a
    402 first) is asked at another model's paid ping: the channel is the payer's, not the model's."""
    from tests.integration.test_batch_refunds import paid_calls

    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        _session, scheme, charged, _channel = paid_calls(attested, 1)
        enclave.restart_with("impostor", bound_to=ec.generate_private_key(ec.SECP384R1()))
        deadline = time.monotonic() + 15
        while evidence_of(attested).status_code != 503:
            assert time.monotonic() < deadline, "the change was never noticed"
            time.sleep(0.3)
        payer_before = proxy.balances()[0]
        settled = scheme.refund(f"{attested.url}/v1/models/{STATED}/ping")
        assert settled.success and int(settled.amount) > 0 and charged > 0
        assert proxy.balances()[0] - payer_before == int(settled.amount)
        assert len(enclave.host.received) == 1
