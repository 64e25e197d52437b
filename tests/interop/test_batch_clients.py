"""The official clients pay the ``batch-settlement`` scheme: one deposit, then vouchers only.

PyPI ``x402`` 2.25's ``BatchSettlementEvmScheme`` (unmodified, defaults, its in-memory channel
storage) is the only scheme registered on an ``x402ClientSync`` under the requests adapter; its
signer reads the chain (``EthAccountSignerWithRPC``) so it can recover a channel from
``channels(id)``. ``js/pay_batch.mjs`` drives the npm client the same way (``@x402/fetch`` +
``@x402/evm/batch-settlement/client`` 2.27, a viem account composed with a public client). The proxy
runs over anvil with our escrow and collectors at their canonical addresses, the stand-in host, and a
catalog with a floor of 1 atomic unit (so a usage price lies strictly between the floor and the
maximum).

Besides the happy paths, the tests try to break the server side: a stream charged in an SSE comment,
a failing host, two calls on one channel at once, a replayed voucher, a flushed Redis, and vouchers
or deposits built by hand (with the official client's own signing helpers) that must be refused
without touching the channel.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.http.x402_http_client import x402HTTPClientSync
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.eip3009 import (
    create_batch_settlement_eip3009_deposit_payload,
)
from x402.mechanisms.evm.batch_settlement.client.permit2 import (
    create_batch_settlement_permit2_deposit_payload,
)
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig, VoucherPayload
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSigner, EthAccountSignerWithRPC
from x402.schemas import PaymentRequired, PaymentRequirements

from app.backends.escrow import channel_reads, words
from app.devnet.standin import Behaviour, StandinModel
from app.payments.keys import LEDGER_STREAM, channel_key
from app.x402.batch_settlement import BATCH_SETTLEMENT_ADDRESS
from tests.interop.paid import (
    CLIENT_TIMEOUT,
    PROJECT_ROOT,
    TX_HASH_RE,
    decode_settlement,
    run_node,
    token_transfers,
)
from tests.support import CHAT_BODY, Proxy, approve_permit2, offered, usage_price

pytestmark = pytest.mark.integration

BODY: dict[str, Any] = {**CHAT_BODY, "max_tokens": 256}
STREAM_BODY: dict[str, Any] = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
PAY_BATCH = Path(__file__).resolve().parent / "js" / "pay_batch.mjs"
CHAT = "/v1/chat/completions"
PAYMENT_RESPONSE_COMMENT = ": x402-payment-response "

MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"
BUSY = "invalid_batch_settlement_evm_channel_busy"
EXCEEDS_BALANCE = "invalid_batch_settlement_evm_cumulative_exceeds_balance"
BAD_SIGNATURE = "invalid_batch_settlement_evm_voucher_signature"
SIMULATION_FAILED = "invalid_batch_settlement_evm_deposit_simulation_failed"


# -- clients and what they sent -------------------------------------------------------------------------


def batch_session(proxy: Proxy, key: str | None = None) -> tuple[requests.Session, BatchSettlementEvmScheme]:
    """A requests session paying with the official batch-settlement client as ``key`` (the payer)."""
    account = Account.from_key(key or proxy.wallets.payer_key)
    scheme = BatchSettlementEvmScheme(EthAccountSignerWithRPC(account, proxy.settings.rpc_urls[0]))
    client = x402ClientSync()
    client.register("eip155:*", scheme)
    return wrapRequestsWithPayment(requests.Session(), client), scheme


def client_header(scheme: BatchSettlementEvmScheme, challenge: dict[str, Any]) -> str:
    """The ``PAYMENT-SIGNATURE`` the official client ``scheme`` makes for a decoded v2 402 now (from
    its own channel storage), without sending it."""
    client = x402ClientSync()
    client.register("eip155:*", scheme)
    http = x402HTTPClientSync(client)
    payload = http.create_payment_payload(PaymentRequired.model_validate(challenge))
    return str(http.encode_payment_signature_header(payload)["PAYMENT-SIGNATURE"])


def b64json(value: str) -> dict[str, Any]:
    decoded = json.loads(base64.b64decode(value, validate=True))
    assert isinstance(decoded, dict)
    return decoded


def encode(value: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


@pytest.fixture
def exchanges(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every request ``requests`` sends in the test, as {status, paid, type, maxClaimable, error}: the
    official client's adapter sends through ``HTTPAdapter.send``, so its retries show here."""
    seen: list[dict[str, Any]] = []
    original = requests.adapters.HTTPAdapter.send

    def recording(self: requests.adapters.HTTPAdapter, request: Any, **kwargs: Any) -> requests.Response:
        response = original(self, request, **kwargs)
        header = request.headers.get("PAYMENT-SIGNATURE")
        entry: dict[str, Any] = {"status": response.status_code, "paid": header is not None}
        if header:
            payload = b64json(header)["payload"]
            entry["type"] = payload["type"]
            entry["maxClaimable"] = payload["voucher"]["maxClaimableAmount"]
        if response.status_code == 402 and "PAYMENT-REQUIRED" in response.headers:
            entry["error"] = b64json(response.headers["PAYMENT-REQUIRED"]).get("error")
        seen.append(entry)
        return response

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", recording)
    return seen


def paid_exchanges(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in seen if entry["paid"]]


# -- the proxy, Redis and the chain ---------------------------------------------------------------------


@pytest.fixture
def batch_proxy(upto_proxy: Proxy) -> Iterator[Proxy]:
    yield upto_proxy


