"""Settlement through an x402 facilitator (the official SDK's, on loopback), checked on chain."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from flask import Flask, jsonify

from app import create_checked_app
from app.devnet.standin import StandinModel
from app.settings import SettingsError
from tests.facilitator_server import start_facilitator
from tests.support import Proxy, serve, settle_response

pytestmark = pytest.mark.integration


@pytest.fixture
def facilitator(proxy: Proxy) -> Iterator[tuple[str, Flask, str]]:
    key = "0x" + os.urandom(32).hex()
    address = Account.from_key(key).address
    proxy.chain.set_eth(address, 10**20)
    server, app = start_facilitator(key, proxy.chain.url)
    yield f"http://127.0.0.1:{server.server_port}", app, address
    server.shutdown()


def proxy_via(proxy: Proxy, facilitator_url: str, **changes: Any) -> Iterator[Proxy]:
    settings = proxy.settings.with_overrides(facilitator_url=facilitator_url, **changes)
    server = serve(create_checked_app(settings))
    yield Proxy(f"http://127.0.0.1:{server.server_port}", settings, proxy.wallets, proxy.chain, server)
    server.shutdown()


@pytest.mark.parametrize("version", [2, 1])
def test_payment_settled_by_the_facilitator_is_served_once(
    proxy: Proxy, standin: StandinModel, facilitator: tuple[str, Flask, str], version: int
) -> None:
    url, app, signer = facilitator
    for via in proxy_via(proxy, url):
        requirement = via.requirement(version=version)
        amount = int(requirement["amount" if version == 2 else "maxAmountRequired"])
        payment = via.payment(requirement, version)
        payer_before, payee_before = via.balances()
        response = via.pay(payment)
        assert response.status_code == 200, response.text
        tx = settle_response(response, version)["transaction"]
        assert [s["transaction"] for s in app.config["settled"]] == [tx]
        sent = via.chain.rpc.call("eth_getTransactionByHash", [tx])
        assert sent["from"].lower() == signer.lower()  # the facilitator paid the gas, not us
        assert via.balances() == (payer_before - amount, payee_before + amount)
        assert via.pay(payment).status_code == 402
        assert len(standin.received) == 1


def test_a_facilitator_claiming_a_settlement_that_is_not_on_chain_is_not_believed(
    proxy: Proxy, standin: StandinModel
) -> None:
    liar = Flask("lying-facilitator")

    @liar.get("/supported")
    def supported() -> Any:
        return jsonify({"kinds": [{"x402Version": 2, "scheme": "exact", "network": "eip155:8453"}]})

    @liar.post("/settle")
    def settle() -> Any:
        return jsonify(
            {"success": True, "transaction": "0x" + os.urandom(32).hex(), "network": "eip155:8453"}
        )

    server = serve(liar)
    try:
        for via in proxy_via(proxy, f"http://127.0.0.1:{server.server_port}", receipt_timeout=1.0):
            balances = via.balances()
            response = via.pay(via.payment(via.requirement()))
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "settlement_pending"
            assert "stand-in answer" not in response.text
            assert via.balances() == balances
    finally:
        server.shutdown()


def test_a_facilitator_that_does_not_serve_our_network_is_refused_at_start(proxy: Proxy) -> None:
    wrong = Flask("other-network-facilitator")

    @wrong.get("/supported")
    def supported() -> Any:
        return jsonify({"kinds": [{"x402Version": 2, "scheme": "exact", "network": "eip155:84532"}]})

    server = serve(wrong)
    try:
        with pytest.raises(SettingsError) as refused:
            create_checked_app(
                proxy.settings.with_overrides(facilitator_url=f"http://127.0.0.1:{server.server_port}")
            )
        assert refused.value.variable == "X402_FACILITATOR_URL"
    finally:
        server.shutdown()
