"""Adversarial payments against the real chain and Redis (issue: hostile input and failing parts).

Each refusal case builds one hostile request the way a cheating or careless client would (signing
whatever it likes with real keys), and checks the four things a refusal must guarantee: the stable
reason code, no money moved (nor any relayer transaction sent), nothing reached the model, and no
payment state left in Redis other than ``released``. A few cases are not refusals (a v of 0/1 is
normalised, an EIP-1271 wallet that accepts pays, one authorization wrapped in v1 and v2 pays once);
they check that exactly one transfer happened.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
import requests
from eth_hash.auto import keccak

from app.backends.chain import ASSET_PAUSED
from app.backends.token import transfer_calldata
from app.devnet import BASE_USDC, PROJECT_ROOT
from app.devnet.standin import StandinModel
from app.x402.codec import decode_header
from app.x402.eip712 import domain_separator, sign_digest
from app.x402.payer import offered_requirements
from app.x402.verdict import (
    INSUFFICIENT_BALANCE,
    INVALID_PAYLOAD,
    INVALID_SIGNATURE,
    INVALID_VERSION,
    NETWORK_MISMATCH,
    NONCE_USED,
    RECIPIENT_MISMATCH,
    REQUIREMENTS_MISMATCH,
    SIMULATION_FAILED,
    UNSUPPORTED_SCHEME,
    VALID_AFTER,
    VALID_BEFORE,
    VALUE_MISMATCH,
)
from app.x402.wire import Authorization
from tests.security.forge import (
    BASE_DOMAIN,
    CHAT,
    COMPLETIONS,
    PING,
    SECP256K1_N,
    SEPOLIA_USDC,
    STRANGER,
    Attempt,
    Domain,
    address_of,
    authorization_for,
    call_contract,
    header_of,
    new_key,
    payment_states,
    relayer_tx_count,
    send,
    sign,
    token_balances,
    token_tx,
    wrap,
)
from tests.support import CHAT_BODY, Proxy, settle_response

pytestmark = pytest.mark.integration

WALLET_ARTIFACT = PROJECT_ROOT / "contracts" / "ERC1271Wallet.json"
CHEAP_BODY: dict[str, Any] = {**CHAT_BODY, "max_tokens": 16}
DEAR_BODY: dict[str, Any] = {**CHAT_BODY, "max_tokens": 4000}
COMPLETIONS_BODY: dict[str, Any] = {
    "model": CHAT_BODY["model"],
    "prompt": "Once upon a time",
    "max_tokens": 16,
}
SEPOLIA_DOMAIN = {"name": "USDC", "version": "2"}
CANCEL_TYPEHASH = keccak(b"CancelAuthorization(address authorizer,bytes32 nonce)")

Builder = Callable[[Proxy], Iterator[Attempt]]


@dataclass(frozen=True)
class Refusal:
    id: str
    build: Builder
    reason: str
    status: int = 402


# --- building hostile payments -----------------------------------------------------------------


def _requirement(proxy: Proxy, version: int = 2, body: Any = None, path: str = CHAT) -> dict[str, Any]:
    if path == PING:
        unpaid = requests.get(proxy.url + PING, timeout=10)
        _, _, accepts = offered_requirements(dict(unpaid.headers) if version == 2 else {}, unpaid.json())
        return accepts[0]
    return proxy.requirement(body if body is not None else CHAT_BODY, version, path)


def edited(requirement: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``requirement`` with ``changes``; a callable change maps the field's current value."""
    return {
        **requirement,
        **{k: v(requirement[k]) if callable(v) else v for k, v in changes.items()},
    }


def plain(make: Callable[[Proxy], Attempt]) -> Builder:
    """A builder without set-up to undo."""

    def build(proxy: Proxy) -> Iterator[Attempt]:
        yield make(proxy)

    return build


def signed_for(changes: dict[str, Any], version: int = 2) -> Builder:
    """The client edits our requirement and signs what it edited, consistently (domain included)."""

    def make(proxy: Proxy) -> Attempt:
        real = _requirement(proxy, version)
        fake = edited(real, changes)
        chain_id = {"eip155:8453": 8453, "base": 8453}.get(fake["network"], 84532)
        domain = Domain(fake["extra"]["name"], fake["extra"]["version"], chain_id, fake["asset"])
        auth = authorization_for(fake, proxy.wallets.payer, version=version)
        return Attempt(header_of(wrap(auth, sign(proxy.wallets.payer_key, auth, domain), fake, version)))

    return plain(make)


