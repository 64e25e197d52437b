"""Offline payment checks (requirement match, authorization) and the dual-version 402 challenge."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.x402.challenge import EXPOSED_HEADERS, Resource, build_challenge
from app.x402.checks import (
    MAX_CLOCK_SKEW,
    MIN_VALIDITY_MARGIN,
    check_authorization,
    match_requirement,
    normalise_signature,
)
from app.x402.codec import MAX_HEADER_BYTES, decode_header, encode_header
from app.x402.eip712 import (
    SECP256K1_N,
    address_of_key,
    authorization_digest,
    domain_separator,
    sign_digest,
    split_signature,
)
from app.x402.payer import offered_requirements, sign_payment
from app.x402.verdict import (
    INVALID_SIGNATURE,
    NETWORK_MISMATCH,
    RECIPIENT_MISMATCH,
    REQUIREMENTS_MISMATCH,
    UNSUPPORTED_SCHEME,
    VALID_AFTER,
    VALID_BEFORE,
    VALUE_MISMATCH,
)
from app.x402.wire import Authorization, PaymentPayload, Requirement, parse_payment_header

NOW = 1_750_000_000
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
OTHER = "0x1111111111111111111111111111111111111111"
URL = "https://proxy.example/v1/chat/completions"

REQ = Requirement(
    network="eip155:8453",
    amount=10_000,
    asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
    pay_to=PAY_TO,
    max_timeout_seconds=120,
    asset_name="USD Coin",
    asset_version="2",
)
SEPOLIA_DOMAIN = ("USDC", "1", 84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e")


def make_payment(
    key: bytes | None = None,
    *,
    version: int = 2,
    to: str = PAY_TO,
    value: int = REQ.amount,
    valid_after: int = 0,
    valid_before: int = NOW + 120,
    domain: tuple[str, str, int, str] | None = None,
    signer: bytes | None = None,
    accepted: dict[str, Any] | None = None,
    network: str | None = None,
    scheme: str = "exact",
) -> PaymentPayload:
    """A payment from ``key``'s address, signed by ``signer`` (default: the same key) over ``domain``."""
    key = key or os.urandom(32)
    auth = Authorization(address_of_key(key), to.lower(), value, valid_after, valid_before, os.urandom(32))
    name, version_, chain_id, contract = domain or (
        REQ.asset_name,
        REQ.asset_version,
        REQ.chain_id,
        REQ.asset,
    )
    digest = authorization_digest(
        domain_separator(name, version_, chain_id, contract),
        auth.from_,
        auth.to,
        auth.value,
        auth.valid_after,
        auth.valid_before,
        auth.nonce,
    )
    return PaymentPayload(
        version=version,
        scheme=scheme,
        network=network if network is not None else (REQ.network if version == 2 else REQ.v1_network),
        authorization=auth,
        signature=sign_digest(signer or key, digest),
        accepted=(accepted if accepted is not None else REQ.to_v2()) if version == 2 else None,
    )


def with_accepted(**changes: Any) -> PaymentPayload:
    accepted = REQ.to_v2()
    for key, value in changes.items():
        if value is None:
            accepted.pop(key, None)
        else:
            accepted[key] = value
    return make_payment(accepted=accepted)


# -- match_requirement -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_match_accepts_our_own_requirement(version: int) -> None:
    assert match_requirement(make_payment(version=version), REQ).ok


@pytest.mark.parametrize("version", [1, 2])
def test_match_unsupported_scheme(version: int) -> None:
    verdict = match_requirement(make_payment(version=version, scheme="upto"), REQ)
    assert (verdict.ok, verdict.reason) == (False, UNSUPPORTED_SCHEME)


@pytest.mark.parametrize(
    ("version", "network"),
    [(2, "eip155:84532"), (2, "base"), (2, "eip155:1"), (1, "base-sepolia"), (1, "eip155:8453"), (1, "")],
)
def test_match_network_mismatch(version: int, network: str) -> None:
    verdict = match_requirement(make_payment(version=version, network=network), REQ)
    assert (verdict.ok, verdict.reason) == (False, NETWORK_MISMATCH)


@pytest.mark.parametrize(
    "changes",
    [
        {"amount": "10001"},
        {"amount": "9999"},
        {"amount": "010000"},
        {"amount": 10_000},  # number instead of the string we offered
        {"amount": None},
        {"maxTimeoutSeconds": 121},
        {"maxTimeoutSeconds": "120"},
        {"maxTimeoutSeconds": None},
        {"asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e"},
        {"asset": None},
        {"asset": 1},
        {"payTo": OTHER},
        {"payTo": None},
        {"extra": {"name": "USDC", "version": "2"}},
        {"extra": {"name": "USD Coin", "version": "1"}},
        {"extra": {"name": "USD Coin", "version": "2", "chainId": 8453}},
        {"extra": ["USD Coin", "2"]},
    ],
    ids=repr,
)
def test_match_requirement_mismatch(changes: dict[str, Any]) -> None:
    verdict = match_requirement(with_accepted(**changes), REQ)
    assert (verdict.ok, verdict.reason) == (False, REQUIREMENTS_MISMATCH)


