"""``batch-settlement`` channels in Redis (``app.payments.channels``): the hold, the charge, the
release and the chain's view, run as the real Lua scripts on fakeredis. Also the receiver
authorizer's digests (``claim_batch_digest``, ``refund_digest``) against PyPI ``x402`` 2.25's own
signers."""

from __future__ import annotations

import os
import time
from typing import Any

import fakeredis
import pytest
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st
from x402.mechanisms.evm.batch_settlement.authorizer_signer import (
    LocalAuthorizerSigner,
    sign_claim_batch,
    sign_refund,
)
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as OfficialConfig
from x402.mechanisms.evm.batch_settlement.types import VoucherClaim as OfficialClaim

from app.backends.escrow import ChainView
from app.payments.channels import BUSY, HELD, MISSING, REFUSED, Channels
from app.payments.keys import LEDGER_STREAM, channel_index_key, channel_key
from app.payments.ledger import Ledger
from app.x402.batch_settlement import ChannelConfig, channel_id, claim_batch_digest, refund_digest
from app.x402.eip712 import recover_signer

CHAIN = 8453
PAYER = "0x" + "ab" * 20
CONFIG = ChannelConfig(PAYER, PAYER, "0x" + "22" * 20, "0x" + "33" * 20, "0x" + "44" * 20, 900, b"\x05" * 32)
CHANNEL = channel_id(CONFIG, CHAIN)
SIG = b"\x01" * 65
NOW = 1_800_000_000


def channels() -> Channels:
    return Channels(Ledger(fakeredis.FakeRedis()), CHAIN, f"eip155:{CHAIN}")


def funded(store: Channels, balance: int = 1_000, claimed: int = 0, charged: int = 0) -> None:
    """A channel Redis rebuilt from the chain (``balance``, ``claimed``) and a first voucher that
    says ``charged`` was charged; the hold that made it is released, the record stays (funded)."""
    held = store.hold(
        CHANNEL, "h0", NOW + 60, 10, charged + 10, SIG, 0, (CONFIG, ChainView(balance, claimed))
    )
    assert held.status == HELD, held
    store.sync(CHANNEL, ChainView(balance, claimed))
    assert store.release(CHANNEL, "h0")


def test_a_channel_redis_does_not_know_is_missing_until_rebuilt_from_the_chain() -> None:
    store = channels()
    assert store.hold(CHANNEL, "h1", NOW + 60, 10, 10, SIG).status == MISSING
    funded(store)
    state = store.hold(CHANNEL, "h1", NOW + 60, 10, 10, SIG)
    assert (state.status, state.charged, state.balance) == (HELD, 0, 1_000)


def test_one_call_at_a_time_and_a_dead_call_s_hold_lapses() -> None:
    store = channels()
    funded(store)
    until = int(time.time()) + 60
    assert store.hold(CHANNEL, "a", until, 10, 10, SIG).status == HELD
    assert store.hold(CHANNEL, "b", until, 10, 10, SIG).status == BUSY
    store.ledger.redis.hset(channel_key(CHAIN, CHANNEL), "hold_until", 1)  # its time passed
    assert store.hold(CHANNEL, "b", until, 10, 10, SIG).status == HELD
    assert store.commit(CHANNEL, "a", 5, 10, "m", PAYER).status == "lapsed"  # a's charge: never
    assert store.commit(CHANNEL, "b", 5, 10, "m", PAYER).charged == 5


def test_a_charge_keeps_the_voucher_indexes_the_channel_and_writes_its_event() -> None:
    store = channels()
    funded(store)
    store.hold(CHANNEL, "a", NOW + 60, 10, 10, b"\x02" * 65)
    state = store.commit(CHANNEL, "a", 7, 10, "hermes", PAYER)
    assert (state.status, state.charged, state.signed, state.signature) == (
        "committed",
        7,
        10,
        "0x" + "02" * 65,
    )
    key = channel_key(CHAIN, CHANNEL)
    assert store.ledger.redis.zscore(channel_index_key(key), key) is not None
    (entry,) = store.ledger.redis.xrange(LEDGER_STREAM)
    fields = {k.decode(): v.decode() for k, v in entry[1].items()}
    assert fields["event"] == "voucher" and fields["amount"] == "7" and fields["charged"] == "7"
    assert fields["scheme"] == "batch-settlement" and fields["authorized"] == "10"
    assert [c.unclaimed for c in store.every()] == [7]
    # the next voucher must be exactly what was charged plus the next maximum
    assert store.hold(CHANNEL, "b", NOW + 60, 10, 20, SIG).status == REFUSED
    assert store.hold(CHANNEL, "b", NOW + 60, 10, 17, SIG).status == HELD


def test_a_charge_above_the_call_s_maximum_is_never_taken() -> None:
    store = channels()
    funded(store)
    store.hold(CHANNEL, "a", NOW + 60, 10, 10, SIG)
    assert store.commit(CHANNEL, "a", 11, 10, "m", PAYER).status == "lapsed"


def test_a_voucher_beyond_the_balance_is_refused_unless_a_deposit_is_on_its_way() -> None:
    store = channels()
    funded(store, balance=15)
    assert store.hold(CHANNEL, "a", NOW + 60, 20, 20, SIG).status == REFUSED
    assert store.hold(CHANNEL, "a", NOW + 60, 20, 20, SIG, incoming=5).status == HELD


