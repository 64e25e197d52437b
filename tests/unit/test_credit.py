"""A wallet's credit (``app.payments.credit``): its lots, holds, settlements, expiry and pointers to
failed calls' payments, run as the real Lua scripts on fakeredis, with the clock under test control
(the scripts take "now" from their arguments). Also the payment state ``credited`` a pointer's
payment moves to."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.payments import credit as credit_module
from app.payments.credit import HELD, LOG_LENGTH, NONCE_USED, SHORT, Credit, Entry, Statement
from app.payments.keys import credit_keys, payment_key
from app.payments.ledger import RETENTION_SECONDS, Ledger
from app.payments.states import State
from app.settings import Settings

SETTINGS = Settings(pay_to="0x" + "22" * 20, relayer_key="0x" + "33" * 32, redis_url="redis://127.0.0.1:9")
LIFETIME = 1_000  # X402_CREDIT_SECONDS of most tests: lots that expire within a test
PAYER = "0x" + "Ab" * 20  # mixed case: the wallet is its lower-case address
OTHER = "0x" + "cd" * 20
NOW = 1_800_000_000
POINTED = "x402:{p7}:auth:8453:0xasset:0xfrom:0xnonce"  # a failed call's payment key
TX = "0x" + "99" * 32


class Clock:
    """``time.time`` for the module under test: whole seconds, moved by the test."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


def make_credit(lifetime: int = LIFETIME) -> Credit:
    return Credit(
        SETTINGS.with_overrides(credit_seconds=lifetime),
        Ledger(fakeredis.FakeRedis(server=fakeredis.FakeServer())),
    )


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(NOW)
    monkeypatch.setattr(credit_module.time, "time", fake)
    return fake


@pytest.fixture
def credit(clock: Clock) -> Credit:
    return make_credit()


def events(credit: Credit, name: str | None = None) -> list[dict[str, str]]:
    """The ledger stream's events (named ``name``), newest first."""
    return [e for e in credit.ledger.events(100_000) if name is None or e["event"] == name]


def total(credit: Credit, name: str) -> int:
    return sum(int(e["amount"]) for e in events(credit, name))


def lefts(statement: Statement) -> dict[str, int]:
    """What is left of each live lot, by source."""
    return {lot.source: lot.left for lot in statement.lots}


def add(credit: Credit, source: str, amount: int, at: int = NOW, payer: str = PAYER) -> bool:
    return credit.add(payer, source, amount, "change", "model-a", TX, at)


def hold(credit: Credit, hold_id: str, amount: int, until: int, nonce: str = "") -> str:
    return credit.hold(PAYER, hold_id, amount, until, nonce, until + 300).outcome


def three_lots(credit: Credit) -> None:
    """100 each in ``soon`` (expires first), ``mid`` and ``late``."""
    assert add(credit, "change:late", 100, at=NOW)
    assert add(credit, "change:soon", 100, at=NOW - 100)
    assert add(credit, "change:mid", 100, at=NOW - 50)


# --- adding ------------------------------------------------------------------------------------------


def test_a_source_is_credited_once(credit: Credit) -> None:
    assert add(credit, "change:a", 100)
    assert not add(credit, "change:a", 100)
    assert not add(credit, "change:a", 70)
    assert add(credit, "change:b", 5)
    assert not add(credit, "change:c", 0) and not add(credit, "change:c", -1)
    statement = credit.statement(PAYER)
    assert statement.balance == 105
    assert [e["amount"] for e in events(credit, "credit")] == ["5", "100"]
    wallet = credit_keys(8453, SETTINGS.asset, PAYER)[0]
    assert events(credit)[-1] == {
        "event": "credit",
        "key": wallet,
        "payer": PAYER.lower(),
        "amount": "100",
        "model": "model-a",
        "network": "eip155:8453",
        "tx": TX,
        "at": str(NOW),
        "kind": "change",
        "scheme": "exact",
    }
    assert statement.recent[-1] == Entry(NOW, "change", 100, TX)
    assert credit.statement(OTHER).balance == 0  # one wallet's credit is its own


def test_a_lot_that_would_already_have_expired_is_not_added(credit: Credit) -> None:
    assert not add(credit, "change:old", 100, at=NOW - LIFETIME)  # expires now
    assert not add(credit, "change:older", 100, at=NOW - 10 * LIFETIME)
    assert events(credit) == [] and credit.statement(PAYER).recent == ()
    assert add(credit, "change:old", 100, at=NOW - LIFETIME + 1)
    assert credit.statement(PAYER).lots[0].expires == NOW + 1