@pytest.fixture
def store(batch_proxy: Proxy) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(batch_proxy.settings.redis_url, decode_responses=True)
    yield client
    client.close()


def challenge_of(proxy: Proxy, body: dict[str, Any] = BODY) -> dict[str, Any]:
    """The decoded v2 ``PAYMENT-REQUIRED`` of a real 402 for ``body``."""
    response = proxy.post(body=body)
    assert response.status_code == 402, response.text
    return b64json(response.headers["PAYMENT-REQUIRED"])


def batch_entry(proxy: Proxy, body: dict[str, Any] = BODY) -> dict[str, Any]:
    (entry,) = [e for e in offered(proxy.post(body=body)) if e["scheme"] == "batch-settlement"]
    return dict(entry)


def maximum_of(proxy: Proxy, body: dict[str, Any] = BODY) -> int:
    return int(batch_entry(proxy, body)["amount"])


def channel_on_chain(proxy: Proxy, channel: str) -> tuple[int, int]:
    """``channels(id)``: (balance, totalClaimed)."""
    answers = proxy.chain.rpc.batch(channel_reads(bytes.fromhex(channel[2:])))
    balances = words(answers[0], 2)
    assert balances is not None
    return balances[0], balances[1]


def stored(proxy: Proxy, store: redis.Redis, channel: str) -> dict[str, str]:
    """The channel's Redis hash (``app.payments.channels``), {} when absent."""
    key = channel_key(proxy.settings.network.chain_id, bytes.fromhex(channel[2:]))
    return dict(store.hgetall(key))  # type: ignore[arg-type]


def wait_for_hold(proxy: Proxy, store: redis.Redis, channel: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not stored(proxy, store, channel).get("hold"):
        assert time.monotonic() < deadline, "the first call never held the channel"
        time.sleep(0.01)


def voucher_events(store: redis.Redis) -> list[dict[str, str]]:
    return [fields for _id, fields in store.xrange(LEDGER_STREAM) if fields.get("event") == "voucher"]  # type: ignore[union-attr]


def redis_snapshot(store: redis.Redis) -> dict[str, Any]:
    """Every key with its value (hashes, strings, sets, streams): to prove a refusal wrote nothing."""
    snapshot: dict[str, Any] = {}
    for key in sorted(store.keys("*")):  # type: ignore[union-attr]
        kind = store.type(key)
        if kind == "hash":
            snapshot[key] = store.hgetall(key)
        elif kind == "string":
            snapshot[key] = store.get(key)
        elif kind == "zset":
            snapshot[key] = store.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            snapshot[key] = sorted(store.smembers(key))  # type: ignore[arg-type]
        elif kind == "stream":
            snapshot[key] = store.xrange(key)
        else:
            snapshot[key] = kind
    return snapshot


def error_of(response: requests.Response) -> str | None:
    assert response.status_code == 402, (response.status_code, response.text)
    error = b64json(response.headers["PAYMENT-REQUIRED"]).get("error")
    return None if error is None else str(error)


def corrective_extra(response: requests.Response) -> dict[str, Any]:
    (entry,) = [
        e
        for e in b64json(response.headers["PAYMENT-REQUIRED"])["accepts"]
        if e["scheme"] == "batch-settlement"
    ]
    return dict(entry["extra"])


def settled_of(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    settled = decode_settlement(response.headers["PAYMENT-RESPONSE"])
    assert settled["success"] is True, settled
    return settled


def price_of(proxy: Proxy, response: requests.Response) -> int:
    return price_of_body(proxy, response.json())


def price_of_body(proxy: Proxy, body: dict[str, Any]) -> int:
    """The usage price of an answer's body (``usage``)."""
    return usage_price(proxy, body["usage"])


# -- the Python client ----------------------------------------------------------------------------------


def test_python_client_deposits_once_then_pays_with_vouchers(
    batch_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = batch_proxy
    maximum = maximum_of(proxy, BODY)
    session, _scheme = batch_session(proxy)
    payer_before, payee_before = proxy.balances()
    charged_total = 0
    deposit_tx = ""
    for call in range(4):
        response = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)
        assert response.status_code == 200, response.text
        settled = decode_settlement(response.headers["PAYMENT-RESPONSE"])
        assert settled["success"] is True, settled
        price = usage_price(proxy, response.json()["usage"])
        assert 1 < price < maximum
        assert settled["extra"]["chargedAmount"] == str(price)
        charged_total += price
        state = settled["extra"]["channelState"]
        assert state["chargedCumulativeAmount"] == str(charged_total)
        if call == 0:
            deposit_tx = settled["transaction"]
            assert deposit_tx.startswith("0x"), settled
        else:
            assert settled["transaction"] == "", settled  # no transaction per call
    balance, claimed = channel_on_chain(proxy, state["channelId"])
    assert claimed == 0 and balance >= charged_total
    payer_after, payee_after = proxy.balances()
    assert payer_before - payer_after == balance  # one deposit left the wallet, into the escrow
    assert payee_after == payee_before  # nothing reaches payTo before a claim and a settle
    receipt = proxy.chain.rpc.call("eth_getTransactionReceipt", [deposit_tx])
    assert receipt["to"].lower() == BATCH_SETTLEMENT_ADDRESS.lower()
    escrow = BATCH_SETTLEMENT_ADDRESS.lower()
    assert any(to == escrow and value == balance for _f, to, value in token_transfers(proxy, deposit_tx))
    assert len(standin.received) == 4


def test_python_client_recovers_from_a_corrective_402(batch_proxy: Proxy, standin: StandinModel) -> None:
    proxy = batch_proxy
    session, _scheme = batch_session(proxy)
    first = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)
    assert first.status_code == 200, first.text
    # a second client for the same wallet knows nothing of the channel's charges: its first voucher
    # is stale, the proxy answers the corrective 402, and the client resynchronises and pays
    fresh, _ = batch_session(proxy)
    second = fresh.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)
    assert second.status_code == 200, second.text
    settled = decode_settlement(second.headers["PAYMENT-RESPONSE"])
    assert settled["transaction"] == ""  # no second deposit
    state = settled["extra"]["channelState"]
    expected = sum(usage_price(proxy, r.json()["usage"]) for r in (first, second))
    assert state["chargedCumulativeAmount"] == str(expected)
    assert json.loads(second.text)["choices"]


