"""Malformed input against the running proxy (issue: hostile input and failing parts).

Payment headers and request bodies are fuzzed with hypothesis and sent as raw bytes (no client-side
validation in the way). Whatever arrives, the answer is a 4xx (a 402 for a payment header on a
priceable body), never a 5xx, always the JSON shape when the app answers, never a traceback, and
the model host is never reached. Templates that do parse are signed by a key that holds no USDC, so
no fuzzed payment can ever pay.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from itertools import product
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from app.devnet.standin import StandinModel
from app.x402.codec import decode_header
from app.x402.verdict import (
    INSUFFICIENT_BALANCE,
    INVALID_PAYLOAD,
    INVALID_SIGNATURE,
    INVALID_VERSION,
    NETWORK_MISMATCH,
    NONCE_USED,
    PAYMENT_REQUIRED,
    RECIPIENT_MISMATCH,
    REQUIREMENTS_MISMATCH,
    SIMULATION_FAILED,
    UNSUPPORTED_SCHEME,
    VALID_AFTER,
    VALID_BEFORE,
    VALUE_MISMATCH,
)
from tests.security.forge import COMPLETIONS, RawResponse, new_key, payment_states, raw_request
from tests.security.jsontext import (
    CONSTANTS,
    HOSTILE_VALUES,
    JSON_VALUES,
    ODD_HEX,
    ODD_NUMBERS,
    ODD_UINTS,
    Pairs,
    Raw,
    dumps,
)
from tests.support import CHAT_BODY, Proxy

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
HEADERS = {2: b"PAYMENT-SIGNATURE", 1: b"X-PAYMENT"}
CHAT_BYTES = json.dumps(CHAT_BODY).encode()
ANY_REFUSAL = frozenset(
    {
        UNSUPPORTED_SCHEME,
        NETWORK_MISMATCH,
        INVALID_VERSION,
        INVALID_PAYLOAD,
        REQUIREMENTS_MISMATCH,
        RECIPIENT_MISMATCH,
        VALUE_MISMATCH,
        VALID_BEFORE,
        VALID_AFTER,
        INVALID_SIGNATURE,
        NONCE_USED,
        INSUFFICIENT_BALANCE,
        SIMULATION_FAILED,
    }
)
HEADER_LEVEL = frozenset({INVALID_PAYLOAD, INVALID_VERSION, PAYMENT_REQUIRED})
BODY_STATUSES = {400, 402, 403, 404, 413}

_templates: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}


def templates(proxy: Proxy) -> dict[int, dict[str, Any]]:
    """A well-formed v1 and v2 payment for CHAT_BODY, signed by a key that holds nothing: if a
    mutation leaves it valid, it is still refused (insufficient balance) and nothing can move."""
    ident = (proxy.url, proxy.wallets.pay_to)
    if ident not in _templates:
        key = new_key()
        _templates[ident] = {
            v: proxy.payment(proxy.requirement(version=v), v, key=key).to_wire() for v in (1, 2)
        }
    return _templates[ident]


def check_answer(response: RawResponse, reasons: frozenset[str] | None = None) -> None:
    """Never a 5xx nor a traceback. A 402 is the JSON challenge with a reason (in ``reasons`` when
    given); any other app answer is the JSON error shape. The HTTP server itself may refuse
    malformed HTTP (400/431) before the app sees it."""
    assert response.status < 500, response.body[:300]
    assert 400 <= response.status < 500, response.status
    assert b"Traceback" not in response.body and b'File "' not in response.body
    content_type = response.headers.get("content-type", "")
    if response.status == 402:
        body = response.json()
        assert body["x402Version"] == 1 and isinstance(body["error"], str)
        assert decode_header(response.headers["payment-required"])["error"] == body["error"]
        if reasons is not None:
            assert body["error"] in reasons, body["error"]
    elif content_type.startswith("application/json"):
        error = response.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
    else:
        assert response.status in (400, 431) and b"Error response" in response.body, response.body[:300]


def send_header(proxy: Proxy, name: bytes, value: bytes, body: bytes = CHAT_BYTES) -> RawResponse:
    return raw_request(proxy, [(name, value)], body)


def assert_untouched(proxy: Proxy, standin: StandinModel, balances: tuple[int, int]) -> None:
    assert standin.received == []
    assert proxy.balances() == balances
    assert set(payment_states(proxy).values()) <= {"released"}


# --- payment headers: arbitrary values ----------------------------------------------------------

NO_NEWLINES = st.binary(max_size=400).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
HEADER_VALUES = st.one_of(
    NO_NEWLINES,
    st.text(max_size=200).map(lambda t: t.encode("utf-8").replace(b"\r", b"").replace(b"\n", b"")),
    st.binary(max_size=300).map(base64.b64encode),
    st.binary(min_size=1, max_size=300).map(base64.urlsafe_b64encode),
    JSON_VALUES.map(lambda v: base64.b64encode(dumps(v).encode())),
    HOSTILE_VALUES.map(lambda v: base64.b64encode(dumps(v).encode())),
)


@FUZZ
@given(name=st.sampled_from(list(HEADERS.values())), value=HEADER_VALUES)
def test_arbitrary_payment_header_values_are_refused(
    proxy: Proxy, standin: StandinModel, name: bytes, value: bytes
) -> None:
    check_answer(send_header(proxy, name, value), HEADER_LEVEL)
    assert standin.received == []


# --- payment headers: base64 that is almost right ------------------------------------------------

WHITESPACE = [b" ", b"\t", b"\r\n ", b"\r\n\t", b"\x0b", b"\x0c"]
NOT_UTF8 = [b"\xff", b"\xc0\x80", b"\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc3"]


@FUZZ
@given(data=st.data())
def test_almost_base64_is_invalid_payload(proxy: Proxy, standin: StandinModel, data: st.DataObject) -> None:
    version = data.draw(st.sampled_from([1, 2]), label="version")
    plain = json.dumps(templates(proxy)[version], separators=(",", ":")).encode()
    # a few spaces after "{" (still the same JSON) move the base64 alignment
    plain = b"{" + b" " * data.draw(st.integers(0, 2), label="shift") + plain[1:]
    encoded = base64.b64encode(plain)
    kind = data.draw(
        st.sampled_from(
            ["urlsafe", "whitespace", "padding", "stray bits", "not utf-8", "bom", "utf-16", "twice", "lower"]
        ),
        label="kind",
    )
    if kind == "urlsafe":
        # JSON whitespace after "{" until the standard encoding has a + or / to differ in
        variants = (b"{" + bytes(ws) + plain[1:] for n in range(4) for ws in product(b" \t\n\r", repeat=n))
        spaced = next((v for v in variants if set(base64.b64encode(v)) & set(b"+/")), None)
        assume(spaced is not None)
        assert spaced is not None
        value = base64.urlsafe_b64encode(spaced)
    elif kind == "whitespace":
        at = data.draw(st.integers(1, len(encoded) - 1), label="at")
        value = encoded[:at] + data.draw(st.sampled_from(WHITESPACE)) + encoded[at:]
    elif kind == "padding":
        value = encoded.rstrip(b"=") if encoded.endswith(b"=") else encoded + b"=="
    elif kind == "stray bits":
        data_end = len(encoded.rstrip(b"="))
        if data_end == len(encoded):
            value = encoded + b"A==="
        else:
            alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
            last = alphabet.index(encoded[data_end - 1 : data_end]) ^ 1
            value = encoded[: data_end - 1] + alphabet[last : last + 1] + encoded[data_end:]
    elif kind == "not utf-8":
        at = data.draw(st.integers(1, len(plain) - 1), label="at")
        value = base64.b64encode(plain[:at] + data.draw(st.sampled_from(NOT_UTF8)) + plain[at:])
    elif kind == "bom":
        value = base64.b64encode(b"\xef\xbb\xbf" + plain)
    elif kind == "utf-16":
        value = base64.b64encode(plain.decode().encode("utf-16"))
    elif kind == "twice":
        value = base64.b64encode(encoded)
    else:
        value = encoded.lower()
    balances = proxy.balances()
    check_answer(send_header(proxy, HEADERS[version], value), frozenset({INVALID_PAYLOAD}))
    assert_untouched(proxy, standin, balances)


# --- payment headers: JSON that is almost right -------------------------------------------------

UINT_FIELDS = ("value", "validAfter", "validBefore")
HEX_FIELDS = ("from", "to", "nonce")
# Objects whose keys are checked strictly (no unknown keys, exact types); `accepted` is compared
# with our requirement instead, so a change there may end in any refusal.
STRICT_OBJECTS = {(), ("payload",), ("payload", "authorization")}
TOP_KEYS = {
    2: {"x402Version", "accepted", "payload", "resource", "extensions"},
    1: {"x402Version", "scheme", "network", "payload"},
}


def paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every node below the root."""
    found: list[tuple[str, ...]] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.append((*prefix, key))
            found.extend(paths(value, (*prefix, key)))
    return found


