"""The pure ``sign-in-with-x`` logic (``app.x402.extensions.sign_in_with_x``): reading the header, the
EIP-4361 text and its EIP-191 digest, the signer, the stateless checks, our nonces and the 402's
declaration.

The text is compared with what the official ``siwe`` library writes for the same fields, the digest
with eth-account's EIP-191 hash, signatures are made by eth-account and headers by the official x402
client's encoder, so a line, a prefix or a field name that differs from theirs fails.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from datetime import datetime
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_defunct
from eth_keys.constants import SECPK1_N as SECP256K1_N
from hypothesis import given, settings
from hypothesis import strategies as st
from x402.extensions.sign_in_with_x import SIWxPayload, encode_siwx_header

from app.x402.codec import canonical_json, encode_header
from app.x402.extensions.sign_in_with_x import (
    CHAIN_ID,
    DOMAIN_MISMATCH,
    EXPIRATION_TIME,
    EXPIRED,
    FUTURE_SKEW,
    IN_FUTURE,
    INVALID_HEADER,
    ISSUED_AT,
    MALFORMED_SIGNATURE,
    MAX_AGE,
    MAX_SIGNATURE_BYTES,
    NOT_BEFORE,
    NOT_YET_VALID,
    TOO_OLD,
    URI_MISMATCH,
    SignIn,
    check,
    declaration,
    iso,
    message_text,
    new_nonce,
    nonce_issued,
    parse,
    signed_digest,
    signer,
)
from app.x402.verdict import Verdict

KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"  # anvil's first account
ADDRESS = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
ORIGIN = "http://127.0.0.1:1234"
URI = ORIGIN + "/v1/chat/completions"
NETWORK = "eip155:8453"
ISSUED = 1_796_033_586  # 2026-11-30T10:13:06Z
EXAMPLE = SignIn(
    domain="127.0.0.1:1234",
    address=ADDRESS,
    uri=URI,
    version="1",
    chain_id=NETWORK,
    type="eip191",
    nonce="40c51ea39b45fb1b303dcc22bd33318750374184",
    issued_at="2026-11-30T10:13:06.082Z",
    signature=b"",
    expiration_time="2026-11-30T10:18:06.082Z",
    resources=(URI,),
)
# What siwe's SiweMessage(...).prepare_message() writes for EXAMPLE's fields (no statement).
SIWE_TEXT = """127.0.0.1:1234 wants you to sign in with your Ethereum account:
0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266


URI: http://127.0.0.1:1234/v1/chat/completions
Version: 1
Chain ID: 8453
Nonce: 40c51ea39b45fb1b303dcc22bd33318750374184
Issued At: 2026-11-30T10:13:06.082Z
Expiration Time: 2026-11-30T10:18:06.082Z
Resources:
- http://127.0.0.1:1234/v1/chat/completions"""


def signed(sign_in: SignIn, key: str = KEY) -> SignIn:
    """``sign_in`` with eth-account's ``personal_sign`` signature of its EIP-4361 text."""
    signature = Account.from_key(key).sign_message(encode_defunct(text=message_text(sign_in))).signature
    return dataclasses.replace(sign_in, signature=bytes(signature))


def wire(**changes: Any) -> dict[str, Any]:
    """A valid header payload (JSON fields), with ``changes`` applied (None removes a field)."""
    fields: dict[str, Any] = {
        "domain": "127.0.0.1:1234",
        "address": ADDRESS,
        "statement": "S",
        "uri": URI,
        "version": "1",
        "chainId": NETWORK,
        "type": "eip191",
        "nonce": EXAMPLE.nonce,
        "issuedAt": EXAMPLE.issued_at,
        "expirationTime": EXAMPLE.expiration_time,
        "resources": [URI],
        "signature": "0x" + "ab" * 65,
    }
    fields.update(changes)
    return {name: value for name, value in fields.items() if value is not None}


def refusal(header: str) -> str:
    """The reason code ``parse`` refuses ``header`` with (fails when it accepts it)."""
    result = parse(header)
    assert isinstance(result, Verdict), result
    assert not result.ok
    return result.reason


# --- the EIP-4361 text ---------------------------------------------------------------------------


def test_the_text_is_siwes_without_a_statement() -> None:
    """No statement: EIP-4361's grammar still leaves two empty lines after the address."""
    assert message_text(EXAMPLE) == SIWE_TEXT