def sse_events(text: str) -> list[str]:
    return [event for event in text.split("\n\n") if event.strip()]


def test_python_client_pays_a_stream_then_resynchronises(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis, exchanges: list[dict[str, Any]]
) -> None:
    """A stream (here the channel's first call, with the deposit) is charged its usage at its end, in
    an SSE comment the client does not read; its next call is stale, gets the corrective 402 (before
    any deposit it carries is sent) and pays with a voucher."""
    proxy = batch_proxy
    maximum = maximum_of(proxy, STREAM_BODY)
    session, scheme = batch_session(proxy)
    payer_before, _ = proxy.balances()

    streamed = session.post(proxy.url + CHAT, json=STREAM_BODY, timeout=CLIENT_TIMEOUT)

    assert streamed.status_code == 200, streamed.text
    assert "PAYMENT-RESPONSE" not in streamed.headers  # a stream's settlement comes at its end
    events = sse_events(streamed.text)
    assert "data: [DONE]" in events
    (comment,) = [e for e in events if e.startswith(PAYMENT_RESPONSE_COMMENT)]
    settled = decode_settlement(comment.removeprefix(PAYMENT_RESPONSE_COMMENT))
    assert settled["success"] is True, settled
    assert TX_HASH_RE.fullmatch(settled["transaction"]), settled  # the deposit, made by this call
    (usage_event,) = [e for e in events if e.startswith("data: ") and '"usage"' in e]
    stream_price = usage_price(proxy, json.loads(usage_event.removeprefix("data: "))["usage"])
    assert 1 < stream_price < maximum
    assert settled["extra"]["chargedAmount"] == str(stream_price)
    channel = settled["extra"]["channelState"]["channelId"]
    assert settled["extra"]["channelState"]["chargedCumulativeAmount"] == str(stream_price)
    assert stored(proxy, store, channel)["charged"] == str(stream_price)
    assert [e.get("type") for e in paid_exchanges(exchanges)] == ["deposit"]
    exchanges.clear()

    second = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)

    second_settled = settled_of(second)
    second_price = price_of(proxy, second)
    assert second_settled["transaction"] == ""
    total = stream_price + second_price
    assert second_settled["extra"]["channelState"]["chargedCumulativeAmount"] == str(total)
    assert stored(proxy, store, channel)["charged"] == str(total)
    # the client believed the channel empty (it never saw the stream's settlement) and tried a
    # deposit with a voucher of one maximum: refused with the corrective 402, then a voucher
    paid = paid_exchanges(exchanges)
    assert [(e["status"], e["type"], e.get("error")) for e in paid] == [
        (402, "deposit", MISMATCH),
        (200, "voucher", None),
    ], exchanges
    assert paid[0]["maxClaimable"] == str(maximum)
    assert paid[1]["maxClaimable"] == str(stream_price + maximum)
    balance, claimed = channel_on_chain(proxy, channel)
    assert claimed == 0
    assert payer_before - proxy.balances()[0] == balance  # one deposit only: the refused one moved nothing
    context = scheme._storage.get(channel.lower())
    assert context is not None and context.charged_cumulative_amount == str(total)
    assert len(standin.received) == 2


@pytest.mark.parametrize("failing_call", [0, 1], ids=["deposit-call", "voucher-call"])
def test_a_failing_host_costs_nothing(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis, failing_call: int
) -> None:
    """The host fails one call (the channel's first, which carries the deposit, or a later voucher):
    the call is not charged, the channel is released, and the same client's next call is served."""
    proxy = batch_proxy
    session, _scheme = batch_session(proxy)
    prices: list[int] = []
    channel = ""
    for call in range(3):
        # the proxy tries a host's 5xx twice (app.backends.upstream.ATTEMPTS) before it answers
        standin.behaviour = Behaviour(status=500, times=2) if call == failing_call else Behaviour()
        response = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)
        if call == failing_call:
            assert response.status_code >= 500, response.text
            assert "PAYMENT-RESPONSE" not in response.headers
            if channel:
                state = stored(proxy, store, channel)
                assert "hold" not in state and state["charged"] == str(sum(prices))
            continue
        settled = settled_of(response)
        prices.append(price_of(proxy, response))
        channel = settled["extra"]["channelState"]["channelId"]
        assert settled["extra"]["channelState"]["chargedCumulativeAmount"] == str(sum(prices))
    state = stored(proxy, store, channel)
    assert state["charged"] == str(sum(prices))
    assert "hold" not in state
    events = voucher_events(store)
    assert [int(e["amount"]) for e in events] == prices  # one ledger event per served call only
    assert len(standin.received) == 2 + 2  # two served calls, and the failed one asked twice


