"""Wire objects: real signed payments round-trip through the header codec; anything looser is refused."""

from __future__ import annotations

import base64
import copy
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.x402.codec import decode_header, encode_header
from app.x402.eip712 import address_of_key
from app.x402.payer import header_name, requirement_amount, sign_payment
from app.x402.verdict import INVALID_PAYLOAD, INVALID_VERSION, Verdict
from app.x402.wire import (
    RESPONSE_HEADERS,
    V1_HEADER,
    V2_HEADER,
    Authorization,
    PaymentPayload,
    Requirement,
    SettleResponse,
    parse_payment_header,
)

NOW = 1_750_000_000
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
RESOURCE_URL = "https://proxy.example/v1/chat/completions"

BASE_REQ = Requirement(
    network="eip155:8453",
    amount=10_000,
    asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
    pay_to=PAY_TO,
    max_timeout_seconds=120,
    asset_name="USD Coin",
    asset_version="2",
)
SEPOLIA_REQ = Requirement(
    network="eip155:84532",
    amount=1,
    asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    pay_to=PAY_TO,
    max_timeout_seconds=60,
    asset_name="USDC",
    asset_version="2",
)


def offered(requirement: Requirement, version: int) -> dict[str, Any]:
    if version == 2:
        return requirement.to_v2()
    return requirement.to_v1(RESOURCE_URL, "a chat completion", "application/json")


def signed(version: int, requirement: Requirement = BASE_REQ, key: bytes | None = None) -> PaymentPayload:
    resource = {"url": RESOURCE_URL, "description": "a chat completion", "mimeType": "application/json"}
    return sign_payment(
        offered(requirement, version),
        version,
        key or os.urandom(32),
        NOW,
        os.urandom(32),
        resource=resource,
    )


def header_of(wire: Any) -> str:
    return encode_header(wire)


# -- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("requirement", [BASE_REQ, SEPOLIA_REQ], ids=["base", "base-sepolia"])
@pytest.mark.parametrize("version", [1, 2])
def test_signed_payment_round_trips(version: int, requirement: Requirement) -> None:
    key = os.urandom(32)
    payment = signed(version, requirement, key)
    parsed = parse_payment_header(encode_header(payment.to_wire()), version)
    assert isinstance(parsed, PaymentPayload)
    assert parsed == payment
    assert parsed.version == version
    assert parsed.scheme == "exact"
    assert parsed.authorization.from_ == address_of_key(key)
    assert parsed.authorization.to == PAY_TO.lower()
    assert parsed.authorization.value == requirement.amount
    assert len(parsed.signature) == 65


def test_v2_payment_fields() -> None:
    payment = signed(2)
    assert payment.network == "eip155:8453"
    assert payment.accepted == BASE_REQ.to_v2()
    assert payment.resource is not None and payment.resource["url"] == RESOURCE_URL
    assert payment.authorization.valid_after == 0
    assert payment.authorization.valid_before == NOW + BASE_REQ.max_timeout_seconds
    wire = payment.to_wire()
    assert list(wire) == ["x402Version", "resource", "accepted", "payload"]
    assert wire["payload"]["authorization"]["value"] == "10000"
    assert wire["payload"]["authorization"]["validAfter"] == "0"


def test_v1_payment_fields() -> None:
    payment = signed(1)
    assert payment.network == "base"
    assert payment.accepted is None and payment.resource is None
    assert payment.authorization.valid_after == NOW - 600
    wire = payment.to_wire()
    assert set(wire) == {"x402Version", "scheme", "network", "payload"}
    assert wire["network"] == "base"


def test_v2_extensions_round_trip() -> None:
    payment = signed(2)
    wire = payment.to_wire()
    wire["extensions"] = {"bazaar": {"info": 1}}
    parsed = parse_payment_header(header_of(wire), 2)
    assert isinstance(parsed, PaymentPayload)
    assert parsed.extensions == {"bazaar": {"info": 1}}
    assert parsed.to_wire() == wire


def test_v2_resource_is_optional() -> None:
    wire = signed(2).to_wire()
    del wire["resource"]
    parsed = parse_payment_header(header_of(wire), 2)
    assert isinstance(parsed, PaymentPayload)
    assert parsed.resource is None


def test_upper_case_hex_is_accepted_and_normalised() -> None:
    payment = signed(2)
    wire = payment.to_wire()
    auth = wire["payload"]["authorization"]
    auth["from"] = "0x" + auth["from"][2:].upper()
    auth["to"] = PAY_TO
    auth["nonce"] = "0x" + auth["nonce"][2:].upper()
    wire["payload"]["signature"] = "0x" + wire["payload"]["signature"][2:].upper()
    parsed = parse_payment_header(header_of(wire), 2)
    assert parsed == payment


