"""The books of ``batch-settlement``: ``revenue`` counts each voucher's charge, and ``reconcile``
checks every channel against the escrow's ``channels(id)`` (real anvil, real redis-server, paid by
the official PyPI client)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import requests
from eth_abi import encode

from app.backends.chain import Chain
from app.backends.escrow import CONFIG_TUPLE, config_tuple
from app.backends.token import selector
from app.devnet import DevChain
from app.payments.books import reconcile, revenue
from app.payments.claims import ClaimLoop
from app.payments.keys import channel_key
from app.payments.ledger import Ledger, connect
from tests.integration.test_batch_claims import (
    ESCROW,
    on_chain,
    paid_calls,
    second_payer,
    send_from,
    stored_config,
)
from tests.support import Proxy

pytestmark = pytest.mark.integration


@pytest.fixture
def books(upto_proxy: Proxy) -> Iterator[tuple[Proxy, Ledger, ClaimLoop]]:
    loop = ClaimLoop.for_settings(upto_proxy.settings)
    yield upto_proxy, Ledger(connect(upto_proxy.settings)), loop
    loop.stop()


def metric(exposition: str, name: str) -> float:
    """The value of an unlabelled metric in a Prometheus exposition (0 when absent)."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def channel_findings(proxy: Proxy, ledger: Ledger) -> list[tuple[str, str, str]]:
    findings = reconcile(ledger, Chain(proxy.settings), proxy.settings, 3600)
    return [(f.key, f.problem, f.open) for f in findings if f.state == "channel"]


def test_revenue_counts_each_voucher_charge_by_scheme(books: tuple[Proxy, Ledger, ClaimLoop]) -> None:
    proxy, ledger, _loop = books
    _channel, charged = paid_calls(proxy, proxy.wallets.payer_key, 3)
    totals = revenue(ledger, 3600, "scheme")
    assert totals == {"batch-settlement": charged}  # the deposit is the payer's money, not revenue
    assert sum(revenue(ledger, 3600, "model").values()) == charged
    assert charged > 3  # three usage prices, each above the floor of 1


def test_reconcile_lists_unclaimed_charges_then_nothing_once_claimed(
    books: tuple[Proxy, Ledger, ClaimLoop],
) -> None:
    proxy, ledger, loop = books
    channel, charged = paid_calls(proxy, proxy.wallets.payer_key, 2)
    key = channel_key(8453, channel)
    assert channel_findings(proxy, ledger) == [(key, "", f"{charged} charged, not claimed yet")]
    before = requests.get(proxy.url + "/metrics", timeout=10).text
    assert loop.run(settle=False, force=True).claimed.amount == charged
    assert channel_findings(proxy, ledger) == []
    exposed = requests.get(proxy.url + "/metrics", timeout=10).text
    assert (
        metric(exposed, "x402_claimed_atomic_total") - metric(before, "x402_claimed_atomic_total") == charged
    )
    assert metric(exposed, "x402_claim_batches_total") - metric(before, "x402_claim_batches_total") == 1
    assert metric(exposed, "x402_channels_unclaimed_atomic") == 0
    assert metric(exposed, "x402_channels_open") >= 1


def test_reconcile_takes_the_chain_s_claimed_total_when_redis_counts_less(
    books: tuple[Proxy, Ledger, ClaimLoop],
) -> None:
    """Redis lost charges that were claimed meanwhile: reconcile says so and counts them."""
    proxy, ledger, loop = books
    channel, charged = paid_calls(proxy, proxy.wallets.payer_key, 2)
    loop.run(settle=False, force=True)
    key = channel_key(8453, channel)
    client = redis.Redis.from_url(proxy.settings.redis_url)
    client.hset(key, mapping={"charged": 1, "claimed": 0})  # as if Redis had lost the charges
    ((found, problem, _),) = channel_findings(proxy, ledger)
    assert found == key and problem.startswith(f"claimed {charged} on chain, above the 1 charged here")
    assert int(client.hget(key, "charged")) == charged  # repaired from the chain
    assert channel_findings(proxy, ledger) == []


def test_reconcile_reports_charges_a_payer_left_with(
    books: tuple[Proxy, Ledger, ClaimLoop], chain: DevChain, time_travel: None
) -> None:
    """The withdraw race lost (no claim ran within the delay): the payer's withdrawal took what was
    charged, and reconcile says so."""
    proxy, ledger, loop = books
    payer_key = second_payer(chain)
    channel, charged = paid_calls(proxy, payer_key, 1)
    balance, _claimed, _ = on_chain(proxy, channel)
    config = config_tuple(stored_config(loop, channel))
    initiate = selector(f"initiateWithdraw({CONFIG_TUPLE},uint128)")
    send_from(chain, payer_key, ESCROW, initiate + encode([CONFIG_TUPLE, "uint128"], [config, balance]))
    chain.rpc.call("evm_increaseTime", [proxy.settings.withdraw_delay + 1])
    chain.rpc.call("evm_mine", [])
    finalize = selector(f"finalizeWithdraw({CONFIG_TUPLE})")
    send_from(chain, payer_key, ESCROW, finalize + encode([CONFIG_TUPLE], [config]))
    ((key, problem, _),) = channel_findings(proxy, ledger)
    assert key == channel_key(8453, channel)
    assert problem == f"charged {charged}, above the channel's balance 0 (payer left)"
