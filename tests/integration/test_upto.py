"""The ``upto`` scheme end to end (issue 15): a Permit2 permit for the priced maximum, the host's
reported usage charged, on anvil with our Permit2 and x402UptoPermit2Proxy at their canonical
addresses, real Redis, the stand-in host, and the official PyPI x402 ``upto`` client as the buyer.

The catalog here has a floor of 1 atomic unit, so the usage price lies strictly between the floor and
the maximum and a test can tell the three apart.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from eth_abi import encode
from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.mechanisms.evm import EthAccountSignerWithRPC
from x402.mechanisms.evm.upto import UptoEvmClientScheme

from app import create_checked_app
from app.backends.chain import Chain
from app.backends.permit2 import settle_calldata
from app.backends.store import Store
from app.backends.token import selector
from app.backends.upstream import abandoned_after
from app.cli import main
from app.devnet import PROJECT_ROOT, DevChain, Wallets
from app.devnet.standin import StandinModel
from app.payments.books import Finding, reconcile, revenue
from app.payments.keys import LEDGER_STREAM, debt_key, permit_key
from app.payments.ledger import Ledger
from app.payments.receipts import Receipt
from app.payments.upto import UptoGate
from app.settings import Settings
from app.x402.codec import decode_header
from app.x402.upto import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS, UptoPayment, upto_payment_of
from tests.rpc_proxy import FaultyRpc
from tests.support import (
    CHAT_BODY,
    Proxy,
    approve_permit2,
    moved_since,
    offered,
    proxy_with,
    serve,
    settle_response,
    upto_header,
    upto_session,
    usage_price,
)

pytestmark = pytest.mark.integration

BODY: dict[str, Any] = {**CHAT_BODY, "max_tokens": 256}
MODEL = "hermes-3-8b-tee"


def metric(proxy: Proxy, name: str) -> float:
    """A sample of ``/metrics`` (the metrics are the process's: read before and after, and compare)."""
    for line in requests.get(proxy.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def sse_events(text: str) -> list[str]:
    return [event for event in text.split("\n\n") if event.strip()]


def test_the_402_offers_upto_beside_exact(upto_proxy: Proxy) -> None:
    response = upto_proxy.post(body=BODY)
    assert response.status_code == 402
    exact, upto, batch = offered(response)
    assert (exact["scheme"], upto["scheme"], batch["scheme"]) == ("exact", "upto", "batch-settlement")
    assert upto["amount"] == exact["amount"]  # the priced maximum
    assert upto["extra"]["facilitatorAddress"] == upto_proxy.wallets.relayer
    assert upto["extra"]["assetTransferMethod"] == "permit2"
    assert (upto["payTo"], upto["asset"], upto["network"]) == (exact["payTo"], exact["asset"], "eip155:8453")
    assert [entry["scheme"] for entry in response.json()["accepts"]] == ["exact"]  # x402 v1 has no upto


def test_official_client_pays_the_reported_usage(upto_proxy: Proxy, standin: StandinModel) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    maximum = int(offered(upto_proxy.post(body=BODY))[1]["amount"])
    before = upto_proxy.balances()

    response = upto_session(upto_proxy.wallets.payer_key).post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=60
    )

    assert response.status_code == 200, response.text
    price = usage_price(upto_proxy, response.json()["usage"])
    assert 1 < price < maximum
    settled = settle_response(response)
    assert settled["success"] is True and settled["amount"] == str(price)
    assert moved_since(upto_proxy, before) == price  # the chain moved the usage price, once
    receipt = upto_proxy.chain.rpc.call("eth_getTransactionReceipt", [settled["transaction"]])
    assert receipt["to"].lower() == UPTO_PROXY_ADDRESS.lower()
    assert len(standin.received) == 1


def test_ledger_records_authorized_and_charged(
    upto_proxy: Proxy, standin: StandinModel, redis_client: redis.Redis
) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    maximum = int(offered(upto_proxy.post(body=BODY))[1]["amount"])
    charged, authorized = (
        f'x402_upto_{kind}_atomic_total{{model="{MODEL}"}}' for kind in ("charged", "authorized")
    )
    before = metric(upto_proxy, charged), metric(upto_proxy, authorized)
    response = upto_session(upto_proxy.wallets.payer_key).post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=60
    )
    price = usage_price(upto_proxy, response.json()["usage"])
    events = [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _id, fields in redis_client.xrevrange(LEDGER_STREAM, count=10)
    ]
    mine = [e for e in events if e["payer"] == upto_proxy.wallets.payer.lower()]
    assert [e["event"] for e in mine] == ["served", "settled"]
    for event in mine:
        assert (event["scheme"], event["authorized"], event["amount"]) == ("upto", str(maximum), str(price))
    assert metric(upto_proxy, charged) - before[0] == price
    assert metric(upto_proxy, authorized) - before[1] == maximum


