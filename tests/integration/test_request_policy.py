"""The price covers all the work a body asks for, on real processes.

anvil (chain id 8453, our token at the Base USDC address), redis-server, the proxy over loopback and
the stand-in model, which reports every field path it received (``standin_received``). Each kind of
work is either priced into the 402 (and the paid call moves exactly that amount on chain) or refused
with a 400 and a stable code before any 402: nothing charged, no model call, no Redis key.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
import requests

from app.catalog import load_catalog, quote_for
from app.catalog.policy import ROUTE_FIELDS, Rule
from app.devnet.standin import StandinModel
from app.payments.keys import PAYMENT_KEYS
from app.settings import DEFAULT_CATALOG
from app.x402.codec import decode_header
from tests.support import Proxy, settle_response

pytestmark = pytest.mark.integration

M = "hermes-3-8b-tee"
HERMES = load_catalog(DEFAULT_CATALOG)[M]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Name three trusted execution environments."}]
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a TEE vendor up",
        "parameters": {"type": "object", "properties": {"vendor": {"type": "string"}}},
    },
}


def price(route: str, body: dict[str, Any]) -> int:
    return quote_for(HERMES, route, body).amount


def output_price(tokens: int) -> int:
    return tokens * HERMES.output_per_million // 10**6


def input_price(tokens: int) -> int:
    return tokens * HERMES.input_per_million // 10**6


def offered(proxy: Proxy, path: str, body: dict[str, Any]) -> int:
    return int(proxy.requirement(body, path=path)["amount"])


def pay(proxy: Proxy, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """Pay the 402's amount for ``body``; the chain must show exactly that amount moved."""
    amount = offered(proxy, path, body)
    before = proxy.balances()
    response = proxy.pay(proxy.payment(proxy.requirement(body, path=path)), body, path=path)
    assert response.status_code == 200, response.text
    assert settle_response(response)["success"] is True
    after = proxy.balances()
    assert (before[0] - after[0], after[1] - before[1]) == (amount, amount)
    return amount, response


# --- multiplied work is priced ------------------------------------------------------------------


def test_n_answers_are_priced_as_n_and_served_as_n(proxy: Proxy, standin: StandinModel) -> None:
    one = offered(proxy, CHAT, {"model": M, "messages": USER, "max_tokens": 4000})
    body = {"model": M, "messages": USER, "max_tokens": 4000, "n": 8}
    amount, response = pay(proxy, CHAT, body)
    assert amount == price("chat", body) >= one + output_price(7 * 4000)
    assert len(response.json()["choices"]) == 8
    assert standin.received[-1].body["n"] == 8


def test_best_of_and_list_prompts_are_priced_for_every_answer(proxy: Proxy, standin: StandinModel) -> None:
    one = offered(proxy, COMPLETIONS, {"model": M, "prompt": "Once", "max_tokens": 4000})
    best_of = {"model": M, "prompt": "Once", "max_tokens": 4000, "best_of": 8}
    assert offered(proxy, COMPLETIONS, best_of) >= one + output_price(7 * 4000)
    listed = {"model": M, "prompt": ["Once", "Twice", "Thrice", "Again"], "max_tokens": 4000, "n": 2}
    amount, response = pay(proxy, COMPLETIONS, listed)
    assert amount == price("completions", listed) >= output_price(8 * 4000)
    assert len(response.json()["choices"]) == 8


def test_token_id_prompts_are_counted_one_token_per_id(proxy: Proxy, standin: StandinModel) -> None:
    ids = {"model": M, "prompt": list(range(1, 20_001)), "max_tokens": 16}
    amount, _ = pay(proxy, COMPLETIONS, ids)
    assert amount > HERMES.floor
    assert amount >= input_price(20_000) + output_price(16)
    assert standin.received[-1].body["prompt"] == ids["prompt"]


def test_tool_definitions_are_priced_as_input(proxy: Proxy, standin: StandinModel) -> None:
    schema = {"type": "object", "description": "d" * 30_000}
    tools = [{"type": "function", "function": {"name": "big", "description": "", "parameters": schema}}]
    body = {"model": M, "messages": USER, "max_tokens": 16, "tools": tools, "tool_choice": "auto"}
    amount, _ = pay(proxy, CHAT, body)
    printed = HERMES.tools_factor * 30_000  # the template prints a definition several times
    assert amount >= input_price(printed + HERMES.tools_overhead) + output_price(16)
    assert standin.received[-1].body["tools"] == tools


# --- refused before any 402: nothing charged, nothing called, nothing stored ---------------------

