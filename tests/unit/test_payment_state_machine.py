"""A stateful property test of the payment gate over Redis (fakeredis), with the chain and the
settler replaced by models whose outcomes hypothesis chooses: settled, reverted, pending (and the
receipt landing later), upstream failures, and retries of the same headers in any order.

Invariants: an answer is delivered only for a settled payment and at most once per payment; an
authorization is broadcast again only after its last broadcast reverted (a reverted EIP-3009
transfer leaves the authorization unused, so the same header may be settled anew), and lands at
most once; after every request no payment is left between states
(settled ⇒ served ∨ redeemable ∨ pending).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import fakeredis
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from app.backends.chain import AUTHORIZATION_USED_TOPIC, TRANSFER_TOPIC, Preflight
from app.catalog import Catalog, load_catalog
from app.payments.errors import ApiError
from app.payments.gate import Gate, PaymentRequired
from app.payments.ledger import Ledger, payment_key
from app.payments.settlement import FAILED, PENDING, SETTLED, Settlement
from app.settings import DEFAULT_CATALOG, Settings
from app.x402.codec import encode_header
from app.x402.payer import sign_payment
from app.x402.verdict import ACCEPTED
from app.x402.wire import Authorization

BODY: dict[str, Any] = {"model": "hermes-3-8b-tee", "messages": [{"role": "user", "content": "hi"}]}
PAYMENTS = 4


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

    def __init__(self, chain: ModelChain) -> None:
        self.chain = chain
        self.next_outcome = SETTLED
        self.broadcasts: Counter[bytes] = Counter()
        self.reverted: Counter[bytes] = Counter()
        self.sent: dict[str, Authorization] = {}

    def settle(
        self, payment: Any, requirement: Any, preflight: Preflight, start: Any, replaced: Any
    ) -> Settlement:
        auth = payment.authorization
        start((8453, self.address, 0))
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


class GateMachine(RuleBasedStateMachine):
    @initialize()
    def build(self) -> None:
        payer_key = os.urandom(32)
        self.settings = Settings(
            pay_to="0x" + "22" * 20, relayer_key="0x" + "33" * 32, redis_url="redis://model"
        )
        self.redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.ledger = Ledger(self.redis)
        self.chain = ModelChain(self.settings.asset)
        self.settler = ModelSettler(self.chain)
        catalog = Catalog(load_catalog(DEFAULT_CATALOG))
        self.gate = Gate(self.settings, catalog, self.ledger, self.chain, self.settler)  # type: ignore[arg-type]
        self.quote = catalog.quote("chat", BODY)
        requirement = self.gate.requirement(self.quote).to_v2()
        now = int(time.time())
        self.payments = [
            sign_payment(requirement, 2, payer_key, now, os.urandom(32)) for _ in range(PAYMENTS)
        ]
        self.deliveries: Counter[bytes] = Counter()

    def key(self, index: int) -> str:
        auth = self.payments[index].authorization
        return payment_key(8453, self.settings.asset, auth.from_, auth.nonce)

    @rule(
        index=st.integers(0, PAYMENTS - 1),
        outcome=st.sampled_from([SETTLED, SETTLED, FAILED, PENDING]),
        upstream_ok=st.booleans(),
    )
    def request(self, index: int, outcome: str, upstream_ok: bool) -> None:
        """One paid request, handled as the route handles it (the model call beside the settlement)."""
        payment = self.payments[index]
        self.settler.next_outcome = outcome
        headers = {"PAYMENT-SIGNATURE": encode_header(payment.to_wire())}
        try:
            ticket = self.gate.begin(self.quote, headers)
            paid = ticket.result()
        except PaymentRequired:
            return
        except ApiError as refusal:
            assert refusal.code in {"settlement_pending", "payment_in_progress"}, refusal.code
            return
        if upstream_ok:
            self.deliveries[payment.authorization.nonce] += 1
            self.gate.served(paid)
        else:
            self.gate.redeemable(paid)

    @rule(index=st.integers(0, PAYMENTS - 1))
    def receipt_lands(self, index: int) -> None:
        """A pending settlement's transaction is mined after all."""
        state = self.ledger.get(self.key(index))
        if state.get("state") == "pending" and state["tx"] in self.settler.sent:
            self.chain.landed[state["tx"]] = self.settler.sent[state["tx"]]

    @invariant()
    def nothing_is_left_between_states(self) -> None:
        for index in range(PAYMENTS):
            state = self.ledger.get(self.key(index)).get("state", "none")
            assert state in {"none", "served", "redeemable", "pending", "failed", "released"}, state

    @invariant()
    def never_broadcast_twice(self) -> None:
        broadcasts, reverted = self.settler.broadcasts, self.settler.reverted
        assert all(count <= 1 + reverted[nonce] for nonce, count in broadcasts.items())
        landed = Counter(auth.nonce for auth in self.chain.landed.values())
        assert all(count <= 1 for count in landed.values())

    @invariant()
    def delivered_only_when_settled_and_once(self) -> None:
        settled = {auth.nonce for auth in self.chain.landed.values()}
        assert all(count <= 1 for count in self.deliveries.values())
        assert set(self.deliveries) <= settled
        assert sum(self.deliveries.values()) <= len(settled)


GateMachine.TestCase.settings = hypothesis_settings(max_examples=60, stateful_step_count=30, deadline=None)
TestGateStateMachine = GateMachine.TestCase
