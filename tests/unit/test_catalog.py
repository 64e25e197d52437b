"""The catalog prices a body deterministically, in whole atomic units, never below the floor.

The request policy's own rules (every field, the input bound) are in ``test_policy.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.catalog import Catalog, CatalogError, Model, QuoteError, load_catalog, quote_for
from app.catalog.reading import POLICY_CODES
from app.settings import DEFAULT_CATALOG

PACKAGED = "hermes-3-8b-tee"

PER_CALL_TOML = """
[models."flat"]
description = "flat price"
tee = true
pricing = "per_call"
price = 5000
max_tokens_cap = 1000
default_max_tokens = 100

[models."odd"]
description = "prices that do not divide a million"
tee = true
pricing = "per_token"
input_per_million = 333333
output_per_million = 1000001
floor = 1
default_max_tokens = 16
max_tokens_cap = 64
upstream_url = "http://upstream.example/"

[models."plain"]
description = "not in a TEE"
pricing = "per_call"
price = 7
"""


@pytest.fixture(scope="module")
def packaged() -> Catalog:
    return Catalog(load_catalog(DEFAULT_CATALOG))


@pytest.fixture
def custom(tmp_path: Path) -> Catalog:
    path = tmp_path / "catalog.toml"
    path.write_text(PER_CALL_TOML, encoding="utf-8")
    return Catalog(load_catalog(path))


def chat(content: str = "hello", model: str = PACKAGED, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- loading -----------------------------------------------------------------------------------------


def test_packaged_catalog_loads(packaged: Catalog) -> None:
    model = packaged.models[PACKAGED]
    assert model.pricing == "per_token"
    assert model.tee is True
    assert (model.input_per_million, model.output_per_million) == (200_000, 600_000)
    assert (model.floor, model.default_max_tokens, model.max_tokens_cap) == (1000, 512, 4096)
    public = model.public()
    assert public["id"] == PACKAGED
    assert public["pricing"]["scheme"] == "per_token"
    assert public["pricing"]["max_tokens_cap"] == 4096


def test_custom_catalog_loads(custom: Catalog) -> None:
    flat = custom.models["flat"]
    assert (flat.pricing, flat.price, flat.floor) == ("per_call", 5000, 1)
    assert flat.public()["pricing"] == {"scheme": "per_call", "floor": 1, "per_call": 5000}
    odd = custom.models["odd"]
    assert odd.upstream_url == "http://upstream.example"  # trailing slash stripped
    assert custom.models["plain"].tee is False  # tee defaults to false


def test_tee_only_refuses_and_hides_non_tee_models(custom: Catalog) -> None:
    assert custom.tee_only is True  # the default
    with pytest.raises(QuoteError) as info:
        custom.quote("chat", chat(model="plain"))
    assert (info.value.code, info.value.status) == ("model_not_tee", 403)
    assert {m.name for m in custom.listed()} == {"flat", "odd"}
    everything = Catalog(custom.models, tee_only=False)
    assert everything.quote("chat", chat(model="plain")).amount == 7
    assert {m.name for m in everything.listed()} == {"flat", "odd", "plain"}


BAD_CATALOGS = {
    "not toml": "[models",
    "bad pricing": '[models.m]\npricing = "per_byte"\n',
    "missing pricing": "[models.m]\nprice = 1\n",
    "negative price": '[models.m]\npricing = "per_call"\nprice = -1\n',
    "string price": '[models.m]\npricing = "per_call"\nprice = "10"\n',
    "float price": '[models.m]\npricing = "per_call"\nprice = 1.5\n',
    "bool price": '[models.m]\npricing = "per_call"\nprice = true\n',
    "bad floor": '[models.m]\npricing = "per_token"\nfloor = "1"\n',
    "default above cap": '[models.m]\npricing = "per_token"\ndefault_max_tokens = 10\nmax_tokens_cap = 5\n',
    "zero default": '[models.m]\npricing = "per_token"\ndefault_max_tokens = 0\n',
    "no models": "# nothing\n",
    "empty models table": "[models]\n",
}


@pytest.mark.parametrize("text", BAD_CATALOGS.values(), ids=BAD_CATALOGS.keys())
def test_bad_catalog_is_catalog_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(CatalogError):
        load_catalog(write(tmp_path, text))


def test_missing_catalog_file_is_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError):
        load_catalog(tmp_path / "absent.toml")


@pytest.mark.parametrize("text", ["models = 3", "models = []", "[models]\nm = 1\n"])
def test_structurally_wrong_catalog_is_catalog_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(CatalogError):
        load_catalog(write(tmp_path, text))


# -- quoting -----------------------------------------------------------------------------------------


# One chat message costs its bytes plus the template's 8 tokens, and the assistant's turn 8 more.
TEMPLATE = 2 * 8


def test_exact_per_token_arithmetic(packaged: Catalog) -> None:
    body = chat("hello", max_tokens=4096)
    # "user" + "hello" = 9 bytes, + 16 template tokens = 25 input tokens
    # (25 * 200000 + 4096 * 600000) / 1e6 = 2462.6 -> 2463
    assert packaged.quote("chat", body).work.input_tokens == 9 + TEMPLATE
    assert packaged.quote("chat", body).amount == 2463


def test_exact_arithmetic_rounds_up(custom: Catalog) -> None:
    body = chat("a" * 10, model="odd", max_tokens=7)
    # "user" + 10 x "a" = 14 bytes -> 30 tokens; (30 * 333333 + 7 * 1000001) / 1e6 = 16.999997 -> 17
    assert custom.quote("chat", body).amount == 17


def test_multibyte_text_counts_utf8_bytes(custom: Catalog) -> None:
    ascii_body = chat("aaa", model="odd", max_tokens=1)
    euro_body = chat("€€€", model="odd", max_tokens=1)  # 9 bytes instead of 3
    # ascii: 7 bytes + 16 -> 23 tokens -> ceil((7666659 + 1000001) / 1e6) = 9
    # euro: 13 bytes + 16 -> 29 tokens -> ceil((9666657 + 1000001) / 1e6) = 11
    assert custom.quote("chat", ascii_body).amount == 9
    assert custom.quote("chat", euro_body).amount == 11


def test_floor_applies(packaged: Catalog) -> None:
    quote = packaged.quote("chat", chat("hi", max_tokens=1))
    assert quote.amount == 1000


def test_per_call_ignores_body(custom: Catalog) -> None:
    assert custom.quote("chat", chat("x", model="flat")).amount == 5000
    assert custom.quote("chat", chat("x" * 10_000, model="flat", max_tokens=1000)).amount == 5000
    assert custom.quote("completions", {"model": "flat", "prompt": "hi"}).amount == 5000


def test_completions_route_prices_prompt(custom: Catalog) -> None:
    short = custom.quote("completions", {"model": "odd", "prompt": "a", "max_tokens": 1}).amount
    long = custom.quote("completions", {"model": "odd", "prompt": "a" * 3000, "max_tokens": 1}).amount
    assert long > short
    with pytest.raises(QuoteError) as info:
        custom.quote("completions", {"model": "odd", "max_tokens": 1})  # no prompt
    assert (info.value.code, info.value.status) == ("invalid_request", 400)
    with pytest.raises(QuoteError) as info:
        custom.quote("completions", chat(model="odd"))  # messages belong to the chat route
    assert (info.value.code, info.value.status) == ("unknown_field", 400)


def test_missing_max_tokens_gets_default(packaged: Catalog) -> None:
    body = chat("hello")
    quote = packaged.quote("chat", body)
    assert quote.body["max_tokens"] == 512
    assert "max_tokens" not in body  # the caller's body is not mutated
    assert quote.amount == packaged.quote("chat", chat("hello", max_tokens=512)).amount
    assert quote.body["messages"] == body["messages"]
    assert quote.model.name == PACKAGED


def test_max_completion_tokens_is_priced_and_forwarded(custom: Catalog) -> None:
    quote = custom.quote("chat", chat(model="odd", max_completion_tokens=40, max_tokens=10))
    assert quote.body["max_tokens"] == 40
    assert quote.body["max_completion_tokens"] == 40
    assert quote.amount == custom.quote("chat", chat(model="odd", max_tokens=40)).amount


@pytest.mark.parametrize("max_tokens", [4097, 10**9])
def test_max_tokens_above_cap(packaged: Catalog, max_tokens: int) -> None:
    with pytest.raises(QuoteError) as info:
        packaged.quote("chat", chat(max_tokens=max_tokens))
    assert (info.value.code, info.value.status) == ("max_tokens_too_large", 400)


def test_max_tokens_at_cap_is_accepted(packaged: Catalog) -> None:
    assert packaged.quote("chat", chat(max_tokens=4096)).body["max_tokens"] == 4096


@pytest.mark.parametrize("bad", [0, -1, "10", 1.5, True, [10]])
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_invalid_max_tokens(packaged: Catalog, field: str, bad: Any) -> None:
    with pytest.raises(QuoteError) as info:
        packaged.quote("chat", chat(**{field: bad}))
    assert (info.value.code, info.value.status) == ("invalid_max_tokens", 400)


def test_unknown_model(packaged: Catalog) -> None:
    with pytest.raises(QuoteError) as info:
        packaged.quote("chat", chat(model="gpt-nothing"))
    assert (info.value.code, info.value.status) == ("model_not_found", 404)


@pytest.mark.parametrize(
    "body",
    [None, [], "text", 3, {"messages": []}, {"model": "", "messages": []}, {"model": 5, "messages": []}],
    ids=repr,
)
def test_invalid_request(packaged: Catalog, body: Any) -> None:
    with pytest.raises(QuoteError) as info:
        packaged.quote("chat", body)
    assert (info.value.code, info.value.status) == ("invalid_request", 400)


def test_missing_messages(packaged: Catalog) -> None:
    with pytest.raises(QuoteError) as info:
        packaged.quote("chat", {"model": PACKAGED})
    assert (info.value.code, info.value.status) == ("invalid_request", 400)


def test_quote_error_is_value_error() -> None:
    error = QuoteError("x", "message")
    assert isinstance(error, ValueError)
    assert (error.code, error.status, str(error)) == ("x", 400, "message")


# -- properties ------------------------------------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=40)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text()}),
    min_size=1,
    max_size=4,
)
max_tokens_opt = st.none() | st.integers(min_value=1, max_value=4096)


def body_of(msgs: list[dict[str, Any]], max_tokens: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": PACKAGED, "messages": msgs}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


@given(messages, max_tokens_opt)
def test_quote_is_deterministic_integer_and_above_floor(
    msgs: list[dict[str, Any]], max_tokens: int | None
) -> None:
    catalog = Catalog(load_catalog(DEFAULT_CATALOG))
    first = catalog.quote("chat", body_of(msgs, max_tokens))
    second = catalog.quote("chat", body_of([dict(m) for m in msgs], max_tokens))
    assert first.amount == second.amount
    assert first.body == second.body
    assert type(first.amount) is int
    assert first.amount >= catalog.models[PACKAGED].floor


@given(messages, st.integers(min_value=1, max_value=4096), st.integers(min_value=1, max_value=4096))
def test_quote_monotone_in_max_tokens(msgs: list[dict[str, Any]], a: int, b: int) -> None:
    catalog = Catalog(load_catalog(DEFAULT_CATALOG))
    low, high = sorted((a, b))
    assert (
        catalog.quote("chat", body_of(msgs, low)).amount <= catalog.quote("chat", body_of(msgs, high)).amount
    )


PER_TOKEN = Model("m", "", True, "per_token", input_per_million=333_333, output_per_million=7, floor=1)


@given(st.text(), st.text(), st.integers(min_value=1, max_value=64))
def test_quote_monotone_in_prompt_size(prefix: str, more: str, max_tokens: int) -> None:
    short = {"model": "m", "messages": [{"role": "user", "content": prefix}], "max_tokens": max_tokens}
    longer = {
        "model": "m",
        "messages": [{"role": "user", "content": prefix + more}],
        "max_tokens": max_tokens,
    }
    extra_msg = {**short, "messages": [*short["messages"], {"role": "user", "content": more}]}
    base = quote_for(PER_TOKEN, "chat", short).amount
    assert quote_for(PER_TOKEN, "chat", longer).amount >= base
    assert quote_for(PER_TOKEN, "chat", extra_msg).amount > base  # a message costs its template tokens


@given(
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**6),
    st.text(),
    st.integers(1, 4096),
    st.integers(1, 8),
)
def test_price_matches_formula(inp: int, out: int, content: str, max_tokens: int, n: int) -> None:
    model = Model("m", "", True, "per_token", input_per_million=inp, output_per_million=out, floor=1)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "n": n,
    }
    tokens = len(("user" + content).encode("utf-8", "surrogatepass")) + TEMPLATE
    expected = max(-(-(tokens * inp + max_tokens * n * out) // 10**6), 1)  # exact integer ceiling
    assert quote_for(model, "chat", body).amount == expected


@given(
    st.recursive(
        json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3)
    )
)
def test_odd_messages_are_priced_or_refused_with_a_stable_code(value: Any) -> None:
    catalog = Catalog(load_catalog(DEFAULT_CATALOG))
    try:
        quote = catalog.quote("chat", {"model": PACKAGED, "messages": value})
    except QuoteError as refusal:
        assert (refusal.status, refusal.code in POLICY_CODES) == (400, True)
    else:
        assert quote.amount >= 1000
