"""The OpenAI SDKs, paying through the official x402 clients, are charged for the work they ask for,
and once for one answer.

- PyPI ``openai`` (``AsyncOpenAI``) over PyPI ``x402``'s httpx client (``x402HttpxClient``);
- npm ``openai`` with ``@x402/fetch``'s paying fetch as its ``fetch`` option (``js/openai_chat.mjs``).

Each asks for ``n`` answers with ``max_completion_tokens`` and tools, streamed and not. The chain must
show one transfer of exactly the 402's amount, and that amount covers every answer at its limit plus
the tool definitions as input. With the SDKs' default retries on, a host that fails once costs one
payment for one answer, and a host that keeps failing costs one payment (kept redeemable), not one
per SDK retry.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from eth_account import Account
from openai import APIStatusError, AsyncOpenAI
from x402 import x402Client
from x402.http.clients.httpx import x402HttpxClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

from app.catalog import load_catalog, quote_for
from app.devnet.standin import Behaviour, StandinModel
from app.settings import DEFAULT_CATALOG
from tests.interop.paid import PROJECT_ROOT, decode_settlement, run_node, token_transfers
from tests.support import Proxy, moved_since

pytestmark = pytest.mark.integration

M = "hermes-3-8b-tee"
HERMES = load_catalog(DEFAULT_CATALOG)[M]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "attest",
            "description": "Fetch the attestation report of a TEE host " + "and check it " * 200,
            "parameters": {
                "type": "object",
                "properties": {"host": {"type": "string"}},
                "required": ["host"],
            },
        },
    }
]
MESSAGES = [{"role": "user", "content": "Which hosts run in a TEE?"}]
CASES = {
    "n=3 with tools": {"n": 3, "max_completion_tokens": 3000, "tools": TOOLS, "tool_choice": "auto"},
    "streamed n=2 with tools": {"n": 2, "max_completion_tokens": 2000, "tools": TOOLS, "stream": True},
}


def covers_the_work(amount: int, body: dict[str, Any]) -> None:
    """The amount pays every answer at its limit and the tool definitions as input."""
    tool_bytes = len(json.dumps(TOOLS).encode())
    output = body["n"] * body["max_completion_tokens"] * HERMES.output_per_million
    tools = (tool_bytes + HERMES.tools_overhead) * HERMES.input_per_million
    assert amount >= (output + tools) // 10**6 > HERMES.floor


def paid_once(proxy: Proxy, settlement: dict[str, Any], amount: int) -> None:
    payer, payee = proxy.wallets.payer.lower(), proxy.wallets.pay_to.lower()
    assert settlement["success"] is True, settlement
    assert token_transfers(proxy, settlement["transaction"]) == [(payer, payee, amount)]


def npm_chat(proxy: Proxy, body: dict[str, Any]) -> dict[str, Any]:
    """One chat call through the ``openai`` npm package over ``@x402/fetch`` (its printed line)."""
    env = {
        "X402_URL": proxy.url + "/v1",
        "X402_PAYER_KEY": proxy.wallets.payer_key,
        "X402_BODY": json.dumps(body),
    }
    return run_node(PROJECT_ROOT / "tests" / "interop" / "js" / "openai_chat.mjs", env)


async def _python_sdk_call(
    proxy: Proxy, body: dict[str, Any], retries: int = 0
) -> tuple[dict[str, Any], int]:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(proxy.wallets.payer_key)))
    async with x402HttpxClient(client, timeout=60) as http:
        openai = AsyncOpenAI(
            base_url=proxy.url + "/v1", api_key="no-key-needed", http_client=http, max_retries=retries
        )
        raw = await openai.chat.completions.with_raw_response.create(**body)
        settlement = decode_settlement(raw.headers.get("PAYMENT-RESPONSE"))
        parsed = raw.parse()
        if body.get("stream"):
            indexes = {choice.index async for chunk in parsed for choice in chunk.choices}
        else:
            indexes = {choice.index for choice in parsed.choices}
    return settlement, len(indexes)


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_openai_python_sdk_over_x402_httpx_is_charged_for_its_work(
    proxy: Proxy, standin: StandinModel, extra: dict[str, Any]
) -> None:
    body = {"model": M, "messages": MESSAGES, **extra}
    amount = quote_for(HERMES, "chat", body).amount
    covers_the_work(amount, body)
    settlement, answers = asyncio.run(_python_sdk_call(proxy, body))
    paid_once(proxy, settlement, amount)
    assert standin.received[-1].body["n"] == body["n"]
    assert standin.received[-1].body["max_tokens"] == body["max_completion_tokens"]
    assert answers == (1 if body.get("stream") else body["n"])  # the stand-in streams one answer


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_openai_npm_sdk_over_x402_fetch_is_charged_for_its_work(
    proxy: Proxy, standin: StandinModel, extra: dict[str, Any]
) -> None:
    assert (PROJECT_ROOT / "node_modules" / "openai").is_dir(), "run npm ci at the project root"
    body = {"model": M, "messages": MESSAGES, **extra}
    amount = quote_for(HERMES, "chat", body).amount
    covers_the_work(amount, body)
    line = npm_chat(proxy, body)
    assert line["status"] == 200, line
    assert line["paymentResponse"]["success"] is True
    paid_once(proxy, line["paymentResponse"], amount)
    assert standin.received[-1].body["n"] == body["n"]
    assert line["choices"] == (1 if body.get("stream") else body["n"])


# --- the SDKs' default retries never make the wallet pay twice -------------------------------------

SIMPLE = {"model": M, "messages": MESSAGES, "max_completion_tokens": 64}
DEFAULT_RETRIES = 2  # both SDKs' default


@pytest.mark.parametrize("sdk", ["python", "npm"])
def test_a_host_that_fails_once_costs_one_payment_for_one_answer(
    proxy: Proxy, standin: StandinModel, sdk: str
) -> None:
    standin.behaviour = Behaviour(status=500, times=1)
    before = proxy.balances()
    price = quote_for(HERMES, "chat", SIMPLE).amount
    if sdk == "python":
        settlement, answers = asyncio.run(_python_sdk_call(proxy, SIMPLE, DEFAULT_RETRIES))
        assert settlement["success"] is True and answers == 1
    else:
        line = npm_chat(proxy, SIMPLE)
        assert line["status"] == 200 and line["choices"] == 1, line
    assert moved_since(proxy, before) == price
    assert len(standin.received) == 2  # the proxy tried the host once more itself


@pytest.mark.parametrize("sdk", ["python", "npm"])
def test_a_host_that_keeps_failing_costs_one_payment_not_one_per_sdk_retry(
    proxy: Proxy, standin: StandinModel, sdk: str
) -> None:
    standin.behaviour = Behaviour(status=500)
    before = proxy.balances()
    price = quote_for(HERMES, "chat", SIMPLE).amount
    if sdk == "python":
        with pytest.raises(APIStatusError) as raised:
            asyncio.run(_python_sdk_call(proxy, SIMPLE, DEFAULT_RETRIES))
        assert raised.value.status_code == 502
    else:
        line = npm_chat(proxy, SIMPLE)
        assert line["status"] == 502, line
    assert moved_since(proxy, before) == price  # one payment, kept redeemable
    assert len(standin.received) == 2  # one SDK request, tried twice by the proxy
