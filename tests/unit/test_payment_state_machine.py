"""A stateful property test of the payment gate over Redis (fakeredis), with the chain and the
settler replaced by models whose outcomes hypothesis chooses: settled, reverted, pending (and the
receipt landing later), upstream failures, and retries of the same headers in any order.

Each request runs the real ``app.payments.serve.serve`` with a stand-in model call. Invariants: an
answer is delivered only for a settled payment and at most once per payment; an
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

from app.catalog import Catalog, load_catalog
from app.payments.errors import ApiError
from app.payments.gate import Gate
from app.payments.keys import payment_key
from app.payments.ledger import Ledger
from app.payments.outcomes import PaymentRequired
from app.payments.serve import PaidCall, serve
from app.payments.settlement import FAILED, PENDING, SETTLED
from app.settings import DEFAULT_CATALOG, Settings
from app.x402.codec import encode_header
from app.x402.payer import sign_payment
from tests.fakes import ModelChain, ModelSettler, host_answer

BODY: dict[str, Any] = {"model": "hermes-3-8b-tee", "messages": [{"role": "user", "content": "hi"}]}
PAYMENTS = 4


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
        self.presented: set[int] = set()

    def key(self, index: int) -> str:
        auth = self.payments[index].authorization
        return payment_key(8453, self.settings.asset, auth.from_, auth.nonce)

    @rule(
        index=st.integers(0, PAYMENTS - 1),
        outcome=st.sampled_from([SETTLED, SETTLED, FAILED, PENDING]),
        upstream_ok=st.booleans(),
    )
    def request(self, index: int, outcome: str, upstream_ok: bool) -> None:
        """One paid request through the real ``serve`` (the model call beside the settlement)."""
        payment = self.payments[index]
        fresh = index not in self.presented
        self.presented.add(index)
        self.settler.next_outcome = outcome
        headers = {"PAYMENT-SIGNATURE": encode_header(payment.to_wire())}
        call = PaidCall(
            self.quote, headers, lambda _body: host_answer(upstream_ok), False, "00" * 32, 0.0, lambda: True
        )
        try:
            answer = serve(self.gate, call)
        except PaymentRequired:
            assert not (fresh and outcome == SETTLED), "a fresh, funded payment was refused"
            return
        except ApiError as refusal:
            assert refusal.code in {"settlement_pending", "payment_in_progress"}, refusal.code
            return
        if answer.status == 200:
            self.deliveries[payment.authorization.nonce] += 1
        assert answer.status == (200 if upstream_ok else 502)
        if fresh and outcome == SETTLED and upstream_ok:
            assert self.deliveries[payment.authorization.nonce] == 1, "a fresh, funded payment was not served"

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
