"""Strict header codec: padded standard base64 of UTF-8 JSON, and nothing looser."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.x402.codec import (
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    MalformedInput,
    b64decode_strict,
    canonical_json,
    decode_header,
    encode_header,
    strict_json_loads,
)

ROOT = Path(__file__).resolve().parents[2]
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.text()


def json_strategy(depth: int) -> st.SearchStrategy[Any]:
    """JSON values whose nesting (scalars counted as a level) is at most ``depth``."""
    if depth <= 1:
        return JSON_SCALARS
    inner = json_strategy(depth - 1)
    return JSON_SCALARS | st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)


json_values = json_strategy(5)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- encode/decode round trip -------------------------------------------------------------------


@given(json_values)
def test_encode_decode_round_trip(value: Any) -> None:
    header = encode_header(value)
    assert header.isascii()
    assert decode_header(header) == value


@given(json_values)
def test_encode_is_compact_utf8_json(value: Any) -> None:
    raw = base64.b64decode(encode_header(value), validate=True)
    assert raw.decode("utf-8") == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_encode_header_keeps_key_order_and_non_ascii() -> None:
    header = encode_header({"b": 1, "a": "é"})
    assert base64.b64decode(header) == '{"b":1,"a":"é"}'.encode()


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json(float("nan"))


# -- strict_json_loads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ['{"a":1,"a":2}', '{"a":1,"b":{"c":1,"c":1}}', '[{"x":0,"x":0}]'],
)
def test_duplicate_keys_refused(text: str) -> None:
    with pytest.raises(MalformedInput, match="duplicate"):
        strict_json_loads(text)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_constants_refused(constant: str) -> None:
    with pytest.raises(MalformedInput, match="constant"):
        strict_json_loads(f'{{"value":{constant}}}')
    with pytest.raises(MalformedInput):
        strict_json_loads(constant)


@pytest.mark.parametrize("data", [b'{"a":"\xff"}', b'"\xc3\x28"', b'"\xed\xa0\x80"', b"\x80"])
def test_invalid_utf8_refused(data: bytes) -> None:
    with pytest.raises(MalformedInput, match="UTF-8"):
        strict_json_loads(data)


def test_valid_utf8_bytes_accepted() -> None:
    assert strict_json_loads('{"a":"é€😀"}'.encode()) == {"a": "é€😀"}


@pytest.mark.parametrize("text", ["", "{", "[1,]", "{'a':1}", '{"a":1} x', "01", "tru"])
def test_not_json_refused(text: str) -> None:
    with pytest.raises(MalformedInput, match="not JSON"):
        strict_json_loads(text)


def nested_lists(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_dicts(depth: int) -> str:
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


@pytest.mark.parametrize("build", [nested_lists, nested_dicts])
def test_depth_limit_is_exact(build: Any) -> None:
    assert strict_json_loads(build(MAX_JSON_DEPTH)) is not None
    with pytest.raises(MalformedInput, match="deeper"):
        strict_json_loads(build(MAX_JSON_DEPTH + 1))


def test_custom_depth_limit() -> None:
    assert strict_json_loads("[[]]", max_depth=2) == [[]]
    assert strict_json_loads('{"a":{}}', max_depth=2) == {"a": {}}
    with pytest.raises(MalformedInput):
        strict_json_loads("[[[]]]", max_depth=2)
    with pytest.raises(MalformedInput):
        strict_json_loads('{"a":{"b":{}}}', max_depth=2)


@given(json_strategy(MAX_JSON_DEPTH))
def test_values_within_depth_limit_parse(value: Any) -> None:
    assert strict_json_loads(canonical_json(value)) == value


@pytest.mark.parametrize("depth", [1_000, 5_000, 10_000])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deep_input_is_malformed(depth: int, opener: str) -> None:
    with pytest.raises(MalformedInput):
        strict_json_loads(opener * depth)


# Run in a child process: when the bug is present the interpreter segfaults, which must not take
# the test session down with it. ``import app.settings`` pulls in eth_account -> py_ecc, which (as in
# the real proxy process) raises the recursion limit to 100000 at import time.
DEEP_SCRIPT = """
import app.settings
from app.x402.codec import MalformedInput, strict_json_loads
for text in ("[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 100_000):
    try:
        strict_json_loads(text)
    except MalformedInput:
        print("malformed", flush=True)
"""


def test_recursion_deep_input_is_malformed_not_a_crash() -> None:
    result = subprocess.run(
        [sys.executable, "-c", DEEP_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"child exited with {result.returncode}"
    assert result.stdout.split() == ["malformed"] * 3


def test_malformed_input_is_a_value_error() -> None:
    assert issubclass(MalformedInput, ValueError)


# -- b64decode_strict ---------------------------------------------------------------------------


def test_standard_alphabet_with_plus_and_slash_accepted() -> None:
    text = b64(b"\xfb\xff\xfe")
    assert text == "+//+"
    assert b64decode_strict(text) == b"\xfb\xff\xfe"


@pytest.mark.parametrize(
    "text",
    [
        base64.urlsafe_b64encode(b"\xfb\xff\xfe").decode(),  # "-__-": URL-safe alphabet
        "ab-_",
        "QUJD\n",
        "QU\nJD",
        " QUJD",
        "QUJD ",
        "QU JD",
        "QUJD\r\n",
        "QUJD\t",
        "QQ",  # missing padding
        "QQ=",  # short padding
        "QUI",  # missing padding
        "QUJDRA",
        "QQ===",  # too much padding
        "Q===",
        "=QQ=",
        "QQ==QQ==",  # padding in the middle
        "",  # empty
        "QUJD\x00",
        "QUJDé",  # non-ASCII
        "ＱＵＪＤ",  # full-width letters
        "QUJD!",
        "QR==",  # non-canonical trailing bits (canonical is "QQ==")
        "QUJ=",  # non-canonical: canonical is "QUI="
        "QUK=",
    ],
)
def test_b64_strict_refusals(text: str) -> None:
    with pytest.raises(MalformedInput):
        b64decode_strict(text)


def test_b64_non_canonical_trailing_bits() -> None:
    assert b64decode_strict("QQ==") == b"A"
    assert base64.b64decode("QR==") == b"A"  # what the lenient decoder would accept
    with pytest.raises(MalformedInput, match="non-canonical"):
        b64decode_strict("QR==")


def test_b64_non_ascii_message() -> None:
    with pytest.raises(MalformedInput, match="ASCII"):
        b64decode_strict("QUJDé===")


def test_b64_length_limit() -> None:
    at_limit = b64(b"\x00" * (MAX_HEADER_BYTES // 4 * 3))
    assert len(at_limit) == MAX_HEADER_BYTES
    assert b64decode_strict(at_limit) == b"\x00" * (MAX_HEADER_BYTES // 4 * 3)
    over = b64(b"\x00" * (MAX_HEADER_BYTES // 4 * 3 + 1))
    assert len(over) > MAX_HEADER_BYTES
    with pytest.raises(MalformedInput, match="longer"):
        b64decode_strict(over)
    with pytest.raises(MalformedInput, match="longer"):
        b64decode_strict("QUJD", max_bytes=3)


def test_decode_header_refuses_over_long_header() -> None:
    big = encode_header({"pad": "x" * MAX_HEADER_BYTES})
    with pytest.raises(MalformedInput):
        decode_header(big)


@given(st.binary(min_size=1, max_size=MAX_HEADER_BYTES // 4 * 3))
def test_b64_round_trip_any_bytes(data: bytes) -> None:
    assert b64decode_strict(b64(data)) == data


def test_b64_empty_refused() -> None:
    with pytest.raises(MalformedInput):
        b64decode_strict("")


@given(st.binary(min_size=1, max_size=64))
def test_b64_urlsafe_refused_whenever_it_differs(data: bytes) -> None:
    url = base64.urlsafe_b64encode(data).decode()
    if url != b64(data):
        with pytest.raises(MalformedInput):
            b64decode_strict(url)


@given(st.binary(min_size=1, max_size=64))
def test_b64_unpadded_refused(data: bytes) -> None:
    encoded = b64(data)
    stripped = encoded.rstrip("=")
    if stripped != encoded:
        with pytest.raises(MalformedInput):
            b64decode_strict(stripped)


# -- decode_header on arbitrary input -----------------------------------------------------------


def _check_decode(text: str) -> None:
    try:
        value = decode_header(text)
    except MalformedInput:
        return
    assert decode_header(encode_header(value)) == value


@given(st.text())
def test_decode_header_arbitrary_text_never_crashes(text: str) -> None:
    _check_decode(text)


@given(st.binary(max_size=512))
def test_decode_header_arbitrary_base64_payload_never_crashes(data: bytes) -> None:
    if data:
        _check_decode(b64(data))


@given(st.text(alphabet='{}[]",:0123456789.-+eEtrufalsn \\u"abc', max_size=64))
def test_decode_header_json_like_payload_never_crashes(text: str) -> None:
    raw = text.encode("utf-8")
    if raw:
        _check_decode(b64(raw))


def test_decode_header_lone_surrogate_is_malformed_or_reencodable() -> None:
    _check_decode(b64(b'{"a":"\\ud800"}'))