def test_match_bool_max_timeout_refused() -> None:
    one_second = dataclasses.replace(REQ, max_timeout_seconds=1)
    payment = make_payment(accepted={**one_second.to_v2(), "maxTimeoutSeconds": True})
    verdict = match_requirement(payment, one_second)
    assert (verdict.ok, verdict.reason) == (False, REQUIREMENTS_MISMATCH)


@pytest.mark.parametrize(
    "changes",
    [
        {"asset": REQ.asset.lower()},
        {"asset": "0x" + REQ.asset[2:].upper()},
        {"payTo": PAY_TO.lower()},
        {"payTo": "0x" + PAY_TO[2:].upper()},
        {"extra": {}},  # a subset of ours
        {"extra": {"name": "USD Coin"}},
        {"extra": None},  # absent
    ],
    ids=repr,
)
def test_match_accepts_case_and_extra_subset(changes: dict[str, Any]) -> None:
    assert match_requirement(with_accepted(**changes), REQ).ok


def test_match_v1_has_no_accepted_to_compare() -> None:
    assert match_requirement(make_payment(version=1), REQ).ok


def test_cheap_route_payment_does_not_buy_dear_route() -> None:
    cheap = dataclasses.replace(REQ, amount=1)
    payment = make_payment(value=1, accepted=cheap.to_v2())
    assert match_requirement(payment, cheap).ok
    assert match_requirement(payment, REQ).reason == REQUIREMENTS_MISMATCH


# -- check_authorization -----------------------------------------------------------------------------


def test_check_accepts_a_good_payment() -> None:
    payment = make_payment()
    result = check_authorization(payment, REQ, NOW)
    assert result.verdict.ok
    assert result.ecdsa_signer is True
    assert result.signature == payment.signature


def test_check_recipient_mismatch_comes_first() -> None:
    payment = make_payment(to=OTHER, value=1, valid_before=NOW - 1, valid_after=NOW + 10)
    result = check_authorization(payment, REQ, NOW)
    assert (result.verdict.ok, result.verdict.reason) == (False, RECIPIENT_MISMATCH)
    assert result.ecdsa_signer is False


def test_check_recipient_case_insensitive() -> None:
    payment = make_payment(to=PAY_TO.lower())
    assert check_authorization(payment, REQ, NOW).verdict.ok


@pytest.mark.parametrize("value", [0, 1, REQ.amount - 1, REQ.amount + 1, 2**256 - 1])
def test_check_value_must_be_exact(value: int) -> None:
    payment = make_payment(value=value, valid_before=NOW - 1)  # value is checked before time
    result = check_authorization(payment, REQ, NOW)
    assert (result.verdict.ok, result.verdict.reason) == (False, VALUE_MISMATCH)


@pytest.mark.parametrize(
    ("valid_before", "ok"),
    [
        (0, False),
        (NOW - 1, False),
        (NOW, False),
        (NOW + MIN_VALIDITY_MARGIN - 1, False),
        (NOW + 5, False),
        (NOW + 6, True),
        (NOW + 7, True),
        (NOW + 120 + MAX_CLOCK_SKEW, True),
        (NOW + 120 + MAX_CLOCK_SKEW + 1, False),  # beyond maxTimeoutSeconds: a claim would live long
        (2**256 - 1, False),
    ],
)
def test_check_valid_before_margin(valid_before: int, ok: bool) -> None:
    result = check_authorization(make_payment(valid_before=valid_before), REQ, NOW)
    assert result.verdict.ok is ok
    if not ok:
        assert result.verdict.reason == VALID_BEFORE
        # the signature is good: an expired payment recorded earlier may still be recovered; one
        # too far ahead was never accepted
        assert result.window_only is (valid_before < NOW + MIN_VALIDITY_MARGIN)
        assert result.ecdsa_signer is True


def test_a_bad_signature_outside_the_window_is_not_recoverable() -> None:
    payment = make_payment(valid_before=NOW - 1)
    forged = dataclasses.replace(payment, signature=payment.signature[:64] + bytes([29]))
    result = check_authorization(forged, REQ, NOW)
    assert (result.verdict.reason, result.window_only) == (VALID_BEFORE, False)
    other = make_payment(valid_before=NOW - 1, signer=os.urandom(32))  # signed by someone else
    assert check_authorization(other, REQ, NOW).ecdsa_signer is False