def test_a_statement_sits_between_single_empty_lines() -> None:
    lines = message_text(dataclasses.replace(EXAMPLE, statement="S")).split("\n")
    assert lines[:5] == [
        "127.0.0.1:1234 wants you to sign in with your Ethereum account:",
        ADDRESS,
        "",
        "S",
        "",
    ]
    assert lines[5:] == SIWE_TEXT.split("\n")[4:]


def test_the_optional_lines_come_in_the_eips_order() -> None:
    full = dataclasses.replace(
        EXAMPLE,
        statement="S",
        not_before="2026-11-30T10:13:00.000Z",
        request_id="r-1",
        resources=("https://a.example/1", "ipfs://b"),
    )
    assert message_text(full).split("\n")[10:] == [
        "Expiration Time: 2026-11-30T10:18:06.082Z",
        "Not Before: 2026-11-30T10:13:00.000Z",
        "Request ID: r-1",
        "Resources:",
        "- https://a.example/1",
        "- ipfs://b",
    ]
    bare = dataclasses.replace(EXAMPLE, expiration_time=None, resources=None)
    assert message_text(bare).split("\n")[-1] == "Issued At: 2026-11-30T10:13:06.082Z"


def test_the_digest_is_eth_accounts_eip191_hash() -> None:
    for sign_in in (EXAMPLE, dataclasses.replace(EXAMPLE, statement="Pay from credit ✓ (ünïcode)")):
        assert signed_digest(sign_in) == _hash_eip191_message(encode_defunct(text=message_text(sign_in)))


# --- the signer ----------------------------------------------------------------------------------

lines = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=40)
sign_ins = st.builds(
    SignIn,
    domain=st.sampled_from(["127.0.0.1:1234", "proxy.example.com", "[::1]:8080"]),
    address=st.just(ADDRESS),
    uri=lines.map(lambda path: f"{URI}/{path}"),
    version=st.just("1"),
    chain_id=st.sampled_from([NETWORK, "eip155:84532"]),
    type=st.just("eip191"),
    nonce=st.text("0123456789abcdefABCDEF", min_size=8, max_size=40),
    issued_at=st.integers(0, 2**32).map(iso),
    signature=st.just(b""),
    statement=st.none() | lines,
    expiration_time=st.none() | st.integers(0, 2**32).map(iso),
    not_before=st.none() | st.integers(0, 2**32).map(iso),
    request_id=st.none() | lines,
    resources=st.none() | st.lists(lines, max_size=3).map(tuple),
)
keys = st.integers(1, SECP256K1_N - 1).map(lambda k: "0x" + k.to_bytes(32, "big").hex())


@settings(max_examples=60, deadline=None)
@given(sign_in=sign_ins, key=keys)
def test_whoever_signs_the_text_with_eth_account_is_the_signer(sign_in: SignIn, key: str) -> None:
    proof = signed(sign_in, key)
    assert signer(proof) == Account.from_key(key).address.lower()
    assert signed_digest(proof) == _hash_eip191_message(encode_defunct(text=message_text(proof)))


@pytest.mark.parametrize(
    "change",
    [
        {"domain": "127.0.0.1:1235"},
        {"uri": URI + "x"},
        {"chain_id": "eip155:1"},
        {"nonce": "40c51ea39b45fb1b303dcc22bd33318750374185"},
        {"issued_at": "2026-11-30T10:13:06.083Z"},
        {"expiration_time": None},
        {"statement": "S"},
        {"request_id": "r-1"},
        {"resources": None},
        {"resources": (URI, "ipfs://x")},
    ],
)
def test_every_field_is_in_what_was_signed(change: dict[str, Any]) -> None:
    """A signature over one message recovers someone else for a message changed in any field."""
    proof = signed(EXAMPLE)
    assert signer(proof) == ADDRESS.lower()
    assert signer(dataclasses.replace(proof, **change)) not in (None, ADDRESS.lower())


def test_v_may_be_0_or_1() -> None:
    proof = signed(EXAMPLE)
    raw = proof.signature
    assert raw[64] in (27, 28)
    low_v = dataclasses.replace(proof, signature=raw[:64] + bytes([raw[64] - 27]))
    assert signer(low_v) == ADDRESS.lower()