def test_large_amounts_stay_exact_integers(credit: Credit) -> None:
    """Amounts pass through Lua doubles: exact, and written without an exponent, up to 2**53."""
    big = 2**53 - 1
    assert add(credit, "change:big", big)
    assert hold(credit, "h", big - 1, NOW + 60) == HELD
    assert credit.settle(PAYER, "h", 10**15 + 1, "m") == (10**15 + 1, big - 10**15 - 1)
    assert [e["amount"] for e in events(credit)] == [str(10**15 + 1), str(big)]


# --- holding -----------------------------------------------------------------------------------------


def test_a_hold_takes_from_the_lots_that_expire_first(credit: Credit) -> None:
    three_lots(credit)
    result = credit.hold(PAYER, "h", 150, NOW + 60, "", 0)
    assert (result.outcome, result.available, result.pointers) == (HELD, 300, 0)
    statement = credit.statement(PAYER)
    assert lefts(statement) == {"change:soon": 0, "change:mid": 50, "change:late": 100}
    assert (statement.balance, statement.held) == (150, 150)
    assert [lot.source for lot in statement.lots] == ["change:soon", "change:mid", "change:late"]


def test_a_short_balance_holds_nothing(credit: Credit) -> None:
    three_lots(credit)
    before, stream = credit.statement(PAYER), events(credit)
    result = credit.hold(PAYER, "h", 301, NOW + 60, "", 0)
    assert (result.outcome, result.available) == (SHORT, 300)
    assert credit.statement(PAYER) == before and events(credit) == stream
    assert credit.settle(PAYER, "h", 1, "m") is None  # no hold was made
    assert hold(credit, "h", 300, NOW + 60) == HELD  # exactly the balance is enough
    assert credit.statement(PAYER).balance == 0


def test_a_hold_uses_its_nonce_once_even_when_short(credit: Credit) -> None:
    """The nonce is spent by the attempt: a replayed sign-in is refused even after a top-up."""
    assert add(credit, "change:a", 100)
    assert hold(credit, "h1", 500, NOW + 60, nonce="n1") == SHORT
    assert add(credit, "change:b", 1_000)
    assert hold(credit, "h2", 500, NOW + 60, nonce="n1") == NONCE_USED
    assert credit.statement(PAYER).held == 0
    assert hold(credit, "h3", 500, NOW + 60, nonce="n2") == HELD
    before = credit.statement(PAYER)
    result = credit.hold(PAYER, "h4", 1, NOW + 60, "n2", NOW + 300)
    assert (result.outcome, result.available) == (NONCE_USED, 0)
    assert credit.statement(PAYER) == before
    assert hold(credit, "h5", 1, NOW + 60) == hold(credit, "h6", 1, NOW + 60) == HELD  # no nonce: none used


def test_use_nonce_marks_a_nonce_once_per_wallet(credit: Credit) -> None:
    assert credit.use_nonce(PAYER, "n", NOW + 300)
    assert not credit.use_nonce(PAYER, "n", NOW + 300)
    assert credit.use_nonce(OTHER, "n", NOW + 300)
    assert add(credit, "change:a", 100)
    assert hold(credit, "h", 10, NOW + 60, nonce="n") == NONCE_USED  # hold and use_nonce share the marks
    assert hold(credit, "h", 10, NOW + 60, nonce="m") == HELD
    assert not credit.use_nonce(PAYER, "m", NOW + 300)


def test_a_used_nonce_is_forgotten_only_after_its_expiry(credit: Credit, clock: Clock) -> None:
    assert add(credit, "change:a", 100)
    assert credit.use_nonce(PAYER, "n", NOW + 10)
    clock.now = NOW + 10
    assert hold(credit, "h1", 1, NOW + 60, nonce="n") == NONCE_USED
    clock.now = NOW + 11
    assert hold(credit, "h2", 1, NOW + 60) == HELD  # sweeps the mark
    assert credit.use_nonce(PAYER, "n", NOW + 311)


# --- settling ----------------------------------------------------------------------------------------