@settings(max_examples=50, deadline=None)
@given(
    value=st.integers(min_value=0, max_value=2**256 - 1),
    valid_after=st.integers(min_value=0, max_value=2**256 - 1),
    valid_before=st.integers(min_value=0, max_value=2**256 - 1),
    nonce=st.binary(min_size=32, max_size=32),
    signature=st.binary(min_size=65, max_size=200),
    version=st.sampled_from([1, 2]),
)
def test_any_well_formed_payload_round_trips(
    value: int, valid_after: int, valid_before: int, nonce: bytes, signature: bytes, version: int
) -> None:
    payment = PaymentPayload(
        version=version,
        scheme="exact",
        network="eip155:8453" if version == 2 else "base",
        authorization=Authorization(
            "0x" + "ab" * 20, "0x" + "cd" * 20, value, valid_after, valid_before, nonce
        ),
        signature=signature,
        accepted=BASE_REQ.to_v2() if version == 2 else None,
    )
    assert parse_payment_header(encode_header(payment.to_wire()), version) == payment


# -- refusals --------------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], Any]


def set_auth(key: str, value: Any) -> Mutation:
    def mutate(wire: dict[str, Any]) -> dict[str, Any]:
        wire["payload"]["authorization"][key] = value
        return wire

    return mutate


def del_auth(key: str) -> Mutation:
    def mutate(wire: dict[str, Any]) -> dict[str, Any]:
        del wire["payload"]["authorization"][key]
        return wire

    return mutate


def set_payload(key: str, value: Any) -> Mutation:
    def mutate(wire: dict[str, Any]) -> dict[str, Any]:
        wire["payload"][key] = value
        return wire

    return mutate


def del_payload(key: str) -> Mutation:
    def mutate(wire: dict[str, Any]) -> dict[str, Any]:
        del wire["payload"][key]
        return wire

    return mutate


def set_top(key: str, value: Any) -> Mutation:
    def mutate(wire: dict[str, Any]) -> dict[str, Any]:
        wire[key] = value
        return wire

    return mutate


def del_top(key: str) -> Mutation:
    def mutate(wire: dict[str, Any]) -> dict[str, Any]:
        del wire[key]
        return wire

    return mutate


def replace_all(value: Any) -> Mutation:
    return lambda wire: value


BAD_UINTS: list[Any] = [
    " 10",
    "10 ",
    "1_0",
    "+10",
    "-10",
    "１０",  # full-width digits: int() would take them
    "٣",  # Arabic-Indic digit
    "0x10",
    "10.0",
    "1e3",
    "",
    str(2**256),
    "9" * 79,
    10,
    10.0,
    -10,
    True,
    None,
    ["10"],
]
BAD_ADDRESSES: list[Any] = [
    "0x" + "ab" * 19,
    "0x" + "ab" * 21,
    "ab" * 20,
    "0X" + "ab" * 20,
    "0x" + "zz" * 20,
    "0x" + "ab" * 19 + "a",
    " 0x" + "ab" * 20,
    "",
    0,
    None,
]
BAD_NONCES: list[Any] = [
    "0x" + "ab" * 31,
    "0x" + "ab" * 33,
    "ab" * 32,
    "0x" + "gg" * 32,
    "0x" + "ab" * 31 + "a",
    12345,
    None,
]
BAD_SIGNATURES: list[Any] = [
    "0x" + "zz" * 65,
    "0x" + "a" * 131,  # odd length
    "ab" * 65,  # no 0x
    "0x" + "ab" * 64,  # 64 bytes
    "0x",
    "",
    "0x" + "ab" * 1025,
    65,
    None,
    ["0x" + "ab" * 65],
]
AUTH_KEYS = ["from", "to", "value", "validAfter", "validBefore", "nonce"]