def test_high_s_and_garbage_signatures_have_no_signer() -> None:
    raw = signed(EXAMPLE).signature
    r, s, v = raw[:32], int.from_bytes(raw[32:64], "big"), raw[64]
    high_s = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # the same signature, malleated
    assert Account._recover_hash(signed_digest(EXAMPLE), signature=high_s) == ADDRESS  # valid, yet high-s
    for signature in (
        high_s,
        high_s[:64] + bytes([high_s[64] - 27]),
        raw[:64] + bytes([29]),
        raw[:64] + bytes([2]),
        raw[:64],
        raw + b"\x00",
        bytes(65),
        bytes(32) + raw[32:],  # r = 0
        b"\xff" * 65,
        b"",
    ):
        assert signer(dataclasses.replace(EXAMPLE, signature=signature)) is None, signature.hex()


# --- reading the header --------------------------------------------------------------------------


def test_the_official_clients_header_is_read_field_for_field() -> None:
    payload = SIWxPayload(
        domain="127.0.0.1:1234",
        address=ADDRESS,
        uri=URI,
        version="1",
        chainId=NETWORK,
        type="eip191",
        nonce=EXAMPLE.nonce,
        issuedAt=EXAMPLE.issued_at,
        statement="S",
        expirationTime=EXAMPLE.expiration_time,
        notBefore="2026-11-30T10:13:00Z",
        requestId="r-1",
        resources=[URI, "ipfs://x"],
        signatureScheme="eip191",
        signature="0x" + "Ab" * 65,
    )
    assert parse(encode_siwx_header(payload)) == SignIn(
        domain="127.0.0.1:1234",
        address=ADDRESS,
        uri=URI,
        version="1",
        chain_id=NETWORK,
        type="eip191",
        nonce=EXAMPLE.nonce,
        issued_at=EXAMPLE.issued_at,
        signature=bytes.fromhex("ab" * 65),
        statement="S",
        expiration_time=EXAMPLE.expiration_time,
        not_before="2026-11-30T10:13:00Z",
        request_id="r-1",
        resources=(URI, "ipfs://x"),
        signature_scheme="eip191",
    )


def test_optional_fields_may_be_absent_or_null() -> None:
    absent = parse(encode_header(wire(statement=None, expirationTime=None, resources=None)))
    null = parse(encode_header({**wire(), "statement": None, "expirationTime": None, "resources": None}))
    assert isinstance(absent, SignIn) and absent == null
    assert (absent.statement, absent.expiration_time, absent.resources) == (None, None, None)


def test_a_header_that_is_not_canonical_base64_of_a_json_object_is_refused() -> None:
    good = encode_header(wire())
    assert isinstance(parse(good), SignIn)
    unpadded = base64.b64encode(canonical_json(wire()).encode() + b"x").decode().rstrip("=")
    stray_bits = base64.b64encode(b'{"a":1}').decode()  # 'eyJhIjoxfQ==': 'Q' carries stray bits
    for header in (
        "",
        good + " ",
        " " + good,
        good[:4] + "\n" + good[4:],
        unpadded,
        stray_bits[:-3] + "R==",
        base64.urlsafe_b64encode(b'{"a":"\xff\xfe"}').decode(),
        encode_header([wire()]),
        encode_header("text"),
        encode_header(None),
        base64.b64encode(b"{not json}").decode(),
        base64.b64encode(b'{"domain": "a", "domain": "b"}').decode(),  # a duplicate key
    ):
        assert refusal(header) == INVALID_HEADER, header


REQUIRED = ("domain", "address", "uri", "version", "chainId", "type", "nonce", "issuedAt", "signature")


@pytest.mark.parametrize("name", REQUIRED)
@pytest.mark.parametrize("value", [None, "", 1, ["x"], {"x": 1}, True])
def test_each_required_field_must_be_a_non_empty_string(name: str, value: Any) -> None:
    payload = wire()
    if value is None:
        del payload[name]
    else:
        payload[name] = value
    assert refusal(encode_header(payload)) == INVALID_HEADER


@pytest.mark.parametrize("name", ["statement", "expirationTime", "notBefore", "requestId", "signatureScheme"])
@pytest.mark.parametrize("value", [1, ["x"], {"x": 1}, False])
def test_each_optional_text_field_must_be_a_string(name: str, value: Any) -> None:
    assert refusal(encode_header(wire(**{name: value}))) == INVALID_HEADER