def paid_stream(proxy: Proxy, body: dict[str, Any]) -> tuple[list[str], dict[str, Any], int]:
    """Stream ``body`` paid with the official upto client: (SSE events, the settlement comment
    decoded, atomic units moved on chain)."""
    before = proxy.balances()
    response = upto_session(proxy.wallets.payer_key).post(
        proxy.url + "/v1/chat/completions", json=body, timeout=60
    )
    assert response.status_code == 200, response.text
    events = sse_events(response.text)
    (comment,) = [e for e in events if e.startswith(": x402-payment-response ")]
    settled = json.loads(base64.b64decode(comment.removeprefix(": x402-payment-response ")))
    return events, settled, moved_since(proxy, before)


def test_a_stream_is_charged_its_usage_and_the_usage_event_goes_only_to_who_asked(
    upto_proxy: Proxy, standin: StandinModel
) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    asked = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    events, settled, moved = paid_stream(upto_proxy, asked)
    (usage_event,) = [e for e in events if '"usage"' in e]
    price = usage_price(upto_proxy, json.loads(usage_event.removeprefix("data: "))["usage"])
    assert settled["success"] is True and moved == int(settled["amount"]) == price
    assert events[-3:-1] == ["data: [DONE]", events[-2]]
    assert events[-2].startswith(": x402-payment-response ") and events[-1].startswith(": x402-receipt ")

    events, settled, moved = paid_stream(upto_proxy, {**BODY, "stream": True})  # same work, no usage asked

    assert standin.received[-1].body["stream_options"] == {"include_usage": True}  # asked of the host
    assert not any('"usage"' in event for event in events)  # but not passed on
    assert "data: [DONE]" in events
    assert settled["success"] is True and moved == int(settled["amount"]) == price


@pytest.mark.parametrize("mode", ["omit", "malformed"])
def test_a_host_without_usage_is_charged_the_maximum(
    upto_proxy: Proxy, standin: StandinModel, mode: str
) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    maximum = int(offered(upto_proxy.post(body=BODY))[1]["amount"])
    standin.behaviour.usage = mode
    before = upto_proxy.balances()

    response = upto_session(upto_proxy.wallets.payer_key).post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=60
    )

    assert response.status_code == 200
    assert settle_response(response)["amount"] == str(maximum)
    assert moved_since(upto_proxy, before) == maximum
    assert Receipt.from_header(response.headers["X-Receipt"]).usage == "unreported"


def test_a_failing_host_costs_nothing_and_the_same_header_is_served_later(
    upto_proxy: Proxy, standin: StandinModel, redis_client: redis.Redis
) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    standin.behaviour.status, standin.behaviour.times = 500, 2  # both tries of the first call fail
    before = upto_proxy.balances()
    session = upto_session(upto_proxy.wallets.payer_key)

    failed = session.post(upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=60)

    assert failed.status_code == 502
    assert failed.json()["error"]["code"] == "upstream_unavailable"
    assert moved_since(upto_proxy, before) == 0
    header = failed.request.headers["PAYMENT-SIGNATURE"]
    served = requests.post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=60
    )
    assert served.status_code == 200, served.text
    assert moved_since(upto_proxy, before) == int(settle_response(served)["amount"]) > 0
    again = requests.post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=60
    )
    assert again.status_code == 402  # one permit, one answered call
    assert again.headers["X-Payment-Error"]


def test_no_permit2_allowance_is_refused_naming_the_fix(upto_proxy: Proxy, standin: StandinModel) -> None:
    response = upto_session(upto_proxy.wallets.payer_key).post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=60
    )

    assert response.status_code == 402
    assert (
        json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))["error"]
        == "permit2_allowance_required"
    )
    assert (
        "approve" in response.headers["X-Payment-Error"] and "Permit2" in response.headers["X-Payment-Error"]
    )
    assert standin.received == []


