"""Strict decoding of payment headers: padded standard base64 of UTF-8 JSON, nothing looser.

Python's ``b64decode`` skips junk and ``json.loads`` takes duplicate keys, NaN and unbounded depth;
a payment header must be exactly one canonical thing, so both are replaced here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

MAX_HEADER_BYTES = 8192
MAX_JSON_DEPTH = 16
_B64_RE = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_STRUCTURE_RE = re.compile(r'[\\"\[\]{}]')
MAX_INTEGER_DIGITS = 100  # far beyond any uint256 (78 digits); Python refuses over 4300 by raising


class MalformedInput(ValueError):
    """Input that is not canonical base64 / strict JSON. The message says what was wrong."""


def _reject_constant(name: str) -> Any:
    raise MalformedInput(f"JSON constant {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise MalformedInput(f"duplicate JSON key {key!r}")
        obj[key] = value
    return obj


def _check_nesting(text: str, limit: int) -> None:
    """Refuse deep nesting *before* parsing: the C parser can overflow the C stack on deep input
    (eth-keyfile's py_ecc raises the recursion limit to 100000 at import), killing the process.
    One linear pass over the structural characters, skipping brackets inside strings."""
    if text.count("[") + text.count("{") <= limit:
        return  # too few openers to nest that deep, wherever they are
    depth, in_string, escaped_at = 0, False, -1
    for match in _STRUCTURE_RE.finditer(text):
        position, char = match.start(), match.group()
        if in_string:
            if position == escaped_at:
                continue
            if char == "\\":
                escaped_at = position + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                raise MalformedInput(f"JSON nested deeper than {limit}")
        elif char in "]}":
            depth -= 1


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise MalformedInput(f"JSON integer longer than {MAX_INTEGER_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise MalformedInput("JSON number out of range")
    return value


def _check_strings(value: Any) -> None:
    """Every string and key must be valid Unicode (no lone surrogates from ``\\ud800`` escapes),
    so whatever we decode can be re-encoded."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise MalformedInput("JSON string with a lone surrogate") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def strict_json_loads(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON refusing duplicate keys, NaN/Infinity, invalid UTF-8 and excessive nesting."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedInput("not UTF-8") from None
    _check_nesting(data, max_depth)
    try:
        value = json.loads(
            data,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except json.JSONDecodeError as exc:
        raise MalformedInput(f"not JSON: {exc.msg}") from None
    _check_strings(value)
    return value


def canonical_json(value: Any) -> str:
    """Compact JSON, keys in the order given: the form we put in headers."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def b64decode_strict(text: str, max_bytes: int = MAX_HEADER_BYTES) -> bytes:
    """Decode padded standard base64 only (no URL-safe alphabet, no whitespace, no junk)."""
    if len(text) > max_bytes:
        raise MalformedInput(f"header longer than {max_bytes} bytes")
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise MalformedInput("header is not ASCII") from None
    if not raw or not _B64_RE.fullmatch(raw):
        raise MalformedInput("not padded standard base64")
    try:
        decoded = base64.b64decode(raw, validate=True)
    except binascii.Error as exc:
        raise MalformedInput(f"not base64: {exc}") from None
    if base64.b64encode(decoded) != raw:
        raise MalformedInput("non-canonical base64 (stray bits in the last group)")
    return decoded


def decode_header(text: str) -> Any:
    """A payment header's JSON value."""
    return strict_json_loads(b64decode_strict(text))


def encode_header(value: Any) -> str:
    """base64(UTF-8 compact JSON): the encoding of every x402 header."""
    return base64.b64encode(canonical_json(value).encode("utf-8")).decode("ascii")
