"""The payment states in Redis and every transition between them: one table, which the ledger
enforces on each transition and which the Lua scripts are checked against (``tests/unit/test_states.py``).
See ``docs/states.md`` for who makes each transition and why.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """A payment's state (the ``state`` field of its Redis hash)."""

    CLAIMED = "claimed"  # taken for one request; nothing sent yet
    SETTLING = "settling"  # the settlement is being sent or confirmed
    SETTLED = "settled"  # the chain shows the money moved; the answer is on its way
    SERVED = "served"  # the answer was handed over
    REDEEMABLE = "redeemable"  # paid, not served: the same header buys a call later
    PENDING = "pending"  # sent, no receipt in time: resolved from the chain later
    FAILED = "failed"  # our settlement reverted: nothing moved, the authorization is still live
    RELEASED = "released"  # refused before anything was sent: the header may be sent again
    OWED = "owed"  # upto: answered, but the settlement of its charge reverted: the payer owes it
    CREDITED = "credited"  # paid, not served, and claimed into the payer's credit by a sign-in


S = State
# from-state → the states it may move to (a state may be re-entered to record a new tx hash).
TRANSITIONS: dict[State, frozenset[State]] = {
    S.CLAIMED: frozenset({S.CLAIMED, S.SETTLING, S.SETTLED, S.RELEASED}),  # claimed again: abandoned
    S.SETTLING: frozenset(
        {S.SETTLING, S.SETTLED, S.SERVED, S.REDEEMABLE, S.PENDING, S.FAILED, S.RELEASED, S.OWED}
    ),
    S.SETTLED: frozenset({S.SETTLED, S.SERVED, S.REDEEMABLE}),
    S.PENDING: frozenset({S.SETTLED, S.REDEEMABLE, S.FAILED, S.SERVED, S.OWED}),  # upto: answered already
    S.FAILED: frozenset({S.CLAIMED, S.REDEEMABLE}),
    S.REDEEMABLE: frozenset({S.SETTLED, S.CREDITED}),
    S.RELEASED: frozenset({S.CLAIMED}),
    S.SERVED: frozenset(),
    S.OWED: frozenset({S.SERVED}),  # the debt was collected with the same permit
    S.CREDITED: frozenset(),  # its value lives on in the wallet's credit (app.payments.credit)
}
# Ledger events: a transition into one of these is appended to the ledger stream.
EVENTS = frozenset({S.SETTLED, S.SERVED, S.REDEEMABLE, S.FAILED, S.OWED})
# States whose outcome is still open: resolved from chain state by a retried header or `reconcile`.
OPEN = frozenset({S.SETTLING, S.PENDING, S.FAILED})


def allowed(from_state: str, to_state: str) -> bool:
    """Whether ``from_state`` may move to ``to_state`` (both state names)."""
    return from_state in TRANSITIONS and to_state in TRANSITIONS[State(from_state)]