def test_a_payer_who_revokes_during_a_stream_owes_it_and_is_refused_until_paid(
    upto_proxy: Proxy, standin: StandinModel, redis_client: redis.Redis
) -> None:
    chain, payer = upto_proxy.chain, upto_proxy.wallets.payer
    approve_permit2(chain, payer)
    standin.behaviour.chunk_delay = 0.3
    before = upto_proxy.balances()
    debt_before = metric(upto_proxy, f'x402_upto_debt_atomic_total{{model="{MODEL}"}}')
    session = upto_session(upto_proxy.wallets.payer_key)
    body = {**BODY, "stream": True}

    revoke = threading.Timer(0.5, approve_permit2, (chain, payer, 0))
    revoke.start()
    streamed = session.post(upto_proxy.url + "/v1/chat/completions", json=body, timeout=60)
    revoke.join()

    assert streamed.status_code == 200 and "tok4" in streamed.text  # the answer went out
    (comment,) = [e for e in sse_events(streamed.text) if e.startswith(": x402-payment-response ")]
    owed = json.loads(base64.b64decode(comment.removeprefix(": x402-payment-response ")))
    assert owed["success"] is False
    assert moved_since(upto_proxy, before) == 0
    standin.behaviour.chunk_delay = 0.0

    refused = session.post(upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=60)
    assert refused.status_code == 402
    reason = json.loads(base64.b64decode(refused.headers["PAYMENT-REQUIRED"]))["error"]
    assert reason == "upto_payer_in_debt"
    assert metric(upto_proxy, f'x402_upto_debt_atomic_total{{model="{MODEL}"}}') - debt_before == int(
        owed["amount"]
    )

    collected_before = metric(upto_proxy, "x402_upto_debt_collected_atomic_total")
    approve_permit2(chain, payer)  # the payer restores the allowance and pays again
    paid = session.post(upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=60)
    assert paid.status_code == 200, paid.text
    assert moved_since(upto_proxy, before) == int(owed["amount"]) + int(settle_response(paid)["amount"])
    collected = metric(upto_proxy, "x402_upto_debt_collected_atomic_total") - collected_before
    assert collected == int(owed["amount"])
    header = streamed.request.headers["PAYMENT-SIGNATURE"]
    record = json.loads(base64.b64decode(header))["payload"]["permit2Authorization"]
    key = permit_key(8453, upto_proxy.settings.asset, payer, int(record["nonce"]))
    assert redis_client.hget(key, "state") == b"served"


def test_x402_schemes_exact_offers_exact_alone_and_refuses_upto(
    upto_proxy: Proxy, settings: Settings, wallets: Wallets, chain: DevChain, standin: StandinModel
) -> None:
    approve_permit2(chain, wallets.payer)
    challenge = json.loads(base64.b64decode(upto_proxy.post(body=BODY).headers["PAYMENT-REQUIRED"]))
    header = upto_header(wallets.payer_key, challenge)
    only_exact = settings.with_overrides(schemes=("exact",), catalog_path=upto_proxy.settings.catalog_path)
    server = serve(create_checked_app(only_exact))
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
        unpaid = requests.post(url, json=BODY, timeout=30)
        assert [entry["scheme"] for entry in offered(unpaid)] == ["exact"]
        refused = requests.post(url, json=BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=30)
        assert refused.status_code == 402
        assert (
            json.loads(base64.b64decode(refused.headers["PAYMENT-REQUIRED"]))["error"] == "unsupported_scheme"
        )
        assert standin.received == []
    finally:
        server.shutdown()


def test_eip2612_gas_sponsoring_lets_a_payer_without_allowance_pay_without_gas(
    upto_proxy: Proxy, standin: StandinModel
) -> None:
    """The 402 declares ``eip2612GasSponsoring``; the official client, able to read the chain, sees no
    Permit2 allowance and adds a signed EIP-2612 permit; the relayer submits it and settles in one
    transaction (``settleWithPermit``). The payer never had ETH."""
    chain, payer = upto_proxy.chain, upto_proxy.wallets.payer
    declared = json.loads(base64.b64decode(upto_proxy.post(body=BODY).headers["PAYMENT-REQUIRED"]))
    assert "eip2612GasSponsoring" in declared["extensions"]
    assert int(chain.rpc.call("eth_getBalance", [payer, "latest"]), 16) == 0
    before = upto_proxy.balances()

    client = x402ClientSync()  # the official signer that reads the chain, as the README says
    signer = EthAccountSignerWithRPC(
        Account.from_key(upto_proxy.wallets.payer_key), upto_proxy.settings.rpc_urls[0]
    )
    client.register("eip155:*", UptoEvmClientScheme(signer))
    response = wrapRequestsWithPayment(requests.Session(), client).post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=60
    )

    assert response.status_code == 200, response.text
    sent = json.loads(base64.b64decode(response.request.headers["PAYMENT-SIGNATURE"]))
    assert sent["extensions"]["eip2612GasSponsoring"]["info"]["signature"]
    price = usage_price(upto_proxy, response.json()["usage"])
    assert moved_since(upto_proxy, before) == price == int(settle_response(response)["amount"])
    receipt = chain.rpc.call("eth_getTransactionReceipt", [settle_response(response)["transaction"]])
    assert receipt["from"].lower() == upto_proxy.wallets.relayer.lower()  # the relayer paid the gas


