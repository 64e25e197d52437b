"""``batch-settlement`` charges reach the chain and payTo (``app.payments.claims``): voucher-paid calls
by the official PyPI client (``batch_session``) on real anvil and redis-server, then one
``claimWithSignature`` for every channel, ``settle`` to payTo, the withdraw race, the schedule and the
deployment-wide lock, and the ``x402-proxy channels`` commands.

Amounts are atomic USDC units (6 decimals), times unix seconds; gas in units of gas.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from eth_abi import encode
from eth_account import Account
from eth_hash.auto import keccak
from x402.mechanisms.evm.batch_settlement.client.eip3009 import (
    create_batch_settlement_eip3009_deposit_payload,
)
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as OfficialConfig
from x402.mechanisms.evm.batch_settlement.types import VoucherPayload
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequirements

from app.backends.escrow import CONFIG_TUPLE, channel_reads, config_tuple, receivers_read, words
from app.backends.token import selector
from app.cli import main
from app.devnet import PROJECT_ROOT, DevChain, Service, free_port
from app.devnet.standin import StandinModel
from app.payments.channels import ChainView
from app.payments.claims import MAX_CLAIMS_PER_BATCH, ClaimLoop, config_of
from app.payments.keys import CLAIMS_KEY
from app.settings import Settings, SettingsError
from app.x402.batch_settlement import BATCH_SETTLEMENT_ADDRESS, ChannelConfig, channel_id, voucher_digest
from app.x402.eip712 import sign_digest
from tests.interop.paid import CLIENT_TIMEOUT, decode_settlement
from tests.interop.test_batch_clients import BODY, batch_entry, batch_session, error_of
from tests.support import USDC, Proxy, proxy_with, send_signed

pytestmark = pytest.mark.integration

ESCROW = BATCH_SETTLEMENT_ADDRESS
CHAIN_ID = 8453
CLAIMED_TOPIC = "0x" + keccak(b"Claimed(bytes32,address,address,uint128,uint128)").hex()


# --- helpers -------------------------------------------------------------------------------------------


def paid_calls(proxy: Proxy, key: str, calls: int) -> tuple[bytes, int]:
    """``calls`` voucher-paid calls (the first deposits) by the official client as ``key``; returns
    the channel id and what it was charged in all."""
    session, _scheme = batch_session(proxy, key)
    state: dict[str, Any] = {}
    for _ in range(calls):
        response = session.post(proxy.url + "/v1/chat/completions", json=BODY, timeout=CLIENT_TIMEOUT)
        assert response.status_code == 200, response.text
        state = decode_settlement(response.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]
    return bytes.fromhex(state["channelId"][2:]), int(state["chargedCumulativeAmount"])


def second_payer(chain: DevChain, usdc: int = 10 * USDC) -> str:
    """A new payer key holding ``usdc`` of the test token and 1 ETH (for its own transactions)."""
    key = "0x" + os.urandom(32).hex()
    address = Account.from_key(key).address
    chain.mint(address, usdc)
    chain.set_eth(address, 10**18)
    return key


def on_chain(proxy: Proxy, channel: bytes) -> tuple[int, int, int]:
    """``channels(id)`` and ``pendingWithdrawals(id)``: (balance, totalClaimed, withdrawal amount)."""
    answers = proxy.chain.rpc.batch(channel_reads(channel))
    balances, pending = words(answers[0], 2), words(answers[1], 2)
    assert balances is not None and pending is not None
    return balances[0], balances[1], pending[0]


def receivers(proxy: Proxy) -> tuple[int, int]:
    """``receivers(payTo, token)``: (totalClaimed, totalSettled)."""
    (answer,) = proxy.chain.rpc.batch([receivers_read(proxy.settings.pay_to, proxy.settings.asset)])
    totals = words(answer, 2)
    assert totals is not None
    return totals[0], totals[1]


def send_from(chain: DevChain, key: str, to: str, data: bytes) -> dict[str, Any]:
    """Sign ``data`` to ``to`` with ``key`` and wait for the receipt, which must be a success."""
    receipt = send_signed(chain, key, to, data, 1_000_000)
    assert receipt["status"] == "0x1", receipt
    return receipt


def stored_config(loop: ClaimLoop, channel: bytes) -> ChannelConfig:
    (stored,) = [c for c in loop.claims.channels.every() if c.channel_id == channel]
    return config_of(stored)


def claimed_order(proxy: Proxy, tx_hash: str) -> list[bytes]:
    """The channel ids of the escrow's ``Claimed`` logs in a receipt, in order."""
    receipt = proxy.chain.rpc.call("eth_getTransactionReceipt", [tx_hash])
    return [
        bytes.fromhex(log["topics"][1][2:])
        for log in receipt["logs"]
        if log["address"].lower() == ESCROW.lower() and log["topics"][0] == CLAIMED_TOPIC
    ]


