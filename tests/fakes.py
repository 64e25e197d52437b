"""Fakes at the backend boundary, for tests of the gate, ``serve`` and the views without anvil or
Redis: a chain whose preflight passes and whose receipts exist once a transaction has landed, a
settler whose next outcome the test chooses, and a model host that answers or fails."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import requests

from app.backends.chain import Preflight
from app.backends.token import AUTHORIZATION_USED_TOPIC, TRANSFER_TOPIC
from app.backends.upstream import UpstreamAnswer, UpstreamFailed
from app.payments.settlement import FAILED, SETTLED, Settlement, SettlementJob
from app.x402.verdict import ACCEPTED
from app.x402.wire import Authorization


def receipt_for(asset: str, auth: Authorization) -> dict[str, Any]:
    def word(address: str) -> str:
        return "0x" + bytes(12).hex() + address[2:]

    transfer = {
        "address": asset,
        "topics": ["0x" + TRANSFER_TOPIC.hex(), word(auth.from_), word(auth.to)],
        "data": "0x" + auth.value.to_bytes(32, "big").hex(),
    }
    used = {
        "address": asset,
        "topics": ["0x" + AUTHORIZATION_USED_TOPIC.hex(), word(auth.from_), "0x" + auth.nonce.hex()],
        "data": "0x",
    }
    return {"status": "0x1", "logs": [used, transfer]}


def host_answer(ok: bool) -> UpstreamAnswer:
    """The model host's answer: a JSON body, or a failure on both tries."""
    if not ok:
        raise UpstreamFailed("status 500")
    response = requests.Response()
    response.status_code, response._content, response._content_consumed = 200, b'{"choices": []}', True
    return UpstreamAnswer(200, {"Content-Type": "application/json"}, response)


class ModelChain:
    """The chain as the gate sees it: preflight passes; receipts exist once a tx has landed."""

    def __init__(self, asset: str) -> None:
        self.asset = asset
        self.landed: dict[str, Authorization] = {}

    def preflight(self, auth: Authorization, signature: bytes, ecdsa_signer: bool, relayer: str) -> Preflight:
        return Preflight(ACCEPTED, calldata=b"", gas_estimate=60_000, relayer_nonce=0, gas_price=1)

    def find_settlement(self, auth: Authorization) -> str | None:
        return None

    def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        auth = self.landed.get(tx_hash)
        return None if auth is None else receipt_for(self.asset, auth)


class ModelSettler:
    """Records every broadcast; the next outcome is chosen by the test."""

    address = "0x" + "11" * 20
    addresses = (address,)

    def pick(self) -> str:
        return self.address

    def __init__(self, chain: ModelChain) -> None:
        self.chain = chain
        self.next_outcome = SETTLED
        self.broadcasts: Counter[bytes] = Counter()
        self.reverted: Counter[bytes] = Counter()
        self.sent: dict[str, Authorization] = {}

    def settle(self, job: SettlementJob) -> Settlement:
        auth = job.payment.authorization
        job.start((8453, self.address, 0))
        tx_hash = "0x" + os.urandom(32).hex()
        self.broadcasts[auth.nonce] += 1
        self.sent[tx_hash] = auth
        if self.next_outcome == SETTLED:
            self.chain.landed[tx_hash] = auth
        if self.next_outcome == FAILED:
            self.reverted[auth.nonce] += 1
        return Settlement(
            self.next_outcome, tx_hash, "" if self.next_outcome == SETTLED else "transaction_failed"
        )