def test_calls_in_flight_never_hold_more_than_the_payer_can_pay(
    upto_proxy: Proxy, standin: StandinModel
) -> None:
    """With an allowance of 1.5 maxima, a second call while the first streams is refused (nothing
    asked of the host); once the first is charged, the next call is served."""
    chain, payer = upto_proxy.chain, upto_proxy.wallets.payer
    maximum = int(offered(upto_proxy.post(body=BODY))[1]["amount"])
    approve_permit2(chain, payer, maximum * 3 // 2)
    standin.behaviour.chunk_delay = 0.2
    session = upto_session(upto_proxy.wallets.payer_key)
    url = upto_proxy.url + "/v1/chat/completions"
    streamed: list[requests.Response] = []
    first = threading.Thread(
        target=lambda: streamed.append(session.post(url, json={**BODY, "stream": True}, timeout=60))
    )
    first.start()
    deadline = time.monotonic() + 10
    while not standin.received and time.monotonic() < deadline:
        time.sleep(0.01)

    refused = upto_session(upto_proxy.wallets.payer_key).post(url, json=BODY, timeout=60)

    assert refused.status_code == 402
    assert (
        json.loads(base64.b64decode(refused.headers["PAYMENT-REQUIRED"]))["error"]
        == "permit2_insufficient_balance"
    )
    assert len(standin.received) == 1
    first.join()
    assert streamed[0].status_code == 200
    standin.behaviour.chunk_delay = 0.0
    assert upto_session(upto_proxy.wallets.payer_key).post(url, json=BODY, timeout=60).status_code == 200


def test_the_upto_permit_lives_as_long_as_a_call_may_hold_it(upto_proxy: Proxy) -> None:
    exact, upto, _batch = offered(upto_proxy.post(body=BODY))
    settings = upto_proxy.settings
    assert exact["maxTimeoutSeconds"] == settings.max_timeout_seconds
    assert upto["maxTimeoutSeconds"] == max(
        settings.max_timeout_seconds, math.ceil(abandoned_after(settings) + settings.upstream_timeout)
    )


@pytest.fixture
def quick_proxy(upto_proxy: Proxy) -> Iterator[Proxy]:
    """The upto proxy with short waits (1 s for the host, 2 s for a receipt): its permits live
    45 s, so a stream can outlast one within a test."""
    yield from proxy_with(upto_proxy, upstream_timeout=1.0, receipt_timeout=2.0, max_timeout_seconds=10)


def test_a_stream_that_outlasts_its_permit_is_ended_in_time_and_charged(
    quick_proxy: Proxy, standin: StandinModel
) -> None:
    """A permit signed for as short a life as the proxy takes (maxTimeoutSeconds less the 30 s of
    clock skew): the stream is ended once the rest of the permit's life only just covers one more
    wait for the host and the settlement, and charged the maximum, since the host's usage had not
    come yet; the chain took it in time."""
    chain, wallets = quick_proxy.chain, quick_proxy.wallets
    approve_permit2(chain, wallets.payer)
    standin.behaviour.chunk_delay, standin.behaviour.chunks = 0.5, 40
    response = quick_proxy.post(body={**BODY, "stream": True})
    challenge = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    life = offered(response)[1]["maxTimeoutSeconds"] - 30 + 1
    header = upto_header(wallets.payer_key, challenge, deadline=int(time.time()) + life)
    maximum = int(offered(response)[1]["amount"])
    before = quick_proxy.balances()

    streamed = requests.post(
        quick_proxy.url + "/v1/chat/completions",
        json={**BODY, "stream": True},
        headers={"PAYMENT-SIGNATURE": header},
        timeout=60,
    )

    events = sse_events(streamed.text)
    assert any('"payment_window_closing"' in event for event in events)
    assert "data: [DONE]" not in events and "tok39" not in streamed.text
    (comment,) = [e for e in events if e.startswith(": x402-payment-response ")]
    settled = json.loads(base64.b64decode(comment.removeprefix(": x402-payment-response ")))
    assert settled["success"] is True and settled["amount"] == str(maximum)
    assert moved_since(quick_proxy, before) == maximum


def test_a_permit_shorter_than_a_call_may_take_is_refused(quick_proxy: Proxy, standin: StandinModel) -> None:
    approve_permit2(quick_proxy.chain, quick_proxy.wallets.payer)
    response = quick_proxy.post(body=BODY)
    challenge = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    life = offered(response)[1]["maxTimeoutSeconds"] - 30 - 2
    header = upto_header(quick_proxy.wallets.payer_key, challenge, deadline=int(time.time()) + life)

    refused = requests.post(
        quick_proxy.url + "/v1/chat/completions", json=BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=30
    )

    assert refused.status_code == 402
    assert (
        json.loads(base64.b64decode(refused.headers["PAYMENT-REQUIRED"]))["error"]
        == "permit2_deadline_too_short"
    )
    assert standin.received == []


def test_a_json_answer_that_outlasts_its_permit_is_withheld_and_nothing_is_sent(
    upto_proxy: Proxy, standin: StandinModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the permit's deadline less the time to settle, a settlement could only revert (and cost
    the relayer gas): none is sent, the answer is withheld, nothing is charged."""
    chain = upto_proxy.chain
    approve_permit2(chain, upto_proxy.wallets.payer)
    monkeypatch.setattr(UptoGate, "settle_by", lambda self, hold: time.time() - 1)
    relayer_nonce = chain.rpc.call("eth_getTransactionCount", [upto_proxy.wallets.relayer, "latest"])
    before = upto_proxy.balances()

    response = upto_session(upto_proxy.wallets.payer_key).post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=60
    )

    assert response.status_code == 402 and len(standin.received) == 1
    assert (
        json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))["error"]
        == "permit2_deadline_expired"
    )
    assert moved_since(upto_proxy, before) == 0
    assert chain.rpc.call("eth_getTransactionCount", [upto_proxy.wallets.relayer, "latest"]) == relayer_nonce


def test_a_stream_without_a_final_blank_line_still_ends_in_readable_comments(
    upto_proxy: Proxy, standin: StandinModel
) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    standin.behaviour.unterminated = True
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    response = upto_session(upto_proxy.wallets.payer_key).post(
        upto_proxy.url + "/v1/chat/completions", json=body, timeout=60
    )
    events = sse_events(response.text)
    usage = json.loads(events[-3].removeprefix("data: "))["usage"]  # the host's last event, closed
    assert events[-2].startswith(": x402-payment-response ") and events[-1].startswith(": x402-receipt ")
    settled = json.loads(base64.b64decode(events[-2].removeprefix(": x402-payment-response ")))
    assert settled["success"] is True and int(settled["amount"]) == usage_price(upto_proxy, usage)


def test_a_forged_payer_costs_no_debt_collection(
    upto_proxy: Proxy, standin: StandinModel, redis_client: redis.Redis
) -> None:
    """A header naming someone else as ``from`` with a signature only the chain could judge (not 65
    bytes) is refused by the on-chain check before that payer's debts are touched."""
    chain, wallets = upto_proxy.chain, upto_proxy.wallets
    approve_permit2(chain, wallets.payer)
    debt = debt_key(8453, upto_proxy.settings.asset, wallets.payer)
    redis_client.hset(
        debt, "x402:{p0}:permit2:8453:x:y:1", f"5:{wallets.relayer}:{int(time.time()) + 600}:00"
    )
    challenge = json.loads(base64.b64decode(upto_proxy.post(body=BODY).headers["PAYMENT-REQUIRED"]))
    wire = json.loads(base64.b64decode(upto_header(Wallets.fresh().payer_key, challenge)))
    wire["payload"]["permit2Authorization"]["from"] = wallets.payer
    wire["payload"]["signature"] += "00"  # 66 bytes: left to the chain (EIP-1271)
    relayer_nonce = chain.rpc.call("eth_getTransactionCount", [wallets.relayer, "latest"])

    refused = requests.post(
        upto_proxy.url + "/v1/chat/completions",
        json=BODY,
        headers={"PAYMENT-SIGNATURE": _encode(wire)},
        timeout=30,
    )

    assert refused.status_code == 402
    assert json.loads(base64.b64decode(refused.headers["PAYMENT-REQUIRED"]))["error"] == "upto_payer_in_debt"
    assert chain.rpc.call("eth_getTransactionCount", [wallets.relayer, "latest"]) == relayer_nonce
    assert standin.received == []
    redis_client.delete(debt)


def _encode(wire: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(wire).encode()).decode()


def permit_key_of(proxy: Proxy, response: requests.Response) -> str:
    sent = json.loads(base64.b64decode(response.request.headers["PAYMENT-SIGNATURE"]))
    nonce = int(sent["payload"]["permit2Authorization"]["nonce"])
    return permit_key(8453, proxy.settings.asset, proxy.wallets.payer, nonce)


def test_reconcile_checks_upto_charges_and_resolves_pending_ones(
    upto_proxy: Proxy, standin: StandinModel, redis_client: redis.Redis
) -> None:
    """A served permit checks out against its Transfer; a tampered charge does not; a pending one
    whose transaction paid becomes served; one whose transaction reverted becomes owed, and the
    payer is then refused until the debt is collected."""
    chain, payer = upto_proxy.chain, upto_proxy.wallets.payer
    approve_permit2(chain, payer)
    session = upto_session(upto_proxy.wallets.payer_key)
    url = upto_proxy.url + "/v1/chat/completions"
    paid, other = (session.post(url, json=BODY, timeout=60) for _ in range(2))
    ledger, chain_client = Ledger(Store(client=redis_client)), Chain(upto_proxy.settings)
    key, other_key = permit_key_of(upto_proxy, paid), permit_key_of(upto_proxy, other)

    def findings() -> dict[str, Finding]:
        found = reconcile(ledger, chain_client, upto_proxy.settings, 3600)
        return {f.key: f for f in found if f.key in (key, other_key)}

    assert findings()[key] == Finding(key, "served", settle_response(paid)["transaction"], "")
    redis_client.hset(key, "amount", "7")
    assert findings()[key].problem == "no matching Transfer on chain for the charge"
    redis_client.hset(key, mapping={"amount": settle_response(paid)["amount"], "state": "pending"})
    assert findings()[key].resolved == "served"

    reverted = chain.transact(UPTO_PROXY_ADDRESS, b"\x00\x00\x00\x00")  # any reverted transaction
    assert reverted["status"] == "0x0"
    header = upto_payment_of(decode_header(other.request.headers["PAYMENT-SIGNATURE"]))
    assert isinstance(header, UptoPayment)
    calldata = settle_calldata(header.authorization, int(settle_response(other)["amount"]), header.signature)
    pending = {"calldata": calldata.hex(), "relayer": upto_proxy.wallets.relayer}  # as the proxy records it
    redis_client.hset(other_key, mapping={"state": "pending", "tx": reverted["transactionHash"], **pending})
    assert findings()[other_key].resolved == "owed"
    assert redis_client.hget(other_key, "state") == b"owed"
    refused = session.post(url, json=BODY, timeout=60)  # its permit was used: the debt cannot be collected
    assert refused.status_code == 402, (refused.status_code, refused.text)
    assert json.loads(base64.b64decode(refused.headers["PAYMENT-REQUIRED"]))["error"] == "upto_payer_in_debt"
    assert findings()[other_key].open.startswith("owed ")


def test_revenue_counts_what_upto_charged(
    upto_proxy: Proxy, standin: StandinModel, redis_client: redis.Redis
) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    ledger = Ledger(Store(client=redis_client))
    before = revenue(ledger, 3600, "scheme")
    charged = upto_session(upto_proxy.wallets.payer_key).post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=60
    )
    exact = upto_proxy.pay(upto_proxy.payment(upto_proxy.requirement(BODY)), BODY)
    after = revenue(ledger, 3600, "scheme")
    assert after.get("upto", 0) - before.get("upto", 0) == int(settle_response(charged)["amount"])
    # exact counts what it paid less the change credited to the wallet (a liability until spent)
    change = int(exact.headers["X-Credit-Added"])
    assert (
        after.get("exact", 0) - before.get("exact", 0) == int(upto_proxy.requirement(BODY)["amount"]) - change
    )
    assert exact.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_an_upto_receipt_binds_the_charge_to_its_usage_and_verifies(
    upto_proxy: Proxy, standin: StandinModel, tmp_path: Path, stream: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    body = {**BODY, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    response = upto_session(upto_proxy.wallets.payer_key).post(
        upto_proxy.url + "/v1/chat/completions", json=body, timeout=60
    )
    assert response.status_code == 200
    (tmp_path / "request.json").write_bytes(response.request.body)
    (tmp_path / "response").write_bytes(response.content)
    if stream:
        text = response.text
        receipt = Receipt.from_header(text[text.rindex(": x402-receipt ") + 15 :].strip())
        (usage_event,) = [e for e in sse_events(text) if '"usage"' in e]
        usage = json.loads(usage_event.removeprefix("data: "))["usage"]
    else:
        receipt = Receipt.from_header(response.headers["X-Receipt"])
        usage = response.json()["usage"]
    assert receipt.usage == f"{usage['prompt_tokens']}+{usage['completion_tokens']}"
    assert receipt.amount == usage_price(upto_proxy, usage)
    assert receipt.authorized == int(offered(upto_proxy.post(body=BODY))[1]["amount"])
    files = ["--request", str(tmp_path / "request.json"), "--response", str(tmp_path / "response")]
    receipt_args = [] if stream else ["--receipt", response.headers["X-Receipt"]]
    assert main(["verify-receipt", *files, *receipt_args, "--proxy", upto_proxy.url]) == 0
    said = capsys.readouterr().out
    assert f"usage {receipt.usage}" in said and "upto: of at most" in said
    forged = Receipt.from_header(response.headers["X-Receipt"]) if not stream else receipt
    tampered = dataclasses.replace(forged, amount=forged.amount - 1)
    assert tampered.signer() != forged.signer()  # the charge is signed with its usage


def test_discovery_names_the_schemes_and_the_upto_facilitators(upto_proxy: Proxy) -> None:
    described = requests.get(upto_proxy.url + "/.well-known/x402", timeout=10).json()
    assert described["schemes"] == ["exact", "upto", "batch-settlement"]
    _exact, upto, batch = offered(upto_proxy.post(body=BODY))
    assert described["upto"] == {
        "maxTimeoutSeconds": upto["maxTimeoutSeconds"],
        "assetTransferMethod": "permit2",
        "facilitatorAddresses": [upto_proxy.wallets.relayer],
    }
    assert described["batch-settlement"] == {
        "escrow": "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003",
        "receiverAuthorizer": batch["extra"]["receiverAuthorizer"],
        "withdrawDelay": batch["extra"]["withdrawDelay"],
        "maxTimeoutSeconds": batch["maxTimeoutSeconds"],
    }
    assert described["maxTimeoutSeconds"] == upto_proxy.settings.max_timeout_seconds  # exact's


def test_a_contract_wallet_pays_upto_through_eip1271(upto_proxy: Proxy, standin: StandinModel) -> None:
    """The permit (and the EIP-2612 permit) are signed by the wallet's owner key; the signature does
    not recover to the wallet, so the proxy leaves it to the chain: the simulation of the
    settlement accepts it (EIP-1271), and the wallet pays the usage. A wallet that refuses its
    signatures is refused before the host is asked."""
    chain, wallets = upto_proxy.chain, upto_proxy.wallets
    wallet = Account.create().address
    artifact = json.loads((PROJECT_ROOT / "contracts" / "ERC1271Wallet.json").read_text())
    chain.rpc.call("anvil_setCode", [wallet, artifact["deployedBytecode"]])
    chain.transact(wallet, selector("setOwner(address)") + encode(["address"], [wallets.payer]))
    chain.mint(wallet, 10**6)
    url = upto_proxy.url + "/v1/chat/completions"

    response = upto_session(wallets.payer_key, chain.rpc, wallet).post(url, json=BODY, timeout=60)

    assert response.status_code == 200, response.text
    charged = int(settle_response(response)["amount"])
    assert charged == usage_price(upto_proxy, response.json()["usage"])
    assert chain.balance(wallet) == 10**6 - charged
    chain.transact(wallet, selector("setRefuse(bool)") + encode(["bool"], [True]))
    calls = len(standin.received)
    refused = upto_session(wallets.payer_key, chain.rpc, wallet).post(url, json=BODY, timeout=60)
    assert refused.status_code == 402
    reason = json.loads(base64.b64decode(refused.headers["PAYMENT-REQUIRED"]))["error"]
    assert reason == "invalid_upto_evm_transaction_simulation_failed"
    assert len(standin.received) == calls


def send_as(chain: DevChain, sender: str, to: str, data: bytes) -> None:
    """A transaction from ``sender`` through anvil's impersonation (with gas money set first)."""
    chain.set_eth(sender, 10**18)
    chain.rpc.call("anvil_impersonateAccount", [sender])
    try:
        tx_hash = chain.rpc.call(
            "eth_sendTransaction", [{"from": sender, "to": to, "data": "0x" + data.hex()}]
        )
        deadline = time.monotonic() + 10
        while chain.rpc.call("eth_getTransactionReceipt", [tx_hash]) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        chain.rpc.call("anvil_stopImpersonatingAccount", [sender])


def test_the_chain_refuses_a_used_permit2_nonce_and_a_short_balance(
    upto_proxy: Proxy, standin: StandinModel
) -> None:
    chain, payer = upto_proxy.chain, upto_proxy.wallets.payer
    approve_permit2(chain, payer)
    challenge = json.loads(base64.b64decode(upto_proxy.post(body=BODY).headers["PAYMENT-REQUIRED"]))
    header = upto_header(upto_proxy.wallets.payer_key, challenge)
    nonce = int(json.loads(base64.b64decode(header))["payload"]["permit2Authorization"]["nonce"])
    invalidate = selector("invalidateUnorderedNonces(uint256,uint256)") + encode(
        ["uint256", "uint256"], [nonce >> 8, 1 << (nonce & 0xFF)]
    )
    send_as(chain, payer, PERMIT2_ADDRESS, invalidate)  # the payer cancels the permit on chain

    used = requests.post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=30
    )

    assert (
        json.loads(base64.b64decode(used.headers["PAYMENT-REQUIRED"]))["error"]
        == "permit2_nonce_already_used"
    )
    maximum = int(offered(upto_proxy.post(body=BODY))[1]["amount"])
    balance = chain.balance(payer)
    transfer = selector("transfer(address,uint256)") + encode(
        ["address", "uint256"], [upto_proxy.wallets.pay_to, balance - maximum + 1]
    )
    send_as(chain, payer, chain.token, transfer)  # one atomic unit short of the maximum
    short = upto_session(upto_proxy.wallets.payer_key).post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=30
    )
    assert (
        json.loads(base64.b64decode(short.headers["PAYMENT-REQUIRED"]))["error"]
        == "permit2_insufficient_balance"
    )
    assert standin.received == []


