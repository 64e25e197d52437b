"""Attacks on the credit path (``sign-in-with-x``, change, failed calls' payments), on anvil, real
Redis and the stand-in host. Each reproduces a finding of the security review of that path, fixed
since: it would fail if the attack worked again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from app import create_checked_app
from app.backends.chain import Chain
from app.devnet.standin import Behaviour, StandinModel
from app.payments.books import credit_outstanding, revenue
from app.payments.credit import Credit
from app.payments.ledger import Ledger, connect
from app.payments.signin import SignInGate
from app.x402.codec import decode_header
from tests.integration.test_credit import (
    BIG_BODY,
    credit_of,
    give_change,
    info_of,
    reason_of,
    redis_of,
    sign_in_header,
)
from tests.rpc_proxy import FaultyRpc
from tests.support import CHAT_BODY, Proxy, key_of, proxy_with

pytestmark = pytest.mark.integration


@pytest.fixture
def credit_proxy(proxy: Proxy, catalog_file: Path) -> Iterator[Proxy]:
    """Floor 1 atomic unit: an exact call leaves change. No ``X402_PUBLIC_URL`` (the default)."""
    yield from proxy_with(proxy, catalog_path=catalog_file)


# --- 1. a sign-in obtained by another site spends the wallet's credit (no X402_PUBLIC_URL) ---------


def test_a_login_signed_for_another_site_cannot_spend_credit(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    change = give_change(proxy)  # the victim's credit
    # evil.example fetches our 402 (our nonce is not bound to any domain) and shows the victim an
    # ordinary "Sign in to evil.example" SIWE message with that nonce: its wallet sees evil.example
    # is the page's own origin, so no phishing warning.
    info = info_of(proxy)
    theirs = {
        "domain": "evil.example",
        "uri": "http://evil.example/login",
        "statement": "Sign in to Evil Example.",
    }
    login = sign_in_header(info, proxy.wallets.payer_key, changes=theirs)

    stolen = proxy.post(body=CHAT_BODY, headers={"SIGN-IN-WITH-X": login, "Host": "evil.example"})

    assert stolen.status_code == 402, f"served from the victim's credit: {stolen.status_code}"
    assert credit_of(proxy)["balance"] == change


# --- 2. two sign-ins claiming the same failed call's payment lose it -----------------------------


def test_two_sign_ins_claiming_one_failed_call_do_not_lose_it(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    standin.behaviour = Behaviour(status=500, times=2)
    payment = proxy.payment(proxy.requirement())
    amount = payment.authorization.value
    assert proxy.pay(payment).status_code == 502
    key, payer = key_of(proxy, payment), proxy.wallets.payer.lower()

    settings, chain = proxy.settings, Chain(proxy.settings)
    ledger_a, ledger_b = Ledger(connect(settings)), Ledger(connect(settings))
    b = SignInGate(settings, ledger_b, chain, Credit(settings, ledger_b))
    real_transition_b = ledger_b.transition

    def a_wins_first(k: str, allowed: Any, to: Any, **fields: str) -> bool:
        ledger_a.transition(k, allowed, to, **fields)  # sign-in A moves redeemable → credited first
        return real_transition_b(k, allowed, to, **fields)  # B's move then fails

    ledger_b.transition = a_wins_first  # type: ignore[method-assign]
    b._claim_failed_calls(payer)  # B must keep the pointer A's move made credit (A converts it too)

    assert redis_of(proxy).hget(key, "state") == b"credited"  # its header is refused from now on
    assert Credit(settings, Ledger(connect(settings))).statement(payer).balance == amount, "payment lost"


# --- 3. one nonce, unlimited signature attempts, each an eth_call ---------------------------------


def test_bad_signatures_do_not_each_cost_an_rpc_call(
    credit_proxy: Proxy, standin: StandinModel, faulty: FaultyRpc
) -> None:
    for proxy in proxy_with(credit_proxy, rpc_urls=(faulty.url,)):
        info = info_of(proxy)
        stranger = Account.create().key.hex()
        forged = sign_in_header(info, "0x" + stranger.removeprefix("0x"), address=proxy.wallets.payer)
        faulty.calls.clear()
        reasons = [
            reason_of(proxy.post(body=CHAT_BODY, headers={"SIGN-IN-WITH-X": forged})) for _ in range(5)
        ]
        eth_calls = faulty.calls.count("eth_call")
        assert eth_calls <= 1, f"{eth_calls} eth_calls for one nonce"
        assert reasons[1:] == ["invalid_siwx_nonce"] * 4, reasons


# --- 4. expired credit never reaches revenue ---------------------------------------------------------


def test_expired_credit_counts_as_revenue_without_the_wallet_returning(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    for proxy in proxy_with(credit_proxy, credit_seconds=2):
        ledger = Ledger(connect(proxy.settings))
        before = sum(revenue(ledger, 3600, "scheme").values())
        requirement = proxy.requirement(BIG_BODY)
        price = int(requirement["amount"])
        paid = proxy.pay(proxy.payment(requirement), BIG_BODY)
        assert paid.status_code == 200, paid.text
        change = int(paid.headers["X-Credit-Added"])
        assert change > 0
        time.sleep(3.5)  # the lot expired; the wallet never signs in again

        earned = sum(revenue(ledger, 3600, "scheme").values()) - before
        outstanding = credit_outstanding(ledger)

        assert outstanding == 0
        assert earned + outstanding == price, f"{change} of expired credit is in neither"


# --- 5. messages that are not EIP-4361 are accepted ---------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"statement": "Pay from credit.\rURI: https://wallet.example/"},
        {"statement": "Pay from credit.\u2028Chain ID: 1"},
        {"issuedAt": "SPACE"},
    ],
    ids=["carriage-return", "line-separator", "issued-at-not-rfc3339"],
)
def test_a_sign_in_that_is_not_eip4361_is_refused(
    credit_proxy: Proxy, standin: StandinModel, changes: dict[str, str]
) -> None:
    proxy = credit_proxy
    give_change(proxy)
    info = info_of(proxy)
    if changes.get("issuedAt") == "SPACE":
        changes = {"issuedAt": info["issuedAt"].replace("T", " ")}
    header = sign_in_header(info, proxy.wallets.payer_key, changes=changes)

    answer = proxy.post(body=CHAT_BODY, headers={"SIGN-IN-WITH-X": header})

    assert answer.status_code == 402, f"accepted: {answer.status_code}"
    assert reason_of(answer) == ("invalid_siwx_issued_at" if "issuedAt" in changes else "invalid_siwx_header")


# --- 6. a remote caller naming a loopback Host (no X402_PUBLIC_URL) ---------------------------------


def test_a_remote_caller_naming_a_loopback_host_is_offered_no_sign_in(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    """Without ``X402_PUBLIC_URL`` sign-in is offered on loopback only, and the Host header is the
    sender's word: a request from another address that names ``127.0.0.1`` gets no challenge, and
    its sign-in (valid for that domain) is refused. The same app, over loopback, offers it."""
    proxy = credit_proxy
    give_change(proxy)
    client = create_checked_app(proxy.settings).test_client()
    remote = {"REMOTE_ADDR": "192.0.2.7"}
    host = {"Host": proxy.url.removeprefix("http://")}

    unpaid = client.post("/v1/chat/completions", json=CHAT_BODY, headers=host, environ_base=remote)
    assert unpaid.status_code == 402
    assert "sign-in-with-x" not in decode_header(unpaid.headers["PAYMENT-REQUIRED"]).get("extensions", {})
    login = sign_in_header(info_of(proxy), proxy.wallets.payer_key)  # a real sign-in, for the loopback origin
    refused = client.post(
        "/v1/chat/completions", json=CHAT_BODY, headers={**host, "SIGN-IN-WITH-X": login}, environ_base=remote
    )
    assert refused.status_code == 402
    assert decode_header(refused.headers["PAYMENT-REQUIRED"])["error"] == "invalid_siwx_domain_mismatch"
    assert client.get("/v1/credit", headers=host, environ_base=remote).status_code == 404
    local = client.post(
        "/v1/chat/completions", json=CHAT_BODY, headers=host, environ_base={"REMOTE_ADDR": "127.0.0.1"}
    )
    assert "sign-in-with-x" in decode_header(local.headers["PAYMENT-REQUIRED"])["extensions"]