def test_settle_charges_and_gives_the_rest_back_to_the_later_lots_first(credit: Credit) -> None:
    three_lots(credit)
    assert hold(credit, "h", 150, NOW + 60) == HELD  # soon 100, mid 50
    stream = events(credit)
    assert credit.settle(PAYER, "h", 20, "model-b") == (20, 280)
    statement = credit.statement(PAYER)
    assert lefts(statement) == {"change:soon": 80, "change:mid": 100, "change:late": 100}
    assert (statement.balance, statement.held) == (280, 0)
    new = events(credit)[: len(events(credit)) - len(stream)]
    assert new == [
        {
            "event": "credit_spent",
            "key": credit_keys(8453, SETTINGS.asset, PAYER)[0],
            "payer": PAYER.lower(),
            "amount": "20",
            "model": "model-b",
            "network": "eip155:8453",
            "tx": "",
            "at": str(NOW),
            "kind": "spent",
            "scheme": "credit",
        }
    ]
    assert statement.recent[0] == Entry(NOW, "spent", 20, "")
    assert credit.settle(PAYER, "h", 20, "model-b") is None  # once


def test_settle_charges_at_most_the_hold(credit: Credit) -> None:
    three_lots(credit)
    assert hold(credit, "h", 150, NOW + 60) == HELD
    assert credit.settle(PAYER, "h", 10**6, "m") == (150, 150)
    assert lefts(credit.statement(PAYER)) == {"change:soon": 0, "change:mid": 50, "change:late": 100}
    assert total(credit, "credit_spent") == 150


def test_a_zero_charge_gives_everything_back_and_writes_no_event(credit: Credit) -> None:
    three_lots(credit)
    before = lefts(credit.statement(PAYER))
    assert hold(credit, "h", 250, NOW + 60) == HELD
    assert credit.settle(PAYER, "h", 0, "m") == (0, 300)
    assert lefts(credit.statement(PAYER)) == before
    assert events(credit, "credit_spent") == []


def test_settling_an_unknown_hold_is_none(credit: Credit) -> None:
    assert credit.settle(PAYER, "never", 10, "m") is None
    assert add(credit, "change:a", 100)
    assert credit.settle(PAYER, "never", 10, "m") is None
    assert credit.statement(PAYER).balance == 100 and events(credit, "credit_spent") == []


def test_an_abandoned_hold_goes_back_whole_with_the_next_script(credit: Credit, clock: Clock) -> None:
    three_lots(credit)
    assert hold(credit, "h", 150, NOW + 60) == HELD
    clock.now = NOW + 60
    assert hold(credit, "other", 1, NOW + 120) == HELD  # at its time the hold still stands; mid gives 1
    assert credit.statement(PAYER).held == 151
    clock.now = NOW + 61
    assert add(credit, "change:new", 7, at=NOW + 61)  # any script that touches the wallet
    statement = credit.statement(PAYER)
    assert (statement.balance, statement.held) == (306, 1)
    assert lefts(statement) == {"change:soon": 100, "change:mid": 99, "change:late": 100, "change:new": 7}
    assert Entry(NOW + 61, "returned", 150, "") in statement.recent
    assert credit.settle(PAYER, "h", 20, "m") is None
    assert events(credit, "credit_spent") == [] and events(credit, "credit_expired") == []


def test_a_late_settle_that_finds_its_hold_still_there_charges_it(credit: Credit, clock: Clock) -> None:
    """Nothing swept the hold since its time passed: settle takes it as it is (it does not sweep
    before looking), so a call that outran its hold is still charged."""
    three_lots(credit)
    assert hold(credit, "h", 150, NOW + 60) == HELD
    clock.now = NOW + 61
    assert credit.settle(PAYER, "h", 20, "m") == (20, 280)


# --- expiry ------------------------------------------------------------------------------------------