def test_a_json_answer_whose_receipt_is_late_goes_out_pending_and_reconcile_settles_it(
    upto_proxy: Proxy, standin: StandinModel, faulty: FaultyRpc, redis_client: redis.Redis
) -> None:
    """The charge was sent but no receipt came in time: the answer goes out (the host did the work,
    the transaction is on its way) with ``PAYMENT-RESPONSE`` success false, ``settlement_pending``;
    the permit is ``pending`` with what collects it, and ``reconcile`` makes it served once the chain
    shows the charge."""
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    faulty.hide_receipts = True
    for late in proxy_with(upto_proxy, rpc_urls=(faulty.url,), receipt_timeout=1.0):
        response = upto_session(late.wallets.payer_key).post(
            late.url + "/v1/chat/completions", json=BODY, timeout=60
        )
        assert response.status_code == 200 and response.json()["choices"]
        settled = settle_response(response)
        assert (settled["success"], settled["errorReason"]) == (False, "settlement_pending")
        key = permit_key_of(late, response)
        record = {k.decode(): v.decode() for k, v in redis_client.hgetall(key).items()}
        assert (
            record["state"] == "pending" and record["calldata"] and record["relayer"] == late.wallets.relayer
        )
        faulty.hide_receipts = False
        ledger, chain = Ledger(Store(client=redis_client)), Chain(late.settings)
        (finding,) = [f for f in reconcile(ledger, chain, late.settings, 3600) if f.key == key]
        assert finding.resolved == "served"


