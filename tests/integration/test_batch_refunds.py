"""Leaving a ``batch-settlement`` channel: the cooperative refund the official client asks for, and a
payer's own withdrawal, which stops the proxy from honouring vouchers on that channel.

Real anvil with our escrow at its canonical address, real redis-server, the stand-in host, and
PyPI ``x402`` 2.25's ``BatchSettlementEvmScheme`` (``refund`` probes a GET resource: the paid ping).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis
import requests
from eth_abi import encode
from eth_account import Account
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as OfficialConfig

from app.backends.escrow import config_tuple
from app.backends.token import selector
from app.cli import main
from app.payments.claims import ClaimLoop
from app.payments.keys import channel_key
from app.x402.batch_settlement import BATCH_SETTLEMENT_ADDRESS, ChannelConfig
from app.x402.codec import decode_header
from tests.integration.test_batch_books import metric
from tests.interop.paid import CLIENT_TIMEOUT, decode_settlement
from tests.interop.test_batch_clients import (
    BODY,
    batch_entry,
    batch_session,
    channel_on_chain,
    error_of,
    voucher_header,
)
from tests.support import Proxy, send_signed, usage_price

pytestmark = pytest.mark.integration

PING = "/v1/models/hermes-3-8b-tee/ping"


def paid_calls(proxy: Proxy, count: int) -> tuple[Any, Any, int, str]:
    """``count`` voucher-paid calls from a fresh official client: (session, scheme, charged, channel)."""
    session, scheme = batch_session(proxy)
    charged, channel = 0, ""
    for _ in range(count):
        response = session.post(proxy.url + "/v1/chat/completions", json=BODY, timeout=CLIENT_TIMEOUT)
        assert response.status_code == 200, response.text
        charged += usage_price(proxy, response.json()["usage"])
        channel = decode_settlement(response.headers["PAYMENT-RESPONSE"])["extra"]["channelState"][
            "channelId"
        ]
    return session, scheme, charged, channel


def test_the_official_client_gets_its_unused_balance_back(upto_proxy: Proxy) -> None:
    proxy = upto_proxy
    _session, scheme, charged, channel = paid_calls(proxy, 2)
    balance, _ = channel_on_chain(proxy, channel)
    payer_before, payee_before = proxy.balances()
    before = requests.get(proxy.url + "/metrics", timeout=10).text

    settled = scheme.refund(proxy.url + PING)

    assert settled.success, settled
    assert int(settled.amount) == balance - charged
    payer_after, payee_after = proxy.balances()
    assert payer_after - payer_before == balance - charged  # the rest came back to the wallet
    assert payee_after == payee_before  # the charges were claimed into the escrow, not swept yet
    after_balance, claimed = channel_on_chain(proxy, channel)
    assert claimed == charged  # what the calls were charged was claimed in the same transaction
    assert after_balance == charged
    receipt = proxy.chain.rpc.call("eth_getTransactionReceipt", [settled.transaction])
    assert receipt["to"].lower() == BATCH_SETTLEMENT_ADDRESS.lower() and receipt["status"] == "0x1"
    after = requests.get(proxy.url + "/metrics", timeout=10).text
    for name, moved in (
        ("x402_refunded_atomic_total", balance - charged),
        ("x402_claimed_atomic_total", charged),
    ):
        assert metric(after, name) - metric(before, name) == moved, name


def test_a_refund_of_more_than_is_left_is_refused_and_changes_nothing(upto_proxy: Proxy) -> None:
    from x402.mechanisms.evm.batch_settlement.client.refund import RefundOptions

    proxy = upto_proxy
    _session, scheme, charged, channel = paid_calls(proxy, 1)
    balance, _ = channel_on_chain(proxy, channel)
    before = proxy.balances()
    with pytest.raises(RuntimeError, match="refund_no_balance"):
        scheme.refund(proxy.url + PING, RefundOptions(amount=str(balance - charged + 1)))
    assert proxy.balances() == before
    assert channel_on_chain(proxy, channel) == (balance, 0)


def _payer_sends(proxy: Proxy, data: bytes) -> dict[str, Any]:
    """A transaction from the demo payer to the escrow (the payer pays its own gas)."""
    proxy.chain.set_eth(Account.from_key(proxy.wallets.payer_key).address, 10**18)
    receipt = send_signed(proxy.chain, proxy.wallets.payer_key, BATCH_SETTLEMENT_ADDRESS, data, 300_000)
    assert receipt["status"] == "0x1", receipt
    return receipt


def test_a_pending_withdrawal_stops_the_channel_s_vouchers(upto_proxy: Proxy) -> None:
    proxy = upto_proxy
    session, _scheme, charged, channel = paid_calls(proxy, 1)
    client = redis.Redis.from_url(proxy.settings.redis_url)
    key = channel_key(8453, bytes.fromhex(channel[2:]))
    stored: dict[str, Any] = json.loads(client.hget(key, "config"))
    config = ChannelConfig(
        payer=stored["payer"].lower(),
        payer_authorizer=stored["payerAuthorizer"].lower(),
        receiver=stored["receiver"].lower(),
        receiver_authorizer=stored["receiverAuthorizer"].lower(),
        token=stored["token"].lower(),
        withdraw_delay=stored["withdrawDelay"],
        salt=bytes.fromhex(stored["salt"][2:]),
    )
    call = selector("initiateWithdraw((address,address,address,address,address,uint40,bytes32),uint128)")
    _payer_sends(
        proxy,
        call
        + encode(
            ["(address,address,address,address,address,uint40,bytes32)", "uint128"], [config_tuple(config), 1]
        ),
    )
    client.hset(key, "synced", 0)  # as if last read more than half a withdraw delay ago

    refused = session.post(proxy.url + "/v1/chat/completions", json=BODY, timeout=CLIENT_TIMEOUT)

    assert refused.status_code == 402, refused.text
    challenge = decode_header(refused.headers["PAYMENT-REQUIRED"])
    assert isinstance(challenge, dict)
    assert challenge["error"] == "invalid_batch_settlement_evm_withdrawal_pending"
    assert int(client.hget(key, "charged")) == charged  # nothing more was charged
    assert int(client.hget(key, "withdraw_at")) > 0
    assert client.hget(key, "hold") is None  # the channel was given back


def test_the_operator_refunds_a_channel_from_the_command_line(
    upto_proxy: Proxy, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``x402-proxy channels refund <id>``: the charges are claimed with the voucher we hold and the
    rest goes back to the payer, in one transaction; a second refund finds nothing left."""
    proxy = upto_proxy
    _session, _scheme, charged, channel = paid_calls(proxy, 2)
    balance, _ = channel_on_chain(proxy, channel)
    payer_before, _ = proxy.balances()

    assert main(["channels", "refund", channel]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"refunded {channel}  {(balance - charged) / 10**6:.6f} USDC  0x")
    assert proxy.balances()[0] - payer_before == balance - charged
    assert channel_on_chain(proxy, channel) == (charged, charged)  # claimed, and nothing else left

    assert main(["channels", "refund", channel]) == 1
    assert "not refunded: the channel has 0 atomic units left to refund" in capsys.readouterr().err
    assert main(["channels", "refund", "0x12"]) == 2