def test_a_stream_the_host_cuts_costs_nothing(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis, exchanges: list[dict[str, Any]]
) -> None:
    """The host cuts a paid stream: the buyer gets the ``upstream_cut`` event and no settlement, the
    channel is released uncharged, and the client's next voucher (the same cumulative) is served."""
    proxy = batch_proxy
    session, _scheme = batch_session(proxy)
    first = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)
    first_price = price_of(proxy, first)
    channel = settled_of(first)["extra"]["channelState"]["channelId"]
    standin.behaviour = Behaviour(cut_after=2)
    cut = session.post(proxy.url + CHAT, json=STREAM_BODY, timeout=CLIENT_TIMEOUT, stream=True)
    assert cut.status_code == 200
    received = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # the proxy ends the body after
        for chunk in cut.iter_content(chunk_size=None):  # its cut event, without a last chunk
            received += chunk
    standin.behaviour = Behaviour()
    assert b"upstream_cut" in received
    assert PAYMENT_RESPONSE_COMMENT.encode() not in received
    state = stored(proxy, store, channel)
    assert state["charged"] == str(first_price) and "hold" not in state
    exchanges.clear()

    after = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)

    total = first_price + price_of(proxy, after)
    assert settled_of(after)["extra"]["channelState"]["chargedCumulativeAmount"] == str(total)
    assert stored(proxy, store, channel)["charged"] == str(total)
    # the client never saw a settlement for the cut stream, so its voucher was already right
    assert [(e["status"], e["type"]) for e in paid_exchanges(exchanges)] == [(200, "voucher")]
    assert [int(e["amount"]) for e in voucher_events(store)] == [first_price, total - first_price]


# -- two calls at once, and a replayed voucher ----------------------------------------------------------


def test_one_call_at_a_time_per_channel_and_a_replay_is_never_charged_twice(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis
) -> None:
    proxy = batch_proxy
    session, scheme = batch_session(proxy)
    first = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)
    first_price = price_of(proxy, first)
    channel = settled_of(first)["extra"]["channelState"]["channelId"]
    challenge = challenge_of(proxy)
    maximum = int(challenge["accepts"][0]["amount"])
    header = client_header(scheme, challenge)  # the voucher for the next call: first_price + maximum
    assert b64json(header)["payload"]["voucher"]["maxClaimableAmount"] == str(first_price + maximum)
    headers = {"PAYMENT-SIGNATURE": header}

    standin.behaviour = Behaviour(delay=2.0)  # holds the next call at the host
    slow: dict[str, requests.Response] = {}
    thread = threading.Thread(
        target=lambda: slow.update(
            answer=requests.post(proxy.url + CHAT, json=BODY, headers=headers, timeout=30)
        )
    )
    thread.start()
    try:
        wait_for_hold(proxy, store, channel)
        busy = requests.post(proxy.url + CHAT, json=BODY, headers=headers, timeout=30)
        assert error_of(busy) == BUSY
        assert "channelState" not in corrective_extra(busy)
    finally:
        thread.join(30)
    standin.behaviour = Behaviour()
    second = slow["answer"]
    second_settled = settled_of(second)
    second_price = price_of(proxy, second)
    total = first_price + second_price
    assert second_settled["extra"]["channelState"]["chargedCumulativeAmount"] == str(total)

    replay = requests.post(proxy.url + CHAT, json=BODY, headers=headers, timeout=30)

    assert error_of(replay) == MISMATCH
    extra = corrective_extra(replay)
    assert extra["channelState"]["channelId"] == channel
    assert extra["channelState"]["chargedCumulativeAmount"] == str(total)
    assert extra["voucherState"]["signedMaxClaimable"] == str(first_price + maximum)
    assert extra["voucherState"]["signature"] == b64json(header)["payload"]["voucher"]["signature"]
    state = stored(proxy, store, channel)
    assert state["charged"] == str(total) and "hold" not in state
    assert [int(e["amount"]) for e in voucher_events(store)] == [first_price, second_price]
    assert len(standin.received) == 2  # neither the busy call nor the replay reached the host
    # and the client, fed nothing, resynchronises from that corrective 402 and pays on
    third = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)
    third_state = settled_of(third)["extra"]["channelState"]
    assert third_state["chargedCumulativeAmount"] == str(total + price_of(proxy, third))


def test_a_replayed_deposit_header_moves_nothing_and_charges_nothing(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis
) -> None:
    """The official client's deposit header, sent again after it was served: its authorization was
    used, so no second deposit is sent; its voucher is stale, so the answer is the corrective 402."""
    proxy = batch_proxy
    _session, scheme = batch_session(proxy)
    challenge = challenge_of(proxy)
    header = {"PAYMENT-SIGNATURE": client_header(scheme, challenge)}
    assert b64json(header["PAYMENT-SIGNATURE"])["payload"]["type"] == "deposit"
    first = requests.post(proxy.url + CHAT, json=BODY, headers=header, timeout=CLIENT_TIMEOUT)
    settled = settled_of(first)
    price = price_of(proxy, first)
    channel = settled["extra"]["channelState"]["channelId"]
    on_chain = channel_on_chain(proxy, channel)
    payer_balance = proxy.balances()[0]

    replay = requests.post(proxy.url + CHAT, json=BODY, headers=header, timeout=CLIENT_TIMEOUT)

    assert error_of(replay) == MISMATCH
    assert corrective_extra(replay)["channelState"]["chargedCumulativeAmount"] == str(price)
    assert channel_on_chain(proxy, channel) == on_chain
    assert proxy.balances()[0] == payer_balance
    state = stored(proxy, store, channel)
    assert state["charged"] == str(price) and "hold" not in state
    assert len(voucher_events(store)) == 1
    assert len(standin.received) == 1