@pytest.mark.parametrize("failure", ["refused", "cut"])
def test_a_host_that_refuses_or_cuts_costs_nothing_and_the_header_works_again(
    upto_proxy: Proxy, standin: StandinModel, failure: str
) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    body = {**BODY, "stream": failure == "cut"}
    if failure == "refused":
        standin.behaviour.status, standin.behaviour.times = 400, 1
    else:
        standin.behaviour.cut_after = 2
    challenge = json.loads(base64.b64decode(upto_proxy.post(body=body).headers["PAYMENT-REQUIRED"]))
    header = upto_header(upto_proxy.wallets.payer_key, challenge)
    url = upto_proxy.url + "/v1/chat/completions"
    before = upto_proxy.balances()
    first = requests.post(url, json=body, headers={"PAYMENT-SIGNATURE": header}, timeout=30, stream=True)
    try:
        content = b"".join(first.iter_content(chunk_size=None))
    except requests.exceptions.ChunkedEncodingError:  # the broken transfer of a cut stream
        content = b"upstream_cut"
    assert first.status_code == 400 if failure == "refused" else b"upstream_cut" in content
    assert moved_since(upto_proxy, before) == 0
    standin.behaviour.cut_after = None

    again = requests.post(url, json=body, headers={"PAYMENT-SIGNATURE": header}, timeout=30)

    assert again.status_code == 200, again.text
    assert moved_since(upto_proxy, before) > 0


