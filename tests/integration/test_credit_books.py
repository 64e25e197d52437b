"""Credit in the books (issue 16 §2): revenue counts it as a liability until spent, ``reconcile``
credits change that was recorded but not credited, and the official sync client cannot sign in (the
README's Clients section says so). Anvil, real Redis, the stand-in host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.extensions.sign_in_with_x import CreateSIWxClientExtensionOptions, create_siwx_client_extension
from x402.http.clients.requests import PaymentError, wrapRequestsWithPayment
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

from app.backends.chain import Chain
from app.devnet.standin import StandinModel
from app.payments.books import credit_outstanding, reconcile, revenue
from app.payments.keys import credit_keys
from app.payments.ledger import Ledger, connect
from tests.integration.test_credit import BIG_BODY, signed_in
from tests.support import CHAT_BODY, Proxy, proxy_with

pytestmark = pytest.mark.integration


@pytest.fixture
def credit_proxy(proxy: Proxy, catalog_file: Path) -> Iterator[Proxy]:
    """Floor 1 atomic unit: an exact call's usage price is below its priced maximum."""
    yield from proxy_with(proxy, catalog_path=catalog_file)


def test_revenue_counts_credit_once_spent_and_the_outstanding_credit_apart(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    ledger = Ledger(connect(proxy.settings))
    before = revenue(ledger, 3600, "scheme")
    requirement = proxy.requirement(BIG_BODY)
    paid = proxy.pay(proxy.payment(requirement), BIG_BODY)
    change = int(paid.headers["X-Credit-Added"])
    spent = signed_in(proxy)
    assert spent.status_code == 200, spent.text
    charged = int(spent.headers["X-Credit-Charged"])

    after = revenue(ledger, 3600, "scheme")
    price = int(requirement["amount"])
    assert after.get("exact", 0) - before.get("exact", 0) == price - change  # change is not revenue
    assert after.get("credit", 0) - before.get("credit", 0) == charged  # until it is spent
    assert credit_outstanding(ledger) == change - charged == int(spent.headers["X-Credit-Balance"])


def test_reconcile_credits_change_that_was_recorded_but_not_credited(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    """Redis failing between the ``served`` mark (which records the change) and the credit is
    played by deleting the wallet's credit: ``reconcile`` credits it from the payment's record, once."""
    proxy = credit_proxy
    paid = proxy.pay(proxy.payment(proxy.requirement(BIG_BODY)), BIG_BODY)
    change = int(paid.headers["X-Credit-Added"])
    keys = credit_keys(8453, proxy.settings.asset, proxy.wallets.payer)
    redis.Redis.from_url(proxy.settings.redis_url).delete(keys.wallet, keys.sources)
    ledger, chain = Ledger(connect(proxy.settings)), Chain(proxy.settings)
    assert signed_in(proxy).json()["error"] == "insufficient_credit"

    findings = reconcile(ledger, chain, proxy.settings, 3600)
    assert [f.resolved for f in findings if f.resolved] == ["change credited"]
    assert not [f for f in reconcile(ledger, chain, proxy.settings, 3600) if f.resolved]  # once
    served = signed_in(proxy)
    assert served.status_code == 200, served.text
    assert int(served.headers["X-Credit-Balance"]) == change - int(served.headers["X-Credit-Charged"])


def test_the_official_sync_client_cannot_sign_in(credit_proxy: Proxy, standin: StandinModel) -> None:
    """``x402ClientSync`` over requests with the SIWx extension registered fails every 402 (the
    extension's hook is async; the sync client refuses async hooks) and neither signs in nor pays."""
    proxy = credit_proxy
    proxy.pay(proxy.payment(proxy.requirement(BIG_BODY)), BIG_BODY)  # credit that would cover the call
    client = x402ClientSync()
    account = Account.from_key(proxy.wallets.payer_key)
    register_exact_evm_client(client, EthAccountSigner(account))
    client.register_extension(
        create_siwx_client_extension(CreateSIWxClientExtensionOptions(signers=[account]))
    )
    before = proxy.balances()
    ledger = Ledger(connect(proxy.settings))
    owed = credit_outstanding(ledger)

    with pytest.raises(PaymentError, match="Async hooks are not supported"):
        wrapRequestsWithPayment(requests.Session(), client).post(
            proxy.url + "/v1/chat/completions", json=CHAT_BODY, timeout=60
        )
    assert proxy.balances() == before
    assert credit_outstanding(ledger) == owed