def test_an_expired_lot_is_swept_with_one_event_for_what_was_left(credit: Credit, clock: Clock) -> None:
    assert add(credit, "change:a", 100)
    assert add(credit, "change:b", 50)
    assert hold(credit, "h", 120, NOW + 60) == HELD  # a 100 (same expiry: by name), b 20
    assert credit.settle(PAYER, "h", 120, "m") == (120, 30)
    clock.now = NOW + LIFETIME  # at its expiry second a lot still counts
    assert credit.statement(PAYER).balance == 30
    assert hold(credit, "h2", 0, NOW + LIFETIME) == HELD
    assert events(credit, "credit_expired") == []
    clock.now = NOW + LIFETIME + 1
    assert credit.statement(PAYER).balance == 0  # the statement does not count it (nor sweep)
    assert events(credit, "credit_expired") == []
    assert add(credit, "change:c", 10, at=NOW + LIFETIME + 1)
    expired = events(credit, "credit_expired")
    assert len(expired) == 1  # the spent lot a left nothing to expire
    assert {k: expired[0][k] for k in ("amount", "model", "tx", "kind", "scheme", "at")} == {
        "amount": "30",
        "model": "",
        "tx": "",
        "kind": "expired",
        "scheme": "credit",
        "at": str(NOW + LIFETIME + 1),
    }
    statement = credit.statement(PAYER)
    assert lefts(statement) == {"change:c": 10}
    assert statement.recent[:2] == (
        Entry(NOW + LIFETIME + 1, "change", 10, TX),
        Entry(NOW + LIFETIME + 1, "expired", 30, ""),
    )
    assert add(credit, "change:d", 1, at=NOW + LIFETIME + 1)
    assert len(events(credit, "credit_expired")) == 1  # swept once


@pytest.mark.parametrize("swept_first", [False, True])
def test_what_a_hold_gives_back_to_an_expired_lot_expires(
    credit: Credit, clock: Clock, swept_first: bool
) -> None:
    """The lot it came from expired while the hold stood (still in the hash, or swept already by
    another script): the part given back expires on its own, beside what was left in the lot."""
    assert add(credit, "change:soon", 100, at=NOW - LIFETIME + 10)  # expires at NOW + 10
    assert add(credit, "change:late", 100)
    assert hold(credit, "h", 140, NOW + 100) == HELD  # soon 100, late 40
    assert add(credit, "change:soon2", 30, at=NOW - LIFETIME + 10)  # also expires at NOW + 10
    assert hold(credit, "h2", 20, NOW + 100) == HELD  # soon2 20: 10 left in it
    clock.now = NOW + 20
    if swept_first:
        assert add(credit, "change:new", 5, at=NOW + 20)
        assert [e["amount"] for e in events(credit, "credit_expired")] == ["10"]
    assert credit.settle(PAYER, "h2", 5, "m") == (5, 60 + 5 * swept_first)
    assert credit.settle(PAYER, "h", 10, "m") == (10, 100 + 5 * swept_first)  # late refilled to 100
    expired = sorted(int(e["amount"]) for e in events(credit, "credit_expired"))
    assert expired == [10, 15, 90]  # what soon2 had left, then what each hold gave back
    assert lefts(credit.statement(PAYER)) == {"change:late": 100} | ({"change:new": 5} if swept_first else {})
    assert total(credit, "credit") == 100 + 5 * swept_first + 15 + 115  # balance + spent + expired


def test_an_abandoned_hold_of_an_expired_lot_expires_what_it_gives_back(credit: Credit, clock: Clock) -> None:
    assert add(credit, "change:soon", 100, at=NOW - LIFETIME + 10)  # expires at NOW + 10
    assert add(credit, "change:late", 100)
    assert hold(credit, "h", 150, NOW + 30) == HELD  # soon 100, late 50
    clock.now = NOW + 31
    assert add(credit, "change:new", 5, at=NOW + 31)
    assert [e["amount"] for e in events(credit, "credit_expired")] == ["100"]
    statement = credit.statement(PAYER)
    assert lefts(statement) == {"change:late": 100, "change:new": 5}
    assert statement.held == 0
    assert credit.settle(PAYER, "h", 10, "m") is None


# --- failed calls' payments --------------------------------------------------------------------------