# -- a lost Redis ---------------------------------------------------------------------------------------


def test_a_flushed_redis_is_rebuilt_from_the_chain_and_the_payers_voucher(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis, exchanges: list[dict[str, Any]]
) -> None:
    """Redis loses everything after three paid calls; the chain still has the deposit. The client's
    next voucher (its cumulative: what it saw charged, plus one maximum) rebuilds the channel and the
    charge goes on from the client's view.

    What is lost with Redis: every charge not yet claimed on chain (``totalClaimed``) that the payer
    does not assert again. The channel is rebuilt from ``channels(id)`` and the voucher the payer brings,
    whose base (its maxClaimableAmount minus this call's maximum) is taken as what was charged, but never
    below ``totalClaimed``. The client here kept its view, so nothing is lost; a payer that comes back
    with a fresh client (or lies) starts from ``totalClaimed`` (0 here: nothing was claimed), so every
    unclaimed charge, and our copy of its latest voucher (which could have claimed them), is gone. The
    last check pins that."""
    proxy = batch_proxy
    session, _scheme = batch_session(proxy)
    prices = []
    channel = ""
    for _call in range(3):
        response = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)
        settled = settled_of(response)
        prices.append(price_of(proxy, response))
        channel = settled["extra"]["channelState"]["channelId"]
    balance, claimed = channel_on_chain(proxy, channel)
    assert claimed == 0
    payer_before, _ = proxy.balances()

    store.flushall()
    exchanges.clear()
    after = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)

    settled = settled_of(after)
    assert settled["transaction"] == ""
    total = sum(prices) + price_of(proxy, after)
    assert settled["extra"]["channelState"]["chargedCumulativeAmount"] == str(total)
    assert settled["extra"]["channelState"]["balance"] == str(balance)
    state = stored(proxy, store, channel)
    assert state["charged"] == str(total) and state["balance"] == str(balance)
    assert [e["type"] for e in paid_exchanges(exchanges)] == ["voucher"]  # served on the first voucher
    assert proxy.balances()[0] == payer_before  # no deposit

    # the documented loss: flushed again, a fresh client for the same wallet starts from totalClaimed
    store.flushall()
    fresh, _ = batch_session(proxy)
    again = fresh.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)
    assert settled_of(again)["extra"]["channelState"]["chargedCumulativeAmount"] == str(
        price_of(proxy, again)
    )


# -- the npm client -------------------------------------------------------------------------------------


def pay_batch_npm(proxy: Proxy, calls: int, key: str | None = None, refund: bool = False) -> dict[str, Any]:
    """``calls`` calls by the npm client in one process, then (``refund``) its cooperative refund
    asked at the paid ping."""
    assert (PROJECT_ROOT / "node_modules" / "@x402" / "evm").is_dir(), "run npm ci at the project root"
    env = {
        "X402_URL": proxy.url + CHAT,
        "X402_PAYER_KEY": key or proxy.wallets.payer_key,
        "X402_BODY": json.dumps(BODY),
        "X402_RPC_URL": proxy.settings.rpc_urls[0],
        "X402_CALLS": str(calls),
    }
    if refund:
        env["X402_REFUND_URL"] = proxy.url + "/v1/models/hermes-3-8b-tee/ping"
    return run_node(PAY_BATCH, env)


def test_npm_client_gets_its_unused_deposit_back(batch_proxy: Proxy, standin: StandinModel) -> None:
    proxy = batch_proxy
    payer_before, payee_before = proxy.balances()

    line = pay_batch_npm(proxy, 2, refund=True)

    assert [call["status"] for call in line["calls"]] == [200, 200], line
    charged = sum(price_of_body(proxy, call["body"]) for call in line["calls"])
    refund = line["refund"]
    assert refund["success"] is True and TX_HASH_RE.fullmatch(refund["transaction"]), refund
    assert payer_before - proxy.balances()[0] == charged  # the deposit came back, but what was charged
    assert proxy.balances()[1] == payee_before  # claimed into the escrow with the refund, not swept yet
    channel = line["calls"][-1]["paymentResponse"]["extra"]["channelState"]["channelId"]
    assert channel_on_chain(proxy, channel) == (charged, charged)