COMMON_REFUSALS: list[tuple[str, Mutation]] = [
    *[(f"value={v!r}", set_auth("value", v)) for v in BAD_UINTS],
    *[(f"validAfter={v!r}", set_auth("validAfter", v)) for v in BAD_UINTS[:8]],
    *[(f"validBefore={v!r}", set_auth("validBefore", v)) for v in BAD_UINTS[:8]],
    *[(f"from={v!r}", set_auth("from", v)) for v in BAD_ADDRESSES],
    *[(f"to={v!r}", set_auth("to", v)) for v in BAD_ADDRESSES],
    *[(f"nonce={v!r}", set_auth("nonce", v)) for v in BAD_NONCES],
    *[(f"signature={v!r}"[:60], set_payload("signature", v)) for v in BAD_SIGNATURES],
    *[(f"missing authorization.{k}", del_auth(k)) for k in AUTH_KEYS],
    ("unknown authorization key", set_auth("amount", "10000")),
    ("missing payload.signature", del_payload("signature")),
    ("missing payload.authorization", del_payload("authorization")),
    ("unknown payload key", set_payload("extra", {})),
    ("missing payload", del_top("payload")),
    ("unknown top-level key", set_top("foo", 1)),
    ("payload is a list", set_top("payload", [])),
    ("payload is a string", set_top("payload", "x")),
    ("authorization is a list", set_payload("authorization", [])),
    ("authorization is null", set_payload("authorization", None)),
    ("top level is a list", replace_all([])),
    ("top level is a string", replace_all("payment")),
    ("top level is null", replace_all(None)),
    ("top level is a number", replace_all(2)),
]

V2_REFUSALS: list[tuple[str, Mutation]] = [
    ("missing accepted", del_top("accepted")),
    ("accepted is a list", set_top("accepted", [])),
    ("accepted is a string", set_top("accepted", "exact")),
    ("accepted.scheme is a number", lambda w: w["accepted"].update(scheme=1) or w),
    ("accepted.network missing", lambda w: w["accepted"].pop("network") and w),
    ("resource is a string", set_top("resource", RESOURCE_URL)),
    ("extensions is a list", set_top("extensions", [])),
    ("v1 scheme key at top", set_top("scheme", "exact")),
]

V1_REFUSALS: list[tuple[str, Mutation]] = [
    ("missing scheme", del_top("scheme")),
    ("missing network", del_top("network")),
    ("scheme is a number", set_top("scheme", 1)),
    ("network is null", set_top("network", None)),
    ("v2 accepted key", set_top("accepted", {})),
    ("v2 resource key", set_top("resource", {"url": RESOURCE_URL})),
]


def refusal(version: int, mutate: Mutation) -> Verdict:
    wire = mutate(copy.deepcopy(signed(version).to_wire()))
    result = parse_payment_header(header_of(wire), version)
    assert isinstance(result, Verdict), "a malformed payment was accepted"
    return result


@pytest.mark.parametrize(("label", "mutate"), COMMON_REFUSALS, ids=[c[0] for c in COMMON_REFUSALS])
@pytest.mark.parametrize("version", [1, 2])
def test_common_refusals(version: int, label: str, mutate: Mutation) -> None:
    verdict = refusal(version, mutate)
    assert not verdict.ok
    assert verdict.reason == (INVALID_VERSION if label.startswith("top level") else INVALID_PAYLOAD), (
        verdict.detail
    )
    assert verdict.detail


@pytest.mark.parametrize(("label", "mutate"), V2_REFUSALS, ids=[c[0] for c in V2_REFUSALS])
def test_v2_refusals(label: str, mutate: Mutation) -> None:
    verdict = refusal(2, mutate)
    assert (verdict.ok, verdict.reason) == (False, INVALID_PAYLOAD), verdict.detail


@pytest.mark.parametrize(("label", "mutate"), V1_REFUSALS, ids=[c[0] for c in V1_REFUSALS])
def test_v1_refusals(label: str, mutate: Mutation) -> None:
    verdict = refusal(1, mutate)
    assert (verdict.ok, verdict.reason) == (False, INVALID_PAYLOAD), verdict.detail


@pytest.mark.parametrize(
    ("body_version", "header_version", "mutate"),
    [
        (1, 2, None),  # a v1 body in PAYMENT-SIGNATURE
        (2, 1, None),  # a v2 body in X-PAYMENT
        (2, 2, set_top("x402Version", "2")),
        (2, 2, set_top("x402Version", 3)),
        (2, 2, set_top("x402Version", None)),
        (2, 2, del_top("x402Version")),
        (1, 1, set_top("x402Version", True)),  # True == 1 in Python
        (1, 1, set_top("x402Version", "1")),
        (1, 1, set_top("x402Version", 0)),
    ],
)
def test_version_mismatch(body_version: int, header_version: int, mutate: Mutation | None) -> None:
    wire = signed(body_version).to_wire()
    if mutate is not None:
        wire = mutate(wire)
    verdict = parse_payment_header(header_of(wire), header_version)
    assert isinstance(verdict, Verdict)
    assert (verdict.ok, verdict.reason) == (False, INVALID_VERSION), verdict.detail