def test_a_pointer_becomes_a_failed_call_lot_once(clock: Clock) -> None:
    credit = make_credit(lifetime=30 * 86400)  # longer than the payment is kept: the lot lives as long
    assert credit.point(PAYER, POINTED, 500, at=NOW)
    assert not credit.point(PAYER, POINTED, 900, at=NOW)
    assert credit.statement(PAYER).redeemable == {POINTED: 500}
    assert credit.statement(PAYER).balance == 0 and events(credit) == []  # not credit yet
    assert credit.hold(PAYER, "h", 1, NOW + 60, "", 0) == credit_module.HoldResult(SHORT, 0, 1)
    assert credit.convert(PAYER, POINTED, "model-c", TX, keep=True) == 500
    statement = credit.statement(PAYER)
    assert statement.redeemable == {}
    assert statement.lots == (credit_module.Lot(f"failed_call:{POINTED}", 500, NOW + RETENTION_SECONDS),)
    assert statement.recent[0] == Entry(NOW, "failed_call", 500, TX)
    (event,) = events(credit)
    assert (event["event"], event["amount"], event["kind"], event["scheme"], event["model"], event["tx"]) == (
        "credit",
        "500",
        "failed_call",
        "exact",
        "model-c",
        TX,
    )
    assert credit.convert(PAYER, POINTED, "model-c", TX, keep=True) == 0
    assert credit.point(PAYER, POINTED, 500, at=NOW)  # pointed again: still credited once
    assert credit.convert(PAYER, POINTED, "model-c", TX, keep=True) == 0
    assert credit.statement(PAYER).redeemable == {} and credit.statement(PAYER).balance == 500
    assert len(events(credit)) == 1


def test_a_pointer_whose_payment_was_redeemed_is_dropped(credit: Credit) -> None:
    assert credit.point(PAYER, POINTED, 500, at=NOW)
    assert credit.convert(PAYER, POINTED, "m", TX, keep=False) == 0
    assert credit.statement(PAYER) == Statement(0, 0, (), {}, ())
    assert credit.convert(PAYER, POINTED, "m", TX, keep=True) == 0  # nothing left to convert
    assert events(credit) == []


def test_a_pointer_lives_as_long_as_credit_and_no_longer(credit: Credit, clock: Clock) -> None:
    assert not credit.point(PAYER, POINTED, 500, at=NOW - LIFETIME)  # would expire now
    assert credit.point(PAYER, POINTED, 500, at=NOW - LIFETIME + 1)
    clock.now = NOW + 2
    assert credit.statement(PAYER).redeemable == {}
    assert credit.convert(PAYER, POINTED, "m", TX, keep=True) == 0
    assert events(credit) == []


# --- the statement -----------------------------------------------------------------------------------


def test_the_statement_sums_balance_holds_and_pointers(credit: Credit) -> None:
    assert add(credit, "change:a", 100)
    assert add(credit, "change:b", 50, at=NOW - 10)
    assert hold(credit, "h1", 30, NOW + 60) == HELD
    assert hold(credit, "h2", 12, NOW + 60) == HELD
    assert credit.point(PAYER, POINTED, 500, at=NOW)
    assert credit.point(PAYER, POINTED + "2", 7, at=NOW)
    statement = credit.statement(PAYER)
    assert (statement.balance, statement.held) == (108, 42)
    assert statement.redeemable == {POINTED: 500, POINTED + "2": 7}
    assert [entry.kind for entry in statement.recent] == ["change", "change"]  # holds write no entry
    assert credit.statement(PAYER.lower()) == statement


def test_the_recent_entries_are_the_newest_50_newest_first(credit: Credit, clock: Clock) -> None:
    for i in range(60):
        clock.now = NOW + i
        assert credit.add(PAYER, f"change:{i}", i + 1, "change", "m", f"0x{i:064x}", NOW + i)
    recent = credit.statement(PAYER).recent
    assert len(recent) == LOG_LENGTH == 50
    assert recent[0] == Entry(NOW + 59, "change", 60, f"0x{59:064x}")
    assert [entry.amount for entry in recent] == list(range(60, 10, -1))
    assert credit.ledger.redis.llen(credit_keys(8453, SETTINGS.asset, PAYER)[1]) == LOG_LENGTH  # kept


# --- conservation ------------------------------------------------------------------------------------