def test_npm_client_deposits_once_then_pays_with_vouchers_and_a_second_process_resynchronises(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis
) -> None:
    proxy = batch_proxy
    maximum = maximum_of(proxy)
    payer_before, payee_before = proxy.balances()

    line = pay_batch_npm(proxy, 3)

    total = 0
    channel = ""
    deposit_tx = ""
    for index, call in enumerate(line["calls"]):
        assert call["status"] == 200, call
        assert call["body"]["choices"][0]["message"]["content"].startswith("stand-in answer")
        settled = decode_settlement(call["paymentResponseHeader"])
        assert call["paymentResponse"] == settled  # the SDK's own decoder reads the same
        assert settled["success"] is True, settled
        price = usage_price(proxy, call["body"]["usage"])
        assert 1 < price < maximum
        assert settled["extra"]["chargedAmount"] == str(price)
        paid = [e for e in call["exchanges"] if e["paid"]]
        assert [e["status"] for e in call["exchanges"]] == [402, 200], call["exchanges"]
        assert paid[0]["maxClaimableAmount"] == str(total + maximum)  # exactly charged so far + maximum
        total += price
        state = settled["extra"]["channelState"]
        assert state["chargedCumulativeAmount"] == str(total)
        channel = state["channelId"]
        if index == 0:
            assert paid[0]["type"] == "deposit"
            deposit_tx = settled["transaction"]
            assert TX_HASH_RE.fullmatch(deposit_tx), settled
        else:
            assert paid[0]["type"] == "voucher"
            assert settled["transaction"] == "", settled
    assert line["channel"]["chargedCumulativeAmount"] == str(total)  # the client's own view agrees
    balance, claimed = channel_on_chain(proxy, channel)
    assert claimed == 0 and balance >= total
    assert int(paid[0]["maxClaimableAmount"]) <= balance
    escrow = BATCH_SETTLEMENT_ADDRESS.lower()
    assert any(to == escrow and value == balance for _f, to, value in token_transfers(proxy, deposit_tx))

    # a second process for the same wallet, fresh storage: recovers the channel from the chain
    # (charged = totalClaimed = 0), is told the truth by the corrective 402 and pays on, no deposit
    again = pay_batch_npm(proxy, 2)

    first, second = again["calls"]
    assert [(e["status"], e.get("type"), e.get("error")) for e in first["exchanges"]] == [
        (402, None, "payment_required"),
        (402, "voucher", MISMATCH),
        (200, "voucher", None),
    ], first["exchanges"]
    assert first["exchanges"][1]["maxClaimableAmount"] == str(maximum)
    assert first["exchanges"][2]["maxClaimableAmount"] == str(total + maximum)
    for call in (first, second):
        assert call["status"] == 200, call
        settled = decode_settlement(call["paymentResponseHeader"])
        assert settled["transaction"] == "", settled
        total += usage_price(proxy, call["body"]["usage"])
        assert settled["extra"]["channelState"]["chargedCumulativeAmount"] == str(total)
    assert [e["status"] for e in second["exchanges"]] == [402, 200]  # in sync again: no corrective
    assert again["channel"]["chargedCumulativeAmount"] == str(total)
    assert stored(proxy, store, channel)["charged"] == str(total)
    payer_after, payee_after = proxy.balances()
    assert payer_before - payer_after == balance  # one deposit in all
    assert payee_after == payee_before
    assert len(standin.received) == 5


# -- payloads built by hand -----------------------------------------------------------------------------


def requirements_of(entry: dict[str, Any]) -> PaymentRequirements:
    return PaymentRequirements.model_validate(entry)


def honest_config(entry: dict[str, Any], key: str, salt: str = "0x" + "00" * 32) -> ChannelConfig:
    """The config the official client builds for ``entry`` (``build_channel_config``), for ``key``."""
    payer = Account.from_key(key).address
    return ChannelConfig(
        payer=payer,
        payer_authorizer=payer,
        receiver=entry["payTo"],
        receiver_authorizer=entry["extra"]["receiverAuthorizer"],
        token=entry["asset"],
        withdraw_delay=int(entry["extra"]["withdrawDelay"]),
        salt=salt,
    )


def voucher_header(
    entry: dict[str, Any], config: ChannelConfig, amount: int, signer_key: str, channel: str | None = None
) -> dict[str, str]:
    """A voucher payload for ``config`` (its channel id, unless ``channel``), signed by ``signer_key``
    with the official client's ``sign_voucher``."""
    channel_id = channel or compute_channel_id(config, entry["network"])
    payload = VoucherPayload()
    payload.channel_config = config
    payload.voucher = sign_voucher(
        EthAccountSigner(Account.from_key(signer_key)), channel_id, amount, entry["network"]
    )
    return {"PAYMENT-SIGNATURE": encode({"x402Version": 2, "accepted": entry, "payload": payload.to_dict()})}


def deposit_header(entry: dict[str, Any], config: ChannelConfig, key: str, deposit: int, amount: int) -> str:
    payload = create_batch_settlement_eip3009_deposit_payload(
        EthAccountSigner(Account.from_key(key)), requirements_of(entry), config, deposit, amount
    )
    return encode({"x402Version": 2, "accepted": entry, "payload": payload.to_dict()})