def test_margin_is_six_seconds() -> None:
    assert MIN_VALIDITY_MARGIN == 6


@pytest.mark.parametrize(("valid_after", "ok"), [(0, True), (NOW - 600, True), (NOW, True), (NOW + 1, False)])
def test_check_valid_after(valid_after: int, ok: bool) -> None:
    result = check_authorization(make_payment(valid_after=valid_after), REQ, NOW)
    assert result.verdict.ok is ok
    if not ok:
        assert result.verdict.reason == VALID_AFTER


@pytest.mark.parametrize("moment", [NOW, NOW + 3, NOW + 100])
def test_check_empty_window_refused(moment: int) -> None:
    payment = make_payment(valid_after=moment, valid_before=moment)
    result = check_authorization(payment, REQ, NOW)
    assert not result.verdict.ok
    assert result.verdict.reason in (VALID_AFTER, VALID_BEFORE)


@settings(max_examples=50, deadline=None)
@given(
    after=st.integers(min_value=0, max_value=NOW + 1000),
    before=st.integers(min_value=0, max_value=NOW + 1000),
)
def test_check_time_window_property(after: int, before: int) -> None:
    result = check_authorization(make_payment(valid_after=after, valid_before=before), REQ, NOW)
    expected = NOW + MIN_VALIDITY_MARGIN <= before <= NOW + 120 + MAX_CLOCK_SKEW and after <= NOW
    assert result.verdict.ok is expected


def high_s(signature: bytes) -> bytes:
    v, r, s = split_signature(signature)
    return r + (SECP256K1_N - int.from_bytes(s, "big")).to_bytes(32, "big") + bytes([55 - v])


def test_check_high_s_is_invalid_signature() -> None:
    payment = make_payment()
    twin = dataclasses.replace(payment, signature=high_s(payment.signature))
    result = check_authorization(twin, REQ, NOW)
    assert (result.verdict.ok, result.verdict.reason) == (False, INVALID_SIGNATURE)


def test_check_high_s_with_raw_v_is_invalid_signature() -> None:
    payment = make_payment()
    twin = high_s(payment.signature)
    twin = twin[:64] + bytes([twin[64] - 27])
    result = check_authorization(dataclasses.replace(payment, signature=twin), REQ, NOW)
    assert (result.verdict.ok, result.verdict.reason) == (False, INVALID_SIGNATURE)


def test_check_signature_by_another_key_needs_a_contract_wallet() -> None:
    payment = make_payment(signer=os.urandom(32))
    result = check_authorization(payment, REQ, NOW)
    assert result.verdict.ok
    assert result.ecdsa_signer is False
    assert result.signature == payment.signature


def test_check_raw_v_is_normalised() -> None:
    payment = make_payment()
    v = payment.signature[64]
    raw = dataclasses.replace(payment, signature=payment.signature[:64] + bytes([v - 27]))
    result = check_authorization(raw, REQ, NOW)
    assert result.verdict.ok
    assert result.ecdsa_signer is True
    assert result.signature == payment.signature
    assert result.signature[64] in (27, 28)


def test_normalise_signature() -> None:
    body = os.urandom(64)
    assert normalise_signature(body + b"\x00") == body + b"\x1b"
    assert normalise_signature(body + b"\x01") == body + b"\x1c"
    for v in (27, 28, 2, 255):
        assert normalise_signature(body + bytes([v])) == body + bytes([v])
    assert normalise_signature(body + b"\x00\x00") == body + b"\x00\x00"  # not 65 bytes: untouched


@pytest.mark.parametrize(
    "domain",
    [
        SEPOLIA_DOMAIN,
        ("USDC", REQ.asset_version, REQ.chain_id, REQ.asset),
        (REQ.asset_name, "1", REQ.chain_id, REQ.asset),
        (REQ.asset_name, REQ.asset_version, 84532, REQ.asset),
        (REQ.asset_name, REQ.asset_version, REQ.chain_id, SEPOLIA_DOMAIN[3]),
    ],
    ids=["all", "name", "version", "chain", "contract"],
)
def test_check_signature_over_another_domain_does_not_recover(domain: tuple[str, str, int, str]) -> None:
    result = check_authorization(make_payment(domain=domain), REQ, NOW)
    assert result.verdict.ok
    assert result.ecdsa_signer is False


def test_check_long_signature_is_left_to_eip1271() -> None:
    payment = make_payment()
    long = dataclasses.replace(payment, signature=payment.signature + os.urandom(65))
    result = check_authorization(long, REQ, NOW)
    assert result.verdict.ok
    assert result.ecdsa_signer is False
    assert result.signature == long.signature


# -- challenge -----------------------------------------------------------------------------------------