def test_idle_channels_are_refunded_by_the_claim_loop(upto_proxy: Proxy) -> None:
    proxy = upto_proxy
    _session, _scheme, charged, channel = paid_calls(proxy, 1)
    balance, _ = channel_on_chain(proxy, channel)
    loop = ClaimLoop.for_settings(proxy.settings.with_overrides(idle_refund_seconds=3600))
    try:
        busy = loop.run(settle=False, force=True)
        assert busy.refunded == ()  # charged a moment ago: not idle
        key = channel_key(8453, bytes.fromhex(channel[2:]))
        redis.Redis.from_url(proxy.settings.redis_url).hset(key, "updated", int(time.time()) - 3601)
        payer_before, _ = proxy.balances()
        cycle = loop.run(settle=False, force=True)
        (refund,) = cycle.refunded
        assert (refund.channel.hex(), refund.amount) == (channel[2:], balance - charged)
        assert proxy.balances()[0] - payer_before == balance - charged
        assert loop.run(settle=False, force=True).refunded == ()  # nothing left to give back
    finally:
        loop.stop()


def test_a_payer_that_signs_its_own_vouchers_pays_too(upto_proxy: Proxy) -> None:
    """``payerAuthorizer`` zero: the payer itself signs each voucher (ecrecover for an account,
    EIP-1271 for a wallet contract, as SignatureChecker decides on chain); the proxy accepts it,
    and its claim lands with those vouchers."""
    from x402 import x402ClientSync
    from x402.http.clients import wrapRequestsWithPayment
    from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
    from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions
    from x402.mechanisms.evm.signers import EthAccountSignerWithRPC

    proxy = upto_proxy
    signer = EthAccountSignerWithRPC(Account.from_key(proxy.wallets.payer_key), proxy.settings.rpc_urls[0])
    options = BatchSettlementEvmSchemeOptions(payer_authorizer="0x" + "00" * 20)
    client = x402ClientSync()
    client.register("eip155:*", BatchSettlementEvmScheme(signer, options))
    session = wrapRequestsWithPayment(requests.Session(), client)
    charged = 0
    for _ in range(2):
        response = session.post(proxy.url + "/v1/chat/completions", json=BODY, timeout=CLIENT_TIMEOUT)
        assert response.status_code == 200, response.text
        charged += usage_price(proxy, response.json()["usage"])
        state = decode_settlement(response.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]
    assert state["chargedCumulativeAmount"] == str(charged)
    client_redis = redis.Redis.from_url(proxy.settings.redis_url)
    stored = json.loads(client_redis.hget(channel_key(8453, bytes.fromhex(state["channelId"][2:])), "config"))
    assert int(stored["payerAuthorizer"], 16) == 0
    loop = ClaimLoop.for_settings(proxy.settings)
    try:
        assert loop.run(settle=False, force=True).claimed.amount == charged
    finally:
        loop.stop()
    assert channel_on_chain(proxy, state["channelId"])[1] == charged