@pytest.mark.parametrize("resources", ["http://a", {"a": 1}, [1], ["http://a", None], ["http://a\nNonce: 1"]])
def test_resources_must_be_a_list_of_one_line_strings(resources: Any) -> None:
    assert refusal(encode_header(wire(resources=resources))) == INVALID_HEADER


@pytest.mark.parametrize(
    "name", [*REQUIRED, "statement", "expirationTime", "notBefore", "requestId", "signatureScheme"]
)
def test_no_field_may_hold_a_line_break(name: str) -> None:
    """A line break would let one field write another line of the signed text."""
    value = wire().get(name, "x")
    assert refusal(encode_header(wire(**{name: value + "\nNonce: 0"}))) == INVALID_HEADER


@pytest.mark.parametrize(
    "address",
    [
        ADDRESS[:-1],
        ADDRESS + "0",
        ADDRESS[2:],
        "0X" + ADDRESS[2:],
        ADDRESS[:-1] + "g",
        " " + ADDRESS,
        "0x",
        "vitalik.eth",
    ],
)
def test_the_address_must_be_a_0x_address(address: str) -> None:
    assert refusal(encode_header(wire(address=address))) == INVALID_HEADER


@pytest.mark.parametrize(
    "signature",
    ["0x", "0xabc", "0x" + "ab" * 64 + "a", "ab" * 65, "0X" + "ab" * 65, "0x" + "zz" * 65, "0x 1"],
)
def test_the_signature_must_be_0x_hex_bytes(signature: str) -> None:
    assert refusal(encode_header(wire(signature=signature))) == MALFORMED_SIGNATURE


def test_the_signature_may_hold_at_most_2048_bytes() -> None:
    """A contract wallet may sign with more than 65 bytes, up to ``MAX_SIGNATURE_BYTES``, which a
    real (8 KiB) header can carry; one byte more is a malformed signature."""
    most = parse(encode_header(wire(signature="0x" + "ab" * MAX_SIGNATURE_BYTES)))
    assert isinstance(most, SignIn) and len(most.signature) == MAX_SIGNATURE_BYTES == 2048
    too_long = encode_header(wire(signature="0x" + "ab" * (MAX_SIGNATURE_BYTES + 1)))
    assert refusal(too_long) == MALFORMED_SIGNATURE


def test_a_header_over_8_kib_is_refused_before_its_signature_is_read() -> None:
    assert refusal(encode_header(wire(signature="0x" + "ab" * 2_900))) == INVALID_HEADER


def test_an_empty_statement_or_resources_list_is_refused() -> None:
    """EIP-4361 libraries leave an empty statement out (or refuse it) and have no empty resources
    list: a message signed by one could never match what these would rebuild."""
    assert refusal(encode_header(wire(statement=""))) == INVALID_HEADER
    assert refusal(encode_header(wire(resources=[]))) == INVALID_HEADER


# --- the stateless checks ------------------------------------------------------------------------


def fresh(**changes: Any) -> SignIn:
    """A sign-in issued at ``ISSUED`` for ``URI``, expiring ``MAX_AGE`` s later, with ``changes``."""
    base = dataclasses.replace(
        EXAMPLE,
        issued_at=iso(ISSUED),
        expiration_time=iso(ISSUED + MAX_AGE),
        signature=bytes(65),
    )
    return dataclasses.replace(base, **changes)


def reason(sign_in: SignIn, now: float = ISSUED, origin: str = ORIGIN) -> str:
    """'' when ``check`` accepts ``sign_in`` at ``now``, else its reason code."""
    verdict = check(sign_in, origin, NETWORK, now)
    assert verdict.ok == (verdict.reason == "")
    return verdict.reason


