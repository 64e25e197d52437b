"""The ``batch-settlement`` requirement a 402 offers (``BatchGate.requirement``): our receiver
authorizer (never the relayer), the withdraw delay as a JSON number, and the deposit hint."""

from __future__ import annotations

import fakeredis
from eth_account import Account

from app.backends.chain import Chain
from app.catalog import Quote, load_catalog, quote_for
from app.payments.batch import BatchGate
from app.payments.channels import Channels
from app.payments.ledger import Ledger
from app.payments.receipts import derived_key
from app.payments.settlement import LocalSettler
from app.settings import DEFAULT_CATALOG, Settings

RELAYER = "0x" + "33" * 32
BODY = {"model": "hermes-3-8b-tee", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}


def gate(**changes: object) -> BatchGate:
    settings = Settings(pay_to="0x" + "22" * 20, relayer_key=RELAYER, redis_url="redis://127.0.0.1:9")
    settings = settings.with_overrides(**changes)
    ledger = Ledger(fakeredis.FakeRedis())
    chain = Chain(settings)
    channels = Channels(ledger, settings.network.chain_id, settings.network.caip2)
    return BatchGate(settings, channels, chain, LocalSettler(settings, chain, ledger))


def quote() -> Quote:
    return quote_for(load_catalog(DEFAULT_CATALOG)["hermes-3-8b-tee"], "chat", BODY)


def test_the_requirement_names_our_authorizer_the_delay_and_ten_calls_as_the_deposit_hint() -> None:
    offered = gate().requirement(quote()).to_v2()
    amount = quote().amount
    authorizer = Account.from_key(derived_key(RELAYER, "receiver authorizer")).address
    assert offered["scheme"] == "batch-settlement" and offered["amount"] == str(amount)
    assert offered["extra"]["receiverAuthorizer"] == authorizer != Account.from_key(RELAYER).address
    assert offered["extra"]["withdrawDelay"] == 86400 and isinstance(offered["extra"]["withdrawDelay"], int)
    assert offered["extra"]["minDeposit"] == str(10 * amount)


def test_x402_min_deposit_sets_the_hint_never_below_one_call() -> None:
    amount = quote().amount
    assert gate(min_deposit=5 * amount).requirement(quote()).min_deposit == 5 * amount
    assert gate(min_deposit=1).requirement(quote()).min_deposit == amount
    key = "0x" + "44" * 32
    assert gate(receiver_authorizer_key=key).authorizer == Account.from_key(key).address