def test_foreign_or_forged_vouchers_are_refused_and_change_nothing(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis
) -> None:
    proxy = batch_proxy
    key = proxy.wallets.payer_key
    session, _scheme = batch_session(proxy)
    first = session.post(proxy.url + CHAT, json=BODY, timeout=CLIENT_TIMEOUT)
    charged = price_of(proxy, first)
    channel = settled_of(first)["extra"]["channelState"]["channelId"]
    entry = batch_entry(proxy)
    maximum = int(entry["amount"])
    config = honest_config(entry, key)
    assert compute_channel_id(config, entry["network"]).lower() == channel.lower()  # the client's config
    stranger = Account.create()
    other = Account.create().address
    before = redis_snapshot(store)
    payer_balance = proxy.balances()[0]

    cases: list[tuple[str, ChannelConfig]] = [
        (
            "invalid_batch_settlement_evm_receiver_authorizer_mismatch",
            _with(config, receiver_authorizer=other),
        ),
        ("invalid_batch_settlement_evm_receiver_mismatch", _with(config, receiver=other)),
        ("invalid_batch_settlement_evm_token_mismatch", _with(config, token=other)),
        (
            "invalid_batch_settlement_evm_withdraw_delay_mismatch",
            _with(config, withdraw_delay=config.withdraw_delay + 1),
        ),
    ]
    for reason, foreign in cases:
        # signed by the payer, exactly charged-so-far plus one maximum: only the config is wrong
        response = requests.post(
            proxy.url + CHAT,
            json=BODY,
            headers=voucher_header(entry, foreign, charged + maximum, key),
            timeout=30,
        )
        assert error_of(response) == reason, reason
        assert "channelState" not in corrective_extra(response)
    # the honest channel's id with a foreign config
    response = requests.post(
        proxy.url + CHAT,
        json=BODY,
        headers=voucher_header(entry, _with(config, receiver=other), charged + maximum, key, channel),
        timeout=30,
    )
    assert error_of(response) == "invalid_batch_settlement_evm_channel_id_mismatch"
    # the honest channel, signed by another key: refused before the amounts, so a stale amount gets
    # no corrective 402 (which would disclose the channel and our latest voucher)
    for amount in (charged + maximum, maximum):
        response = requests.post(
            proxy.url + CHAT,
            json=BODY,
            headers=voucher_header(entry, config, amount, stranger.key.hex()),
            timeout=30,
        )
        assert error_of(response) == BAD_SIGNATURE
        assert "channelState" not in corrective_extra(response)
        assert "voucherState" not in corrective_extra(response)

    # a channel whose payerAuthorizer is zero (the payer signs, checked on chain): a stranger's
    # signature is not the payer's
    own = _with(config, payer_authorizer="0x" + "00" * 20)
    response = requests.post(
        proxy.url + CHAT,
        json=BODY,
        headers=voucher_header(entry, own, maximum, stranger.key.hex()),
        timeout=30,
    )
    assert error_of(response) == BAD_SIGNATURE

    assert redis_snapshot(store) == before
    assert proxy.balances()[0] == payer_balance
    assert len(standin.received) == 1
    # the honest voucher still pays: nothing above disturbed the channel
    good = requests.post(
        proxy.url + CHAT, json=BODY, headers=voucher_header(entry, config, charged + maximum, key), timeout=30
    )
    assert settled_of(good)["extra"]["channelState"]["chargedCumulativeAmount"] == str(
        charged + price_of(proxy, good)
    )


def _with(config: ChannelConfig, **changes: Any) -> ChannelConfig:
    return ChannelConfig(**{**config.__dict__, **changes})


def test_a_voucher_for_a_channel_that_does_not_exist_is_refused_and_writes_nothing(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis
) -> None:
    """Anyone can sign a voucher for a channel of their own that was never funded (any key, any salt):
    it is refused (no balance), and it must not leave state behind, or every such request (no gas, one
    RPC read) would keep a Redis hash for CHANNEL_RETENTION_SECONDS."""
    proxy = batch_proxy
    entry = batch_entry(proxy)
    maximum = int(entry["amount"])
    stranger = Account.create()
    config = honest_config(entry, stranger.key.hex(), salt="0x" + os.urandom(32).hex())
    channel = compute_channel_id(config, entry["network"])
    before = redis_snapshot(store)

    response = requests.post(
        proxy.url + CHAT,
        json=BODY,
        headers=voucher_header(entry, config, maximum, stranger.key.hex()),
        timeout=30,
    )

    assert error_of(response) == "invalid_batch_settlement_evm_channel_not_found"
    assert len(standin.received) == 0
    assert stored(proxy, store, channel) == {}
    assert redis_snapshot(store) == before


def test_a_deposit_with_a_bad_authorization_moves_nothing(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis
) -> None:
    proxy = batch_proxy
    key = proxy.wallets.payer_key
    entry = batch_entry(proxy)
    maximum = int(entry["amount"])
    config = honest_config(entry, key, salt="0x" + os.urandom(32).hex())
    channel = compute_channel_id(config, entry["network"])
    header = b64json(deposit_header(entry, config, key, 10 * maximum, maximum))
    authorization = header["payload"]["deposit"]["authorization"]["erc3009Authorization"]
    # the ERC-3009 authorization signed by another key (the voucher is the payer's, and valid)
    forged = create_batch_settlement_eip3009_deposit_payload(
        EthAccountSigner(Account.create()), requirements_of(entry), config, 10 * maximum, maximum
    ).to_dict()["deposit"]["authorization"]["erc3009Authorization"]
    authorization["signature"] = forged["signature"]
    payer_before, payee_before = proxy.balances()
    escrow_before = proxy.chain.balance(BATCH_SETTLEMENT_ADDRESS)

    response = requests.post(
        proxy.url + CHAT, json=BODY, headers={"PAYMENT-SIGNATURE": encode(header)}, timeout=30
    )

    assert error_of(response) == SIMULATION_FAILED
    assert proxy.balances() == (payer_before, payee_before)
    assert proxy.chain.balance(BATCH_SETTLEMENT_ADDRESS) == escrow_before
    assert channel_on_chain(proxy, channel) == (0, 0)
    assert stored(proxy, store, channel) == {}  # the record made for this deposit went with it
    assert voucher_events(store) == []
    assert len(standin.received) == 0


