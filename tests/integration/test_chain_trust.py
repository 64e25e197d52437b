"""Trust the chain, not one answer (anvil + redis-server, with ``tests/rpc_proxy.py`` lying).

A settlement that an RPC endpoint may have taken — it dropped the connection or answered too late
after passing it on, or lags — is never signed again for another endpoint: it is resolved from the
chain. A receipt that contradicts itself, or an ``eth_call`` answer that is empty or short, is an
RPC fault (503 / pending), never "reverted, nothing charged" and never a zero balance. ``/readyz``
notices such an endpoint, and answers a flood of probes from one cached evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
from eth_account import Account

from app.backends.rpc import Broadcast, RpcClient
from app.backends.token import (
    AUTHORIZATION_USED_TOPIC,
    SEL_AUTHORIZATION_STATE,
    SEL_BALANCE_OF,
    SEL_NAME,
    TRANSFER_TOPIC,
)
from app.devnet import Service, free_port
from app.devnet.standin import StandinModel
from app.web import ops
from tests.integration.test_settlement_engine import proxy_with, relayer_tx_count, state_of
from tests.rpc_proxy import SEND, FaultyRpc
from tests.support import Proxy, settle_response

pytestmark = pytest.mark.integration

USED = "0x" + AUTHORIZATION_USED_TOPIC.hex()
TRANSFER = "0x" + TRANSFER_TOPIC.hex()


@pytest.fixture
def second(anvil: Service) -> Iterator[FaultyRpc]:
    """Another endpoint on the same chain (honest unless told otherwise)."""
    rpc = FaultyRpc(anvil.url)
    yield rpc
    rpc.stop()


def charged_once(proxy: Proxy, before: tuple[int, int], amount: int) -> bool:
    return proxy.balances() == (before[0] - amount, before[1] + amount)


# --- never broadcast twice through failover ---------------------------------------------------


def test_a_send_whose_answer_was_lost_is_resolved_from_the_chain_not_released(
    proxy: Proxy, standin: StandinModel, faulty: FaultyRpc, second: FaultyRpc
) -> None:
    """The first endpoint passes the settlement on, then drops the connection; the next one, given
    the same bytes, answers "nonce too low" (it is mined already). That is no refusal: the payment
    is confirmed from the chain and served at once, with one transaction."""
    faulty.drop_after_send = True
    for failover in proxy_with(proxy, rpc_urls=(faulty.url, second.url), receipt_timeout=2.0):
        payment = failover.payment(failover.requirement())
        before, sent_before = failover.balances(), relayer_tx_count(failover)
        response = failover.pay(payment)
        assert response.status_code == 200, response.text
        assert relayer_tx_count(failover) == sent_before + 1
        assert charged_once(failover, before, payment.authorization.value)
        assert len(set(faulty.sent_raw + second.sent_raw)) == 1  # only ever the same signed bytes
        assert state_of(failover, payment) == "served"


def test_a_send_that_timed_out_is_never_signed_again_when_the_next_endpoint_refuses(
    proxy: Proxy, standin: StandinModel, faulty: FaultyRpc, second: FaultyRpc
) -> None:
    """The first endpoint takes the settlement into the pool but answers after X402_RPC_TIMEOUT;
    the next refuses it (rate limit). The payment stays pending on that one transaction (no new
    signature, no release) and is served once it is mined."""
    faulty.hold_after_send = 1.5
    second.refuse_sends = "rate limit exceeded"
    chain = proxy.chain
    for failover in proxy_with(
        proxy, rpc_urls=(faulty.url, second.url), rpc_timeout=1.0, receipt_timeout=1.0
    ):
        payment = failover.payment(failover.requirement())
        before, sent_before = failover.balances(), relayer_tx_count(failover)
        chain.rpc.call("evm_setAutomine", [False])
        try:
            first = failover.pay(payment)
            assert first.status_code == 503, first.text
            assert first.json()["error"]["code"] == "settlement_pending"
            assert state_of(failover, payment) == "pending"
            again = failover.pay(payment)
            assert again.status_code == 503 and again.json()["error"]["code"] == "settlement_pending"
        finally:
            chain.rpc.call("evm_setAutomine", [True])
            chain.rpc.call("evm_mine", [])
        served = failover.pay(payment)
        assert served.status_code == 200, served.text
        assert settle_response(served)["transaction"] == settle_response(first)["transaction"]
        assert relayer_tx_count(failover) == sent_before + 1
        assert charged_once(failover, before, payment.authorization.value)
        assert len(set(faulty.sent_raw + second.sent_raw)) == 1


def test_a_send_taken_by_a_lagging_endpoint_is_not_refused_by_the_next(
    proxy: Proxy, standin: StandinModel, faulty: FaultyRpc, second: FaultyRpc
) -> None:
    """The first endpoint takes the settlement but reports a block far behind: its answer is not
    final, and the next endpoint's "nonce too low" for the same bytes is no refusal either."""
    for failover in proxy_with(proxy, rpc_urls=(faulty.url, second.url), receipt_timeout=2.0):
        proxy.chain.rpc.call("anvil_mine", [hex(10)])  # a chain taller than the lag tolerance
        assert failover.pay(failover.payment(failover.requirement())).status_code == 200  # learns it
        faulty.stale_block, faulty.stale_only_with = 0, SEND
        payment = failover.payment(failover.requirement())
        before, sent_before = failover.balances(), relayer_tx_count(failover)
        response = failover.pay(payment)
        assert response.status_code == 200, response.text
        assert relayer_tx_count(failover) == sent_before + 1
        assert charged_once(failover, before, payment.authorization.value)