def objects(tree: Any) -> list[tuple[str, ...]]:
    """The root and every object below it."""
    return [(), *(p for p in paths(tree) if isinstance(get(tree, p), dict))]


def get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def put(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    """``tree`` with the node at ``path`` replaced (the root when ``path`` is empty)."""
    if not path:
        return value
    get(tree, path[:-1])[path[-1]] = value
    return tree


def strict(path: tuple[str, ...]) -> bool:
    return path[:-1] in STRICT_OBJECTS


def other_type(value: Any) -> st.SearchStrategy[Any]:
    return JSON_VALUES.filter(
        lambda v: type(v) is not type(value) and not (isinstance(value, dict) and v == {})
    )


MUTATIONS = [
    "duplicate key",
    "constant",
    "deep",
    "number for a string",
    "x402Version",
    "odd uint",
    "odd hex",
    "odd signature",
    "missing",
    "unknown key",
    "wrong type",
    "odd number",
    "not an object",
    "optional of the wrong type",
]


def mutate(data: st.DataObject, wire: dict[str, Any], version: int) -> tuple[Any, frozenset[str] | None]:
    """One malformation of ``wire``: the document (with Raw/Pairs parts) and the reasons allowed."""
    doc: Any = copy.deepcopy(wire)
    kind = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    auth = ("payload", "authorization")
    if kind == "duplicate key":
        where = data.draw(st.sampled_from(objects(doc)), label="object")
        node = get(doc, where)
        key = data.draw(st.sampled_from(sorted(node)), label="key")
        again = data.draw(st.one_of(st.just(node[key]), JSON_VALUES), label="again")
        pairs = list(node.items())
        pairs.insert(data.draw(st.integers(0, len(pairs))), (key, again))
        return put(doc, where, Pairs(tuple(pairs))), frozenset({INVALID_PAYLOAD})
    if kind == "constant":
        where = data.draw(st.sampled_from(paths(doc)), label="path")
        return put(doc, where, Raw(data.draw(CONSTANTS))), frozenset({INVALID_PAYLOAD})
    if kind == "deep":
        where = data.draw(st.sampled_from(paths(doc)), label="path")
        depth = data.draw(st.integers(17, 3000), label="depth")
        nested = data.draw(st.sampled_from(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth]))
        return put(doc, where, Raw(nested)), frozenset({INVALID_PAYLOAD})
    if kind == "number for a string":
        field = data.draw(st.sampled_from(UINT_FIELDS), label="field")
        current = int(get(doc, (*auth, field)))
        number = data.draw(
            st.sampled_from([current, float(current), Raw(f"{current}e0"), Raw(f"{current}.0")])
        )
        return put(doc, (*auth, field), number), frozenset({INVALID_PAYLOAD})
    if kind == "x402Version":
        odd = data.draw(
            st.sampled_from(
                [str(version), float(version), True, None, 3 - version, 0, 3, [version], Raw(f"{version}.0")]
            )
        )
        return put(doc, ("x402Version",), odd), frozenset({INVALID_VERSION})
    if kind == "odd uint":
        field = data.draw(st.sampled_from(UINT_FIELDS), label="field")
        return put(doc, (*auth, field), data.draw(ODD_UINTS, label="uint")), frozenset({INVALID_PAYLOAD})
    if kind == "odd hex":
        field = data.draw(st.sampled_from(HEX_FIELDS), label="field")
        return put(doc, (*auth, field), data.draw(ODD_HEX, label="hex")), frozenset({INVALID_PAYLOAD})
    if kind == "odd signature":
        good = doc["payload"]["signature"]
        odd = data.draw(
            st.one_of(
                ODD_HEX,
                st.sampled_from(
                    [good[:-1], good[2:], good.upper(), "0x" + good[2:] + "0", good + " ", good[:-2]]
                ),
            ),
            label="signature",
        )
        return put(doc, ("payload", "signature"), odd), frozenset({INVALID_PAYLOAD})
    if kind == "missing":
        where = data.draw(st.sampled_from(paths(doc)), label="path")
        del get(doc, where[:-1])[where[-1]]
        if where == ("x402Version",):
            return doc, frozenset({INVALID_VERSION})
        return doc, frozenset({INVALID_PAYLOAD}) if strict(where) else None
    if kind == "unknown key":
        where = data.draw(st.sampled_from(objects(doc)), label="object")
        node = get(doc, where)
        taken = TOP_KEYS[version] if where == () else set(node)
        key = data.draw(st.text(max_size=12).filter(lambda k: k not in taken), label="key")
        node[key] = data.draw(JSON_VALUES, label="value")
        return doc, frozenset({INVALID_PAYLOAD}) if where in STRICT_OBJECTS else None
    if kind == "wrong type":
        where = data.draw(st.sampled_from(paths(doc)), label="path")
        doc = put(doc, where, data.draw(other_type(get(doc, where)), label="value"))
        if where == ("x402Version",):
            return doc, frozenset({INVALID_VERSION})
        return doc, frozenset({INVALID_PAYLOAD}) if strict(where) else None
    if kind == "odd number":
        where = data.draw(st.sampled_from(paths(doc)), label="path")
        return put(doc, where, Raw(data.draw(ODD_NUMBERS, label="number"))), None
    if kind == "not an object":
        return data.draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict))), frozenset({INVALID_VERSION})
    name = data.draw(st.sampled_from(["resource", "extensions"]), label="optional")
    doc[name] = data.draw(JSON_VALUES.filter(lambda v: v is not None and not isinstance(v, dict)))
    return doc, frozenset({INVALID_PAYLOAD})