adds = st.tuples(
    st.just("add"), st.integers(0, 5), st.integers(1, 1_000), st.integers(0, 1_500), st.integers(0, 400)
)  # source, amount, age of the credit, seconds waited before
holds = st.tuples(
    st.just("hold"), st.integers(0, 1_500), st.integers(0, 200), st.integers(0, 400)
)  # amount, seconds held, seconds waited before
settles = st.tuples(st.just("settle"), st.integers(0, 9), st.integers(0, 2_000))  # which hold, charge
points = st.tuples(st.just("point"), st.integers(0, 2), st.integers(1, 1_000))  # payment, amount
converts = st.tuples(st.just("convert"), st.integers(0, 2), st.booleans())  # payment, keep


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.one_of(adds, holds, settles, points, converts), max_size=20))
def test_credit_is_conserved(steps: list[tuple[Any, ...]]) -> None:
    """After every step: credited = balance + held + spent + expired, in whole non-negative units,
    and each call answers as a model of holds and pointers says. Time moves only before a script
    that sweeps first (add, hold), so the statement, which does not sweep, sees what they see."""
    with pytest.MonkeyPatch.context() as patch:
        clock = Clock(NOW)
        patch.setattr(credit_module.time, "time", clock)
        credit = make_credit()
        live: dict[str, tuple[int, int]] = {}  # hold id → (amount, until)
        pointers: dict[str, tuple[int, int]] = {}  # payment key → (amount, expires)
        converted: set[str] = set()
        count = 0
        for step in steps:
            if step[0] == "add":
                _, source, amount, age, wait = step
                clock.now += wait
                add(credit, f"change:{source}", amount, at=clock.now - age)
            elif step[0] == "hold":
                _, amount, seconds, wait = step
                clock.now += wait
                count += 1
                result = credit.hold(PAYER, str(count), amount, clock.now + seconds, "", 0)
                after = credit.statement(PAYER).balance
                if result.outcome == HELD:
                    assert amount <= result.available and after == result.available - amount
                    live[str(count)] = (amount, clock.now + seconds)
                else:
                    assert (result.outcome, after) == (SHORT, result.available)
                    assert amount > result.available
            elif step[0] == "point":
                _, payment, amount = step
                expires = NOW + LIFETIME  # every payment was made at NOW
                made = credit.point(PAYER, f"pay{payment}", amount, at=NOW)
                assert made == (f"pay{payment}" not in pointers and expires > clock.now)
                if made:
                    pointers[f"pay{payment}"] = (amount, expires)
            elif step[0] == "convert":
                _, payment, keep = step
                amount, expires = pointers.pop(f"pay{payment}", (0, 0))
                expected = amount if keep and expires > clock.now and f"pay{payment}" not in converted else 0
                assert credit.convert(PAYER, f"pay{payment}", "m", TX, keep) == expected
                if expected:
                    converted.add(f"pay{payment}")
            else:
                _, which, charge = step
                hold_id = str(count - which)
                settled = credit.settle(PAYER, hold_id, charge, "m")
                if hold_id in live:
                    amount, _ = live.pop(hold_id)
                    assert settled == (min(charge, amount), credit.statement(PAYER).balance)
                else:
                    assert settled is None
            live = {h: (a, until) for h, (a, until) in live.items() if until >= clock.now}
            statement = credit.statement(PAYER)
            assert statement.held == sum(a for a, _ in live.values())
            assert statement.redeemable == {k: a for k, (a, e) in pointers.items() if e >= clock.now}
            assert all(lot.left >= 0 for lot in statement.lots) and statement.balance >= 0
            stream = events(credit)
            assert all(e["amount"].isdigit() for e in stream)
            credited, spent, expired = (
                total(credit, n) for n in ("credit", "credit_spent", "credit_expired")
            )
            assert credited == statement.balance + statement.held + spent + expired


# --- the payment state "credited" --------------------------------------------------------------------


def test_a_redeemable_payment_is_credited_once() -> None:
    """Sign-in and a header retry race for a redeemable payment: one transition wins. The move
    writes no ledger event (the ``credit`` event of its lot counts it)."""
    ledger = Ledger(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    key = payment_key(8453, "0x" + "aa" * 20, "0x" + "bb" * 20, bytes(32))
    ledger.claim(key, 10**10, "0x" + "bb" * 20, 1_000, "m", "eip155:8453")
    assert ledger.transition(key, (State.CLAIMED,), State.SETTLING)
    assert ledger.transition(key, (State.SETTLING,), State.REDEEMABLE, tx=TX)
    stream = ledger.events()
    assert ledger.transition(key, (State.REDEEMABLE,), State.CREDITED)
    assert ledger.get(key)["state"] == State.CREDITED
    assert ledger.events() == stream
    assert not ledger.transition(key, (State.REDEEMABLE,), State.CREDITED)
    assert not ledger.transition(key, (State.REDEEMABLE,), State.SETTLED)  # the header retry loses
    with pytest.raises(ValueError, match="no transition"):
        ledger.transition(key, (State.CREDITED,), State.SETTLED)  # credited is final
    assert ledger.get(key)["state"] == State.CREDITED
