"""The official PyPI x402 client with its sign-in-with-x (SIWx) extension spends a wallet's credit.

``siwx_client.py`` runs in the SIWx client's own virtualenv (``siwx_venv.siwx_python()``): x402 2.25's
``x402Client`` with the EVM ``exact`` scheme (unless ``--no-pay``) and ``create_siwx_client_extension``
for the payer's key, through ``x402_httpx_transport``. On a 402 the client first signs in with the
challenge the 402 declares; when that answer is a 402 too, it pays the first 402. Its ``sent`` log
says what went out on each request (``paid``: ``PAYMENT-SIGNATURE``, ``signed_in``:
``SIGN-IN-WITH-X``) and what came back, so each test checks the client's own traffic, the answers
and the chain.

Same setup as ``tests/integration/test_credit.py``: a catalog with a floor of 1 atomic unit, so an
exact call's usage price lies below its priced maximum and leaves change.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.devnet.standin import Behaviour, StandinModel
from tests.interop.paid import CLIENT_TIMEOUT
from tests.interop.siwx_venv import clean_env, siwx_python
from tests.support import CHAT_BODY, Proxy, moved_since, proxy_with

pytestmark = pytest.mark.integration

CLIENT = Path(__file__).resolve().parent / "siwx_client.py"
BIG_BODY: dict[str, Any] = {**CHAT_BODY, "max_tokens": 2000}
SMALL_BODY: dict[str, Any] = {**CHAT_BODY, "max_tokens": 64}


@pytest.fixture
def credit_proxy(proxy: Proxy, catalog_file: Path) -> Iterator[Proxy]:
    yield from proxy_with(proxy, catalog_path=catalog_file)


def official_client(proxy: Proxy, body: dict[str, Any], *flags: str) -> dict[str, Any]:
    """Run the official client once for ``body``; its answers and what it sent."""
    done = subprocess.run(
        [
            str(siwx_python()),
            str(CLIENT),
            "--url",
            proxy.url + "/v1/chat/completions",
            "--key",
            proxy.wallets.payer_key,
            "--body",
            json.dumps(body),
            *flags,
        ],
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def traffic(result: dict[str, Any]) -> list[tuple[int, bool, bool]]:
    """(status, paid, signed in) of every request the client sent."""
    return [(sent["status"], sent["paid"], sent["signed_in"]) for sent in result["sent"]]


def test_the_official_client_pays_once_then_is_served_from_its_change(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    maximum = int(proxy.requirement(BIG_BODY)["amount"])
    before = proxy.balances()

    first = official_client(proxy, BIG_BODY)

    (paid,) = first["responses"]
    assert paid["status"] == 200, paid
    # it tried its (empty) credit first, then paid the first 402
    assert traffic(first) == [(402, False, False), (402, False, True), (200, True, False)]
    change = int(paid["headers"]["x-credit-added"])
    assert change > 0
    assert moved_since(proxy, before) == maximum

    second = official_client(proxy, SMALL_BODY)

    (served,) = second["responses"]
    assert served["status"] == 200, served
    assert traffic(second) == [(402, False, False), (200, False, True)]  # signed in, no payment
    assert "payment-response" not in served["headers"]
    charged = int(served["headers"]["x-credit-charged"])
    assert charged > 0 and int(served["headers"]["x-credit-balance"]) == change - charged
    assert json.loads(served["body"])["choices"][0]["message"]["content"].startswith("stand-in answer")
    assert moved_since(proxy, before) == maximum  # only the first payment moved
    assert len(standin.received) == 2


def test_a_client_that_cannot_pay_and_has_no_credit_gets_no_answer(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    before = proxy.balances()

    result = official_client(proxy, SMALL_BODY, "--no-pay")

    (answer,) = result["responses"]
    assert "error" in answer, answer  # the transport gives up: a sign-in was all it could offer
    assert traffic(result) == [(402, False, False), (402, False, True)]
    assert proxy.balances() == before
    assert standin.received == []


def test_a_failed_calls_payment_is_spent_through_the_official_clients_sign_in(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    amount = int(proxy.requirement(SMALL_BODY)["amount"])
    standin.behaviour = Behaviour(status=500, times=2)  # both tries of the paid call fail
    before = proxy.balances()

    failed = official_client(proxy, SMALL_BODY)

    assert failed["responses"][0]["status"] == 502
    assert traffic(failed) == [(402, False, False), (402, False, True), (502, True, False)]
    assert moved_since(proxy, before) == amount

    spent = official_client(proxy, SMALL_BODY, "--no-pay")  # it could not pay even if it had to

    (served,) = spent["responses"]
    assert served["status"] == 200, served
    assert traffic(spent) == [(402, False, False), (200, False, True)]
    charged = int(served["headers"]["x-credit-charged"])
    assert int(served["headers"]["x-credit-balance"]) == amount - charged
    assert moved_since(proxy, before) == amount  # no new transaction


# The README's way to read GET /v1/credit with the official package (its client signs in only on a
# 402): the 401's challenge, completed with the chain, signed by ``create_siwx_payload``.
READ_CREDIT = """
import asyncio, json, sys
import httpx
from eth_account import Account
from x402.extensions.sign_in_with_x import create_siwx_payload, encode_siwx_header

url, key = sys.argv[1], sys.argv[2]
unsigned = httpx.get(url)
info = unsigned.json()["extensions"]["sign-in-with-x"]["info"]
chosen = {**info, "chainId": "eip155:8453", "type": "eip191"}
payload = asyncio.run(create_siwx_payload(chosen, Account.from_key(key), url))
signed = httpx.get(url, headers={"SIGN-IN-WITH-X": encode_siwx_header(payload)})
print(json.dumps({"unsigned": unsigned.status_code, "signed": signed.status_code, "credit": signed.json()}))
"""


def test_the_official_package_signs_in_to_read_the_credit(credit_proxy: Proxy, standin: StandinModel) -> None:
    official_client(credit_proxy, BIG_BODY)  # pays, and leaves change
    done = subprocess.run(
        [
            str(siwx_python()),
            "-c",
            READ_CREDIT,
            credit_proxy.url + "/v1/credit",
            credit_proxy.wallets.payer_key,
        ],
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=True,
    )
    read = json.loads(done.stdout)
    assert (read["unsigned"], read["signed"]) == (401, 200)
    assert read["credit"]["balance"] > 0 and [e["kind"] for e in read["credit"]["recent"]] == ["change"]