def test_a_voucher_above_the_channel_balance_is_refused(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis
) -> None:
    """A channel opened (by hand, with the official client's ERC-3009 helper) with the least deposit
    the 402 asks (``minDeposit``, ten calls of ``BODY``): after one call, a voucher for a body whose
    maximum is above what is left (charged + that maximum) is above its balance."""
    proxy = batch_proxy
    key = proxy.wallets.payer_key
    entry = batch_entry(proxy)
    maximum, minimum = int(entry["amount"]), int(entry["extra"]["minDeposit"])
    config = honest_config(entry, key)
    channel = compute_channel_id(config, entry["network"])
    opened = requests.post(
        proxy.url + CHAT,
        json=BODY,
        headers={"PAYMENT-SIGNATURE": deposit_header(entry, config, key, minimum, maximum)},
    )
    charged = price_of(proxy, opened)
    assert settled_of(opened)["extra"]["channelState"]["balance"] == str(minimum)
    before = redis_snapshot(store)
    big_body = {**BODY, "max_tokens": 4096}
    big = batch_entry(proxy, big_body)
    assert charged + int(big["amount"]) > minimum  # the precondition: this call does not fit

    response = requests.post(
        proxy.url + CHAT,
        json=big_body,
        headers=voucher_header(big, config, charged + int(big["amount"]), key),
        timeout=30,
    )

    assert error_of(response) == EXCEEDS_BALANCE
    assert redis_snapshot(store) == before
    assert stored(proxy, store, channel)["charged"] == str(charged)
    assert len(standin.received) == 1
    # the official client, resynchronised, tops the channel up and pays the big call
    session, _scheme = batch_session(proxy)
    topped = session.post(proxy.url + CHAT, json=big_body, timeout=CLIENT_TIMEOUT)
    settled = settled_of(topped)
    assert TX_HASH_RE.fullmatch(settled["transaction"]), settled  # the top-up deposit
    assert settled["extra"]["channelState"]["chargedCumulativeAmount"] == str(
        charged + price_of(proxy, topped)
    )


def test_a_permit2_deposit_built_by_the_official_helper_is_accepted(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis
) -> None:
    """The server takes a Permit2 deposit although its 402 does not name ``assetTransferMethod``; the
    payload is the official client's own (``create_batch_settlement_permit2_deposit_payload``)."""
    proxy = batch_proxy
    key = proxy.wallets.payer_key
    approve_permit2(proxy.chain, proxy.wallets.payer)
    entry = batch_entry(proxy)
    maximum = int(entry["amount"])
    config = honest_config(entry, key)
    channel = compute_channel_id(config, entry["network"])
    payload = create_batch_settlement_permit2_deposit_payload(
        EthAccountSigner(Account.from_key(key)), requirements_of(entry), config, 10 * maximum, maximum
    )
    payer_before, _ = proxy.balances()

    response = requests.post(
        proxy.url + CHAT,
        json=BODY,
        headers={
            "PAYMENT-SIGNATURE": encode({"x402Version": 2, "accepted": entry, "payload": payload.to_dict()})
        },
        timeout=CLIENT_TIMEOUT,
    )

    settled = settled_of(response)
    assert TX_HASH_RE.fullmatch(settled["transaction"]), settled
    price = price_of(proxy, response)
    assert settled["extra"]["channelState"]["chargedCumulativeAmount"] == str(price)
    assert channel_on_chain(proxy, channel) == (10 * maximum, 0)
    assert payer_before - proxy.balances()[0] == 10 * maximum
    assert stored(proxy, store, channel)["charged"] == str(price)


def test_a_deposit_below_the_offered_minimum_is_refused_before_any_transaction(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis
) -> None:
    """Our relayer pays each deposit's gas: a deposit below ``extra.minDeposit`` is never sent."""
    proxy = batch_proxy
    key = proxy.wallets.payer_key
    entry = batch_entry(proxy)
    maximum, minimum = int(entry["amount"]), int(entry["extra"]["minDeposit"])
    config = honest_config(entry, key, salt="0x" + os.urandom(32).hex())
    relayer_nonce = proxy.chain.rpc.call("eth_getTransactionCount", [proxy.wallets.relayer, "latest"])
    before = proxy.balances()

    response = requests.post(
        proxy.url + CHAT,
        json=BODY,
        headers={"PAYMENT-SIGNATURE": deposit_header(entry, config, key, minimum - 1, maximum)},
        timeout=30,
    )

    assert error_of(response) == "invalid_batch_settlement_evm_deposit_below_min_deposit"
    assert proxy.balances() == before
    assert proxy.chain.rpc.call("eth_getTransactionCount", [proxy.wallets.relayer, "latest"]) == relayer_nonce
    assert stored(proxy, store, compute_channel_id(config, entry["network"])) == {}
    assert len(standin.received) == 0


def test_a_voucher_of_2_to_the_53_or_more_is_refused_before_redis(
    batch_proxy: Proxy, standin: StandinModel, store: redis.Redis
) -> None:
    """Channel amounts go through Lua numbers (doubles, exact below 2**53): a voucher at 2**53 is
    refused before any script runs, and nothing is written."""
    proxy = batch_proxy
    key = proxy.wallets.payer_key
    entry = batch_entry(proxy)
    config = honest_config(entry, key, salt="0x" + os.urandom(32).hex())
    before = redis_snapshot(store)

    response = requests.post(
        proxy.url + CHAT, json=BODY, headers=voucher_header(entry, config, 2**53, key), timeout=30
    )

    assert error_of(response) == "invalid_batch_settlement_evm_voucher_payload"
    assert redis_snapshot(store) == before
    assert len(standin.received) == 0