def test_a_json_settlement_that_reverts_withholds_the_answer_and_charges_nothing(
    upto_proxy: Proxy, standin: StandinModel, redis_client: redis.Redis
) -> None:
    """The payer revokes its allowance while the model works: the charge reverts, the answer is
    withheld (402 ``invalid_upto_evm_transaction_failed``), nothing moves, the permit is ``failed``."""
    chain, payer = upto_proxy.chain, upto_proxy.wallets.payer
    approve_permit2(chain, payer)
    standin.behaviour.delay = 0.6
    before = upto_proxy.balances()
    revoke = threading.Timer(0.2, approve_permit2, (chain, payer, 0))
    revoke.start()
    response = upto_session(upto_proxy.wallets.payer_key).post(
        upto_proxy.url + "/v1/chat/completions", json=BODY, timeout=30
    )
    revoke.join()

    assert response.status_code == 402 and "choices" not in response.text
    reason = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))["error"]
    assert reason == "invalid_upto_evm_transaction_failed"
    assert settle_response(response)["success"] is False
    assert moved_since(upto_proxy, before) == 0
    assert redis_client.hget(permit_key_of(upto_proxy, response), "state") == b"failed"


def test_a_copy_of_a_permit_in_use_is_turned_away(upto_proxy: Proxy, standin: StandinModel) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    standin.behaviour.delay = 0.8
    challenge = json.loads(base64.b64decode(upto_proxy.post(body=BODY).headers["PAYMENT-REQUIRED"]))
    header = upto_header(upto_proxy.wallets.payer_key, challenge)
    url = upto_proxy.url + "/v1/chat/completions"
    answers: list[requests.Response] = []
    first = threading.Thread(
        target=lambda: answers.append(
            requests.post(url, json=BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=30)
        )
    )
    first.start()
    time.sleep(0.3)
    copy = requests.post(url, json=BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=30)
    first.join()
    assert copy.status_code == 503 and copy.json()["error"]["code"] == "payment_in_progress"
    assert answers[0].status_code == 200 and len(standin.received) == 1


def test_reconcile_resolves_a_permit_held_past_any_call(
    upto_proxy: Proxy, standin: StandinModel, redis_client: redis.Redis
) -> None:
    """A permit left ``settling`` (its worker died): released when nothing moved; when its charge
    moved, a problem (whether its answer went out is unknown)."""
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    session = upto_session(upto_proxy.wallets.payer_key)
    url = upto_proxy.url + "/v1/chat/completions"
    charged, untouched = (session.post(url, json=BODY, timeout=60) for _ in range(2))
    moved_key, idle_key = permit_key_of(upto_proxy, charged), permit_key_of(upto_proxy, untouched)
    redis_client.hset(moved_key, mapping={"state": "settling", "updated": "0"})
    redis_client.hset(idle_key, mapping={"state": "settling", "updated": "0", "tx": ""})
    ledger, chain = Ledger(Store(client=redis_client)), Chain(upto_proxy.settings)

    found = {f.key: f for f in reconcile(ledger, chain, upto_proxy.settings, 3600)}

    assert found[idle_key].resolved == "released"
    assert found[moved_key].problem.startswith("charged ") and "unknown" in found[moved_key].problem