@FUZZ
@given(data=st.data())
def test_malformed_payment_json_is_refused(proxy: Proxy, standin: StandinModel, data: st.DataObject) -> None:
    version = data.draw(st.sampled_from([1, 2]), label="version")
    doc, reasons = mutate(data, templates(proxy)[version], version)
    value = base64.b64encode(dumps(doc).encode("utf-8"))
    if len(value) > 8192:
        reasons = frozenset({INVALID_PAYLOAD})
    balances = proxy.balances()
    check_answer(send_header(proxy, HEADERS[version], value), reasons or ANY_REFUSAL)
    assert_untouched(proxy, standin, balances)


@pytest.mark.parametrize("version", [2, 1])
def test_unmutated_template_is_refused_for_want_of_funds(
    proxy: Proxy, standin: StandinModel, version: int
) -> None:
    """The fuzzing baseline: the templates parse, match, and fail only on chain."""
    value = base64.b64encode(dumps(templates(proxy)[version]).encode())
    check_answer(send_header(proxy, HEADERS[version], value), frozenset({INSUFFICIENT_BALANCE}))
    assert_untouched(proxy, standin, proxy.balances())


@pytest.mark.parametrize("size", [8192, 8193, 20_000, 60_000, 70_000, 300_000])
@pytest.mark.parametrize("name", list(HEADERS.values()))
def test_huge_payment_header_is_refused_not_500(
    proxy: Proxy, standin: StandinModel, name: bytes, size: int
) -> None:
    """Over 8 KB a header is refused by the proxy (402 invalid_payload); past the HTTP server's
    line limit (64 KB for werkzeug's server, 8 KB for gunicorn) the server answers 431/400 first."""
    value = (base64.b64encode(dumps(templates(proxy)[2]).encode()) * (size // 600 + 1))[:size]
    response = send_header(proxy, name, value)
    check_answer(response, frozenset({INVALID_PAYLOAD}))
    assert response.status in (402, 400, 431)
    if size < 65_000:
        assert response.status == 402
    assert requests.get(proxy.url + "/healthz", timeout=10).status_code == 200
    assert standin.received == []


def test_too_many_headers_is_refused(proxy: Proxy, standin: StandinModel) -> None:
    response = raw_request(proxy, [(f"X-Pad-{i}".encode(), b"x") for i in range(150)], CHAT_BYTES)
    check_answer(response)
    assert standin.received == []


def test_huge_integer_in_payment_header_is_invalid_payload(proxy: Proxy, standin: StandinModel) -> None:
    """json.loads raises a plain ValueError (not JSONDecodeError) past 4300 digits."""
    value = base64.b64encode(('{"x402Version": ' + "1" * 4301 + "}").encode())
    check_answer(send_header(proxy, HEADERS[2], value), frozenset({INVALID_PAYLOAD}))
    assert standin.received == []


# --- request bodies ------------------------------------------------------------------------------

CHAT_LIKE = st.fixed_dictionaries(
    {"model": st.one_of(st.just("hermes-3-8b-tee"), JSON_VALUES)},
    optional={
        "messages": HOSTILE_VALUES,
        "prompt": HOSTILE_VALUES,
        "max_tokens": st.one_of(st.integers(), JSON_VALUES, ODD_NUMBERS.map(Raw)),
        "max_completion_tokens": st.one_of(st.integers(), JSON_VALUES),
        "stream": JSON_VALUES,
        "base_url": st.text(max_size=30),
    },
)
BODIES = st.one_of(
    st.binary(max_size=2000),
    JSON_VALUES.map(lambda v: dumps(v).encode()),
    HOSTILE_VALUES.map(lambda v: dumps(v).encode()),
    CHAT_LIKE.map(lambda v: dumps(v).encode()),
)


@FUZZ
@given(path=st.sampled_from([b"/v1/chat/completions", COMPLETIONS.encode()]), body=BODIES)
def test_arbitrary_bodies_are_4xx(proxy: Proxy, standin: StandinModel, path: bytes, body: bytes) -> None:
    response = raw_request(proxy, [], body, path=path)
    check_answer(response)
    assert response.status in BODY_STATUSES, response.status
    assert standin.received == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_cap_is_413_json(proxy: Proxy, standin: StandinModel, chunked: bool) -> None:
    """Over the cap by a tail of junk after a valid document that fills the cap exactly: a server
    that read only up to the cap would price (402) a body it never fully read."""
    valid = json.dumps({"model": "hermes-3-8b-tee", "prompt": "a", "max_tokens": 16}).encode()
    body = valid + b" " * (proxy.settings.max_body_bytes - len(valid)) + b'{"junk": 1}'
    response = raw_request(proxy, [], body, path=COMPLETIONS.encode(), chunked=chunked)
    assert response.status == 413, response.body[:200]
    assert response.headers["content-type"].startswith("application/json")
    assert set(response.json()["error"]) == {"code", "message"}
    assert standin.received == []


def test_huge_integer_in_body_is_400(proxy: Proxy, standin: StandinModel) -> None:
    body = json.dumps(CHAT_BODY)[:-1].encode() + b', "n": ' + b"1" * 4301 + b"}"
    response = raw_request(proxy, [], body)
    check_answer(response)
    assert response.status == 400 and response.json()["error"]["code"] == "invalid_json"


def test_out_of_range_number_in_body_is_refused_before_any_402(proxy: Proxy, standin: StandinModel) -> None:
    """1e400 parses to float('inf'): the call would be priced and paid, then the forward fails
    (requests refuses to serialise inf) after settlement, on every retry."""
    body = json.dumps(CHAT_BODY)[:-1].encode() + b', "temperature": 1e400}'
    response = raw_request(proxy, [], body)
    check_answer(response)
    assert response.status == 400 and response.json()["error"]["code"] == "invalid_json"


def test_unterminated_escaped_string_body_is_refused_quickly(proxy: Proxy, standin: StandinModel) -> None:
    """A body of escaped quotes with no closing quote: the nesting pre-check must stay linear.
    (24 KB here; the body cap allows 1 MB.)"""
    body = b'{"model": "hermes-3-8b-tee", "messages": "' + b'\\"' * 12_000
    started = time.monotonic()
    response = raw_request(proxy, [], body)
    elapsed = time.monotonic() - started
    check_answer(response)
    assert response.status == 400
    assert elapsed < 1.0, f"a 24 KB body took {elapsed:.1f} s to refuse"
