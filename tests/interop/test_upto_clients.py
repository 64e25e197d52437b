"""The official npm client pays the ``upto`` scheme on the first try.

``js/pay_v2.mjs`` (``X402_SCHEME=upto``) drives ``@x402/fetch``'s ``wrapFetchWithPaymentFromConfig`` with only
``@x402/evm``'s ``UptoEvmScheme`` registered (2.27, unmodified, defaults): it answers the proxy's 402 by
picking the ``upto`` entry and signing a Permit2 permit for the priced maximum. The proxy charges the
usage the stand-in host reports and settles through x402UptoPermit2Proxy; each test checks the answer,
the settlement (header for JSON, SSE comment for a stream) and the chain.

Same setup as ``tests/integration/test_upto.py``: a catalog with a floor of 1 atomic unit, so the usage
price lies strictly between the floor and the maximum.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.devnet.standin import StandinModel
from app.x402.upto import UPTO_PROXY_ADDRESS
from tests.interop.paid import PROJECT_ROOT, TX_HASH_RE, decode_settlement, run_node, token_transfers
from tests.support import CHAT_BODY, Proxy, approve_permit2, moved_since, offered, usage_price

pytestmark = pytest.mark.integration

PAY = Path(__file__).resolve().parent / "js" / "pay_v2.mjs"
BODY: dict[str, Any] = {**CHAT_BODY, "max_tokens": 256}
MODEL = "hermes-3-8b-tee"
PAYMENT_RESPONSE_COMMENT = ": x402-payment-response "
RECEIPT_COMMENT = ": x402-receipt "


def maximum_of(proxy: Proxy, body: dict[str, Any]) -> int:
    """The priced maximum the ``upto`` entry of a real 402 for ``body`` offers."""
    (upto,) = [entry for entry in offered(proxy.post(body=body)) if entry["scheme"] == "upto"]
    return int(upto["amount"])


def pay_upto(proxy: Proxy, body: dict[str, Any]) -> dict[str, Any]:
    assert (PROJECT_ROOT / "node_modules" / "@x402" / "evm").is_dir(), "run npm ci at the project root"
    return run_node(
        PAY,
        {
            "X402_SCHEME": "upto",
            "X402_URL": proxy.url + "/v1/chat/completions",
            "X402_PAYER_KEY": proxy.wallets.payer_key,
            "X402_BODY": json.dumps(body),
        },
    )


def assert_settled_through_upto_proxy(proxy: Proxy, settled: dict[str, Any], price: int) -> None:
    """One Transfer(payer → payee, price), in a transaction sent to x402UptoPermit2Proxy."""
    assert settled["success"] is True, settled
    assert TX_HASH_RE.fullmatch(settled["transaction"]), settled
    assert settled["network"] == "eip155:8453", settled
    assert settled["payer"].lower() == proxy.wallets.payer.lower(), settled
    receipt = proxy.chain.rpc.call("eth_getTransactionReceipt", [settled["transaction"]])
    assert receipt["to"].lower() == UPTO_PROXY_ADDRESS.lower(), receipt
    payer, payee = proxy.wallets.payer.lower(), proxy.wallets.pay_to.lower()
    assert token_transfers(proxy, settled["transaction"]) == [(payer, payee, price)]


def test_npm_upto_client_pays_the_reported_usage(upto_proxy: Proxy, standin: StandinModel) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    maximum = maximum_of(upto_proxy, BODY)
    before = upto_proxy.balances()

    line = pay_upto(upto_proxy, BODY)

    assert line["status"] == 200, line
    answer = line["body"]
    assert answer["choices"][0]["message"]["content"].startswith("stand-in answer"), answer
    settled = decode_settlement(line["paymentResponseHeader"])
    assert line["paymentResponse"] == settled  # the SDK's own decoder reads the same
    assert "amount" in settled, settled
    price = usage_price(upto_proxy, answer["usage"])
    assert 1 < price < maximum
    assert settled["amount"] == str(price)
    assert moved_since(upto_proxy, before) == price  # the chain moved the usage price, once
    assert_settled_through_upto_proxy(upto_proxy, settled, price)
    assert len(standin.received) == 1  # paid on the first try: one call reached the host


def sse_events(text: str) -> list[str]:
    return [event for event in text.split("\n\n") if event.strip()]


@pytest.mark.parametrize("include_usage", [False, True], ids=["stream", "stream-with-usage"])
def test_npm_upto_client_pays_a_stream(upto_proxy: Proxy, standin: StandinModel, include_usage: bool) -> None:
    approve_permit2(upto_proxy.chain, upto_proxy.wallets.payer)
    body: dict[str, Any] = {**BODY, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    maximum = maximum_of(upto_proxy, body)
    before = upto_proxy.balances()

    line = pay_upto(upto_proxy, body)

    assert line["status"] == 200, line
    text = line["body"]
    assert isinstance(text, str), text  # SSE, not JSON
    events = sse_events(text)
    assert "data: [DONE]" in events
    assert events[-2].startswith(PAYMENT_RESPONSE_COMMENT), events[-3:]
    assert events[-1].startswith(RECEIPT_COMMENT), events[-3:]
    settled = decode_settlement(events[-2].removeprefix(PAYMENT_RESPONSE_COMMENT))
    assert settled["success"] is True, settled
    amount = int(settled["amount"])
    assert 1 < amount < maximum
    assert moved_since(upto_proxy, before) == amount
    assert_settled_through_upto_proxy(upto_proxy, settled, amount)
    assert standin.received[-1].body["stream_options"] == {"include_usage": True}  # asked of the host
    usage_events = [event for event in events if '"usage"' in event]
    if include_usage:
        (usage_event,) = usage_events
        assert amount == usage_price(upto_proxy, json.loads(usage_event.removeprefix("data: "))["usage"])
    else:
        assert usage_events == []  # not asked, so not passed on
    assert len(standin.received) == 1