def accepted_differs(changes: dict[str, Any]) -> Builder:
    """An honest authorization for our price, but ``accepted`` says something else."""

    def make(proxy: Proxy) -> Attempt:
        real = _requirement(proxy)
        auth = authorization_for(real, proxy.wallets.payer)
        accepted = edited(real, changes)
        return Attempt(header_of(wrap(auth, sign(proxy.wallets.payer_key, auth), accepted)))

    return plain(make)


def authorization_differs(version: int = 2, network: str | None = None, **changes: Any) -> Builder:
    """``accepted`` is ours (v2), the authorization is edited and validly signed."""

    def make(proxy: Proxy) -> Attempt:
        real = _requirement(proxy, version)
        auth = authorization_for(real, proxy.wallets.payer, version=version)
        auth = replace(auth, **{k: v(auth) if callable(v) else v for k, v in changes.items()})
        payment = wrap(auth, sign(proxy.wallets.payer_key, auth), real, version, network)
        return Attempt(header_of(payment))

    return plain(make)


def signed_over(domain: Domain) -> Builder:
    def make(proxy: Proxy) -> Attempt:
        real = _requirement(proxy)
        auth = authorization_for(real, proxy.wallets.payer)
        return Attempt(header_of(wrap(auth, sign(proxy.wallets.payer_key, auth, domain), real)))

    return plain(make)


def signature_mangled(mangle: Callable[[bytes], bytes], key: str | None = None) -> Builder:
    def make(proxy: Proxy) -> Attempt:
        real = _requirement(proxy)
        auth = authorization_for(real, proxy.wallets.payer)
        signature = mangle(sign(key or proxy.wallets.payer_key, auth))
        return Attempt(header_of(wrap(auth, signature, real)))

    return plain(make)


def paid_for(
    body: dict[str, Any], path: str = CHAT, sent_body: dict[str, Any] = DEAR_BODY, version: int = 2
) -> Builder:
    """A payment made for one (cheap) call, presented with another body or on another route."""

    def make(proxy: Proxy) -> Attempt:
        payment = proxy.payment(_requirement(proxy, version, body, path), version)
        return Attempt(header_of(payment), body=sent_body, path=CHAT)

    return plain(make)


def in_the_other_header(version: int) -> Builder:
    def make(proxy: Proxy) -> Attempt:
        payment = proxy.payment(_requirement(proxy, version), version)
        return Attempt(header_of(payment, header_version=3 - version))

    return plain(make)