def test_a_fresh_sign_in_for_this_origin_and_network_passes() -> None:
    assert check(fresh(), ORIGIN, NETWORK, ISSUED) == Verdict(True)
    assert reason(fresh(uri=ORIGIN)) == ""
    assert reason(fresh(expiration_time=None, resources=None)) == ""


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"domain": "127.0.0.1:1235"}, DOMAIN_MISMATCH),
        ({"domain": "127.0.0.1"}, DOMAIN_MISMATCH),
        ({"domain": "localhost:1234"}, DOMAIN_MISMATCH),
        ({"uri": "https://127.0.0.1:1234/v1/chat/completions"}, URI_MISMATCH),
        ({"uri": "http://127.0.0.1:1235/v1/chat/completions"}, URI_MISMATCH),
        ({"uri": "http://127.0.0.1:1234@evil.example/v1"}, URI_MISMATCH),
        ({"uri": "/v1/chat/completions"}, URI_MISMATCH),
        ({"version": "2"}, INVALID_HEADER),
        ({"chain_id": "eip155:1"}, CHAIN_ID),
        ({"chain_id": "8453"}, CHAIN_ID),
        ({"type": "ed25519"}, CHAIN_ID),
        ({"issued_at": "2026-11-30T10:13:06"}, ISSUED_AT),  # no zone
        ({"issued_at": "yesterday"}, ISSUED_AT),
        ({"expiration_time": "2026-11-30"}, EXPIRATION_TIME),
        ({"not_before": "soon"}, NOT_BEFORE),
    ],
)
def test_each_field_check_has_its_reason_code(change: dict[str, Any], code: str) -> None:
    assert reason(fresh(**change)) == code


@settings(max_examples=200)
@given(age=st.integers(-3 * MAX_AGE, 3 * MAX_AGE))
def test_issued_at_may_be_at_most_300_s_old_and_30_s_ahead(age: int) -> None:
    expected = TOO_OLD if age > MAX_AGE else IN_FUTURE if age < -FUTURE_SKEW else ""
    assert reason(fresh(expiration_time=None), now=ISSUED + age) == expected


def test_the_issued_at_boundaries() -> None:
    late = fresh(expiration_time=None)
    assert reason(late, now=ISSUED + 300) == ""
    assert reason(late, now=ISSUED + 300.001) == TOO_OLD
    assert reason(late, now=ISSUED + 301) == TOO_OLD
    assert reason(late, now=ISSUED - 30) == ""
    assert reason(late, now=ISSUED - 31) == IN_FUTURE
    assert reason(fresh(issued_at="2026-11-30T12:13:06+02:00", expiration_time=None), now=ISSUED) == ""


def test_expiration_time_is_inclusive() -> None:
    expiring = fresh(expiration_time=iso(ISSUED + 10))
    assert reason(expiring, now=ISSUED + 10) == ""
    assert reason(expiring, now=ISSUED + 10.001) == EXPIRED
    assert reason(fresh(expiration_time=iso(ISSUED - 1)), now=ISSUED) == EXPIRED


def test_not_before_is_inclusive() -> None:
    later = fresh(not_before=iso(ISSUED + 10))
    assert reason(later, now=ISSUED + 9) == NOT_YET_VALID
    assert reason(later, now=ISSUED + 10) == ""
    assert reason(fresh(not_before=iso(ISSUED - 10)), now=ISSUED) == ""


def test_empty_optional_times_are_no_times() -> None:
    """An empty ``expirationTime``/``notBefore`` (the header allows it) adds no line and no check."""
    empty = fresh(expiration_time="", not_before="")
    assert reason(empty, now=ISSUED + MAX_AGE) == ""
    assert "Expiration Time" not in message_text(empty) and "Not Before" not in message_text(empty)


# --- our nonces ----------------------------------------------------------------------------------

SECRET = bytes(range(32))
# The proxy's secret is always 32 random bytes (``SignInGate.secret``). Of any length, two keys that
# differ only in trailing zero bytes are one HMAC key (RFC 2104 pads short keys with zeros).
secrets_ = st.binary(min_size=32, max_size=32)
randoms = st.binary(min_size=8, max_size=8)
issued_times = st.integers(0, 2**32 - 1)


@given(secret=secrets_, issued=issued_times, random=randoms)
def test_a_nonce_is_40_hex_and_tells_when_it_was_issued(secret: bytes, issued: int, random: bytes) -> None:
    nonce = new_nonce(secret, issued, random)
    assert re.fullmatch(r"[0-9a-f]{40}", nonce)
    assert nonce_issued(secret, nonce) == issued


