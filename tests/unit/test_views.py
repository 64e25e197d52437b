"""The views over fakes at the backend boundary: ``create_app`` with ``Services`` whose ledger is
fakeredis, whose chain, settler and model host are models (``tests/fakes.py``). No anvil, no
redis-server, no network: building the app connects to nothing, and a paid call goes through the
real gate, ``serve`` and routes. The payment guarantees are tested on real processes elsewhere."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from flask.testing import FlaskClient

from app import create_app
from app.backends.enclave import Attestor
from app.catalog import Catalog, load_catalog
from app.payments.gate import Gate
from app.payments.ledger import Ledger
from app.payments.settlement import FAILED
from app.services import Services
from app.settings import DEFAULT_CATALOG, Settings
from app.x402.codec import decode_header, encode_header
from app.x402.payer import sign_payment
from tests.fakes import ModelChain, ModelSettler, host_answer

BODY: dict[str, Any] = {"model": "hermes-3-8b-tee", "messages": [{"role": "user", "content": "hi"}]}
# Nothing listens here: any attempt to reach Redis or an RPC endpoint would fail the test.
UNREACHABLE = "http://127.0.0.1:9"


class ModelHost:
    """The model host: answers (or fails) and counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.ok = True

    def forward(
        self, route: str, body: dict[str, object], model: object = None, admission: object = None
    ) -> Any:
        self.calls += 1
        return host_answer(self.ok)


@pytest.fixture
def parts() -> Iterator[tuple[FlaskClient, ModelSettler, ModelHost, Settings]]:
    settings = Settings(
        pay_to="0x" + "22" * 20, relayer_key="0x" + "33" * 32, redis_url="redis://127.0.0.1:9"
    )
    settings = settings.with_overrides(rpc_urls=(UNREACHABLE,), upstream_url=UNREACHABLE)
    catalog = Catalog(load_catalog(DEFAULT_CATALOG))
    ledger = Ledger(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    chain = ModelChain(settings.asset)
    settler = ModelSettler(chain)
    host = ModelHost()
    gate = Gate(settings, catalog, ledger, chain, settler)  # type: ignore[arg-type]
    services = Services(settings, catalog, ledger, chain, settler, host, Attestor(settings, {}), gate)  # type: ignore[arg-type]
    app = create_app(settings, services)
    yield app.test_client(), settler, host, settings


def test_building_the_app_connects_to_nothing() -> None:
    settings = Settings(
        pay_to="0x" + "22" * 20, relayer_key="0x" + "33" * 32, redis_url="redis://127.0.0.1:9"
    )
    app = create_app(settings.with_overrides(rpc_urls=(UNREACHABLE,), upstream_url=UNREACHABLE))
    assert app.test_client().get("/healthz").status_code == 200


def pay(client: FlaskClient, settings: Settings) -> Any:
    unpaid = client.post("/v1/chat/completions", json=BODY)
    assert unpaid.status_code == 402
    requirement = decode_header(unpaid.headers["PAYMENT-REQUIRED"])["accepts"][0]
    payment = sign_payment(requirement, 2, os.urandom(32), int(time.time()), os.urandom(32))
    headers = {"PAYMENT-SIGNATURE": encode_header(payment.to_wire())}
    return client.post("/v1/chat/completions", json=BODY, headers=headers)


def test_a_paid_call_is_served_through_the_real_gate_and_routes(
    parts: tuple[FlaskClient, ModelSettler, ModelHost, Settings],
) -> None:
    client, settler, host, settings = parts
    answer = pay(client, settings)
    assert answer.status_code == 200, answer.text
    assert decode_header(answer.headers["PAYMENT-RESPONSE"])["success"] is True
    assert host.calls == 1 and sum(settler.broadcasts.values()) == 1


def test_a_reverted_settlement_serves_nothing(
    parts: tuple[FlaskClient, ModelSettler, ModelHost, Settings],
) -> None:
    client, settler, _, settings = parts
    settler.next_outcome = FAILED
    answer = pay(client, settings)
    assert answer.status_code == 402 and answer.json["error"] == "transaction_failed"
    assert b"choices" not in answer.data


def test_a_failing_host_leaves_the_payment_redeemable(
    parts: tuple[FlaskClient, ModelSettler, ModelHost, Settings],
) -> None:
    client, _, host, settings = parts
    host.ok = False
    answer = pay(client, settings)
    assert answer.status_code == 502 and answer.json["error"]["code"] == "upstream_unavailable"
    assert answer.headers["x-should-retry"] == "false"


def test_the_model_list_and_bad_bodies_need_no_backend(
    parts: tuple[FlaskClient, ModelSettler, ModelHost, Settings],
) -> None:
    client, _, host, _ = parts
    assert client.get("/v1/models").json["data"][0]["id"] == "hermes-3-8b-tee"
    refused = client.post("/v1/chat/completions", json={**BODY, "chat_template": "x"})
    assert refused.status_code == 400 and refused.json["error"]["code"] == "unknown_field"
    assert host.calls == 0