def high_s(signature: bytes) -> bytes:
    s = int.from_bytes(signature[32:64], "big")
    flipped = 55 - signature[64]  # 27 <-> 28
    return signature[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([flipped])


def nonce_spent_elsewhere(proxy: Proxy) -> Iterator[Attempt]:
    """The payer already used this nonce on chain, for the same value, to someone else."""
    real = _requirement(proxy)
    auth = authorization_for(real, proxy.wallets.payer)
    elsewhere_to = address_of(new_key())
    elsewhere = replace(auth, to=elsewhere_to)
    signature = sign(proxy.wallets.payer_key, elsewhere)
    proxy.chain.transact(proxy.chain.token, transfer_calldata(elsewhere, signature, True))
    assert proxy.chain.balance(elsewhere_to) == auth.value
    yield Attempt(header_of(wrap(auth, sign(proxy.wallets.payer_key, auth), real)), watch=(elsewhere_to,))


def nonce_canceled(proxy: Proxy) -> Iterator[Attempt]:
    real = _requirement(proxy)
    auth = authorization_for(real, proxy.wallets.payer)
    separator = domain_separator("USD Coin", "2", 8453, BASE_USDC)
    struct = keccak(CANCEL_TYPEHASH + bytes(12) + bytes.fromhex(auth.from_[2:]) + auth.nonce)
    cancel = sign_digest(bytes.fromhex(proxy.wallets.payer_key[2:]), keccak(b"\x19\x01" + separator + struct))
    token_tx(
        proxy,
        "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)",
        ["address", "bytes32", "uint8", "bytes32", "bytes32"],
        [auth.from_, auth.nonce, cancel[64], cancel[:32], cancel[32:64]],
    )
    yield Attempt(header_of(wrap(auth, sign(proxy.wallets.payer_key, auth), real)))


def payer_too_poor(proxy: Proxy) -> Iterator[Attempt]:
    real = _requirement(proxy)
    poor_key = new_key()
    poor = address_of(poor_key)
    proxy.chain.mint(poor, int(real["amount"]) - 1)
    auth = authorization_for(real, poor)
    yield Attempt(header_of(wrap(auth, sign(poor_key, auth), real)), watch=(poor,))


def blacklisted(who: str) -> Builder:
    def build(proxy: Proxy) -> Iterator[Attempt]:
        address = proxy.wallets.payer if who == "payer" else proxy.wallets.pay_to
        payment = proxy.payment(_requirement(proxy))
        token_tx(proxy, "blacklist(address)", ["address"], [address])
        try:
            yield Attempt(header_of(payment))
        finally:
            token_tx(proxy, "unBlacklist(address)", ["address"], [address])

    return build


def token_paused(proxy: Proxy) -> Iterator[Attempt]:
    payment = proxy.payment(_requirement(proxy))
    token_tx(proxy, "pause()", [], [])
    try:
        yield Attempt(header_of(payment))
    finally:
        token_tx(proxy, "unpause()", [], [])


def contract_wallet(proxy: Proxy, owner_key: str, refuse: bool, funds: int) -> str:
    """An EIP-1271 wallet placed at a fresh address, owned by ``owner_key``, holding ``funds``."""
    code = json.loads(WALLET_ARTIFACT.read_text())["deployedBytecode"]
    wallet = address_of(new_key())
    proxy.chain.rpc.call("anvil_setCode", [wallet, code if code.startswith("0x") else "0x" + code])
    call_contract(proxy, wallet, "setOwner(address)", ["address"], [address_of(owner_key)])
    if refuse:
        call_contract(proxy, wallet, "setRefuse(bool)", ["bool"], [True])
    proxy.chain.mint(wallet, funds)
    return wallet


def wallet_payment(proxy: Proxy, refuse: bool) -> tuple[Attempt, str, int]:
    real = _requirement(proxy)
    owner_key = new_key()
    wallet = contract_wallet(proxy, owner_key, refuse, 10 * int(real["amount"]))
    auth = authorization_for(real, wallet)
    payment = wrap(auth, sign(owner_key, auth), real)  # the owner signs for the wallet as ``from``
    return Attempt(header_of(payment), watch=(wallet,)), wallet, auth.value


def refusing_wallet(proxy: Proxy) -> Iterator[Attempt]:
    yield wallet_payment(proxy, refuse=True)[0]


def now_plus(seconds: int) -> Callable[[Authorization], int]:
    return lambda _auth: int(time.time()) + seconds


REFUSALS: list[Refusal] = [
    # price: v2 must pay exactly; the server compares `accepted` first
    Refusal(
        "v2 underpay, requirement edited and signed",
        signed_for({"amount": lambda a: str(int(a) - 1)}),
        REQUIREMENTS_MISMATCH,
    ),
    Refusal(
        "v2 overpay, requirement edited and signed",
        signed_for({"amount": lambda a: str(int(a) + 1)}),
        REQUIREMENTS_MISMATCH,
    ),
    Refusal(
        "v2 accepted ours, value one less",
        authorization_differs(value=lambda a: a.value - 1),
        VALUE_MISMATCH,
    ),
    Refusal(
        "v2 accepted ours, value one more",
        authorization_differs(value=lambda a: a.value + 1),
        VALUE_MISMATCH,
    ),
    Refusal(
        "v2 accepted ours, value zero",
        authorization_differs(value=0),
        VALUE_MISMATCH,
    ),
    Refusal(
        "v1 underpay",
        authorization_differs(version=1, value=lambda a: a.value - 1),
        VALUE_MISMATCH,
    ),
    Refusal(
        "v1 overpay",
        authorization_differs(version=1, value=lambda a: a.value + 1),
        VALUE_MISMATCH,
    ),
    # recipient
    Refusal(
        "v2 authorization to someone else, accepted ours",
        authorization_differs(to=STRANGER.lower()),
        RECIPIENT_MISMATCH,
    ),
    Refusal(
        "v2 payTo and to both someone else",
        signed_for({"payTo": STRANGER}),
        REQUIREMENTS_MISMATCH,
    ),
    Refusal(
        "v1 authorization to someone else",
        authorization_differs(version=1, to=STRANGER.lower()),
        RECIPIENT_MISMATCH,
    ),
    # asset and network
    Refusal("v2 other asset, signed over it", signed_for({"asset": SEPOLIA_USDC}), REQUIREMENTS_MISMATCH),
    Refusal(
        "v2 Base Sepolia, signed for chain 84532",
        signed_for({"network": "eip155:84532", "asset": SEPOLIA_USDC, "extra": SEPOLIA_DOMAIN}),
        NETWORK_MISMATCH,
    ),
    Refusal("v2 network spelled the v1 way", signed_for({"network": "base"}), NETWORK_MISMATCH),
    Refusal(
        "v1 base-sepolia",
        authorization_differs(version=1, network="base-sepolia"),
        NETWORK_MISMATCH,
    ),
    Refusal(
        "v1 network spelled the v2 way",
        authorization_differs(version=1, network="eip155:8453"),
        NETWORK_MISMATCH,
    ),
    # `accepted` differing in one field, the authorization honest
    Refusal("accepted.amount", accepted_differs({"amount": "1"}), REQUIREMENTS_MISMATCH),
    Refusal("accepted.amount as a JSON number", accepted_differs({"amount": int}), REQUIREMENTS_MISMATCH),
    Refusal("accepted.payTo", accepted_differs({"payTo": STRANGER}), REQUIREMENTS_MISMATCH),
    Refusal("accepted.asset", accepted_differs({"asset": SEPOLIA_USDC}), REQUIREMENTS_MISMATCH),
    Refusal(
        "accepted.maxTimeoutSeconds",
        accepted_differs({"maxTimeoutSeconds": lambda t: t + 1}),
        REQUIREMENTS_MISMATCH,
    ),
    Refusal(
        "accepted.maxTimeoutSeconds as a string",
        accepted_differs({"maxTimeoutSeconds": str}),
        REQUIREMENTS_MISMATCH,
    ),
    Refusal("accepted.scheme", accepted_differs({"scheme": "deferred"}), UNSUPPORTED_SCHEME),
    # an exact payload under the scheme name "upto" is a malformed upto payment
    Refusal("accepted.scheme upto", accepted_differs({"scheme": "upto"}), INVALID_PAYLOAD),
    Refusal("accepted.network", accepted_differs({"network": "eip155:84532"}), NETWORK_MISMATCH),
    Refusal(
        "accepted.extra.name",
        accepted_differs({"extra": {"name": "USDC", "version": "2"}}),
        REQUIREMENTS_MISMATCH,
    ),
    Refusal(
        "accepted.extra.version",
        accepted_differs({"extra": {"name": "USD Coin", "version": "1"}}),
        REQUIREMENTS_MISMATCH,
    ),
    # a payment for one call presented for a dearer one
    Refusal("v2 paid max_tokens 16, sent max_tokens 4000", paid_for(CHEAP_BODY), REQUIREMENTS_MISMATCH),
    Refusal(
        "v1 paid max_tokens 16, sent max_tokens 4000",
        paid_for(CHEAP_BODY, version=1),
        VALUE_MISMATCH,
    ),
    Refusal(
        "v2 paid max_tokens 4000, sent max_tokens 16",
        paid_for(DEAR_BODY, sent_body=CHEAP_BODY),
        REQUIREMENTS_MISMATCH,
    ),
    Refusal(
        "v2 completions payment on the chat route",
        paid_for(COMPLETIONS_BODY, COMPLETIONS),
        REQUIREMENTS_MISMATCH,
    ),
    Refusal("v2 ping payment on the chat route", paid_for({}, PING), REQUIREMENTS_MISMATCH),
    # time window
    Refusal(
        "validBefore an hour ago",
        authorization_differs(valid_before=now_plus(-3600)),
        VALID_BEFORE,
    ),
    Refusal(
        "validBefore within 6 s",
        authorization_differs(valid_before=now_plus(5)),
        VALID_BEFORE,
    ),
    Refusal(
        "validAfter in the future",
        authorization_differs(valid_after=now_plus(60)),
        VALID_AFTER,
    ),
    Refusal(
        "validAfter == validBefore, in the future",
        authorization_differs(valid_after=now_plus(60), valid_before=now_plus(60)),
        VALID_AFTER,
    ),
    Refusal(
        "validAfter == validBefore, in the past",
        authorization_differs(valid_after=now_plus(-10), valid_before=now_plus(-10)),
        VALID_BEFORE,
    ),
    # signatures
    Refusal(
        "signature by another key",
        signature_mangled(lambda s: s, key=new_key()),
        INVALID_SIGNATURE,
    ),
    Refusal(
        "domain name USDC",
        signed_over(replace(BASE_DOMAIN, name="USDC")),
        INVALID_SIGNATURE,
    ),
    Refusal(
        "domain version 1",
        signed_over(replace(BASE_DOMAIN, version="1")),
        INVALID_SIGNATURE,
    ),
    Refusal(
        "domain chain 84532",
        signed_over(replace(BASE_DOMAIN, chain_id=84532)),
        INVALID_SIGNATURE,
    ),
    Refusal(
        "domain of another verifying contract",
        signed_over(replace(BASE_DOMAIN, contract=SEPOLIA_USDC)),
        INVALID_SIGNATURE,
    ),
    Refusal("high-s malleated signature", signature_mangled(high_s), INVALID_SIGNATURE),
    Refusal(
        "v = 29",
        signature_mangled(lambda s: s[:64] + bytes([29])),
        INVALID_SIGNATURE,
    ),
    Refusal(
        "s = 0",
        signature_mangled(lambda s: s[:32] + bytes(32) + s[64:]),
        INVALID_SIGNATURE,
    ),
    Refusal("truncated 64-byte signature", signature_mangled(lambda s: s[:64]), INVALID_PAYLOAD),
    Refusal(
        "66-byte signature",
        signature_mangled(lambda s: s + b"\x00"),
        INVALID_SIGNATURE,
    ),
    Refusal("v2 payload in X-PAYMENT", in_the_other_header(2), INVALID_VERSION),
    Refusal("v1 payload in PAYMENT-SIGNATURE", in_the_other_header(1), INVALID_VERSION),
    # chain state
    Refusal(
        "nonce already used on chain to someone else",
        nonce_spent_elsewhere,
        NONCE_USED,
    ),
    Refusal("canceled nonce", nonce_canceled, NONCE_USED),
    Refusal("payer one unit short", payer_too_poor, INSUFFICIENT_BALANCE),
    Refusal(
        "blacklisted payer",
        blacklisted("payer"),
        SIMULATION_FAILED,
    ),
    Refusal("blacklisted payee", blacklisted("payee"), "payee_blacklisted", 503),  # no payment can fix it
    Refusal("token paused", token_paused, ASSET_PAUSED, 503),
    Refusal(
        "EIP-1271 wallet that refuses",
        refusing_wallet,
        SIMULATION_FAILED,
    ),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_hostile_payment_is_refused_and_changes_nothing(
    proxy: Proxy, standin: StandinModel, case: Refusal
) -> None:
    with contextmanager(case.build)(proxy) as attempt:
        balances = token_balances(proxy, *attempt.watch)
        sent = relayer_tx_count(proxy)
        response = send(proxy, attempt)
        assert response.status_code == case.status, response.text
        if case.status == 402:
            assert response.json()["error"] == case.reason, response.text
            assert decode_header(response.headers["PAYMENT-REQUIRED"])["error"] == case.reason
        else:
            assert response.json()["error"]["code"] == case.reason, response.text
        # refused before any transaction: no settlement to report
        assert "PAYMENT-RESPONSE" not in response.headers and "X-PAYMENT-RESPONSE" not in response.headers
        assert token_balances(proxy, *attempt.watch) == balances
        assert relayer_tx_count(proxy) == sent
    assert standin.received == []
    assert set(payment_states(proxy).values()) <= {"released"}


def _served_once(
    proxy: Proxy, standin: StandinModel, response: Any, payer: str, amount: int, before: dict[str, int]
) -> str:
    """The call was served, exactly one transfer of ``amount`` from ``payer`` to the payee happened,
    by one relayer transaction with receipt status 1. Returns the transaction hash."""
    assert response.status_code == 200, response.text
    settled = settle_response(response)
    assert settled["success"] is True and settled["payer"] == payer.lower()
    receipt = proxy.chain.rpc.call("eth_getTransactionReceipt", [settled["transaction"]])
    assert int(receipt["status"], 16) == 1
    assert receipt["from"].lower() == proxy.wallets.relayer.lower()
    after = token_balances(proxy, payer)
    pay_to = proxy.wallets.pay_to.lower()
    assert after[payer.lower()] == before[payer.lower()] - amount
    assert after[pay_to] == before[pay_to] + amount
    assert len(standin.received) == 1
    assert list(payment_states(proxy).values()) == ["served"]
    return str(settled["transaction"])


@pytest.mark.parametrize("v", [0, 1])
def test_v_of_0_or_1_is_normalised_and_settles_once(proxy: Proxy, standin: StandinModel, v: int) -> None:
    """Not a refusal: v in {0, 1} is the same signature as 27/28. It must settle exactly once and
    not revert at the gas we estimated."""
    real = _requirement(proxy)
    while True:  # find a nonce whose signature has the recovery id we want
        auth = authorization_for(real, proxy.wallets.payer)
        signature = sign(proxy.wallets.payer_key, auth)
        if signature[64] == 27 + v:
            break
    payment = wrap(auth, signature[:64] + bytes([v]), real)
    before = token_balances(proxy)
    sent = relayer_tx_count(proxy)
    response = send(proxy, Attempt(header_of(payment)))
    _served_once(proxy, standin, response, proxy.wallets.payer, auth.value, before)
    assert relayer_tx_count(proxy) == sent + 1
    again = send(proxy, Attempt(header_of(payment)))
    assert again.status_code == 402 and again.json()["error"] == NONCE_USED
    assert relayer_tx_count(proxy) == sent + 1 and len(standin.received) == 1


def test_eip1271_wallet_that_accepts_pays_once(proxy: Proxy, standin: StandinModel) -> None:
    attempt, wallet, amount = wallet_payment(proxy, refuse=False)
    before = token_balances(proxy, wallet)
    sent = relayer_tx_count(proxy)
    response = send(proxy, attempt)
    _served_once(proxy, standin, response, wallet, amount, before)
    assert relayer_tx_count(proxy) == sent + 1
    again = send(proxy, attempt)
    assert again.status_code == 402 and again.json()["error"] == NONCE_USED
    assert proxy.chain.balance(wallet) == before[wallet.lower()] - amount
    assert relayer_tx_count(proxy) == sent + 1 and len(standin.received) == 1


@pytest.mark.parametrize("first", [2, 1], ids=["v2 first", "v1 first"])
def test_one_authorization_in_v1_and_v2_pays_once(proxy: Proxy, standin: StandinModel, first: int) -> None:
    v2_requirement, v1_requirement = _requirement(proxy, 2), _requirement(proxy, 1)
    auth = authorization_for(v2_requirement, proxy.wallets.payer, valid_after=int(time.time()) - 600)
    signature = sign(proxy.wallets.payer_key, auth)
    wrapped = {2: wrap(auth, signature, v2_requirement, 2), 1: wrap(auth, signature, v1_requirement, 1)}
    before = token_balances(proxy)
    sent = relayer_tx_count(proxy)
    served = send(proxy, Attempt(header_of(wrapped[first])))
    assert served.status_code == 200, served.text
    assert ("PAYMENT-RESPONSE" if first == 2 else "X-PAYMENT-RESPONSE") in served.headers
    refused = send(proxy, Attempt(header_of(wrapped[3 - first])))
    assert refused.status_code == 402
    assert refused.json()["error"] == NONCE_USED
    after = token_balances(proxy)
    assert after[proxy.wallets.payer.lower()] == before[proxy.wallets.payer.lower()] - auth.value
    assert after[proxy.wallets.pay_to.lower()] == before[proxy.wallets.pay_to.lower()] + auth.value
    assert relayer_tx_count(proxy) == sent + 1
    assert len(standin.received) == 1
    assert list(payment_states(proxy).values()) == ["served"]
