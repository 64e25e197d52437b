"""What every interop test checks after a real client paid: the answer, the settlement header, the chain.

The header is decoded here independently of the proxy's codec (strict standard base64, then JSON), the
way a client would, and the chain is read directly: the payee gained exactly the price, the payer lost
exactly the price, and the settlement transaction carries one Transfer(payer → payee, price).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.devnet.standin import StandinModel
from tests.support import CHAT_BODY, Proxy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TX_HASH_RE = re.compile(r"0x[0-9a-f]{64}")
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
NETWORK = {2: "eip155:8453", 1: "base"}
RESPONSE_HEADER = {2: "PAYMENT-RESPONSE", 1: "X-PAYMENT-RESPONSE"}
CLIENT_TIMEOUT = 120  # seconds, for every client subprocess


@dataclass(frozen=True)
class Before:
    """Balances and the price, read before the client pays."""

    payer: int
    payee: int
    price: int


def before_paying(proxy: Proxy, body: dict[str, Any] = CHAT_BODY) -> Before:
    """The price comes from a real 402 for the same body; a body always gets the same quote."""
    price = int(proxy.requirement(body)["amount"])
    payer, payee = proxy.balances()
    return Before(payer, payee, price)


def decode_settlement(value: str | None) -> dict[str, Any]:
    assert value, "no settlement header in the paid answer"
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error as exc:  # pragma: no cover - reported as a failure
        raise AssertionError(f"settlement header is not standard base64: {value!r}") from exc
    decoded = json.loads(raw)
    assert isinstance(decoded, dict), decoded
    return decoded


def _topic_address(topic: str) -> str:
    return "0x" + topic[-40:].lower()


def token_transfers(proxy: Proxy, tx_hash: str) -> list[tuple[str, str, int]]:
    receipt = proxy.chain.rpc.call("eth_getTransactionReceipt", [tx_hash])
    assert receipt is not None, f"no receipt for {tx_hash}"
    assert int(receipt["status"], 16) == 1, receipt
    return [
        (_topic_address(log["topics"][1]), _topic_address(log["topics"][2]), int(log["data"], 16))
        for log in receipt["logs"]
        if log["address"].lower() == proxy.chain.token.lower() and log["topics"][0] == TRANSFER_TOPIC
    ]


def assert_paid_once(
    proxy: Proxy,
    standin: StandinModel,
    before: Before,
    status: int,
    answer: Any,
    settlement: dict[str, Any],
    version: int,
) -> None:
    """One paid call: 200 with the model's answer, a successful settlement, the price moved once."""
    assert status == 200, (status, answer)
    assert answer["choices"][0]["message"]["content"].startswith("stand-in answer"), answer
    payer, payee = proxy.wallets.payer.lower(), proxy.wallets.pay_to.lower()

    assert settlement["success"] is True, settlement
    assert TX_HASH_RE.fullmatch(settlement["transaction"]), settlement
    assert settlement["network"] == NETWORK[version], settlement
    assert settlement["payer"].lower() == payer, settlement

    assert token_transfers(proxy, settlement["transaction"]) == [(payer, payee, before.price)]
    payer_after, payee_after = proxy.balances()
    assert payee_after - before.payee == before.price
    assert before.payer - payer_after == before.price
    assert len(standin.received) == 1, "the model host should have been called exactly once"


def run_node(script: Path, env: dict[str, str], cwd: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Run a client script; it prints one JSON line on stdout."""
    result = subprocess.run(
        ["node", str(script)],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"{script.name} printed nothing (exit {result.returncode}): {result.stderr[-2000:]}"
    line: dict[str, Any] = json.loads(lines[-1])
    assert result.returncode == 0 and "error" not in line, f"{script.name}: {line} {result.stderr[-2000:]}"
    return line