RESOURCE = Resource(URL, "a chat completion on hermes-3-8b-tee")


def test_challenge_body_is_v1() -> None:
    challenge = build_challenge([REQ], RESOURCE, "payment_required")
    assert challenge.body == {
        "x402Version": 1,
        "error": "payment_required",
        "accepts": [REQ.to_v1(URL, RESOURCE.description, "application/json")],
    }
    entry = challenge.body["accepts"][0]
    assert entry["network"] == "base"
    assert "outputSchema" not in entry


def test_challenge_header_is_v2() -> None:
    challenge = build_challenge([REQ], RESOURCE, "invalid_exact_evm_payload_signature")
    decoded = decode_header(challenge.header)
    assert decoded["x402Version"] == 2
    assert decoded["error"] == "invalid_exact_evm_payload_signature"
    assert decoded["resource"] == {
        "url": URL,
        "description": RESOURCE.description,
        "mimeType": "application/json",
    }
    assert len(decoded["accepts"]) == 1
    assert decoded["accepts"][0] == REQ.to_v2()
    assert challenge.header == encode_header(decoded)


def test_challenge_headers() -> None:
    challenge = build_challenge([REQ], RESOURCE, "payment_required")
    headers = challenge.headers()
    assert headers["PAYMENT-REQUIRED"] == challenge.header
    assert headers["Cache-Control"] == "no-store"
    exposed = {h.strip() for h in headers["Access-Control-Expose-Headers"].split(",")}
    assert exposed == {
        "PAYMENT-REQUIRED",
        "PAYMENT-RESPONSE",
        "X-PAYMENT-RESPONSE",
        "X-Receipt",
        "X-Payment-Error",
        "X-Credit-Added",  # what a browser may read of credit: change, charge, balance
        "X-Credit-Charged",
        "X-Credit-Balance",
    }
    assert headers["Access-Control-Expose-Headers"] == EXPOSED_HEADERS


def test_challenge_header_stays_under_8kb() -> None:
    long = Resource("https://proxy.example/" + "p" * 500, "d" * 1000 + "é" * 500, "application/json")
    header = build_challenge([REQ], long, "invalid_exact_evm_payload_authorization_value_mismatch").header
    assert len(header) < 8 * 1024
    assert len(header) <= MAX_HEADER_BYTES
    assert decode_header(header)["resource"]["description"] == long.description


def test_offered_requirements_prefers_header() -> None:
    challenge = build_challenge([REQ], RESOURCE, "payment_required")
    version, resource, accepts = offered_requirements(challenge.headers(), challenge.body)
    assert version == 2
    assert resource == {"url": URL, "description": RESOURCE.description, "mimeType": "application/json"}
    assert accepts == [REQ.to_v2()]


def test_offered_requirements_lower_case_header() -> None:
    challenge = build_challenge([REQ], RESOURCE, "payment_required")
    version, _, accepts = offered_requirements({"payment-required": challenge.header}, challenge.body)
    assert (version, accepts) == (2, [REQ.to_v2()])


@pytest.mark.parametrize(
    "headers",
    [{}, {"PAYMENT-REQUIRED": ""}, {"PAYMENT-REQUIRED": "%%%"}, {"PAYMENT-REQUIRED": encode_header([1])}],
)
def test_offered_requirements_falls_back_to_body(headers: dict[str, str]) -> None:
    challenge = build_challenge([REQ], RESOURCE, "payment_required")
    version, resource, accepts = offered_requirements(headers, challenge.body)
    assert (version, resource) == (1, None)
    assert accepts == challenge.body["accepts"]


@pytest.mark.parametrize("body", [None, [], {"accepts": "x"}, {"x402Version": 1}])
def test_offered_requirements_nothing(body: Any) -> None:
    assert offered_requirements({}, body) == (0, None, [])


@pytest.mark.parametrize("use_header", [True, False])
def test_challenge_to_payment_to_checks_end_to_end(use_header: bool) -> None:
    """A buyer reading either half of our 402 signs a payment every offline check accepts."""
    challenge = build_challenge([REQ], RESOURCE, "payment_required")
    headers = challenge.headers() if use_header else {}
    version, resource, accepts = offered_requirements(headers, challenge.body)
    assert version == (2 if use_header else 1)
    key = os.urandom(32)
    payment = sign_payment(accepts[0], version, key, NOW, os.urandom(32), resource=resource)
    parsed = parse_payment_header(encode_header(payment.to_wire()), version)
    assert isinstance(parsed, PaymentPayload)
    assert match_requirement(parsed, REQ).ok
    result = check_authorization(parsed, REQ, NOW)
    assert result.verdict.ok and result.ecdsa_signer
    assert parsed.authorization.from_ == address_of_key(key)
