"""An attested model whose accepted measurements come from its publisher's signed Aleph messages
(issue 18, part 7), on real sockets: the proxy, the HTTPS enclave stand-in and KDS stand-in of
``tests/integration/test_attested_hosts.py``, a real chain and Redis, and a stand-in of an Aleph API
node on 127.0.0.1 serving AGGREGATE (manifest) and V-PROGRAM messages these tests sign with a
throwaway publisher key (``tests/unit/test_aleph.py``)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from app.devnet.standin import StandinModel
from app.settings import DEFAULT_CATALOG
from tests.integration.test_attested_hosts import STATED, attested_proxy, error_code, evidence_of
from tests.support import CHAT_BODY, Proxy, moved_since
from tests.tee_support import Enclave, KdsStandin
from tests.unit.test_aleph import PUBLISHER, STRANGER, aggregate, manifest, program, sign
from tests.unit.test_sev_snp import MEASUREMENT

pytestmark = pytest.mark.integration
ALEPH_MODEL = "hermes-3-8b-tee-enclave"  # the model's name in the publisher's manifest
OTHER_MEASUREMENT = "cd" * 48


class AlephStandin:
    """An Aleph API node on 127.0.0.1 (plain HTTP, a free port) answering ``GET
    /api/v0/messages.json``: with ``hashes=`` the messages of ``messages`` of those item hashes, with
    ``addresses=...&msgType=AGGREGATE`` the AGGREGATE ones sent by or on behalf of that address
    (its content's ``address``), newest (content time) first, whether they verify or not. A
    ``status`` other than 200 answers that status with no body (an outage). ``asked`` holds every
    query, parsed, in order. ``url`` has no trailing slash."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.status = 200
        self.asked: list[dict[str, list[str]]] = []
        self._lock = threading.Lock()
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                with standin._lock:
                    standin.asked.append(query)
                    status, messages = standin.status, list(standin.messages)
                if parts.path != "/api/v0/messages.json":
                    status = 404
                body = (
                    json.dumps({"messages": standin.answer(query, messages)}).encode()
                    if status == 200
                    else b""
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @staticmethod
    def answer(query: dict[str, list[str]], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if "hashes" in query:
            wanted = set(query["hashes"][0].split(","))
            return [m for m in messages if m["item_hash"] in wanted]
        if query.get("msgType") == ["AGGREGATE"] and "addresses" in query:
            address = query["addresses"][0].lower()
            listed = [
                m
                for m in messages
                if m["type"] == "AGGREGATE"
                and address in (m["sender"].lower(), m["content"]["address"].lower())
            ]
            return sorted(listed, key=lambda m: m["time"], reverse=True)
        return []

    def publish(self, *messages: dict[str, Any]) -> None:
        with self._lock:
            self.messages.extend(messages)

    def aggregate_queries(self) -> int:
        """How many times the publisher's manifest was asked for."""
        with self._lock:
            return sum(1 for query in self.asked if "msgType" in query)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def aleph() -> Iterator[AlephStandin]:
    node = AlephStandin()
    yield node
    node.close()


def deployment(
    launch: str = MEASUREMENT.hex(), policy: int | None = 0x30000, time_: float = 100.0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A program publishing ``launch`` and ``policy``, and a manifest (at ``time_``) naming it as
    the one active deployment of ``ALEPH_MODEL``, both signed by ``PUBLISHER``."""
    vprogram = program([launch], policy, note=f"{launch[:8]}@{time_}")  # distinct programs, distinct hashes
    listing = aggregate(manifest({ALEPH_MODEL: [(vprogram["item_hash"], "active")]}), time=time_)
    return listing, vprogram


def aleph_catalog(path: Path, origin: str, api: str, terms: str = "") -> Path:
    """The packaged ``MODEL`` entry served by the enclave at ``origin``, its measurements those
    ``PUBLISHER`` signed for ``ALEPH_MODEL`` on the Aleph API at ``api`` (``terms`` added), and
    ``STATED``, a TEE on its operator's word."""
    path.write_text(
        DEFAULT_CATALOG.read_text()
        + f'upstream_url = "{origin}"\nattestation = "sev-snp"\n'
        + f'aleph_publisher = "{PUBLISHER.address}"\naleph_model = "{ALEPH_MODEL}"\naleph_api = "{api}"\n'
        + f"{terms}\n"
        + f'\n[models."{STATED}"]\ndescription = "a TEE on its operator\'s word"\n'
        + 'tee = true\npricing = "per_call"\nprice = 1000\n'
    )
    return path


def selling(
    proxy: Proxy,
    tmp_path: Path,
    enclave: Enclave,
    kds: KdsStandin,
    aleph: AlephStandin,
    terms: str = "",
    **changes: Any,
) -> AbstractContextManager[Proxy]:
    """``attested_proxy`` with the Aleph catalog (verifications and Aleph answers trusted 2 s)."""
    catalog = aleph_catalog(tmp_path / "aleph.toml", enclave.host.url, aleph.url, terms)
    return attested_proxy(proxy, tmp_path, enclave, kds, catalog_path=catalog, **changes)


def refused_for(attested: Proxy, proxy: Proxy, enclave: Enclave, reason: str) -> None:
    """The model answers 503 ``attestation_failed`` naming ``reason`` to the unpaid, the paid and
    the evidence request; nothing is charged, nothing reaches the enclave; the other model is sold."""
    payment = proxy.payment(proxy.requirement())  # what the same body costs where it is sold
    before = proxy.balances()
    for refused in (attested.post(), attested.pay(payment), evidence_of(attested)):
        assert refused.status_code == 503 and error_code(refused) == "attestation_failed", refused.text
        assert reason in refused.json()["error"]["message"]
        assert "127.0.0.1" not in refused.json()["error"]["message"]  # no address of the API or enclave
    assert moved_since(proxy, before) == 0 and enclave.host.received == []
    assert attested.post(body={**CHAT_BODY, "model": STATED}).status_code == 402


def test_the_measurement_the_publisher_signed_is_the_one_sold(
    proxy: Proxy,
    standin: StandinModel,
    enclave: Enclave,
    kds: KdsStandin,
    aleph: AlephStandin,
    tmp_path: Path,
) -> None:
    aleph.publish(*deployment())
    with selling(proxy, tmp_path, enclave, kds, aleph, attestation_ttl=600.0) as attested:
        assert attested.post().status_code == 402
        response = attested.pay(attested.payment(attested.requirement()))
        assert response.status_code == 200, response.text
        bundle = evidence_of(attested).json()
        assert bundle["verdict"]["measurement"] == MEASUREMENT.hex() == response.headers["X-TEE-Measurement"]
        assert bundle["verdict"]["policy"] == 0x30000
        assert response.headers["X-TEE-Evidence"] == bundle["evidence_sha256"]
        assert [r.path for r in enclave.host.received] == ["/v1/chat/completions"]
        # asked once: the manifest, then its one program; requests after that use what is cached
        assert [sorted(query) for query in aleph.asked] == [
            ["addresses", "msgType", "page", "pagination"],
            ["hashes"],
        ]
        assert aleph.asked[0]["addresses"] == [PUBLISHER.address]


def test_a_program_publishing_another_measurement_is_refused(
    proxy: Proxy,
    standin: StandinModel,
    enclave: Enclave,
    kds: KdsStandin,
    aleph: AlephStandin,
    tmp_path: Path,
) -> None:
    aleph.publish(*deployment(OTHER_MEASUREMENT))
    with selling(proxy, tmp_path, enclave, kds, aleph) as attested:
        refused_for(attested, proxy, enclave, "measurement_unknown")


def _stranger_s(listing: dict[str, Any], vprogram: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    # on the publisher's behalf (its address in the content, so a node lists it), by another key
    return sign(json.loads(listing["item_content"]), STRANGER), vprogram


def _forged(listing: dict[str, Any], vprogram: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    return sign(json.loads(listing["item_content"]), STRANGER, sender=PUBLISHER.address), vprogram


def _tampered_manifest(listing: dict[str, Any], vprogram: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    return {**listing, "item_content": listing["item_content"].replace('"active"', '"active" ')}, vprogram


def _tampered_program(listing: dict[str, Any], vprogram: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    text = vprogram["item_content"].replace(OTHER_MEASUREMENT, MEASUREMENT.hex())
    return listing, {**vprogram, "item_content": text}


def _unnamed(listing: dict[str, Any], vprogram: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    return aggregate(manifest({"another-model": [(vprogram["item_hash"], "active")]}), time=100.0), vprogram


def _revoked(listing: dict[str, Any], vprogram: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    return (
        listing,
        aggregate(manifest({ALEPH_MODEL: [(vprogram["item_hash"], "deprecated")]}), 200.0),
        vprogram,
    )


FAULTS: dict[str, tuple[Any, dict[str, Any], str]] = {
    # name: (messages served, from the genuine (manifest, program); deployment arguments; reason)
    "a manifest signed by another key": (_stranger_s, {}, "aleph_sender"),
    "a manifest forged in the publisher's name": (_forged, {}, "aleph_signature"),
    "a tampered manifest": (_tampered_manifest, {}, "aleph_hash_mismatch"),
    "a tampered program": (_tampered_program, {"launch": OTHER_MEASUREMENT}, "aleph_hash_mismatch"),
    "a model the manifest does not name": (_unnamed, {}, "aleph_model_unknown"),
    "a deployment the newest manifest deprecates": (_revoked, {}, "aleph_no_deployment"),
    "a catalog policy other than the published": (lambda *m: m, {"policy": 0x10000}, "aleph_policy_mismatch"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_measurements_the_publisher_did_not_sign_are_refused(
    proxy: Proxy,
    standin: StandinModel,
    enclave: Enclave,
    kds: KdsStandin,
    aleph: AlephStandin,
    tmp_path: Path,
    fault: str,
) -> None:
    served, arguments, reason = FAULTS[fault]
    aleph.publish(*served(*deployment(**arguments)))
    terms = "policy = 0x30000" if "policy" in arguments else ""  # the catalog's own, against 0x10000
    with selling(proxy, tmp_path, enclave, kds, aleph, terms) as attested:
        refused_for(attested, proxy, enclave, reason)


def test_the_newest_manifest_wins_over_an_older_one(
    proxy: Proxy,
    standin: StandinModel,
    enclave: Enclave,
    kds: KdsStandin,
    aleph: AlephStandin,
    tmp_path: Path,
) -> None:
    older, wrong = deployment(OTHER_MEASUREMENT, time_=100.0)
    newer, right = deployment(MEASUREMENT.hex(), time_=200.0)
    aleph.publish(newer, right, older, wrong)
    with selling(proxy, tmp_path, enclave, kds, aleph) as attested:
        assert attested.pay(attested.payment(attested.requirement())).status_code == 200
        assert [q["hashes"] for q in aleph.asked if "hashes" in q] == [[right["item_hash"]]]

    # and the other way round: the newest manifest names the wrong program, whatever the order;
    # a still newer one that the publisher did not sign changes nothing
    aleph.messages.clear()
    enclave.host.received.clear()
    older, right = deployment(MEASUREMENT.hex(), time_=100.0)
    newer, wrong = deployment(OTHER_MEASUREMENT, time_=200.0)
    forged = sign({**json.loads(older["item_content"]), "time": 300.0}, STRANGER, sender=PUBLISHER.address)
    aleph.publish(older, right, forged, newer, wrong)
    with selling(proxy, tmp_path, enclave, kds, aleph) as attested:
        refused_for(attested, proxy, enclave, "measurement_unknown")


def test_a_manifest_published_while_selling_is_read_within_the_ttl(
    proxy: Proxy,
    standin: StandinModel,
    enclave: Enclave,
    kds: KdsStandin,
    aleph: AlephStandin,
    tmp_path: Path,
) -> None:
    aleph.publish(*deployment(OTHER_MEASUREMENT, time_=100.0))
    with selling(proxy, tmp_path, enclave, kds, aleph) as attested:
        assert "measurement_unknown" in attested.post().text
        aleph.publish(*deployment(MEASUREMENT.hex(), time_=200.0))  # the publisher's new deployment
        deadline = time.monotonic() + 20  # a failure is checked again within RETRY_FAILED seconds
        while (answer := attested.post()).status_code != 402:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.3)
        assert attested.pay(attested.payment(attested.requirement())).status_code == 200

        # the publisher deprecates it: the background check (TTL 2 s) stops the sale, no buyer needed
        listing = aggregate(manifest({ALEPH_MODEL: [("f" * 64, "deprecated")]}), time=300.0)
        aleph.publish(listing)
        deadline = time.monotonic() + 20
        while (shown := evidence_of(attested)).status_code == 200:
            assert time.monotonic() < deadline, "the deprecation was never read"
            time.sleep(0.3)
        assert error_code(shown) == "attestation_failed" and "aleph_no_deployment" in shown.text


def test_with_the_aleph_api_down_and_nothing_cached_nothing_is_sold_or_charged(
    proxy: Proxy,
    standin: StandinModel,
    enclave: Enclave,
    kds: KdsStandin,
    aleph: AlephStandin,
    tmp_path: Path,
) -> None:
    aleph.publish(*deployment())
    aleph.status = 502
    with selling(proxy, tmp_path, enclave, kds, aleph) as attested:
        refused_for(attested, proxy, enclave, "aleph_unavailable")
        assert kds.asked == [] and enclave.host.handshakes == 0  # nothing else was asked meanwhile
        aleph.status = 200
        deadline = time.monotonic() + 20
        while attested.post().status_code != 402:
            assert time.monotonic() < deadline, "never recovered"
            time.sleep(0.3)
        assert attested.pay(attested.payment(attested.requirement())).status_code == 200

        # down again once verified: the last verified list stays in force (a node can withhold an
        # update, not forge one), through background checks
        aleph.status = 503
        asked = aleph.aggregate_queries()
        deadline = time.monotonic() + 20
        while aleph.aggregate_queries() == asked:
            assert time.monotonic() < deadline, "never asked again"
            assert evidence_of(attested).status_code == 200
            time.sleep(0.3)
        time.sleep(0.5)
        assert evidence_of(attested).status_code == 200
        assert attested.pay(attested.payment(attested.requirement())).status_code == 200
