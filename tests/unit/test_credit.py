"""A wallet's credit (``app.payments.credit``): its lots (one per step of expiry), holds, settlements,
expiry, the sources credited once and pointers to failed calls' payments, run as the real Lua scripts
on fakeredis, with the clock under test control (the scripts take "now" from their arguments). Also
the payment state ``credited`` a pointer's payment moves to."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.payments import credit as credit_module
from app.payments.credit import (
    HELD,
    LOG_LENGTH,
    LOTS_PER_LIFETIME,
    NONCE_USED,
    SHORT,
    Credit,
    Entry,
    Lot,
    Statement,
    source_id,
)
from app.payments.keys import CreditKeys, credit_keys, payment_key
from app.payments.ledger import RETENTION_SECONDS, Ledger
from app.payments.states import State
from app.settings import Settings

SETTINGS = Settings(pay_to="0x" + "22" * 20, relayer_key="0x" + "33" * 32, redis_url="redis://127.0.0.1:9")
LIFETIME = 3_000  # X402_CREDIT_SECONDS of most tests: lots that expire within a test
STEP = LIFETIME // LOTS_PER_LIFETIME  # 100: credit added within one step shares a lot
PAYER = "0x" + "Ab" * 20  # mixed case: the wallet is its lower-case address
OTHER = "0x" + "cd" * 20
NOW = 1_800_000_000  # a multiple of STEP: credit added at NOW expires at LATE exactly
LATE, MID, SOON = NOW + LIFETIME, NOW + LIFETIME - STEP, NOW + LIFETIME - 2 * STEP  # lots one step apart
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
    made = make_credit()
    assert made.step == STEP
    return made


def keys(payer: str = PAYER) -> CreditKeys:
    return credit_keys(8453, SETTINGS.asset, payer)


def events(credit: Credit, name: str | None = None) -> list[dict[str, str]]:
    """The ledger stream's events (named ``name``), newest first."""
    return [e for e in credit.ledger.events(100_000) if name is None or e["event"] == name]


def total(credit: Credit, name: str) -> int:
    return sum(int(e["amount"]) for e in events(credit, name))


def lefts(statement: Statement) -> dict[int, int]:
    """What is left of each live lot, by expiry."""
    return {lot.expires: lot.left for lot in statement.lots}


def lot_fields(credit: Credit, payer: str = PAYER) -> dict[str, str]:
    """The lot fields of the wallet's hash as stored (expired ones not swept yet included)."""
    stored = credit.ledger.redis.hgetall(keys(payer).wallet)
    return {k.decode(): v.decode() for k, v in stored.items() if k.startswith(b"lot:")}