REFUSED: list[tuple[str, str, dict[str, Any], str]] = [
    ("n above the cap", CHAT, {"n": 9}, "too_many_choices"),
    ("20 list prompts", COMPLETIONS, {"prompt": ["a"] * 20}, "too_many_choices"),
    ("best_of above the cap", COMPLETIONS, {"prompt": "a", "best_of": 9}, "too_many_choices"),
    ("300 KB of tools", CHAT, {"tools": [TOOL] * 1500}, "context_length_exceeded"),
    (
        "image part to a text model",
        CHAT,
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
            ]
        },
        "modality_not_supported",
    ),
    ("chat_template", CHAT, {"chat_template": "{{ messages }}"}, "unknown_field"),
    ("chat_template_kwargs", CHAT, {"chat_template_kwargs": {"enable_thinking": True}}, "unknown_field"),
    ("guided_json", CHAT, {"guided_json": {}}, "unknown_field"),
    (
        "an unknown message field",
        CHAT,
        {"messages": [{"role": "user", "content": "x", "x": 1}]},
        "unknown_field",
    ),
    ('stream: "true"', CHAT, {"stream": "true"}, "invalid_field"),
    ('echo: "true"', COMPLETIONS, {"prompt": "a", "echo": "true"}, "invalid_field"),
    ("store: true", CHAT, {"store": True}, "unsupported_field"),
    ("a priority service tier", CHAT, {"service_tier": "priority"}, "unsupported_field"),
    ("predicted outputs", CHAT, {"prediction": {"type": "content", "content": "x"}}, "unsupported_field"),
    (
        "input beyond the context",
        COMPLETIONS,
        {"prompt": "a" * 130_000, "max_tokens": 4096},
        "context_length_exceeded",
    ),
]


@pytest.mark.parametrize(("path", "extra", "code"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_before_any_402(
    proxy: Proxy,
    standin: StandinModel,
    redis_client: redis.Redis,
    path: str,
    extra: dict[str, Any],
    code: str,
) -> None:
    base: dict[str, Any] = {"model": M, "messages": USER} if path == CHAT else {"model": M}
    before = proxy.balances()
    response = proxy.post(path, {**base, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert "PAYMENT-REQUIRED" not in response.headers
    assert standin.received == []
    assert redis_client.keys(PAYMENT_KEYS) == []
    assert proxy.balances() == before


# --- the forwarded body is built from the policy ------------------------------------------------


def test_the_host_receives_exactly_the_accepted_chat_fields(proxy: Proxy, standin: StandinModel) -> None:
    body = {
        "model": M,
        "messages": USER,
        "max_completion_tokens": 32,
        "n": 2,
        "temperature": 0.3,
        "seed": 11,
        "tools": [TOOL],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "stop": ["\n\n"],
        "response_format": {"type": "json_object"},
        "user": "buyer-42",
        "store": False,
        "metadata": {"team": "x"},
        "service_tier": "auto",
    }
    _, response = pay(proxy, CHAT, body)
    forwarded = {
        "model", "messages", "max_completion_tokens", "max_tokens", "n", "temperature", "seed", "tools",
        "tool_choice", "parallel_tool_calls", "stop", "response_format",
    }  # fmt: skip
    assert set(standin.received[-1].body) == forwarded
    reported = {path for path in response.json()["standin_received"] if "." not in path and "[" not in path}
    assert reported == forwarded
    assert standin.received[-1].body["max_tokens"] == standin.received[-1].body["max_completion_tokens"] == 32


def test_the_host_receives_exactly_the_accepted_completions_fields(
    proxy: Proxy, standin: StandinModel
) -> None:
    body = {
        "model": M,
        "prompt": ["a", "b"],
        "max_tokens": 8,
        "best_of": 2,
        "echo": True,
        "logprobs": 1,
        "top_k": 40,
        "user": "buyer-42",
    }
    _, response = pay(proxy, COMPLETIONS, body)
    forwarded = {"model", "prompt", "max_tokens", "best_of", "echo", "logprobs", "top_k"}
    assert set(standin.received[-1].body) == forwarded
    assert {p for p in response.json()["standin_received"] if "." not in p and "[" not in p} == forwarded


def test_a_default_body_gets_the_default_max_tokens_and_nothing_else(
    proxy: Proxy, standin: StandinModel
) -> None:
    pay(proxy, CHAT, {"model": M, "messages": USER})
    assert standin.received[-1].body == {
        "model": M,
        "messages": USER,
        "max_tokens": HERMES.default_max_tokens,
    }


def test_the_model_list_and_the_402_say_what_a_body_may_hold(proxy: Proxy) -> None:
    entry = requests.get(proxy.url + "/v1/models", timeout=10).json()["data"][0]
    assert (entry["context_length"], entry["modalities"], entry["max_choices"]) == (
        HERMES.context_length,
        ["text"],
        HERMES.max_choices,
    )
    assert entry["pricing"]["message_overhead"] == HERMES.message_overhead
    assert entry["pricing"]["tools_overhead"] == HERMES.tools_overhead
    assert entry["pricing"]["tools_factor"] == HERMES.tools_factor
    assert entry["pricing"]["schema_key_overhead"] == HERMES.schema_key_overhead
    for path, route in ((CHAT, "chat"), (COMPLETIONS, "completions")):
        body = {"model": M, "messages": USER} if route == "chat" else {"model": M, "prompt": "x"}
        response = proxy.post(path, body)
        assert len(response.headers["PAYMENT-REQUIRED"]) < 8192
        schema = decode_header(response.headers["PAYMENT-REQUIRED"])["extensions"]["bazaar"]["schema"]
        accepted = schema["properties"]["input"]["properties"]["body"]
        assert accepted["additionalProperties"] is False
        allowed = {name for name, field in ROUTE_FIELDS[route].items() if field.rule is not Rule.REFUSE}
        assert set(accepted["properties"]) == allowed