@pytest.fixture
def batch_proxy(upto_proxy: Proxy) -> Iterator[Proxy]:
    """The proxy with a catalog floor of 1 atomic unit (a usage price below the maximum)."""
    yield upto_proxy


@pytest.fixture
def loop(batch_proxy: Proxy) -> Iterator[ClaimLoop]:
    """The claims of ``batch_proxy`` (same settings, Redis, chain and relayer), built as the CLI does."""
    made = ClaimLoop.for_settings(batch_proxy.settings)
    yield made
    made.stop()


# --- claim and settle ----------------------------------------------------------------------------------


def test_one_claim_for_every_channel_then_settle_moves_exactly_that_to_pay_to(
    batch_proxy: Proxy, loop: ClaimLoop, standin: StandinModel
) -> None:
    proxy = batch_proxy
    first, charged_first = paid_calls(proxy, proxy.wallets.payer_key, 3)
    second, charged_second = paid_calls(proxy, second_payer(proxy.chain), 2)
    total = charged_first + charged_second
    assert on_chain(proxy, first)[1] == on_chain(proxy, second)[1] == 0
    before = receivers(proxy)

    cycle = loop.run(settle=False, force=True)
    assert cycle.status == "ran" and cycle.claimed is not None and not cycle.failed
    (tx,) = cycle.claimed.transactions  # one transaction for both channels
    assert (tx.outcome, tx.channels, tx.amount) == ("settled", 2, total) and tx.gas_used > 0
    assert (cycle.claimed.channels, cycle.claimed.amount) == (2, total)
    assert on_chain(proxy, first)[1] == charged_first and on_chain(proxy, second)[1] == charged_second
    assert receivers(proxy) == (before[0] + total, before[1])
    stored = {c.channel_id: c for c in loop.claims.channels.every()}
    assert stored[first].claimed == charged_first and stored[second].claimed == charged_second

    again = loop.run(settle=False, force=True)  # nothing new: nothing sent
    assert again.claimed is not None and again.claimed.transactions == () and again.claimed.amount == 0

    payee = proxy.chain.balance(proxy.settings.pay_to)
    settled = loop.run(claim=False, force=True).settled
    assert settled is not None and settled.transaction is not None
    assert settled.transaction.outcome == "settled" and settled.amount == total
    assert proxy.chain.balance(proxy.settings.pay_to) - payee == total
    assert receivers(proxy) == (before[0] + total, before[1] + total)
    nothing = loop.run(claim=False, force=True).settled
    assert nothing is not None and nothing.transaction is None and nothing.amount == 0
    assert proxy.chain.balance(proxy.settings.pay_to) - payee == total

    # more calls on a claimed channel: the next claim takes only the new charges
    _, charged_later = paid_calls(proxy, proxy.wallets.payer_key, 1)
    later = loop.run(settle=False, force=True).claimed
    assert later is not None and (later.channels, later.amount) == (1, charged_later - charged_first)


def test_a_withdrawing_payer_is_claimed_first_and_leaves_with_balance_minus_charged(
    batch_proxy: Proxy, loop: ClaimLoop, chain: DevChain, standin: StandinModel, time_travel: None
) -> None:
    proxy = batch_proxy
    staying, _ = paid_calls(proxy, proxy.wallets.payer_key, 2)
    payer_key = second_payer(chain)
    leaving, charged = paid_calls(proxy, payer_key, 2)
    balance, claimed, _ = on_chain(proxy, leaving)
    assert claimed == 0 and balance > charged
    config = stored_config(loop, leaving)
    initiate = selector(f"initiateWithdraw({CONFIG_TUPLE},uint128)") + encode(
        [CONFIG_TUPLE, "uint128"], [config_tuple(config), balance]
    )
    send_from(chain, payer_key, ESCROW, initiate)  # all of it, unilaterally
    assert on_chain(proxy, leaving)[2] == balance

    cycle = loop.run(settle=False, force=True)
    assert cycle.claimed is not None and cycle.claimed.channels == 2
    (tx,) = cycle.claimed.transactions
    assert claimed_order(proxy, tx.tx_hash) == [leaving, staying]  # the withdrawing channel first
    assert on_chain(proxy, leaving)[1] == charged
    (stored,) = [c for c in loop.claims.channels.every() if c.channel_id == leaving]
    assert stored.withdraw_at > 0 and stored.claimed == charged  # the chain's view, recorded

    payer = Account.from_key(payer_key).address
    before = chain.balance(payer)
    chain.rpc.call("evm_increaseTime", [proxy.settings.withdraw_delay + 1])
    chain.rpc.call("evm_mine", [])
    finalize = selector(f"finalizeWithdraw({CONFIG_TUPLE})") + encode([CONFIG_TUPLE], [config_tuple(config)])
    send_from(chain, payer_key, ESCROW, finalize)
    assert chain.balance(payer) - before == balance - charged  # what we charged stays claimed
    assert on_chain(proxy, leaving)[:2] == (charged, charged)