class Sources(dict[str, int]):
    """The sources set as stored (each source's ``source_id`` → its lot's expiry), equal to a dict
    of the sources themselves (``{"change:a": expiry}``) that names the same members."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, dict):
            return NotImplemented
        return dict(self) == {source_id(source): expires for source, expires in other.items()}

    __hash__ = None  # type: ignore[assignment]


def sources(credit: Credit, payer: str = PAYER) -> Sources:
    """The sources the wallet was credited for, with the expiry of the lot each went to."""
    members = credit.ledger.redis.zrange(keys(payer).sources, 0, -1, withscores=True)
    return Sources({member.decode(): int(score) for member, score in members})


def add(credit: Credit, source: str, amount: int, at: int = NOW, payer: str = PAYER) -> bool:
    return credit.add(payer, source, amount, "change", "model-a", TX, at)


def hold(credit: Credit, hold_id: str, amount: int, until: int, nonce: str = "") -> str:
    return credit.hold(PAYER, hold_id, amount, until, nonce, until + 300).outcome


def three_lots(credit: Credit) -> None:
    """100 each in the lots SOON (expires first), MID and LATE, one step apart (added latest first)."""
    assert add(credit, "change:late", 100, at=NOW)
    assert add(credit, "change:soon", 100, at=NOW - 2 * STEP)
    assert add(credit, "change:mid", 100, at=NOW - STEP)
    assert lefts(credit.statement(PAYER)) == {SOON: 100, MID: 100, LATE: 100}


# --- adding ------------------------------------------------------------------------------------------


def test_a_source_is_credited_once(credit: Credit) -> None:
    assert add(credit, "change:a", 100)
    assert not add(credit, "change:a", 100)
    assert not add(credit, "change:a", 70)
    assert not add(credit, "change:a", 70, at=NOW + STEP)  # the source is remembered, not its lot
    assert add(credit, "change:b", 5)
    assert not add(credit, "change:c", 0) and not add(credit, "change:c", -1)
    statement = credit.statement(PAYER)
    assert statement.balance == 105
    assert [e["amount"] for e in events(credit, "credit")] == ["5", "100"]
    assert events(credit)[-1] == {
        "event": "credit",
        "key": keys().wallet,
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
    assert sources(credit) == {"change:a": LATE, "change:b": LATE}
    assert credit.statement(OTHER).balance == 0  # one wallet's credit is its own


def test_a_lot_that_would_already_have_expired_is_not_added(credit: Credit) -> None:
    assert not add(credit, "change:old", 100, at=NOW - LIFETIME)  # expires now
    assert not add(credit, "change:old", 100, at=NOW - LIFETIME - STEP + 1)  # rounded up: still now
    assert not add(credit, "change:older", 100, at=NOW - 10 * LIFETIME)
    assert events(credit) == [] and credit.statement(PAYER).recent == ()
    assert sources(credit) == {}  # a source refused for its expiry is not remembered
    assert add(credit, "change:old", 100, at=NOW - LIFETIME + 1)
    assert credit.statement(PAYER).lots == (Lot(100, NOW + STEP),)  # rounded up to the next step


@pytest.mark.parametrize("lifetime", [1, 29, 30, 59, 1_000, LIFETIME, 30 * 86400])
def test_a_lot_expires_at_its_lifetime_rounded_up_to_the_step(clock: Clock, lifetime: int) -> None:
    """Never earlier than ``at + lifetime``, less than one step later, on a multiple of the step;
    the step is at least a second and at most a thirtieth of the lifetime (rounded up)."""
    credit = make_credit(lifetime)
    step = credit.step
    assert 1 <= step <= -(-lifetime // LOTS_PER_LIFETIME)
    for i, offset in enumerate(sorted({0, 1, 2, step // 2, step - 1, step, step + 1, 2 * step - 1})):
        payer = f"0x{i + 1:040x}"  # a wallet each: one lot each
        at = NOW + offset
        assert add(credit, f"change:{i}", 10, at=at, payer=payer)
        ((field, value),) = lot_fields(credit, payer).items()
        (lot,) = credit.statement(payer).lots
        assert at + lifetime <= lot.expires < at + lifetime + step
        assert lot.expires % step == 0 and (field, value) == (f"lot:{lot.expires}", f"10:{lot.expires}")
        assert sources(credit, payer) == {f"change:{i}": lot.expires}
        if (at + lifetime) % step == 0:
            assert lot.expires == at + lifetime  # on a step already: not moved


def test_credit_added_within_one_step_shares_one_lot(credit: Credit, clock: Clock) -> None:
    for i in range(STEP):  # 100 payments, one a second, all expiring within (LATE - STEP, LATE]
        clock.now = at = NOW - STEP + 1 + i
        assert add(credit, f"change:{i}", i + 1, at=at)
    assert lot_fields(credit) == {f"lot:{LATE}": f"5050:{LATE}"}
    statement = credit.statement(PAYER)
    assert (statement.lots, statement.balance) == ((Lot(5050, LATE),), 5050)
    assert len(events(credit, "credit")) == STEP and total(credit, "credit") == 5050  # an event each
    assert sources(credit) == {f"change:{i}": LATE for i in range(STEP)}
    assert [entry.amount for entry in statement.recent] == list(range(100, 50, -1))
    clock.now = NOW + 1
    assert add(credit, "change:next", 7, at=NOW + 1)  # the next step: the next lot
    assert lot_fields(credit) == {f"lot:{LATE}": f"5050:{LATE}", f"lot:{LATE + STEP}": f"7:{LATE + STEP}"}


@pytest.mark.parametrize(
    "lifetime",
    [
        30,
        60,
        LIFETIME,
        30 * 86400,
        59,
        1_000,
    ],
)
def test_adds_spread_over_the_lifetime_keep_at_most_31_lots(clock: Clock, lifetime: int) -> None:
    """A payment every third of a step for two lifetimes: however often a wallet pays, it holds at
    most LOTS_PER_LIFETIME + 1 lots (the bound is reached: one per step from now to a lifetime on)."""
    credit = make_credit(lifetime)
    every = max(1, credit.step // 3)
    most = 0
    for i, at in enumerate(range(NOW, NOW + 2 * lifetime + 1, every)):
        clock.now = at
        assert add(credit, f"change:{i}", 1, at=at)
        most = max(most, len(lot_fields(credit)))
    assert most == LOTS_PER_LIFETIME + 1
    statement = credit.statement(PAYER)
    assert statement.balance + total(credit, "credit_expired") == total(credit, "credit")


def test_large_amounts_stay_exact_integers(credit: Credit) -> None:
    """Amounts pass through Lua doubles: exact, and written without an exponent, up to 2**53."""
    big = 2**53 - 1
    assert add(credit, "change:big", big)
    assert hold(credit, "h", big - 1, NOW + 60) == HELD
    assert credit.settle(PAYER, "h", 10**15 + 1, "m") == (10**15 + 1, big - 10**15 - 1)
    assert [e["amount"] for e in events(credit)] == [str(10**15 + 1), str(big)]


def test_a_source_is_credited_once_even_after_its_lot_was_emptied(credit: Credit, clock: Clock) -> None:
    """The sources set, not the lot, remembers what was credited: until the lot's expiry, even when
    the lot was spent and deleted; then the member is trimmed (the set does not grow for ever)."""
    assert add(credit, "change:a", 100)
    assert add(credit, "change:b", 50, at=NOW - LIFETIME + 1)  # its lot expires at NOW + STEP
    assert hold(credit, "h", 150, NOW + 60) == HELD  # empties both lots
    assert lot_fields(credit) == {}
    assert credit.settle(PAYER, "h", 150, "m") == (150, 0)
    assert lot_fields(credit) == {}
    assert not add(credit, "change:a", 100) and not add(credit, "change:a", 100, at=NOW + 10 * STEP)
    assert not add(credit, "change:b", 50, at=NOW - LIFETIME + 1)
    assert sources(credit) == {"change:a": LATE, "change:b": NOW + STEP}
    clock.now = NOW + STEP + 1  # b's lot expired: b is forgotten by the next script that credits
    assert add(credit, "change:c", 1, at=NOW + STEP + 1)
    assert sources(credit) == {"change:a": LATE, "change:c": LATE + 2 * STEP}
    clock.now = LATE  # at its lot's expiry a source still counts
    assert not add(credit, "change:a", 100, at=LATE)
    clock.now = LATE + 1
    assert add(credit, "change:d", 1, at=LATE + 1)
    assert sources(credit) == {"change:c": LATE + 2 * STEP, "change:d": LATE + LIFETIME + STEP}
    assert credit.statement(PAYER).balance == 2 and total(credit, "credit") == 152
    assert total(credit, "credit_spent") == 150 and events(credit, "credit_expired") == []


# --- holding -----------------------------------------------------------------------------------------


def test_a_hold_takes_from_the_lots_that_expire_first(credit: Credit) -> None:
    three_lots(credit)
    result = credit.hold(PAYER, "h", 150, NOW + 60, "", 0)
    assert (result.outcome, result.available, result.pointers) == (HELD, 300, 0)
    statement = credit.statement(PAYER)
    assert statement.lots == (Lot(50, MID), Lot(100, LATE))  # SOON emptied: deleted
    assert lot_fields(credit) == {f"lot:{MID}": f"50:{MID}", f"lot:{LATE}": f"100:{LATE}"}
    assert (statement.balance, statement.held) == (150, 150)
    assert hold(credit, "h2", 100, NOW + 60) == HELD  # MID's 50, then LATE's
    assert credit.statement(PAYER).lots == (Lot(50, LATE),)


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
    assert hold(credit, "h", 150, NOW + 60) == HELD  # SOON 100 (deleted), MID 50
    stream = events(credit)
    assert credit.settle(PAYER, "h", 20, "model-b") == (20, 280)
    statement = credit.statement(PAYER)
    assert lefts(statement) == {SOON: 80, MID: 100, LATE: 100}  # MID refilled first, SOON made again
    assert (statement.balance, statement.held) == (280, 0)
    new = events(credit)[: len(events(credit)) - len(stream)]
    assert new == [
        {
            "event": "credit_spent",
            "key": keys().wallet,
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


def test_an_emptied_lot_is_deleted_and_comes_back_with_what_is_given_back(
    credit: Credit, clock: Clock
) -> None:
    assert add(credit, "change:a", 100)  # LATE
    assert add(credit, "change:b", 50, at=NOW - STEP)  # MID
    assert hold(credit, "h", 120, NOW + 60) == HELD  # MID 50, LATE 70
    assert lot_fields(credit) == {f"lot:{LATE}": f"30:{LATE}"}
    assert hold(credit, "h2", 30, NOW + 60) == HELD  # LATE 30
    assert lot_fields(credit) == {}
    statement = credit.statement(PAYER)
    assert (statement.lots, statement.balance, statement.held) == ((), 0, 150)
    assert hold(credit, "h3", 1, NOW + 60) == SHORT
    assert credit.settle(PAYER, "h2", 0, "m") == (0, 30)
    assert lot_fields(credit) == {f"lot:{LATE}": f"30:{LATE}"}
    assert credit.settle(PAYER, "h", 10, "m") == (10, 140)  # 110 back: LATE 70, then MID 40
    assert lot_fields(credit) == {f"lot:{MID}": f"40:{MID}", f"lot:{LATE}": f"100:{LATE}"}
    assert hold(credit, "h4", 140, NOW + 60) == HELD
    assert lot_fields(credit) == {}
    clock.now = NOW + 61  # h4 abandoned: the next script gives it back, making both lots again
    assert hold(credit, "h5", 0, NOW + 120) == HELD
    assert lot_fields(credit) == {f"lot:{MID}": f"40:{MID}", f"lot:{LATE}": f"100:{LATE}"}
    assert total(credit, "credit") == 150 == credit.statement(PAYER).balance + total(credit, "credit_spent")


def test_settle_charges_at_most_the_hold(credit: Credit) -> None:
    three_lots(credit)
    assert hold(credit, "h", 150, NOW + 60) == HELD
    assert credit.settle(PAYER, "h", 10**6, "m") == (150, 150)
    assert lefts(credit.statement(PAYER)) == {MID: 50, LATE: 100}
    assert f"lot:{SOON}" not in lot_fields(credit)  # spent whole: not made again
    assert total(credit, "credit_spent") == 150


def test_a_zero_charge_gives_everything_back_and_writes_no_event(credit: Credit) -> None:
    three_lots(credit)
    before, stored = lefts(credit.statement(PAYER)), lot_fields(credit)
    assert hold(credit, "h", 250, NOW + 60) == HELD
    assert credit.settle(PAYER, "h", 0, "m") == (0, 300)
    assert lefts(credit.statement(PAYER)) == before and lot_fields(credit) == stored
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
    assert hold(credit, "other", 1, NOW + 120) == HELD  # at its time the hold still stands; MID gives 1
    assert credit.statement(PAYER).held == 151
    clock.now = NOW + 61
    assert add(credit, "change:new", 7, at=NOW + 61)  # any script that touches the wallet
    statement = credit.statement(PAYER)
    assert (statement.balance, statement.held) == (306, 1)
    assert lefts(statement) == {SOON: 100, MID: 99, LATE: 100, LATE + STEP: 7}
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
    assert add(credit, "change:a", 100, at=NOW - STEP)  # MID
    assert add(credit, "change:b", 50, at=NOW - 10)  # LATE
    assert add(credit, "change:c", 20)  # LATE too
    assert hold(credit, "h", 120, NOW + 60) == HELD  # MID 100, LATE 20
    assert credit.settle(PAYER, "h", 120, "m") == (120, 50)
    clock.now = MID + 1
    assert hold(credit, "h2", 0, MID + 1) == HELD  # MID was emptied and deleted: nothing to expire
    clock.now = LATE  # at its expiry second a lot still counts
    assert credit.statement(PAYER).balance == 50
    assert hold(credit, "h3", 0, LATE) == HELD
    assert events(credit, "credit_expired") == []
    clock.now = LATE + 1
    assert credit.statement(PAYER).balance == 0  # the statement does not count it (nor sweep)
    assert events(credit, "credit_expired") == [] and f"lot:{LATE}" in lot_fields(credit)
    assert add(credit, "change:d", 10, at=LATE + 1)
    expired = events(credit, "credit_expired")
    assert len(expired) == 1
    assert {k: expired[0][k] for k in ("amount", "model", "tx", "kind", "scheme", "at")} == {
        "amount": "50",
        "model": "",
        "tx": "",
        "kind": "expired",
        "scheme": "credit",
        "at": str(LATE + 1),
    }
    statement = credit.statement(PAYER)
    assert lefts(statement) == {LATE + LIFETIME + STEP: 10}
    assert lot_fields(credit) == {f"lot:{LATE + LIFETIME + STEP}": f"10:{LATE + LIFETIME + STEP}"}
    assert statement.recent[:2] == (
        Entry(LATE + 1, "change", 10, TX),
        Entry(LATE + 1, "expired", 50, ""),
    )
    assert add(credit, "change:e", 1, at=LATE + 1)
    assert len(events(credit, "credit_expired")) == 1  # swept once
    assert lefts(credit.statement(PAYER)) == {LATE + LIFETIME + STEP: 11}


def test_at_its_expiry_second_an_emptied_lot_still_takes_back(credit: Credit, clock: Clock) -> None:
    assert add(credit, "change:a", 100)  # LATE
    clock.now = LATE
    assert hold(credit, "h", 100, LATE + 60) == HELD
    assert lot_fields(credit) == {}
    assert credit.settle(PAYER, "h", 30, "m") == (30, 70)  # made again: it still counts this second
    assert lot_fields(credit) == {f"lot:{LATE}": f"70:{LATE}"} and events(credit, "credit_expired") == []
    clock.now = LATE + 1
    assert hold(credit, "h2", 0, LATE + 60) == HELD
    assert [e["amount"] for e in events(credit, "credit_expired")] == ["70"] and lot_fields(credit) == {}


@pytest.mark.parametrize("swept_first", [False, True])
def test_what_a_hold_gives_back_to_an_expired_lot_expires(
    credit: Credit, clock: Clock, swept_first: bool
) -> None:
    """The lot it came from expired while the hold stood (still in the hash, or swept already by
    another script; or deleted when the hold emptied it): the part given back expires on its own,
    beside what was left in the lot, and the lot is not made again."""
    first = NOW + STEP
    assert add(credit, "change:soon", 100, at=NOW - LIFETIME + 1)  # expires at `first`
    assert add(credit, "change:late", 100)
    assert hold(credit, "h", 140, NOW + 3 * STEP) == HELD  # soon 100 (its lot deleted), late 40
    assert add(credit, "change:soon2", 30, at=NOW - LIFETIME + STEP)  # the same lot: made again
    assert lot_fields(credit)[f"lot:{first}"] == f"30:{first}"
    assert hold(credit, "h2", 20, NOW + 3 * STEP) == HELD  # 20 of it: 10 left
    clock.now = first + 1
    if swept_first:
        assert add(credit, "change:new", 5, at=first + 1)  # expires at LATE + 2 * STEP
        assert [e["amount"] for e in events(credit, "credit_expired")] == ["10"]
    assert credit.settle(PAYER, "h2", 5, "m") == (5, 60 + 5 * swept_first)
    assert credit.settle(PAYER, "h", 10, "m") == (10, 100 + 5 * swept_first)  # late refilled to 100
    expired = sorted(int(e["amount"]) for e in events(credit, "credit_expired"))
    assert expired == [10, 15, 90]  # what soon2 had left, then what each hold gave back
    assert lefts(credit.statement(PAYER)) == {LATE: 100} | ({LATE + 2 * STEP: 5} if swept_first else {})
    assert f"lot:{first}" not in lot_fields(credit)  # swept by the first settle either way
    assert total(credit, "credit") == 100 + 5 * swept_first + 15 + 115  # balance + spent + expired


def test_an_abandoned_hold_of_an_expired_lot_expires_what_it_gives_back(credit: Credit, clock: Clock) -> None:
    first = NOW + STEP
    assert add(credit, "change:soon", 100, at=NOW - LIFETIME + 1)  # expires at `first`
    assert add(credit, "change:late", 100)
    assert hold(credit, "h", 150, first + 20) == HELD  # soon 100 (its lot deleted), late 50
    clock.now = first + 21
    assert add(credit, "change:new", 5, at=first + 21)
    assert [e["amount"] for e in events(credit, "credit_expired")] == ["100"]
    statement = credit.statement(PAYER)
    assert lefts(statement) == {LATE: 100, LATE + 2 * STEP: 5}
    assert f"lot:{first}" not in lot_fields(credit)
    assert statement.held == 0
    assert credit.settle(PAYER, "h", 10, "m") is None


# --- failed calls' payments --------------------------------------------------------------------------


def test_a_pointer_becomes_a_failed_call_lot_once(clock: Clock) -> None:
    credit = make_credit(lifetime=30 * 86400)  # longer than the payment is kept: the lot lives as long
    lot_expires = 20841 * 86400  # NOW + RETENTION_SECONDS (1_800_604_800) rounded up to a day
    assert credit.point(PAYER, POINTED, 500, at=NOW)
    assert not credit.point(PAYER, POINTED, 900, at=NOW)
    assert credit.statement(PAYER).redeemable == {POINTED: 500}
    assert credit.statement(PAYER).balance == 0 and events(credit) == []  # not credit yet
    assert credit.hold(PAYER, "h", 1, NOW + 60, "", 0) == credit_module.HoldResult(SHORT, 0, 1)
    assert credit.convert(PAYER, POINTED, "model-c", TX, keep=True) == 500
    statement = credit.statement(PAYER)
    assert statement.redeemable == {}
    assert NOW + RETENTION_SECONDS < lot_expires < NOW + RETENTION_SECONDS + credit.step
    assert statement.lots == (Lot(500, lot_expires),)
    assert lot_fields(credit) == {f"lot:{lot_expires}": f"500:{lot_expires}"}
    assert sources(credit) == {f"failed_call:{POINTED}": lot_expires}
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
    assert hold(credit, "h2", 500, NOW + 60) == HELD  # its lot emptied and deleted
    assert credit.settle(PAYER, "h2", 500, "m") == (500, 0) and lot_fields(credit) == {}
    assert credit.point(PAYER, POINTED, 500, at=NOW)
    assert credit.convert(PAYER, POINTED, "model-c", TX, keep=True) == 0  # the source is remembered
    assert credit.statement(PAYER).balance == 0 and total(credit, "credit") == 500


def test_a_converted_pointer_shares_the_lot_of_its_step(credit: Credit) -> None:
    """A pointer keeps its own expiry (``at`` + the credit's life); its credit goes to the lot of
    that expiry rounded up to the step, beside change credited in the same step."""
    assert add(credit, "change:x", 100)  # LATE
    assert credit.point(PAYER, POINTED, 500, at=NOW - 50)  # expires at LATE - 50: LATE's lot
    assert credit.point(PAYER, POINTED + "2", 7, at=NOW + 1)  # the next step's lot
    assert credit.statement(PAYER).redeemable == {POINTED: 500, POINTED + "2": 7}
    assert credit.ledger.redis.hget(keys().wallet, f"pay:{POINTED}") == f"500:{LATE - 50}".encode()
    assert credit.convert(PAYER, POINTED, "m", TX, keep=True) == 500
    assert credit.convert(PAYER, POINTED + "2", "m", TX, keep=True) == 7
    assert lot_fields(credit) == {f"lot:{LATE}": f"600:{LATE}", f"lot:{LATE + STEP}": f"7:{LATE + STEP}"}
    assert sources(credit) == {
        "change:x": LATE,
        f"failed_call:{POINTED}": LATE,
        f"failed_call:{POINTED}2": LATE + STEP,
    }
    assert credit.statement(PAYER).balance == 607 == total(credit, "credit")


def test_a_pointer_whose_payment_was_redeemed_is_dropped(credit: Credit) -> None:
    assert credit.point(PAYER, POINTED, 500, at=NOW)
    assert credit.convert(PAYER, POINTED, "m", TX, keep=False) == 0
    assert credit.statement(PAYER) == Statement(0, 0, (), {}, ())
    assert credit.convert(PAYER, POINTED, "m", TX, keep=True) == 0  # nothing left to convert
    assert events(credit) == [] and sources(credit) == {}


def test_a_pointer_lives_as_long_as_credit_and_no_longer(credit: Credit, clock: Clock) -> None:
    assert not credit.point(PAYER, POINTED, 500, at=NOW - LIFETIME)  # would expire now
    assert credit.point(PAYER, POINTED, 500, at=NOW - LIFETIME + 1)  # expires at NOW + 1: not rounded
    clock.now = NOW + 2
    assert credit.statement(PAYER).redeemable == {}
    assert credit.convert(PAYER, POINTED, "m", TX, keep=True) == 0  # though its lot would live on
    assert events(credit) == [] and sources(credit) == {}


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
    assert credit.ledger.redis.llen(keys().log) == LOG_LENGTH  # kept


# --- the books' sweep -------------------------------------------------------------------------------


def test_sweep_credit_sweeps_every_wallet_nobody_touched(credit: Credit, clock: Clock) -> None:
    """``sweep_credit`` runs the sweep of every wallet's hash (not its log, nonces or sources): what
    expired is written, an abandoned hold goes back; a wallet's keys outlive its last lot by
    ``CREDIT_GRACE_SECONDS`` so the books still find it."""
    assert add(credit, "change:a", 100, at=NOW - LIFETIME + 1)  # expires at NOW + STEP
    assert add(credit, "change:b", 50)  # LATE
    assert add(credit, "change:c", 7, payer=OTHER)
    assert hold(credit, "h", 120, NOW + 60) == HELD  # a's 100 (its lot deleted), b's 20
    grace = credit_module.CREDIT_GRACE_SECONDS
    assert LIFETIME + grace - 5 <= credit.ledger.redis.ttl(keys().wallet) <= LIFETIME + grace
    clock.now = NOW + STEP + 1
    assert credit_module.sweep_credit(credit.ledger) == 2
    assert [e["amount"] for e in events(credit, "credit_expired")] == ["100"]
    statement = credit.statement(PAYER)
    assert (statement.lots, statement.held) == ((Lot(50, LATE),), 0)
    assert statement.recent[:2] == (
        Entry(NOW + STEP + 1, "expired", 100, ""),
        Entry(NOW + STEP + 1, "returned", 120, ""),
    )
    assert credit.statement(OTHER).lots == (Lot(7, LATE),)
    stream = events(credit)
    assert credit_module.sweep_credit(credit.ledger) == 2 and events(credit) == stream  # swept once
    assert total(credit, "credit") == 157 == 50 + 7 + total(credit, "credit_expired")  # both wallets


# --- conservation ------------------------------------------------------------------------------------


def up(seconds: int) -> int:
    """``seconds`` rounded up to a multiple of STEP."""
    return -(-seconds // STEP) * STEP


class Model:
    """What the scripts should leave, in Python: the lots by expiry (an emptied one deleted), each
    hold with what it took from which lot, the pointers, the sources remembered until the expiry of
    their lot, and the totals spent and expired. It sweeps where the scripts sweep."""

    def __init__(self) -> None:
        self.lots: dict[int, int] = {}  # expiry → left (> 0)
        self.holds: dict[str, tuple[int, int, list[tuple[int, int]]]] = {}  # id → amount, until, takes
        self.pointers: dict[str, tuple[int, int]] = {}  # payment key → amount, expires
        self.sources: dict[str, int] = {}  # source → its lot's expiry
        self.spent = self.expired = 0

    def give_back(self, takes: list[tuple[int, int]], amount: int, now: int) -> None:
        for expires, took in reversed(takes):  # the lot taken last (expiring last) first
            back = min(amount, took)
            amount -= back
            if back and expires >= now:
                self.lots[expires] = self.lots.get(expires, 0) + back
            else:
                self.expired += back

    def sweep(self, now: int) -> None:
        for hold_id, (amount, until, takes) in list(self.holds.items()):
            if until < now:
                del self.holds[hold_id]
                self.give_back(takes, amount, now)
        for expires in [e for e in self.lots if e < now]:
            self.expired += self.lots.pop(expires)
        self.pointers = {k: (a, e) for k, (a, e) in self.pointers.items() if e >= now}

    def once(self, source: str, expires: int, now: int) -> bool:
        self.sources = {s: e for s, e in self.sources.items() if e >= now}
        if source in self.sources:
            return False
        self.sources[source] = expires
        return True

    def credit(self, source: str, amount: int, expires: int, now: int) -> bool:
        if expires <= now or not self.once(source, expires, now):
            return False
        self.lots[expires] = self.lots.get(expires, 0) + amount
        return True

    def add(self, source: str, amount: int, at: int, now: int) -> bool:
        self.sweep(now)
        return self.credit(source, amount, up(at + LIFETIME), now)

    def hold(self, hold_id: str, amount: int, until: int, now: int) -> tuple[str, int, int]:
        self.sweep(now)
        available = sum(self.lots.values())
        if available < amount:
            return SHORT, available, len(self.pointers)
        need, takes = amount, []
        for expires in sorted(self.lots):
            if need <= 0:
                break
            take = min(need, self.lots[expires])
            need -= take
            self.lots[expires] -= take
            if not self.lots[expires]:
                del self.lots[expires]
            takes.append((expires, take))
        self.holds[hold_id] = (amount, until, takes)
        return HELD, available, len(self.pointers)

    def settle(self, hold_id: str, charge: int, now: int) -> tuple[int, int] | None:
        if hold_id not in self.holds:  # settle does not sweep before looking
            return None
        amount, _, takes = self.holds.pop(hold_id)
        charged = min(charge, amount)
        self.give_back(takes, amount - charged, now)
        self.spent += charged
        self.sweep(now)
        return charged, sum(self.lots.values())

    def point(self, payment: str, amount: int, expires: int, now: int) -> bool:
        if expires <= now or payment in self.pointers:
            return False
        self.pointers[payment] = (amount, expires)
        return True

    def convert(self, payment: str, keep: bool, now: int) -> int:
        amount, expires = self.pointers.pop(payment, (0, 0))
        if not keep or expires <= now:
            return 0
        return amount if self.credit(f"failed_call:{payment}", amount, up(expires), now) else 0


waits = st.one_of(
    st.just(0), st.integers(0, STEP // 2), st.integers(0, 1_200), st.just(-1)
)  # seconds waited before (often within one step); -1: to the next second a lot expires
adds = st.tuples(
    st.just("add"),
    st.integers(0, 7),
    st.integers(1, 1_000),
    st.one_of(st.integers(0, STEP), st.integers(0, LIFETIME + LIFETIME // 2)),
    waits,
)  # source, amount, age of the credit (often within one step of another), wait
holds = st.tuples(
    st.just("hold"), st.one_of(st.integers(0, 200), st.integers(0, 1_500)), st.integers(0, 1_200), waits
)  # amount, seconds held, wait
settles = st.tuples(
    st.just("settle"), st.integers(0, 3), st.one_of(st.integers(0, 300), st.integers(0, 2_000))
)  # which standing hold (0: the newest; past the last: one settled, returned or never made), charge
points = st.tuples(
    st.just("point"), st.integers(0, 2), st.integers(1, 1_000), st.integers(0, LIFETIME)
)  # payment, amount, age of the payment
converts = st.tuples(st.just("convert"), st.integers(0, 2), st.booleans())  # payment, keep


kinds = {"add": adds, "hold": holds, "settle": settles, "point": points, "convert": converts}
some_steps = st.sampled_from(["add"] * 3 + ["hold"] * 3 + ["settle"] * 2 + ["point", "convert"]).flatmap(
    kinds.__getitem__
)  # mostly adds, holds and settles


@settings(max_examples=80, deadline=None)
@given(steps=st.lists(some_steps, min_size=8, max_size=30))
def test_credit_is_conserved(steps: list[tuple[Any, ...]]) -> None:
    """After every step: credited = balance + held + spent + expired, in whole positive events; the
    hash holds exactly the lots of a model (one per expiry, none empty, FIFO by expiry, given back
    to the latest first, expired where they find their lot gone), and each call answers as the model
    says. Time moves only before a script that sweeps first (add, hold), so the statement, which
    does not sweep, sees what they see."""
    with pytest.MonkeyPatch.context() as patch:
        clock = Clock(NOW)
        patch.setattr(credit_module.time, "time", clock)
        credit = make_credit()
        model = Model()
        count = 0
        for step in steps:
            if step[0] == "add":
                _, source, amount, age, wait = step
                clock.now = up(clock.now + 1) if wait < 0 else clock.now + wait
                at = clock.now - age
                assert add(credit, f"change:{source}", amount, at=at) == model.add(
                    f"change:{source}", amount, at, clock.now
                )
            elif step[0] == "hold":
                _, amount, seconds, wait = step
                clock.now = up(clock.now + 1) if wait < 0 else clock.now + wait
                count += 1
                result = credit.hold(PAYER, str(count), amount, clock.now + seconds, "", 0)
                expected = model.hold(str(count), amount, clock.now + seconds, clock.now)
                assert (result.outcome, result.available, result.pointers) == expected
                after = credit.statement(PAYER).balance
                if result.outcome == HELD:
                    assert amount <= result.available and after == result.available - amount
                else:
                    assert amount > result.available == after
            elif step[0] == "point":
                _, payment, amount, age = step
                at = clock.now - age
                expires = at + LIFETIME  # the pointer's own expiry (LIFETIME < RETENTION_SECONDS)
                made = credit.point(PAYER, f"pay{payment}", amount, at=at)
                assert made == model.point(f"pay{payment}", amount, expires, clock.now)
            elif step[0] == "convert":
                _, payment, keep = step
                converted = credit.convert(PAYER, f"pay{payment}", "m", TX, keep)
                assert converted == model.convert(f"pay{payment}", keep, clock.now)
            else:
                _, which, charge = step
                standing = list(model.holds)  # the holds made and not settled or returned yet
                hold_id = standing[-1 - which] if which < len(standing) else str(count - which)
                assert credit.settle(PAYER, hold_id, charge, "m") == model.settle(hold_id, charge, clock.now)
            statement = credit.statement(PAYER)
            assert lot_fields(credit) == {f"lot:{e}": f"{left}:{e}" for e, left in model.lots.items()}
            assert all(left > 0 and e % STEP == 0 for e, left in model.lots.items())
            live_lots = sorted((e, left) for e, left in model.lots.items() if e >= clock.now)
            assert statement.lots == tuple(Lot(left, e) for e, left in live_lots)
            assert statement.held == sum(a for a, until, _ in model.holds.values() if until >= clock.now)
            assert statement.redeemable == {k: a for k, (a, e) in model.pointers.items() if e >= clock.now}
            remembered = Sources({s: e for s, e in sources(credit).items() if e >= clock.now})
            assert remembered == {s: e for s, e in model.sources.items() if e >= clock.now}
            stream = events(credit)
            assert all(e["amount"].isdigit() and int(e["amount"]) > 0 for e in stream)
            credited, spent, expired = (
                total(credit, n) for n in ("credit", "credit_spent", "credit_expired")
            )
            assert (spent, expired) == (model.spent, model.expired)
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


def test_one_script_trims_at_most_a_batch_of_expired_sources(credit: Credit, clock: Clock) -> None:
    """A wallet back after a long pause has many expired sources: each script removes at most
    ``TRIM_BATCH`` of them (Redis is not held up), and a source is still credited once."""
    stale = {f"old{i}": NOW - 1 - i for i in range(3 * credit_module.TRIM_BATCH)}
    credit.ledger.redis.zadd(keys(PAYER).sources, stale)
    assert add(credit, "change:a", 5)
    assert credit.ledger.redis.zcard(keys(PAYER).sources) == 2 * credit_module.TRIM_BATCH + 1
    assert not add(credit, "change:a", 5)  # trims the next batch, and still remembers change:a
    assert credit.ledger.redis.zcard(keys(PAYER).sources) == credit_module.TRIM_BATCH + 1