def test_a_refused_rebuild_and_a_released_unfunded_one_leave_nothing() -> None:
    store = channels()
    key = channel_key(CHAIN, CHANNEL)
    refused = store.hold(CHANNEL, "a", NOW + 60, 10, 10, SIG, 0, (CONFIG, ChainView(0, 0)))
    assert refused.status == REFUSED and not store.ledger.redis.exists(key)
    held = store.hold(CHANNEL, "a", NOW + 60, 10, 10, SIG, 10, (CONFIG, ChainView(0, 0)))  # a deposit
    assert held.status == HELD and store.ledger.redis.exists(key)
    store.release(CHANNEL, "a")  # the deposit failed
    assert not store.ledger.redis.exists(key)


def test_the_chain_s_claimed_total_is_never_below_what_redis_counts_charged() -> None:
    """Redis lost charges (they were claimed on chain meanwhile): the chain's claimed total wins."""
    store = channels()
    funded(store)
    store.sync(CHANNEL, ChainView(1_000, 300, 0, 2))
    state = store.hold(CHANNEL, "a", NOW + 60, 10, 310, SIG)
    assert (state.status, state.charged, state.claimed, state.refund_nonce) == (HELD, 300, 300, 2)


def test_a_stale_voucher_on_a_rebuilt_channel_is_answered_with_what_was_claimed() -> None:
    store = channels()
    state = store.hold(CHANNEL, "a", NOW + 60, 10, 10, SIG, 0, (CONFIG, ChainView(1_000, 50)))
    assert (state.status, state.charged) == (REFUSED, 50)  # the corrective 402's chargedCumulativeAmount


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 500), st.integers(0, 600), st.booleans()), min_size=1, max_size=12))
def test_charged_is_the_sum_of_committed_charges_and_a_voucher_always_covers_it(
    calls: list[tuple[int, int, bool]],
) -> None:
    """Any sequence of calls (maximum, usage price, host failed): ``charged`` is the sum of the
    charges taken (each at most its maximum), and the voucher kept covers it."""
    store = channels()
    funded(store, balance=10**9)
    charged = 0
    for index, (maximum, price, failed) in enumerate(calls):
        hold_id = f"h{index}"
        assert store.hold(CHANNEL, hold_id, NOW + 60, maximum, charged + maximum, SIG).status == HELD
        if failed:
            store.release(CHANNEL, hold_id)
            continue
        state = store.commit(CHANNEL, hold_id, min(price, maximum), maximum, "m", PAYER)
        charged += min(price, maximum)
        assert state.charged == charged and state.signed >= charged


# -- the receiver authorizer's signatures ---------------------------------------------------------------


def _official(config: ChannelConfig) -> OfficialConfig:
    return OfficialConfig.from_dict(config.to_wire())


@given(st.lists(st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 2**128 - 1)), min_size=1, max_size=4))
@settings(max_examples=25, deadline=None)
def test_claim_batch_digest_is_what_the_official_authorizer_signs(amounts: list[tuple[int, int]]) -> None:
    account = Account.from_key("0x" + "07" * 32)
    entries: list[tuple[bytes, int, int]] = []
    claims: list[Any] = []
    for signed, total in amounts:
        config = ChannelConfig(
            PAYER, PAYER, "0x" + "22" * 20, account.address.lower(), "0x" + "44" * 20, 900, os.urandom(32)
        )
        entries.append((channel_id(config, CHAIN), signed, total))
        claims.append(
            OfficialClaim(
                channel=_official(config),
                max_claimable_amount=str(signed),
                signature="0x",
                total_claimed=str(total),
            )
        )
    signature = sign_claim_batch(LocalAuthorizerSigner(account), claims, f"eip155:{CHAIN}")
    assert (
        recover_signer(claim_batch_digest(entries, CHAIN), bytes.fromhex(signature[2:]))
        == account.address.lower()
    )


@given(st.integers(0, 2**256 - 1), st.integers(0, 2**128 - 1))
@settings(max_examples=25, deadline=None)
def test_refund_digest_is_what_the_official_authorizer_signs(nonce: int, amount: int) -> None:
    account = Account.from_key("0x" + "08" * 32)
    signature = sign_refund(
        LocalAuthorizerSigner(account), "0x" + CHANNEL.hex(), str(amount), str(nonce), f"eip155:{CHAIN}"
    )
    assert (
        recover_signer(refund_digest(CHANNEL, nonce, amount, CHAIN), bytes.fromhex(signature[2:]))
        == account.address.lower()
    )


@pytest.mark.parametrize("changed", ["nonce", "amount", "channel"])
def test_a_refund_signature_binds_every_field(changed: str) -> None:
    account = Account.from_key("0x" + "09" * 32)
    signature = bytes.fromhex(
        sign_refund(LocalAuthorizerSigner(account), "0x" + CHANNEL.hex(), "5", "1", "eip155:8453")[2:]
    )
    fields: dict[str, Any] = {"channel": CHANNEL, "nonce": 1, "amount": 5}
    fields[changed] = b"\x00" * 32 if changed == "channel" else fields[changed] + 1
    assert (
        recover_signer(refund_digest(fields["channel"], fields["nonce"], fields["amount"], CHAIN), signature)
        != account.address.lower()
    )