def test_the_loop_claims_and_settles_on_its_own(batch_proxy: Proxy, standin: StandinModel) -> None:
    proxy = batch_proxy
    settings = proxy.settings.with_overrides(claim_interval=1, settle_interval=1)
    loop = ClaimLoop.for_settings(settings)
    _, charged = paid_calls(proxy, proxy.wallets.payer_key, 2)
    payee = proxy.chain.balance(settings.pay_to)
    loop.ensure_running()
    loop.ensure_running()  # once per process
    try:
        deadline = time.monotonic() + 30
        while proxy.chain.balance(settings.pay_to) - payee < charged:
            assert time.monotonic() < deadline, f"not claimed and settled: {loop.last} {loop.last_error}"
            time.sleep(0.2)
    finally:
        loop.stop()
    assert proxy.chain.balance(settings.pay_to) - payee == charged
    threads = [t for t in threading.enumerate() if t.name == "x402-claims" and t.is_alive()]
    assert len(threads) <= 1


def test_two_proxies_never_claim_in_the_same_cycle(
    batch_proxy: Proxy, loop: ClaimLoop, standin: StandinModel
) -> None:
    proxy = batch_proxy
    other_proxy = next(proxy_with(proxy, claim_interval=60))  # a second app on the same Redis
    other = ClaimLoop.for_settings(other_proxy.settings)
    paid_calls(proxy, proxy.wallets.payer_key, 2)
    paid_calls(proxy, second_payer(proxy.chain), 1)

    # a new deployment's first claim is one interval away, not at once
    assert other.run(settle=False).status == "waiting"
    assert loop.state()["claim_at"] > time.time() * 1000 + 30_000
    # both due at once (the interval passed), in two threads: one cycle runs, the other finds it
    # busy or already done
    loop.redis.set(CLAIMS_KEY, json.dumps({"claim_at": 0, "settle_at": 0}))
    start = threading.Barrier(2)
    cycles: list[Any] = []

    def run(which: ClaimLoop) -> None:
        start.wait()
        cycles.append(which.run(settle=False))

    threads = [threading.Thread(target=run, args=(which,)) for which in (loop, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(c.status for c in cycles) in (["busy", "ran"], ["ran", "waiting"])
    (ran,) = [c for c in cycles if c.status == "ran"]
    assert ran.claimed is not None and len(ran.claimed.transactions) == 1 and ran.claimed.channels == 2
    assert loop.state()["claim_at"] > time.time() * 1000  # the deployment's next claim is scheduled
    assert other.run(settle=False).status == "waiting"

    # while one process holds the lock, the other does not start, even forced
    paid_calls(proxy, proxy.wallets.payer_key, 1)
    inside = threading.Event()
    go_on = threading.Event()
    real_claim = loop.claims.claim

    def slow_claim(record: Any = None) -> Any:
        inside.set()
        go_on.wait(20)
        return real_claim(record)

    loop.claims.claim = slow_claim  # type: ignore[method-assign]
    holder = threading.Thread(target=lambda: cycles.append(loop.run(settle=False, force=True)))
    holder.start()
    assert inside.wait(20)
    busy = other.run(force=True)
    assert busy.status == "busy" and busy.owner == loop.owner
    go_on.set()
    holder.join(30)
    assert cycles[-1].status == "ran" and cycles[-1].claimed.channels == 1
    assert loop.state()["owner"] == ""
    other_proxy.server.shutdown()  # type: ignore[union-attr]


def test_a_pending_claim_is_not_sent_again(
    batch_proxy: Proxy, chain: DevChain, standin: StandinModel
) -> None:
    """anvil stops mining: the claim has no receipt within the receipt timeout. Its relayer nonce is
    recorded and the next cycles send nothing while it is undecided; once mined, nothing is left."""
    proxy = batch_proxy
    settings = proxy.settings.with_overrides(receipt_timeout=1.0, fee_bump_after=60.0)
    loop = ClaimLoop.for_settings(settings)
    channel, charged = paid_calls(proxy, proxy.wallets.payer_key, 2)
    relayer = proxy.wallets.relayer
    chain.rpc.call("evm_setAutomine", [False])
    try:
        cycle = loop.run(settle=False, force=True)
        assert cycle.claimed is not None and cycle.failed
        (tx,) = cycle.claimed.transactions
        assert tx.outcome == "pending"
        pending = loop.state()["pending"]
        assert pending["relayer"] == relayer and tx.tx_hash in pending["hashes"]
        sent = chain.rpc.call("eth_getTransactionCount", [relayer, "pending"])
        waiting = loop.run(settle=False, force=True).claimed
        assert waiting is not None and waiting.transactions == () and tx.tx_hash in waiting.waiting
        assert chain.rpc.call("eth_getTransactionCount", [relayer, "pending"]) == sent  # nothing new
    finally:
        chain.rpc.call("evm_setAutomine", [True])
        chain.rpc.call("evm_mine", [])
    after = loop.run(settle=False, force=True).claimed
    assert after is not None and after.transactions == () and not after.waiting
    assert on_chain(proxy, channel)[1] == charged and loop.state()["pending"] is None


def test_a_voucher_below_the_charges_is_skipped_not_claimed(
    batch_proxy: Proxy, loop: ClaimLoop, standin: StandinModel
) -> None:
    proxy = batch_proxy
    bad, _ = paid_calls(proxy, proxy.wallets.payer_key, 1)
    good, charged = paid_calls(proxy, second_payer(proxy.chain), 1)
    key = loop.claims.channels.key(bad)
    loop.redis.hset(key, "signature", "")  # a channel whose voucher was lost: never claimed blindly
    run = loop.run(settle=False, force=True).claimed
    assert run is not None and run.channels == 1 and run.amount == charged
    assert any(line.startswith("0x" + bad.hex()) and "no voucher signature" in line for line in run.skipped)
    assert on_chain(proxy, bad)[1] == 0 and on_chain(proxy, good)[1] == charged


def test_a_voucher_the_escrow_refuses_does_not_sink_its_batch(
    batch_proxy: Proxy, loop: ClaimLoop, standin: StandinModel
) -> None:
    """A stored voucher signed by another key (well formed, refused by the escrow): the batch's
    simulation fails, it is split until that channel is found, and the others are claimed."""
    proxy = batch_proxy
    bad, _ = paid_calls(proxy, proxy.wallets.payer_key, 1)
    good = [paid_calls(proxy, second_payer(proxy.chain), 1) for _ in range(2)]
    (stored,) = [c for c in loop.claims.channels.every() if c.channel_id == bad]
    forged = sign_digest(os.urandom(32), voucher_digest(bad, stored.signed, CHAIN_ID))
    loop.redis.hset(loop.claims.channels.key(bad), "signature", "0x" + forged.hex())
    run = loop.run(settle=False, force=True).claimed
    assert run is not None and not run.failed
    assert run.channels == 2 and run.amount == sum(charged for _, charged in good)
    assert any(line.startswith("0x" + bad.hex()) and "simulation" in line for line in run.skipped)
    assert on_chain(proxy, bad)[1] == 0
    assert all(on_chain(proxy, channel)[1] == charged for channel, charged in good)
    # the channel whose vouchers cannot be claimed takes no more calls
    assert loop.redis.hget(loop.claims.channels.key(bad), "closed")
    held = loop.claims.channels.hold(bad, "next", int(time.time()) + 60, 1, stored.charged + 1, b"")
    assert held.status == "closed"


# --- settings ------------------------------------------------------------------------------------------


def test_the_claim_interval_must_be_below_a_quarter_of_the_withdraw_delay() -> None:
    env = {
        "X402_PAY_TO": "0x" + "11" * 20,
        "X402_RELAYER_KEY": "0x" + "22" * 32,
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "X402_WITHDRAW_DELAY": "900",
    }
    assert Settings.from_env(env={}, overrides={**env, "X402_CLAIM_INTERVAL": "224"}).claim_interval == 224
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(env={}, overrides={**env, "X402_CLAIM_INTERVAL": "225"})
    assert refused.value.variable == "X402_CLAIM_INTERVAL" and "quarter" in str(refused.value)
    unoffered = {**env, "X402_CLAIM_INTERVAL": "225", "X402_SCHEMES": "exact,upto"}
    assert Settings.from_env(env={}, overrides=unoffered).claim_interval == 225


# --- the command line ----------------------------------------------------------------------------------


def test_channels_list_claim_settle_commands(
    batch_proxy: Proxy,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    standin: StandinModel,
) -> None:
    proxy = batch_proxy
    first, charged_first = paid_calls(proxy, proxy.wallets.payer_key, 2)
    second, charged_second = paid_calls(proxy, second_payer(proxy.chain), 1)
    total = charged_first + charged_second

    def usdc(amount: int) -> str:
        return f"{amount / USDC:.6f} USDC"

    assert main(["channels", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    row = next(line for line in lines if line.startswith("0x" + first.hex()))
    payer = Account.from_key(proxy.wallets.payer_key).address.lower()
    assert f"payer {payer}" in row and f"charged {usdc(charged_first)}" in row
    assert f"claimed {usdc(0)}" in row and f"unclaimed {usdc(charged_first)}" in row
    assert "balance " in row and "no withdrawal" in row
    (stored,) = [
        c for c in ClaimLoop.for_settings(proxy.settings).claims.channels.every() if c.channel_id == first
    ]
    assert f"refundable {usdc(stored.balance - charged_first)}" in row
    assert lines[-1].startswith(f"total: 2 channels, charged {usdc(total)}, claimed {usdc(0)}")

    assert main(["channels", "claim"]) == 0
    out = capsys.readouterr().out
    (tx_line,) = [line for line in out.splitlines() if line.startswith("claim settled: 0x")]
    assert f"2 channels, {usdc(total)}" in tx_line and "gas " in tx_line
    assert out.splitlines()[-1].startswith(f"total: claimed 2 channels, {usdc(total)}, gas ")
    assert on_chain(proxy, second)[1] == charged_second

    assert main(["channels", "list"]) == 0
    assert f"claimed {usdc(total)}, unclaimed {usdc(0)}" in capsys.readouterr().out.splitlines()[-1]

    assert main(["channels", "claim"]) == 0
    assert "nothing to claim" in capsys.readouterr().out

    payee = proxy.chain.balance(proxy.settings.pay_to)
    assert main(["channels", "settle"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"settled {usdc(total)} to payTo: 0x") and "gas " in out
    assert proxy.chain.balance(proxy.settings.pay_to) - payee == total
    assert main(["channels", "settle"]) == 0
    assert capsys.readouterr().out == "nothing to settle\n"


def test_channels_commands_exit_codes(
    batch_proxy: Proxy,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    chain: DevChain,
    redis_service: Service,
    standin: StandinModel,
) -> None:
    proxy = batch_proxy
    paid_calls(proxy, proxy.wallets.payer_key, 1)

    # another process holds the claims lock: 1
    proxy_redis = ClaimLoop.for_settings(proxy.settings).redis
    proxy_redis.set(CLAIMS_KEY, '{"owner": "elsewhere:1"}', px=60_000)
    assert main(["channels", "claim"]) == 1
    assert "another process is running a claim cycle (elsewhere:1)" in capsys.readouterr().err
    proxy_redis.delete(CLAIMS_KEY)

    # no RPC answers: 3, nothing sent
    monkeypatch.setenv("X402_RPC_URLS", f"http://127.0.0.1:{free_port()}")
    assert main(["channels", "claim"]) == 3
    assert capsys.readouterr().err.startswith("x402-proxy channels claim: RPC: ")
    assert main(["channels", "settle"]) == 3
    monkeypatch.setenv("X402_RPC_URLS", cli_env["X402_RPC_URLS"])

    # the relayer cannot pay for gas: the claim is not sent, 1
    chain.set_eth(proxy.wallets.relayer, 0)
    try:
        assert main(["channels", "claim"]) == 1
        captured = capsys.readouterr()
        assert "claim not_sent" in captured.out and "did not land" in captured.err
    finally:
        chain.set_eth(proxy.wallets.relayer, 10**20)
    assert main(["channels", "claim"]) == 0  # and the same charges land afterwards
    assert "claim settled: 0x" in capsys.readouterr().out

    # Redis does not answer: 3; bad settings: 2
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["channels", "list"]) == 3
    assert capsys.readouterr().err.startswith("x402-proxy channels list: Redis: ")
    monkeypatch.setenv("REDIS_URL", redis_service.url)
    monkeypatch.setenv("X402_CLAIM_INTERVAL", "100000")
    assert main(["channels", "claim"]) == 2
    assert "X402_CLAIM_INTERVAL" in capsys.readouterr().err


# --- gas per channel -----------------------------------------------------------------------------------


def seeded_channels(proxy: Proxy, loop: ClaimLoop, count: int, charge: int = 1_000) -> list[bytes]:
    """``count`` channels of one fresh payer to ``proxy``, funded in one multicall of ERC-3009 deposits
    (the official client's payloads) and each charged ``charge`` in Redis through the hot path's own
    ``hold`` and ``commit`` with the payer's voucher."""
    from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as OfficialConfig

    from tests.integration.test_batch_settlement_contracts import (
        TX_GAS,
        Key,
        Parties,
        deposit_data,
        eip3009_deposit,
        escrow_data,
        new_key,
        sent_ok,
    )

    chain = proxy.chain
    payer = new_key(chain)
    relayer = new_key(chain)
    parties = Parties(payer, Key("0x" + "00" * 31 + "01"), Key("0x" + "00" * 31 + "02"), relayer, relayer)
    deposit = 10 * charge
    chain.mint(payer.address, count * deposit)
    configs = [
        OfficialConfig(
            payer=payer.address,
            payer_authorizer=payer.address,
            receiver=proxy.settings.pay_to,
            receiver_authorizer=loop.claims.authorizer,
            token=proxy.settings.asset,
            withdraw_delay=proxy.settings.withdraw_delay,
            salt="0x" + os.urandom(32).hex(),
        )
        for _ in range(count)
    ]
    deposits = [deposit_data(eip3009_deposit(parties, config, deposit)) for config in configs]
    sent_ok(chain, relayer, ESCROW, escrow_data("multicall", deposits), gas=TX_GAS)
    made: list[bytes] = []
    channels = loop.claims.channels
    for official in configs:
        ours = ChannelConfig(
            payer=official.payer.lower(),
            payer_authorizer=official.payer_authorizer.lower(),
            receiver=official.receiver.lower(),
            receiver_authorizer=official.receiver_authorizer.lower(),
            token=official.token.lower(),
            withdraw_delay=official.withdraw_delay,
            salt=bytes.fromhex(official.salt[2:]),
        )
        channel = channel_id(ours, CHAIN_ID)
        signature = sign_digest(bytes.fromhex(payer.key[2:]), voucher_digest(channel, charge, CHAIN_ID))
        hold = secrets.token_hex(8)
        until = int(time.time()) + 60
        state = channels.hold(
            channel, hold, until, charge, charge, signature, rebuild=(ours, ChainView(deposit, 0))
        )
        assert state.status == "held", state
        committed = channels.commit(channel, hold, charge, charge, "hermes-3-8b-tee", ours.payer)
        assert committed.status == "committed"
        made.append(channel)
    return made


def test_gas_per_channel_of_a_claim_batch(batch_proxy: Proxy, loop: ClaimLoop, time_travel: None) -> None:
    """One claim transaction for 1, 10 and 100 fresh channels (the batch limit); prints the gas. In
    an anvil snapshot (``time_travel``): its 111 channels do not stay on the session's chain."""
    gas: dict[int, int] = {}
    for count in (1, 10, MAX_CLAIMS_PER_BATCH):
        made = seeded_channels(batch_proxy, loop, count)
        run = loop.run(settle=False, force=True).claimed
        assert run is not None and not run.failed
        (tx,) = run.transactions
        assert tx.channels == count and tx.amount == count * 1_000
        assert all(on_chain(batch_proxy, channel)[1] == 1_000 for channel in made[:3])
        gas[count] = tx.gas_used
    per_channel = {count: used // count for count, used in gas.items()}
    print(f"claim gas used: {gas}; per channel: {per_channel}")
    assert gas[1] < 120_000 and per_channel[MAX_CLAIMS_PER_BATCH] < 40_000


class _WalletSigner:
    """Signs for a wallet contract (``ERC1271Wallet``): its address, its owner's signatures (the
    wallet's ``isValidSignature`` accepts the owner's ECDSA over the digest)."""

    def __init__(self, wallet: str, owner: Any) -> None:
        self.address = wallet
        self._owner = EthAccountSigner(owner)

    def sign_typed_data(self, *args: Any, **kwargs: Any) -> bytes:
        return self._owner.sign_typed_data(*args, **kwargs)


# A wallet runtime whose EIP-1271 answer is the magic value only when tx.gasprice is 0: what an
# eth_call or eth_estimateGas sees, never a real transaction (GASPRICE ISZERO … MSTORE RETURN).
GAS_PRICE_WALLET = "0x3a15600957600080fd5b631626ba7e60e01b60005260206000f3"


def test_a_wallet_payer_whose_claim_reverts_on_chain_is_claimed_apart_and_closed(
    batch_proxy: Proxy, loop: ClaimLoop, chain: DevChain, standin: StandinModel
) -> None:
    """A payer that signs its own vouchers through a wallet contract (payerAuthorizer zero) whose
    EIP-1271 answer passes every simulation and fails the real claim: it is claimed in a
    transaction of its own, so the other channels' batch lands; its channel is closed."""
    proxy = batch_proxy
    honest, honest_charged = paid_calls(proxy, proxy.wallets.payer_key, 1)
    owner, wallet = Account.create(), Account.create().address
    artifact = json.loads((PROJECT_ROOT / "contracts" / "ERC1271Wallet.json").read_text())
    chain.rpc.call("anvil_setCode", [wallet, artifact["deployedBytecode"]])
    chain.transact(wallet, selector("setOwner(address)") + encode(["address"], [owner.address]))
    chain.mint(wallet, 10 * USDC)
    entry = batch_entry(proxy)
    maximum = int(entry["amount"])
    config = OfficialConfig(
        payer=wallet,
        payer_authorizer="0x" + "00" * 20,
        receiver=entry["payTo"],
        receiver_authorizer=entry["extra"]["receiverAuthorizer"],
        token=entry["asset"],
        withdraw_delay=int(entry["extra"]["withdrawDelay"]),
        salt="0x" + os.urandom(32).hex(),
    )
    signer = _WalletSigner(wallet, owner)
    deposit = create_batch_settlement_eip3009_deposit_payload(
        signer, PaymentRequirements.model_validate(entry), config, 10 * maximum, maximum
    )
    header = {"x402Version": 2, "accepted": entry, "payload": deposit.to_dict()}
    served = requests.post(
        proxy.url + "/v1/chat/completions",
        json=BODY,
        headers={"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(header).encode()).decode()},
        timeout=CLIENT_TIMEOUT,
    )
    assert served.status_code == 200, served.text  # the wallet's EIP-1271 answer holds today
    state = decode_settlement(served.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]
    channel = bytes.fromhex(state["channelId"][2:])
    chain.rpc.call("anvil_setCode", [wallet, GAS_PRICE_WALLET])  # an upgraded wallet

    run = loop.run(settle=False, force=True).claimed
    assert run is not None
    assert on_chain(proxy, honest)[1] == honest_charged  # its batch was not sunk
    assert on_chain(proxy, channel)[1] == 0
    assert [tx.outcome for tx in run.transactions].count("failed") == 1  # the wallet's own claim
    assert any("reverted on chain" in line for line in run.skipped)
    assert loop.redis.hget(loop.claims.channels.key(channel), "closed")
    again = loop.run(settle=False, force=True).claimed
    assert again is not None and again.transactions == ()  # a closed channel burns no more gas
    refused = requests.post(
        proxy.url + "/v1/chat/completions",
        json=BODY,
        headers=voucher_for(entry, config, signer, maximum),
        timeout=30,
    )
    assert error_of(refused) == "invalid_batch_settlement_evm_channel_closed"


def voucher_for(entry: dict[str, Any], config: Any, signer: Any, charged_before: int) -> dict[str, str]:
    """A voucher payload on ``config``'s channel for one more call after ``charged_before``."""
    payload = VoucherPayload()
    payload.channel_config = config
    channel = compute_channel_id(config, entry["network"])
    payload.voucher = sign_voucher(signer, channel, charged_before + int(entry["amount"]), entry["network"])
    wire = {"x402Version": 2, "accepted": entry, "payload": payload.to_dict()}
    return {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(wire).encode()).decode()}
