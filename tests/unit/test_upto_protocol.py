"""The pure ``upto`` protocol (``app.x402.upto``): parsing, the Permit2 digest, the offline checks.

The digest is cross-checked against eth-account's generic EIP-712 encoder and payloads come from the
official PyPI x402 ``upto`` client, so a field order or type string that differs from Permit2's fails.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequirements

from app.x402.checks import match_requirement
from app.x402.upto import (
    PERMIT2_ADDRESS,
    UPTO_PROXY_ADDRESS,
    Permit2Authorization,
    check_permit,
    parse_upto_payment,
    permit_digest,
    upto_payment_of,
)
from app.x402.upto import checks as upto
from app.x402.verdict import INVALID_PAYLOAD
from app.x402.wire import Invalid, Requirement

KEY = "0x" + "11" * 32
PAYER = Account.from_key(KEY).address
PAY_TO = "0x" + "22" * 20
RELAYER = "0x" + "33" * 20
USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
MAXIMUM = 2_500
REQUIREMENT = Requirement(
    network="eip155:8453",
    amount=MAXIMUM,
    asset=USDC,
    pay_to=PAY_TO,
    max_timeout_seconds=120,
    asset_name="USD Coin",
    asset_version="2",
    scheme="upto",
    facilitator=RELAYER,
)

addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
uint256 = st.integers(0, 2**256 - 1)


def official_wire(now: int | None = None) -> dict[str, Any]:
    """A v2 payload as the official client builds it for ``REQUIREMENT``."""
    requirements = PaymentRequirements.model_validate(REQUIREMENT.to_v2())
    payload = UptoEvmClientScheme(EthAccountSigner(Account.from_key(KEY))).create_payment_payload(
        requirements
    )
    return {"x402Version": 2, "accepted": REQUIREMENT.to_v2(), "payload": payload}


def typed_data(chain_id: int, auth: Permit2Authorization) -> dict[str, Any]:
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "PermitWitnessTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
                {"name": "witness", "type": "Witness"},
            ],
            "TokenPermissions": [{"name": "token", "type": "address"}, {"name": "amount", "type": "uint256"}],
            "Witness": [
                {"name": "to", "type": "address"},
                {"name": "facilitator", "type": "address"},
                {"name": "validAfter", "type": "uint256"},
            ],
        },
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": chain_id, "verifyingContract": PERMIT2_ADDRESS},
        "message": {
            "permitted": {"token": auth.token, "amount": auth.amount},
            "spender": auth.spender,
            "nonce": auth.nonce,
            "deadline": auth.deadline,
            "witness": {"to": auth.to, "facilitator": auth.facilitator, "validAfter": auth.valid_after},
        },
    }


@settings(max_examples=50, deadline=None)
@given(
    chain_id=st.integers(1, 2**64),
    parts=st.tuples(addresses, uint256, addresses, uint256, uint256, addresses, addresses, uint256),
)
def test_permit_digest_is_the_eip712_hash_of_permit2s_witness_transfer(
    chain_id: int, parts: tuple[Any, ...]
) -> None:
    token, amount, spender, nonce, deadline, to, facilitator, valid_after = parts
    auth = Permit2Authorization(
        PAYER.lower(), token, amount, spender, nonce, deadline, to, facilitator, valid_after
    )
    signable = encode_typed_data(full_message=typed_data(chain_id, auth))
    expected = b"\x19\x01" + signable.header + signable.body
    assert permit_digest(chain_id, auth) == keccak(expected)


def test_the_official_clients_payload_parses_and_passes() -> None:
    payment = parse_upto_payment(official_wire())
    auth = payment.authorization
    assert (auth.from_, auth.spender, auth.to, auth.facilitator) == (
        PAYER.lower(),
        UPTO_PROXY_ADDRESS.lower(),
        PAY_TO,
        RELAYER,
    )
    assert auth.amount == MAXIMUM and payment.permit2612 is None
    checked = check_permit(payment, REQUIREMENT, int(time.time()))
    assert checked.verdict and checked.ecdsa_signer


def test_an_exact_header_is_left_to_the_exact_parser_and_a_broken_upto_one_is_refused() -> None:
    assert upto_payment_of({"x402Version": 2, "accepted": {"scheme": "exact"}}) is None
    assert upto_payment_of(None) is None
    wire = official_wire()
    wire["payload"]["permit2Authorization"]["extra"] = "1"
    verdict = upto_payment_of(wire)
    assert not isinstance(verdict, type(None)) and getattr(verdict, "reason", "") == INVALID_PAYLOAD


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("permit2Authorization.nonce", 5),
        ("permit2Authorization.nonce", "-1"),
        ("permit2Authorization.deadline", str(2**256)),
        ("permit2Authorization.permitted.amount", "1.5"),
        ("permit2Authorization.witness.to", "0x12"),
        ("signature", "0x1234"),
    ],
)
def test_malformed_fields_are_refused(path: str, value: Any) -> None:
    wire = official_wire()
    node = wire["payload"]
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(Invalid):
        parse_upto_payment(wire)


def with_auth(**changes: Any) -> Any:
    payment = parse_upto_payment(official_wire())
    return dataclasses.replace(payment, authorization=dataclasses.replace(payment.authorization, **changes))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"spender": "0x" + "44" * 20}, upto.INVALID_SPENDER),
        ({"to": "0x" + "44" * 20}, upto.RECIPIENT_MISMATCH),
        ({"facilitator": "0x" + "44" * 20}, upto.FACILITATOR_MISMATCH),
        ({"deadline": 0}, upto.DEADLINE_EXPIRED),
        ({"deadline": 2**40}, upto.DEADLINE_TOO_FAR),
        ({"valid_after": 2**40}, upto.NOT_YET_VALID),
        ({"amount": MAXIMUM + 1}, upto.AMOUNT_MISMATCH),
        ({"token": "0x" + "44" * 20}, upto.TOKEN_MISMATCH),
    ],
)
def test_each_term_has_its_reason(changes: dict[str, Any], reason: str) -> None:
    assert check_permit(with_auth(**changes), REQUIREMENT, int(time.time())).verdict.reason == reason


def test_a_permit_must_outlive_the_call() -> None:
    now = int(time.time())
    short = with_auth(deadline=now + REQUIREMENT.max_timeout_seconds - 31)  # beyond the clock skew
    assert check_permit(short, REQUIREMENT, now).verdict.reason == upto.DEADLINE_TOO_SHORT
    skewed = with_auth(deadline=now + REQUIREMENT.max_timeout_seconds - 30)
    assert check_permit(skewed, REQUIREMENT, now).verdict.reason != upto.DEADLINE_TOO_SHORT


def test_a_non_canonical_signature_is_refused_and_a_foreign_one_is_left_to_the_chain() -> None:
    payment = parse_upto_payment(official_wire())
    high_s = payment.signature[:32] + (2**256 - 1).to_bytes(32, "big") + payment.signature[64:]
    refused = check_permit(dataclasses.replace(payment, signature=high_s), REQUIREMENT, int(time.time()))
    assert refused.verdict.reason == upto.INVALID_SIGNATURE
    other = with_auth(nonce=payment.authorization.nonce + 1)  # signed for another nonce
    checked = check_permit(other, REQUIREMENT, int(time.time()))
    assert checked.verdict and not checked.ecdsa_signer  # an EOA then fails on chain; EIP-1271 may pass
    longer = check_permit(dataclasses.replace(payment, signature=payment.signature + b"\x00"), REQUIREMENT, 0)
    assert not longer.verdict or not longer.ecdsa_signer


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["nonce", "deadline", "valid_after", "amount"]), delta=st.integers(1, 10**6))
def test_any_signed_number_changed_after_signing_never_passes_as_the_payers(field: str, delta: int) -> None:
    payment = parse_upto_payment(official_wire())
    changed = with_auth(**{field: getattr(payment.authorization, field) + delta})
    checked = check_permit(changed, REQUIREMENT, int(time.time()))
    assert not (checked.verdict and checked.ecdsa_signer)


def eip2612_extension(**changes: Any) -> dict[str, Any]:
    info = {
        "from": PAYER,
        "asset": USDC,
        "spender": PERMIT2_ADDRESS,
        "amount": str(MAXIMUM),
        "nonce": "0",
        "deadline": str(int(time.time()) + 100),
        "signature": "0x" + "ab" * 65,
        "version": "1",
        "description": "echoed from the 402",
    }
    return {"eip2612GasSponsoring": {"info": {**info, **changes}, "schema": {}}, "bazaar": {"info": {}}}


def test_the_eip2612_permit_is_read_beside_other_extensions_and_checked() -> None:
    wire = {**official_wire(), "extensions": eip2612_extension()}
    payment = parse_upto_payment(wire)
    assert payment.permit2612 is not None and payment.permit2612.value == MAXIMUM
    assert check_permit(payment, REQUIREMENT, int(time.time())).verdict
    declared_only = {**official_wire(), "extensions": {"eip2612GasSponsoring": {"info": {"version": "1"}}}}
    assert parse_upto_payment(declared_only).permit2612 is None  # the 402's declaration, echoed
    for changes, reason in [
        ({"from": "0x" + "44" * 20}, upto.EIP2612_FROM_MISMATCH),
        ({"asset": "0x" + "44" * 20}, upto.EIP2612_ASSET_MISMATCH),
        ({"spender": UPTO_PROXY_ADDRESS}, upto.EIP2612_SPENDER),
        ({"amount": "1"}, upto.EIP2612_AMOUNT_MISMATCH),
        ({"deadline": "1"}, upto.EIP2612_DEADLINE),
    ]:
        bad = parse_upto_payment({**official_wire(), "extensions": eip2612_extension(**changes)})
        assert check_permit(bad, REQUIREMENT, int(time.time())).verdict.reason == reason
    with pytest.raises(Invalid):
        parse_upto_payment({**official_wire(), "extensions": eip2612_extension(signature="0xabcd")})


def test_the_facilitator_address_matches_in_any_letter_case() -> None:
    wire = official_wire()
    wire["accepted"]["extra"]["facilitatorAddress"] = RELAYER.upper().replace("0X", "0x")
    payment = parse_upto_payment(wire)
    assert match_requirement(payment, REQUIREMENT)
    wire["accepted"]["extra"]["facilitatorAddress"] = "0x" + "44" * 20
    assert match_requirement(parse_upto_payment(wire), REQUIREMENT).reason == "invalid_payment_requirements"
