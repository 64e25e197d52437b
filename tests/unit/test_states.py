"""The one table of payment states (``app.payments.states``): the Lua scripts use only its states,
the ledger refuses a transition the table does not hold, and the events are the table's."""

from __future__ import annotations

import re

import fakeredis
import pytest

from app.payments import ledger
from app.payments.keys import payment_key
from app.payments.ledger import Ledger
from app.payments.states import EVENTS, OPEN, TRANSITIONS, State, allowed

# Words a Lua script quotes that are not states: Redis commands, hash fields, script outcomes.
NOT_STATES = {
    "HGET", "HSET", "HMGET", "EXPIRE", "XADD", "SET", "GET", "MAXLEN", "~", "*",
    "state", "tx", "updated", "model", "amount", "payer", "network", "created", "valid_before",
    "relayer_nonce", "event", "key", "at", "chain", "since", "scheme", "authorized",
    "redeem", "taken", "mismatch", "expired", "ok", "refused",
    "new",
}  # fmt: skip
SCRIPTS = {
    name: getattr(ledger, name).source
    for name in ("_CLAIM", "_TRANSITION", "_START", "_RESERVE_NONCE", "_HOLD")
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_state_a_lua_script_names_is_in_the_table(name: str) -> None:
    quoted = set(re.findall(r"'([a-z_]+)'", SCRIPTS[name])) - NOT_STATES
    assert quoted <= {s.value for s in State}, quoted - {s.value for s in State}


def test_the_lua_moves_are_transitions_of_the_table() -> None:
    """The scripts claim (released, failed → claimed), redeem (redeemable → settled) and start
    settling (claimed → settling); each of these is in the table."""
    for from_state, to_state in [
        (State.RELEASED, State.CLAIMED),
        (State.CLAIMED, State.CLAIMED),  # an abandoned claim taken over
        (State.FAILED, State.CLAIMED),
        (State.REDEEMABLE, State.SETTLED),
        (State.SETTLED, State.SETTLED),
        (State.CLAIMED, State.SETTLING),
    ]:
        assert allowed(from_state, to_state)
    assert "'settling'" in SCRIPTS["_START"] and "'claimed'" in SCRIPTS["_START"]


def test_the_ledger_refuses_a_transition_the_table_does_not_hold() -> None:
    book = Ledger(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    key = payment_key(8453, "0x" + "aa" * 20, "0x" + "bb" * 20, bytes(32))
    book.claim(key, 10**10, "0x" + "bb" * 20, 1, "m", "eip155:8453")
    with pytest.raises(ValueError, match="no transition"):
        book.transition(key, (State.CLAIMED,), State.SERVED)  # never served before it settled
    with pytest.raises(ValueError):
        book.transition(key, (State.SERVED,), State.REDEEMABLE)  # served is final


def test_served_is_final_and_every_state_is_reachable() -> None:
    assert TRANSITIONS[State.SERVED] == frozenset()
    reachable = {State.CLAIMED} | {to for targets in TRANSITIONS.values() for to in targets}
    assert reachable == set(State)
    assert set(State) >= EVENTS and set(State) >= OPEN