def test_after_a_refund_the_next_voucher_is_checked_against_the_chain_s_balance(
    upto_proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refund landed but Redis could not record its result: the channel was marked stale before
    the refund was sent, so the next voucher is checked against what the escrow holds now, not the
    balance Redis remembers, and a call the channel can no longer pay is refused."""
    from app.payments.channels import Channels

    proxy = upto_proxy
    _session, scheme, charged, channel = paid_calls(proxy, 1)
    real_sync = Channels.sync
    failures = iter([True])

    def sync_failing_once_after_the_refund(self: Channels, channel_id: bytes, view: Any) -> None:
        if view.balance == charged and next(failures, False):  # the refund's result
            raise redis.ConnectionError("Redis went away")
        real_sync(self, channel_id, view)

    monkeypatch.setattr(Channels, "sync", sync_failing_once_after_the_refund)
    assert scheme.refund(proxy.url + PING).success
    assert channel_on_chain(proxy, channel) == (charged, charged)
    key = channel_key(8453, bytes.fromhex(channel[2:]))
    client = redis.Redis.from_url(proxy.settings.redis_url)
    assert int(client.hget(key, "balance")) > charged  # Redis still remembers the old balance
    # the payer's next voucher, as if nothing had been refunded: charged so far plus one call
    entry = batch_entry(proxy)
    config = OfficialConfig.from_dict(json.loads(client.hget(key, "config")))
    header = voucher_header(entry, config, charged + int(entry["amount"]), proxy.wallets.payer_key)
    refused = requests.post(proxy.url + "/v1/chat/completions", json=BODY, headers=header, timeout=30)
    assert error_of(refused) == "invalid_batch_settlement_evm_cumulative_exceeds_balance"
    assert int(client.hget(key, "charged")) == charged
    assert int(client.hget(key, "balance")) == charged  # the chain's, read again