@given(secret=secrets_, other=secrets_, issued=issued_times, random=randoms)
def test_only_its_secret_recognises_a_nonce(secret: bytes, other: bytes, issued: int, random: bytes) -> None:
    nonce = new_nonce(secret, issued, random)
    assert (nonce_issued(other, nonce) is None) == (other != secret)


@given(
    issued=issued_times,
    random=randoms,
    position=st.integers(0, 39),
    char=st.characters(blacklist_categories=("Cs",)),
)
def test_any_one_character_changed_is_refused(issued: int, random: bytes, position: int, char: str) -> None:
    nonce = new_nonce(SECRET, issued, random)
    changed = nonce[:position] + char + nonce[position + 1 :]
    if changed != nonce:
        assert nonce_issued(SECRET, changed) is None


def test_a_nonce_of_another_shape_is_refused() -> None:
    nonce = new_nonce(SECRET, ISSUED, bytes(8))
    for other in (nonce[:-1], nonce + "0", nonce.upper(), "", " " + nonce[1:], nonce[:39] + "\n"):
        assert nonce_issued(SECRET, other) is None


def test_nonces_differ_by_their_random_part() -> None:
    assert new_nonce(SECRET, ISSUED, bytes(8)) != new_nonce(SECRET, ISSUED, bytes(7) + b"\x01")
    assert new_nonce(SECRET, ISSUED, bytes(8))[:8] == f"{ISSUED:08x}"


# --- the 402's declaration -----------------------------------------------------------------------

STATEMENT = "Pay from this wallet's credit. Credit expires 30 days after it is added."


def test_iso_writes_utc_with_milliseconds_and_z() -> None:
    assert iso(ISSUED) == "2026-11-30T10:13:06.000Z"
    assert iso(ISSUED + 0.082) == "2026-11-30T10:13:06.082Z"
    assert iso(0) == "1970-01-01T00:00:00.000Z"


def test_the_declaration_names_this_resource_and_a_300_s_window() -> None:
    url = "https://proxy.example.com:8443/v1/chat/completions"
    nonce = new_nonce(SECRET, ISSUED, bytes(8))
    declared = declaration(url, nonce, ISSUED, NETWORK, STATEMENT)
    info = declared["info"]
    assert info == {
        "domain": "proxy.example.com:8443",
        "uri": url,
        "statement": STATEMENT,
        "version": "1",
        "nonce": nonce,
        "issuedAt": "2026-11-30T10:13:06.000Z",
        "expirationTime": "2026-11-30T10:18:06.000Z",
        "resources": [url],
    }
    issued, expires = (datetime.fromisoformat(info[name]) for name in ("issuedAt", "expirationTime"))
    assert (expires - issued).total_seconds() == MAX_AGE
    assert declared["supportedChains"] == [{"chainId": NETWORK, "type": "eip191"}]
    assert set(declared["schema"]["required"]) == set(REQUIRED)
    assert declaration("http://127.0.0.1:1234/x", nonce, ISSUED, NETWORK, STATEMENT)["info"]["domain"] == (
        "127.0.0.1:1234"
    )


def test_a_sign_in_built_from_the_declaration_passes_the_checks() -> None:
    """What a client signs from the declared ``info`` parses, passes ``check`` and has its signer."""
    info = declaration(URI, new_nonce(SECRET, ISSUED, bytes(8)), ISSUED, NETWORK, STATEMENT)["info"]
    payload = {**info, "address": ADDRESS, "chainId": NETWORK, "type": "eip191", "signature": "0x00"}
    unsigned = parse(encode_header(payload))
    assert isinstance(unsigned, SignIn)
    proof = signed(unsigned)
    assert check(proof, ORIGIN, NETWORK, ISSUED + MAX_AGE).ok
    assert signer(proof) == ADDRESS.lower()
    assert nonce_issued(SECRET, proof.nonce) == ISSUED


def test_the_declaration_stays_small_enough_to_echo_in_a_payment_header() -> None:
    """The official client echoes every declared extension into its payment header (8 KiB at most)."""
    url = "https://proxy.example.com/v1/chat/completions?model=" + "m" * 8
    assert len(url) == 60
    declared = declaration(url, new_nonce(SECRET, ISSUED, bytes(8)), ISSUED, NETWORK, STATEMENT)
    assert len(canonical_json(declared).encode()) < 700
    assert len(json.dumps(declared).encode()) < 700  # with the official client's looser separators
