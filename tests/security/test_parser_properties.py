"""The payment header parser is total and its accepted inputs round-trip (issue: hostile input).

``parse_payment_header(text, version)`` must, for any text, return either a refusal with reason
``invalid_payload`` / ``invalid_x402_version`` or a ``PaymentPayload`` that re-encodes to a header
parsing back to an equal payload. Anything else (an exception, a payload we cannot re-encode for a
facilitator or a log) is a bug.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from app.x402.codec import encode_header
from app.x402.verdict import INVALID_PAYLOAD, INVALID_VERSION, Verdict
from app.x402.wire import PaymentPayload, parse_payment_header
from tests.security.jsontext import HOSTILE_VALUES, JSON_VALUES, ODD_NUMBERS, Raw, dumps

PROPERTY = settings(max_examples=400, deadline=None, database=None)

HEX_CASE = st.sampled_from([str.lower, str.upper, lambda s: s])
ADDRESSES = st.tuples(st.binary(min_size=20, max_size=20), HEX_CASE).map(lambda t: "0x" + t[1](t[0].hex()))
UINTS = st.one_of(st.integers(0, 2**256 - 1), st.integers(0, 10**10)).map(str)
NONCES = st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())
SIGNATURES = st.binary(min_size=65, max_size=140).map(lambda b: "0x" + b.hex())
AUTHORIZATIONS = st.fixed_dictionaries(
    {
        "from": ADDRESSES,
        "to": ADDRESSES,
        "value": UINTS,
        "validAfter": UINTS,
        "validBefore": UINTS,
        "nonce": NONCES,
    }
)
PAYLOADS = st.fixed_dictionaries({"signature": SIGNATURES, "authorization": AUTHORIZATIONS})


def wires(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """v1 and v2 payloads of the right shape; ``accepted``, ``resource`` and ``extensions`` hold
    arbitrary ``values``."""
    objects = st.dictionaries(st.text(max_size=8), values, max_size=4)
    accepted = st.tuples(objects, st.text(max_size=10), st.text(max_size=14)).map(
        lambda t: {**t[0], "scheme": t[1], "network": t[2]}
    )
    return st.one_of(
        st.fixed_dictionaries(
            {"x402Version": st.just(2), "accepted": accepted, "payload": PAYLOADS},
            optional={"resource": st.none() | objects, "extensions": st.none() | objects},
        ),
        st.fixed_dictionaries(
            {
                "x402Version": st.just(1),
                "scheme": st.text(max_size=10),
                "network": st.text(max_size=14),
                "payload": PAYLOADS,
            }
        ),
    )


WIRES = wires(JSON_VALUES)
HOSTILE_WIRES = wires(HOSTILE_VALUES)


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


HEADER_TEXTS = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),
    JSON_VALUES.map(lambda v: b64(dumps(v))),
    HOSTILE_VALUES.map(lambda v: b64(dumps(v))),
    WIRES.map(lambda w: b64(dumps(w))),
    HOSTILE_WIRES.map(lambda w: b64(dumps(w))),
)


def check(text: str, version: int) -> None:
    parsed = parse_payment_header(text, version)
    if isinstance(parsed, Verdict):
        assert not parsed.ok and parsed.reason in {INVALID_PAYLOAD, INVALID_VERSION}, parsed
        return
    assert isinstance(parsed, PaymentPayload) and parsed.version == version
    again = parse_payment_header(encode_header(parsed.to_wire()), version)
    assert again == parsed


@PROPERTY
@given(text=HEADER_TEXTS, version=st.sampled_from([1, 2]))
def test_parse_refuses_or_round_trips(text: str, version: int) -> None:
    check(text, version)


@PROPERTY
@given(wire=WIRES)
def test_well_formed_payloads_parse_and_round_trip(wire: dict[str, Any]) -> None:
    """Shape-valid payloads (any address case, any uint256, any signature length, any JSON in
    ``accepted``) within the 8 KB cap are accepted."""
    text = b64(dumps(wire))
    assume(len(text) <= 8192)
    parsed = parse_payment_header(text, wire["x402Version"])
    assert isinstance(parsed, PaymentPayload), parsed
    check(text, wire["x402Version"])


@settings(max_examples=60, deadline=None, database=None)
@given(number=ODD_NUMBERS, where=st.sampled_from(["top", "accepted", "extensions", "resource"]))
def test_odd_numbers_anywhere_refuse_or_round_trip(number: str, where: str) -> None:
    auth = {
        "from": "0x" + "11" * 20,
        "to": "0x" + "22" * 20,
        "value": "1000",
        "validAfter": "0",
        "validBefore": "9999999999",
        "nonce": "0x" + "33" * 32,
    }
    wire: dict[str, Any] = {
        "x402Version": 2,
        "accepted": {"scheme": "exact", "network": "eip155:8453"},
        "payload": {"signature": "0x" + "44" * 65, "authorization": auth},
    }
    if where == "top":
        wire["x402Version"] = Raw(number)
    else:
        wire.setdefault(where, {})["n"] = Raw(number)
    check(b64(dumps(wire)), 2)


@pytest.mark.parametrize(
    "text",
    [
        '{"x402Version": ' + "1" * 4301 + "}",
        '{"x402Version": 2, "accepted": {"scheme": "exact", "network": "eip155:8453", "n": 1e400}, '
        '"payload": {"signature": "0x'
        + "44" * 65
        + '", "authorization": {"from": "0x'
        + "11" * 20
        + '", "to": "0x'
        + "22" * 20
        + '", "value": "1000", "validAfter": "0", "validBefore": "9999999999", '
        '"nonce": "0x' + "33" * 32 + '"}}}',
    ],
    ids=["4301-digit integer", "1e400"],
)
def test_number_edge_cases_are_invalid_payload(text: str) -> None:
    """json.loads raises ValueError past 4300 digits (not JSONDecodeError) and reads 1e400 as inf,
    which ``encode_header`` (allow_nan=False) then cannot write: both must be invalid_payload."""
    parsed = parse_payment_header(b64(text), 2)
    assert isinstance(parsed, Verdict) and parsed.reason == INVALID_PAYLOAD, parsed