def test_a_send_counts_as_not_sent_only_when_no_endpoint_can_have_it(
    anvil: Service, faulty: FaultyRpc
) -> None:
    """Unreachable endpoints and outright refusals: not sent (the claim may be released). An endpoint
    that read the request and hung up may have it, whatever the next one says."""
    unfunded = Account.create()  # every node refuses its transaction: it cannot pay the gas
    signed = unfunded.sign_transaction(
        {
            "type": 2,
            "chainId": 8453,
            "nonce": 0,
            "to": unfunded.address,
            "value": 1,
            "gas": 21_000,
            "maxFeePerGas": 10**10,
            "maxPriorityFeePerGas": 10**9,
        }
    )
    raw = "0x" + bytes(signed.raw_transaction).hex()
    dead = f"http://127.0.0.1:{free_port()}"

    def broadcast(*urls: str) -> Broadcast:
        return RpcClient(urls, timeout=1.0, chain_id=8453).broadcast(raw)

    assert broadcast(dead) == Broadcast(False, "no RPC endpoint answers")
    refused = broadcast(dead, anvil.url)
    assert not refused.maybe_sent and refused.refusal
    faulty.down = True  # reads the request, then closes the connection unanswered
    assert broadcast(faulty.url, anvil.url) == Broadcast(True)


# --- receipts that contradict themselves ------------------------------------------------------


@pytest.mark.parametrize("lie", ["no payment logs", "no AuthorizationUsed", "no status"])
def test_a_receipt_that_contradicts_itself_leaves_the_payment_pending_not_failed(
    proxy: Proxy, standin: StandinModel, faulty: FaultyRpc, lie: str
) -> None:
    """The transaction paid; the endpoint's receipt says status 1 without the token's logs for this
    authorization (or has no status). Not "reverted, nothing charged": pending, then served."""
    if lie == "no status":
        faulty.garble_receipts = True
    else:
        faulty.strip_receipt_topics = {USED} if lie == "no AuthorizationUsed" else {USED, TRANSFER}
    for lied_to in proxy_with(proxy, rpc_urls=(faulty.url,), receipt_timeout=1.0):
        payment = lied_to.payment(lied_to.requirement())
        before = lied_to.balances()
        try:
            lied = lied_to.pay(payment)
        finally:
            faulty.garble_receipts, faulty.strip_receipt_topics = False, set()
        assert lied.status_code == 503, lied.text
        assert lied.json()["error"]["code"] == "settlement_pending"
        assert "stand-in answer" not in lied.text
        assert state_of(lied_to, payment) == "pending"
        assert charged_once(lied_to, before, payment.authorization.value)  # the chain did move it
        served = lied_to.pay(payment)
        assert served.status_code == 200, served.text
        assert settle_response(served)["transaction"] == settle_response(lied)["transaction"]
        assert lied_to.pay(payment).status_code == 402
        assert charged_once(lied_to, before, payment.authorization.value)


