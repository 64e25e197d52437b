"""The settlement engine under real processes: overlap, failed and pending settlements, cut
streams, preemption, many payments at once, and RPC failover (anvil + redis-server)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
import requests

from app import create_checked_app
from app.devnet import Service, free_port, start_anvil
from app.devnet.standin import StandinModel
from app.payments.keys import payment_key
from app.payments.ledger import Ledger
from app.settings import Settings
from app.x402.wire import PaymentPayload
from tests.rpc_proxy import FaultyRpc
from tests.support import CHAT_BODY, Proxy, proxy_with, serve, settle_response

pytestmark = pytest.mark.integration


@pytest.fixture
def via_faulty_rpc(proxy: Proxy, faulty: FaultyRpc) -> Iterator[Proxy]:
    yield from proxy_with(proxy, rpc_urls=(faulty.url,), receipt_timeout=1.0)


def state_of(proxy: Proxy, payment: PaymentPayload) -> str:
    key = payment_key(8453, proxy.settings.asset, payment.authorization.from_, payment.authorization.nonce)
    return Ledger(redis.Redis.from_url(proxy.settings.redis_url)).get(key).get("state", "")


def relayer_tx_count(proxy: Proxy) -> int:
    return int(proxy.chain.rpc.call("eth_getTransactionCount", [proxy.wallets.relayer, "latest"]), 16)


def mined_when_upstream_called(proxy: Proxy, standin: StandinModel, faulty: FaultyRpc) -> bool:
    """Pay once with a slow settlement send, and tell whether the settlement transaction was
    already mined at the moment the model host received the request."""
    faulty.delays["eth_sendRawTransaction"] = 0.5
    standin.behaviour.delay = 0.3  # the model is still working when we look
    payment = proxy.payment(proxy.requirement())
    sent_before = relayer_tx_count(proxy)
    result: list[requests.Response] = []
    caller = threading.Thread(target=lambda: result.append(proxy.pay(payment)))
    caller.start()
    deadline = time.monotonic() + 10
    while not standin.received and time.monotonic() < deadline:
        time.sleep(0.005)
    mined = relayer_tx_count(proxy) > sent_before
    caller.join()
    assert result[0].status_code == 200
    assert relayer_tx_count(proxy) == sent_before + 1
    return mined


def test_model_call_runs_while_the_settlement_is_in_flight(
    via_faulty_rpc: Proxy, standin: StandinModel, faulty: FaultyRpc
) -> None:
    assert not mined_when_upstream_called(via_faulty_rpc, standin, faulty)


def test_settle_first_calls_the_model_only_after_the_receipt(
    proxy: Proxy, standin: StandinModel, faulty: FaultyRpc
) -> None:
    for settle_first in proxy_with(proxy, rpc_urls=(faulty.url,), settle_first=True):
        assert mined_when_upstream_called(settle_first, standin, faulty)


def test_failed_settlement_discards_the_answer_and_charges_nothing(
    via_faulty_rpc: Proxy, standin: StandinModel, faulty: FaultyRpc
) -> None:
    proxy = via_faulty_rpc
    chain = proxy.chain
    faulty.before_send = lambda: chain.token_call("pause()", [], [])  # paused after verification
    payment = proxy.payment(proxy.requirement())
    balances = proxy.balances()
    try:
        response = proxy.pay(payment)
    finally:
        faulty.before_send = None
        chain.token_call("unpause()", [], [])
    assert response.status_code == 402
    assert response.json()["error"] == "transaction_failed"
    assert "stand-in answer" not in response.text
    assert settle_response(response)["success"] is False
    assert proxy.balances() == balances
    assert state_of(proxy, payment) == "failed"


def test_payment_preempted_between_verification_and_our_send_is_served_once(
    via_faulty_rpc: Proxy, standin: StandinModel, faulty: FaultyRpc
) -> None:
    """Someone submits the same authorization just before our transaction: ours reverts, theirs
    moved the money to us; the call is served once, under our claim, with their transaction."""
    from app.backends.token import transfer_calldata

    proxy = via_faulty_rpc
    payment = proxy.payment(proxy.requirement())
    calldata = transfer_calldata(payment.authorization, payment.signature, True)
    theirs: list[str] = []

    def submit_first() -> None:
        theirs.append(proxy.chain.transact(proxy.chain.token, calldata)["transactionHash"])

    faulty.before_send = submit_first
    payer_before, payee_before = proxy.balances()
    try:
        response = proxy.pay(payment)
    finally:
        faulty.before_send = None
    assert response.status_code == 200, response.text
    assert settle_response(response)["transaction"] == theirs[0]
    amount = payment.authorization.value
    assert proxy.balances() == (payer_before - amount, payee_before + amount)
    assert proxy.pay(payment).status_code == 402
    assert len(standin.received) == 1


def test_pending_settlement_is_served_after_the_receipt_lands_never_sent_twice(
    via_faulty_rpc: Proxy, standin: StandinModel
) -> None:
    proxy = via_faulty_rpc
    payment = proxy.payment(proxy.requirement())
    sent_before = relayer_tx_count(proxy)
    payer_before, _ = proxy.balances()
    proxy.chain.rpc.call("evm_setAutomine", [False])
    try:
        pending = proxy.pay(payment)
        assert pending.status_code == 503
        assert pending.json()["error"]["code"] == "settlement_pending" and pending.headers["Retry-After"]
        header = settle_response(pending)
        assert header["success"] is False and header["errorReason"] == "settlement_pending"
        assert proxy.pay(payment).status_code == 503  # still not mined: still pending, nothing resent
        assert state_of(proxy, payment) == "pending"
    finally:
        proxy.chain.rpc.call("evm_setAutomine", [True])
        proxy.chain.rpc.call("evm_mine", [])
    served = proxy.pay(payment)
    assert served.status_code == 200, served.text
    assert settle_response(served)["transaction"] == header["transaction"]
    assert relayer_tx_count(proxy) == sent_before + 1
    assert proxy.balances()[0] == payer_before - payment.authorization.value
    # the first attempt's answer (computed beside the settlement) was discarded, not delivered;
    # the retry while still pending did not call the model; the final retry was served
    assert "stand-in answer" not in pending.text
    assert len(standin.received) == 2


def test_hidden_receipt_then_visible_is_served_once(
    via_faulty_rpc: Proxy, standin: StandinModel, faulty: FaultyRpc
) -> None:
    proxy = via_faulty_rpc
    payment = proxy.payment(proxy.requirement())
    payer_before, _ = proxy.balances()
    faulty.hide_receipts = True
    hidden = proxy.pay(payment)
    assert hidden.status_code == 503 and "stand-in answer" not in hidden.text
    faulty.hide_receipts = False
    assert proxy.pay(payment).status_code == 200
    assert proxy.pay(payment).status_code == 402
    assert proxy.balances()[0] == payer_before - payment.authorization.value


def test_stream_cut_midway_leaves_the_payment_redeemable(proxy: Proxy, standin: StandinModel) -> None:
    body = {**CHAT_BODY, "stream": True}
    payment = proxy.payment(proxy.requirement(body))
    payer_before, _ = proxy.balances()
    standin.behaviour.cut_after = 2
    cut = proxy.pay(payment, body, stream=True)
    assert cut.status_code == 200
    received = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # the break is visible to the client
        for chunk in cut.iter_content(None):
            received += chunk
    assert b'"code": "upstream_cut"' in received and b"[DONE]" not in received
    assert state_of(proxy, payment) == "redeemable"
    standin.behaviour.cut_after = None
    retried = proxy.pay(payment, body)
    events = [line for line in retried.text.splitlines() if line.startswith("data:")]
    assert retried.status_code == 200 and events[-1] == "data: [DONE]"
    assert proxy.balances()[0] == payer_before - payment.authorization.value
    assert state_of(proxy, payment) == "served"


@pytest.fixture(scope="module")
def other_chain() -> Iterator[Service]:
    service = start_anvil(chain_id=1)
    yield service
    service.stop()


def test_rpc_failover_skips_dead_wrong_chain_and_lagging_endpoints(
    proxy: Proxy, standin: StandinModel, other_chain: Service, faulty: FaultyRpc
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for urls in ((dead, proxy.settings.rpc_urls[0]), (faulty.url, proxy.settings.rpc_urls[0])):
        for failover in proxy_with(proxy, rpc_urls=urls):
            if urls[0] == faulty.url:
                faulty.stale_block = 0  # answers, but far behind the chain
                failover.pay(failover.payment(failover.requirement()))  # learns the real height
            response = failover.pay(failover.payment(failover.requirement()))
            assert response.status_code == 200, response.text
    faulty.stale_block = None
    settings: Settings = proxy.settings.with_overrides(rpc_urls=(proxy.settings.rpc_urls[0],))
    app = create_checked_app(settings)
    app.extensions["x402"].chain.rpc.urls = (other_chain.url, settings.rpc_urls[0])  # switched chain later
    server = serve(app)
    try:
        switched = Proxy(
            f"http://127.0.0.1:{server.server_port}", settings, proxy.wallets, proxy.chain, server
        )
        assert switched.pay(switched.payment(switched.requirement())).status_code == 200
    finally:
        server.shutdown()


def test_all_rpc_endpoints_down_is_503_and_never_free(
    via_faulty_rpc: Proxy, standin: StandinModel, faulty: FaultyRpc
) -> None:
    proxy = via_faulty_rpc
    payment = proxy.payment(proxy.requirement())
    faulty.down = True
    try:
        response = proxy.pay(payment)
    finally:
        faulty.down = False
    assert response.status_code == 503 and response.json()["error"]["code"] == "rpc_unavailable"
    assert standin.received == []
    assert proxy.pay(payment).status_code == 200  # the claim was released: the same header pays later


def test_stuck_settlement_is_fee_bumped_and_only_one_version_is_mined(
    proxy: Proxy, standin: StandinModel, faulty: FaultyRpc
) -> None:
    for bumping in proxy_with(proxy, rpc_urls=(faulty.url,), receipt_timeout=2.0, fee_bump_after=0.5):
        payment = bumping.payment(bumping.requirement())
        sent_before = relayer_tx_count(bumping)
        payer_before, _ = bumping.balances()
        bumping.chain.rpc.call("evm_setAutomine", [False])
        try:
            pending = bumping.pay(payment)
            assert pending.status_code == 503
            replacement = settle_response(pending)["transaction"]
            assert faulty.calls.count("eth_sendRawTransaction") >= 2
            sends = bumping.chain.rpc.call("eth_getTransactionByHash", [replacement])
            assert int(sends["nonce"], 16) == sent_before  # the same account nonce: a replacement
            pooled = bumping.chain.rpc.call("txpool_content", [])["pending"]
            (queued,) = [
                txs for sender, txs in pooled.items() if sender.lower() == bumping.wallets.relayer.lower()
            ]
            assert len(queued) == 1  # one transaction per nonce in the pool: the bumped one replaced it
        finally:
            bumping.chain.rpc.call("evm_setAutomine", [True])
            bumping.chain.rpc.call("evm_mine", [])
        served = bumping.pay(payment)
        assert served.status_code == 200, served.text
        assert relayer_tx_count(bumping) == sent_before + 1
        assert bumping.balances()[0] == payer_before - payment.authorization.value
