"""A paid call is always served or redeemable, and never paid twice (real anvil, redis-server, the
stand-in model, the proxy over loopback).

- a host's 4xx reaches the buyer with its reason, scrubbed; the payment then buys any body on the same
  model priced at most what it paid;
- a host that fails once is tried again by the proxy; paid error answers tell SDKs not to retry;
- a recorded payment is recovered by its header after its ``validBefore``;
- a buyer who hangs up before the answer is handed over keeps a redeemable payment;
- a reverted settlement leaves the authorization live: the 402 says so and the header settles later;
- spam: a far ``validBefore`` is refused offline, released claims expire with their authorization, a
  full settlement queue refuses before any claim.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import app.payments.gate
from app.backends.token import transfer_calldata
from app.devnet.standin import Behaviour, StandinModel
from app.payments.keys import payment_key
from app.payments.ledger import RELEASED_GRACE, Ledger
from app.x402.checks import MAX_CLOCK_SKEW
from app.x402.codec import encode_header
from app.x402.payer import header_name
from app.x402.wire import PaymentPayload
from tests.integration.test_settlement_engine import proxy_with
from tests.rpc_proxy import FaultyRpc
from tests.support import CHAT_BODY, OPERATOR_KEY, Proxy, moved_since, settle_response

pytestmark = pytest.mark.integration

DEAR = {**CHAT_BODY, "max_tokens": 4000}
CHEAP = {**CHAT_BODY, "max_tokens": 16}


def state_of(proxy: Proxy, payment: PaymentPayload) -> dict[str, str]:
    auth = payment.authorization
    key = payment_key(8453, proxy.settings.asset, auth.from_, auth.nonce)
    return Ledger(redis.Redis.from_url(proxy.settings.redis_url)).get(key)


# --- the host refuses: its reason, and a payment that buys another body --------------------------


def test_a_host_4xx_is_told_scrubbed_and_the_payment_buys_any_cheaper_body(
    proxy: Proxy, standin: StandinModel
) -> None:
    standin.behaviour = Behaviour(
        status=400,
        times=1,
        error_message=f"context too long: 9000 tokens (key {OPERATOR_KEY}, node 10.1.2.3:8000, "
        "host gpu-7.internal.example, see http://10.1.2.3/docs)",
    )
    payment = proxy.payment(proxy.requirement(DEAR))
    before = proxy.balances()
    refused = proxy.pay(payment, DEAR)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "upstream_refused"
    assert "context too long: 9000 tokens" in error["message"]
    for secret in (OPERATOR_KEY, "10.1.2.3", "internal.example", "http://"):
        assert secret not in refused.text and secret not in str(refused.headers)
    assert refused.headers["x-should-retry"] == "false"
    assert settle_response(refused)["success"] is True
    assert state_of(proxy, payment)["state"] == "redeemable"

    dearer = {**CHAT_BODY, "max_tokens": 4096}
    assert proxy.pay(payment, dearer).status_code == 402  # priced above what was paid
    served = proxy.pay(payment, CHEAP)  # the same header buys a cheaper body on the same model
    assert served.status_code == 200, served.text
    assert standin.received[-1].body["max_tokens"] == 16
    assert proxy.pay(payment, CHEAP).status_code == 402  # served once
    assert moved_since(proxy, before) == payment.authorization.value


def test_a_host_4xx_about_the_operator_is_a_502_without_its_message(
    proxy: Proxy, standin: StandinModel
) -> None:
    standin.behaviour = Behaviour(status=401, times=1, error_message=f"bad key {OPERATOR_KEY}")
    response = proxy.pay(proxy.payment(proxy.requirement()))
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_refused"
    assert "bad key" not in response.text and OPERATOR_KEY not in response.text


# --- the host fails: tried once more, and SDKs told not to retry ---------------------------------


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 503}, {"reset": True}])
def test_a_host_that_fails_once_is_tried_again_and_the_call_is_served(
    proxy: Proxy, standin: StandinModel, fault: dict[str, Any]
) -> None:
    standin.behaviour = Behaviour(times=1, **fault)
    before = proxy.balances()
    payment = proxy.payment(proxy.requirement())
    response = proxy.pay(payment)
    assert response.status_code == 200, response.text
    assert len(standin.received) == 2
    assert moved_since(proxy, before) == payment.authorization.value


def test_a_host_that_keeps_failing_leaves_a_redeemable_payment_and_says_do_not_retry(
    proxy: Proxy, standin: StandinModel
) -> None:
    standin.behaviour = Behaviour(status=500, times=2)
    payment = proxy.payment(proxy.requirement())
    failed = proxy.pay(payment)
    assert failed.status_code == 502 and failed.headers["x-should-retry"] == "false"
    assert len(standin.received) == 2
    assert proxy.pay(payment).status_code == 200


def test_errors_without_a_payment_leave_retries_to_the_client(proxy: Proxy) -> None:
    assert "x-should-retry" not in proxy.post(body={**CHAT_BODY, "n": 99}).headers


# --- recovered after validBefore ------------------------------------------------------------------


def short_lived(proxy: Proxy, body: dict[str, Any] = CHAT_BODY, seconds_left: int = 8) -> PaymentPayload:
    """A payment whose authorization expires ``seconds_left`` seconds from now."""
    requirement = proxy.requirement(body)
    signed_at = int(time.time()) - int(requirement["maxTimeoutSeconds"]) + seconds_left
    return proxy.payment(requirement, now=signed_at)


def wait_past(payment: PaymentPayload) -> None:
    time.sleep(max(0.0, payment.authorization.valid_before - time.time() + 1))


def test_a_redeemable_payment_is_served_after_its_authorization_expired(
    proxy: Proxy, standin: StandinModel
) -> None:
    standin.behaviour = Behaviour(status=500, times=2)
    payment = short_lived(proxy)
    before = proxy.balances()
    assert proxy.pay(payment).status_code == 502
    wait_past(payment)
    served = proxy.pay(payment)
    assert served.status_code == 200, served.text
    assert moved_since(proxy, before) == payment.authorization.value


def test_an_expired_header_with_nothing_recorded_is_refused(proxy: Proxy, standin: StandinModel) -> None:
    payment = short_lived(proxy)
    wait_past(payment)
    refused = proxy.pay(payment)
    assert refused.json()["error"] == "invalid_exact_evm_payload_authorization_valid_before"
    assert state_of(proxy, payment) == {} and standin.received == []


def test_an_expired_recorded_payment_needs_its_own_signature(proxy: Proxy, standin: StandinModel) -> None:
    """The nonce and payer of a settled payment are public on chain: a stranger's signature over them
    recovers nothing."""
    standin.behaviour = Behaviour(status=500, times=2)
    payment = short_lived(proxy)
    assert proxy.pay(payment).status_code == 502
    wait_past(payment)
    stranger = proxy.payment(
        proxy.requirement(), key="0x" + bytes(range(1, 33)).hex(), nonce=payment.authorization.nonce
    )
    forged = PaymentPayload(
        **{
            **payment.__dict__,
            "signature": stranger.signature,
        }  # our payer's authorization, not its signature
    )
    headers = {header_name(2): encode_header(forged.to_wire())}
    assert proxy.post(body=CHAT_BODY, headers=headers).status_code == 402
    assert state_of(proxy, payment)["state"] == "redeemable"


# --- the buyer hangs up before the answer is handed over ------------------------------------------


def test_a_buyer_who_hangs_up_before_the_answer_keeps_a_redeemable_payment(
    proxy: Proxy, standin: StandinModel
) -> None:
    payment = proxy.payment(proxy.requirement())
    standin.behaviour = Behaviour(delay=1.0)
    body = (
        b'{"model": "hermes-3-8b-tee", "messages": [{"role": "user", "content": '
        b'"What is a trusted execution environment?"}], "max_tokens": 64}'
    )
    host, port = proxy.url.removeprefix("http://").split(":")
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{header_name(2)}: {encode_header(payment.to_wire())}\r\n\r\n"
    ).encode() + body
    before = proxy.balances()
    with socket.create_connection((host, int(port))) as buyer:
        buyer.sendall(request)
        time.sleep(0.3)  # the model is working
    deadline = time.monotonic() + 10
    while (
        state_of(proxy, payment).get("state") not in ("redeemable", "served") and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert state_of(proxy, payment)["state"] == "redeemable"
    standin.behaviour = Behaviour()
    assert proxy.pay(payment).status_code == 200
    assert moved_since(proxy, before) == payment.authorization.value


# --- a reverted settlement leaves the authorization live --------------------------------------------


@pytest.fixture
def via_faulty(proxy: Proxy, faulty: FaultyRpc) -> Iterator[Proxy]:
    yield from proxy_with(proxy, rpc_urls=(faulty.url,), receipt_timeout=2.0)


def reverted(proxy: Proxy, faulty: FaultyRpc, payment: PaymentPayload) -> None:
    """Pay while the token is paused between our checks and our send: the settlement reverts."""
    chain = proxy.chain
    faulty.before_send = lambda: chain.token_call("pause()", [], [])
    try:
        response = proxy.pay(payment)
    finally:
        faulty.before_send = None
        chain.token_call("unpause()", [], [])
    assert response.status_code == 402 and response.json()["error"] == "transaction_failed"
    assert "stays valid on chain until its validBefore" in response.headers["X-Payment-Error"]
    assert state_of(proxy, payment)["state"] == "failed"


def test_after_our_settlement_reverted_the_same_header_settles_once(
    via_faulty: Proxy, faulty: FaultyRpc, standin: StandinModel
) -> None:
    payment = via_faulty.payment(via_faulty.requirement())
    before = via_faulty.balances()
    reverted(via_faulty, faulty, payment)
    assert moved_since(via_faulty, before) == 0
    served = via_faulty.pay(payment)
    assert served.status_code == 200, served.text
    assert moved_since(via_faulty, before) == payment.authorization.value
    assert via_faulty.pay(payment).status_code == 402


def test_after_our_settlement_reverted_someone_elses_settlement_is_served(
    via_faulty: Proxy, faulty: FaultyRpc, standin: StandinModel
) -> None:
    payment = via_faulty.payment(via_faulty.requirement())
    before = via_faulty.balances()
    reverted(via_faulty, faulty, payment)
    calldata = transfer_calldata(payment.authorization, payment.signature, True)
    theirs = via_faulty.chain.transact(via_faulty.chain.token, calldata)["transactionHash"]
    served = via_faulty.pay(payment)
    assert served.status_code == 200, served.text
    assert settle_response(served)["transaction"] == theirs
    assert moved_since(via_faulty, before) == payment.authorization.value


# --- what an unfunded payment may cost --------------------------------------------------------------


def test_a_far_valid_before_is_refused_offline(proxy: Proxy, standin: StandinModel) -> None:
    requirement = proxy.requirement()
    far = proxy.payment(requirement, now=int(time.time()) + MAX_CLOCK_SKEW + 60)
    refused = proxy.pay(far)
    assert refused.json()["error"] == "invalid_exact_evm_payload_authorization_valid_before"
    assert state_of(proxy, far) == {}


def test_an_unfunded_payment_leaves_a_claim_that_expires_with_its_authorization(
    proxy: Proxy, standin: StandinModel
) -> None:
    broke = "0x" + bytes(range(2, 34)).hex()
    payment = proxy.payment(proxy.requirement(), key=broke)
    refused = proxy.pay(payment)
    assert refused.json()["error"] == "invalid_exact_evm_insufficient_balance"
    auth = payment.authorization
    key = payment_key(8453, proxy.settings.asset, auth.from_, auth.nonce)
    ttl = redis.Redis.from_url(proxy.settings.redis_url).ttl(key)
    assert 0 < ttl <= auth.valid_before - int(time.time()) + RELEASED_GRACE + 1
    assert proxy.pay(payment).json()["error"] == "invalid_exact_evm_insufficient_balance"  # still retryable


def test_a_full_settlement_queue_refuses_before_any_claim(
    proxy: Proxy, standin: StandinModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.payments.gate, "SETTLEMENT_QUEUE_LIMIT", 0)
    payment = proxy.payment(proxy.requirement())
    busy = proxy.pay(payment)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "settlement_busy"
    assert state_of(proxy, payment) == {} and standin.received == []
    monkeypatch.undo()
    assert proxy.pay(payment).status_code == 200