@pytest.mark.parametrize("version", [1, 2])
def test_float_version_refused(version: int) -> None:
    wire = signed(version).to_wire()
    wire["x402Version"] = float(version)
    assert isinstance(parse_payment_header(header_of(wire), version), Verdict)


@pytest.mark.parametrize("field", ["value", "validBefore", "from", "to", "nonce", "signature"])
def test_trailing_newline_refused(field: str) -> None:
    wire = signed(2).to_wire()
    if field == "signature":
        wire["payload"]["signature"] += "\n"
    else:
        wire["payload"]["authorization"][field] += "\n"
    assert isinstance(parse_payment_header(header_of(wire), 2), Verdict)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        base64.urlsafe_b64encode(b'{"x402Version":2}' + b"\xff\xfe").decode(),
        base64.b64encode(b"not json").decode(),
        base64.b64encode(b'{"x402Version":2,"x402Version":2}').decode(),
        base64.b64encode(b'{"x402Version":NaN}').decode(),
        base64.b64encode(b"\xff\xfe").decode(),
        "A" * 9000,
    ],
)
@pytest.mark.parametrize("version", [1, 2])
def test_undecodable_header_is_invalid_payload(text: str, version: int) -> None:
    verdict = parse_payment_header(text, version)
    assert isinstance(verdict, Verdict)
    assert (verdict.ok, verdict.reason) == (False, INVALID_PAYLOAD)


@given(st.text(max_size=200))
def test_parse_never_raises(text: str) -> None:
    result = parse_payment_header(text, 2)
    assert isinstance(result, (PaymentPayload, Verdict))


# -- settle response, requirement shapes, header names -----------------------------------------------


def test_settle_response_success_header() -> None:
    response = SettleResponse(True, "0x" + "ab" * 32, "eip155:8453", "0x" + "cd" * 20)
    assert decode_header(response.to_header()) == {
        "success": True,
        "transaction": "0x" + "ab" * 32,
        "network": "eip155:8453",
        "payer": "0x" + "cd" * 20,
    }


def test_settle_response_failure_header_has_error_reason() -> None:
    response = SettleResponse(False, "", "base", "0x" + "cd" * 20, error_reason="transaction_failed")
    decoded = decode_header(response.to_header())
    assert decoded == {
        "success": False,
        "transaction": "",
        "network": "base",
        "payer": "0x" + "cd" * 20,
        "errorReason": "transaction_failed",
    }
    assert list(decoded) == ["success", "transaction", "network", "payer", "errorReason"]


def test_requirement_to_v2() -> None:
    v2 = BASE_REQ.to_v2()
    assert v2 == {
        "scheme": "exact",
        "network": "eip155:8453",
        "amount": "10000",
        "asset": BASE_REQ.asset,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 120,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    assert isinstance(v2["amount"], str)
    assert type(v2["maxTimeoutSeconds"]) is int
    assert requirement_amount(v2, 2) == 10_000


@pytest.mark.parametrize(("requirement", "v1_name"), [(BASE_REQ, "base"), (SEPOLIA_REQ, "base-sepolia")])
def test_requirement_to_v1(requirement: Requirement, v1_name: str) -> None:
    v1 = requirement.to_v1(RESOURCE_URL, "a chat completion", "application/json")
    assert v1["network"] == v1_name
    assert v1["maxAmountRequired"] == str(requirement.amount)
    assert "amount" not in v1
    assert "outputSchema" not in v1
    assert v1["resource"] == RESOURCE_URL
    assert v1["description"] == "a chat completion"
    assert v1["mimeType"] == "application/json"
    assert type(v1["maxTimeoutSeconds"]) is int
    assert v1["extra"] == {"name": requirement.asset_name, "version": requirement.asset_version}
    assert requirement_amount(v1, 1) == requirement.amount


def test_requirement_chain_id() -> None:
    assert BASE_REQ.chain_id == 8453
    assert SEPOLIA_REQ.chain_id == 84532
    assert BASE_REQ.v1_network == "base"


def test_header_names() -> None:
    assert (header_name(2), header_name(1)) == (V2_HEADER, V1_HEADER) == ("PAYMENT-SIGNATURE", "X-PAYMENT")
    assert RESPONSE_HEADERS == {2: "PAYMENT-RESPONSE", 1: "X-PAYMENT-RESPONSE"}
