"""What a facilitator says is a claim: only the chain settles a payment (the official SDK's
facilitator on loopback, made to misbehave after or instead of settling; anvil + redis-server).

A payment is settled only by a transaction whose receipt holds the token's ``AuthorizationUsed``
for *this* authorization (EIP-3009) next to its ``Transfer``; any answer that is not an explicit
refusal before broadcast leaves the payment pending, resolved later from chain state."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from eth_account import Account
from flask import Flask, Response, jsonify

from app.backends.token import transfer_calldata
from app.devnet.standin import StandinModel
from tests.facilitator_server import start_facilitator
from tests.integration.test_facilitator import proxy_via
from tests.support import Proxy, settle_response

pytestmark = pytest.mark.integration

Answer = Callable[[dict[str, Any] | None], Any]


@pytest.fixture
def scripted(proxy: Proxy) -> Iterator[tuple[str, Flask]]:
    """A real facilitator whose ``/settle`` answer each test may replace."""
    key = "0x" + os.urandom(32).hex()
    proxy.chain.set_eth(Account.from_key(key).address, 10**20)
    server, app = start_facilitator(key, proxy.chain.url)
    yield f"http://127.0.0.1:{server.server_port}", app
    server.shutdown()


def server_error(result: dict[str, Any] | None) -> Any:
    """Settled, then a 5xx that looks like a refusal: a 5xx is never one."""
    return jsonify({"success": False, "errorReason": "unexpected_settle_error", "transaction": ""}), 500


def success_without_transaction(result: dict[str, Any] | None) -> Any:
    assert result is not None
    return jsonify({**result, "transaction": ""})


def malformed_transaction(result: dict[str, Any] | None) -> Any:
    assert result is not None
    return jsonify({**result, "transaction": "0xdead"})


def garbled(result: dict[str, Any] | None) -> Any:
    return Response('{"success": tru', mimetype="application/json")


def late(result: dict[str, Any] | None) -> Any:
    time.sleep(1.5)  # past the proxy's wait (X402_RECEIPT_TIMEOUT = 1 s here)
    return jsonify(result)


@pytest.mark.parametrize(
    "answer",
    [server_error, success_without_transaction, malformed_transaction, garbled, late],
    ids=lambda answer: answer.__name__,
)
def test_an_answer_that_is_not_a_refusal_leaves_the_payment_pending_and_it_is_served_once(
    proxy: Proxy, standin: StandinModel, scripted: tuple[str, Flask], answer: Answer
) -> None:
    """The facilitator broadcast the settlement, then answered badly. "Failed, nothing charged"
    would be a lie: the payment is pending, and the retried header is served from the chain."""
    url, app = scripted
    app.config["answer"] = answer
    for via in proxy_via(proxy, url, receipt_timeout=1.0):
        payment = via.payment(via.requirement())
        amount = payment.authorization.value
        payer_before, payee_before = via.balances()
        unclear = via.pay(payment)
        assert unclear.status_code == 503, unclear.text
        assert unclear.json()["error"]["code"] == "settlement_pending"
        assert "stand-in answer" not in unclear.text
        (settled,) = app.config["settled"]
        assert settled["success"] is True  # it did settle on chain
        assert via.balances() == (payer_before - amount, payee_before + amount)
        served = via.pay(payment)
        assert served.status_code == 200, served.text
        assert settle_response(served)["transaction"] == settled["transaction"]
        assert via.balances() == (payer_before - amount, payee_before + amount)
        assert via.pay(payment).status_code == 402
        assert len(app.config["settled"]) == 1


def test_another_authorizations_transfer_of_the_same_amount_is_not_this_payment(
    proxy: Proxy, standin: StandinModel, scripted: tuple[str, Flask]
) -> None:
    """The facilitator names an older transaction: the same payer paid us the same amount, but
    under another authorization. Its ``Transfer`` matches; its ``AuthorizationUsed`` does not."""
    url, app = scripted
    for via in proxy_via(proxy, url, receipt_timeout=1.0):
        requirement = via.requirement()
        first = via.pay(via.payment(requirement))
        assert first.status_code == 200, first.text
        older = settle_response(first)["transaction"]
        app.config["broadcast"] = False
        claim = {"success": True, "transaction": older, "network": "eip155:8453", "payer": via.wallets.payer}
        app.config["answer"] = lambda _, claim=claim: jsonify(claim)
        payment = via.payment(requirement)
        balances = via.balances()
        named = via.pay(payment)
        assert named.status_code == 503, named.text
        assert named.json()["error"]["code"] == "settlement_pending"
        assert "stand-in answer" not in named.text
        assert settle_response(named)["transaction"] != older
        assert via.balances() == balances
        assert via.pay(payment).status_code == 503  # still nothing on chain for this authorization

        # someone does settle this authorization: the same header is now served, once
        calldata = transfer_calldata(payment.authorization, payment.signature, True)
        theirs = via.chain.transact(via.chain.token, calldata)["transactionHash"]
        served = via.pay(payment)
        assert served.status_code == 200, served.text
        assert settle_response(served)["transaction"] == theirs
        assert via.pay(payment).status_code == 402


@pytest.mark.parametrize("status", [200, 400])
def test_an_explicit_refusal_before_broadcast_charges_nothing_and_says_why(
    proxy: Proxy, standin: StandinModel, scripted: tuple[str, Flask], status: int
) -> None:
    url, app = scripted
    app.config["broadcast"] = False
    app.config["answer"] = lambda _: (
        jsonify(
            {
                "success": False,
                "errorReason": "invalid_exact_evm_insufficient_balance",
                "transaction": "",
                "network": "eip155:8453",
            }
        ),
        status,
    )
    for via in proxy_via(proxy, url, receipt_timeout=1.0):
        balances = via.balances()
        refused = via.pay(via.payment(via.requirement()))
        assert refused.status_code == 402, refused.text
        assert refused.json()["error"] == "invalid_exact_evm_insufficient_balance"
        assert "stand-in answer" not in refused.text
        assert via.balances() == balances