# --- eth_call answers that are empty or short -------------------------------------------------

BALANCE_OF = "0x" + SEL_BALANCE_OF.hex()
AUTHORIZATION_STATE = "0x" + SEL_AUTHORIZATION_STATE.hex()


@pytest.mark.parametrize(
    ("selector", "answer"),
    [(BALANCE_OF, "0x"), (BALANCE_OF, "0x" + "00" * 31), (AUTHORIZATION_STATE, "0x")],
    ids=["balance empty", "balance short", "authorization state empty"],
)
def test_an_empty_or_short_eth_call_answer_is_an_rpc_fault_not_a_zero(
    proxy: Proxy, standin: StandinModel, faulty: FaultyRpc, selector: str, answer: str
) -> None:
    faulty.call_lies = {selector: answer}
    for lied_to in proxy_with(proxy, rpc_urls=(faulty.url,)):
        payment = lied_to.payment(lied_to.requirement())
        before = lied_to.balances()
        try:
            lied = lied_to.pay(payment)
        finally:
            faulty.call_lies = {}
        assert lied.status_code == 503, lied.text
        assert lied.json()["error"]["code"] == "rpc_unavailable"
        assert standin.received == [] and lied_to.balances() == before
        assert lied_to.pay(payment).status_code == 200  # nothing was held against the header


def test_an_endpoint_answering_empty_eth_calls_is_skipped_for_the_next(
    proxy: Proxy, standin: StandinModel, faulty: FaultyRpc, second: FaultyRpc
) -> None:
    faulty.call_lies = {BALANCE_OF: "0x"}
    for failover in proxy_with(proxy, rpc_urls=(faulty.url, second.url)):
        response = failover.pay(failover.payment(failover.requirement()))
        assert response.status_code == 200, response.text


# --- /readyz ----------------------------------------------------------------------------------


def readyz(proxy: Proxy) -> tuple[int, dict]:
    response = requests.get(proxy.url + "/readyz", timeout=20)
    return response.status_code, response.json()


def test_readyz_notices_an_endpoint_whose_eth_call_answers_are_malformed(
    proxy: Proxy,
    standin: StandinModel,
    faulty: FaultyRpc,
    second: FaultyRpc,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The endpoint answers its chain id and blocks, but ``0x`` to calls (it went bad after start)."""
    monkeypatch.setattr(ops, "READY_CACHE_SECONDS", 0.0)  # every probe evaluates
    proxy.chain.rpc.call("evm_mine", [])  # a fresh block: anvil only mines on demand
    for both in proxy_with(proxy, rpc_urls=(faulty.url, second.url)):
        for only_liar in proxy_with(proxy, rpc_urls=(faulty.url,)):
            assert readyz(both)[0] == 200 and readyz(only_liar)[0] == 200
            faulty.call_lies = {"0x" + SEL_NAME.hex(): "0x"}
            status, body = readyz(both)
            assert status == 200, body
            assert body["checks"]["rpc_0"]["ok"] is False
            assert body["checks"]["rpc_0"]["error"] == "eth_call_malformed"
            assert body["checks"]["rpc_1"]["ok"] is True
            status, body = readyz(only_liar)
            assert status == 503 and body["checks"]["rpc_0"]["error"] == "eth_call_malformed"


def ping_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))


def test_a_flood_of_readyz_costs_one_round_of_rpc_and_redis_work(
    proxy: Proxy,
    standin: StandinModel,
    faulty: FaultyRpc,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy.chain.rpc.call("evm_mine", [])
    for probed in proxy_with(proxy, rpc_urls=(faulty.url,)):
        pings, rounds = ping_calls(redis_client), len(faulty.requests)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(readyz, [probed] * 40))
        assert {status for status, _ in answers} == {200}
        assert len({json.dumps(body, sort_keys=True) for _, body in answers}) == 1
        one_round = len(faulty.requests) - rounds
        assert one_round == 2  # the endpoint probe and the asset check, once for all 40
        assert ping_calls(redis_client) - pings == 1
        monkeypatch.setattr(ops, "READY_CACHE_SECONDS", 0.0)  # the cache expires: a fresh evaluation
        assert readyz(probed)[0] == 200
        assert len(faulty.requests) - rounds == 2 * one_round
        assert ping_calls(redis_client) - pings == 2
