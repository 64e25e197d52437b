"""The books: reconcile the ledger against the chain, and report revenue from the ledger stream.

Redis is the fast lock, the chain is the record of truth. ``reconcile`` walks the payments that
changed within a window and checks each one that claims money moved — settled, served,
redeemable — against its transaction's receipt (status, and the token's ``Transfer`` of exactly
the recorded amount from the payer to our payee); it resolves the open ones (pending, abandoned
settling, failed, stale settled) from chain state. It only reads the chain and only moves open
payments, through the same atomic transitions the proxy uses, so it is safe to run while the proxy
serves.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections import defaultdict
from dataclasses import dataclass

import redis

from app.amounts import amount_text
from app.backends.chain import Chain
from app.backends.escrow import channel_reads, channel_view
from app.backends.rpc import ChainUnavailable, RpcFailure
from app.backends.token import ReceiptContradiction, pulled_logged, transfer_logged
from app.backends.upstream import abandoned_after
from app.payments.channels import Channels
from app.payments.credit import Credit, sweep_credit
from app.payments.keys import (
    CREDIT_KEYS,
    LEDGER_STREAM,
    PAYMENT_KEY_RE,
    PAYMENT_KEYS,
    PERMIT_KEY_RE,
    PERMIT_KEYS,
    debt_key,
)
from app.payments.ledger import STALE_SETTLED, Ledger, text_of
from app.payments.states import OPEN, State
from app.settings import Settings
from app.x402.wire import Authorization

MONEY_MOVED = (State.SETTLED, State.SERVED, State.REDEEMABLE, State.CREDITED)
CHECKED = (*MONEY_MOVED, *OPEN)
DONE = (State.SERVED, State.REDEEMABLE, State.CREDITED)
# Revenue: a settled payment counts; the part of it credited to the wallet does not, until spent or
# expired (credit is a liability).
# A batch-settlement call counts when its voucher is charged (``voucher``): the chain has it as the
# payer's signed voucher, claimed later in batches.
REVENUE_SIGN = {State.SETTLED.value: 1, "credit": -1, "credit_spent": 1, "credit_expired": 1, "voucher": 1}
EXPIRED_CREDIT = "(expired credit)"
CHAIN_UNAVAILABLE = "chain unavailable"  # a finding's problem when no RPC answered for it
DURATION_RE = re.compile(r"([0-9]+)([smhd])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RevenueIncomplete(redis.ConnectionError):
    """Some ledger events cannot be read now (a Redis master is down), so a total would be short."""


def parse_duration(text: str) -> int:
    """'90s', '30m', '24h', '7d' → seconds."""
    match = DURATION_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 24h, 7d)")
    return int(match.group(1)) * UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True)
class Finding:
    key: str
    state: str
    tx: str
    problem: str  # "" when the payment checks out
    resolved: str = ""  # the new state when reconcile resolved an open payment
    open: str = ""  # why an open payment was left as it is (in flight, nothing on chain yet)


def _authorization(key: str, record: dict[str, str], pay_to: str) -> Authorization | None:
    match = PAYMENT_KEY_RE.match(key)
    if not match or not record.get("amount", "").isdigit():
        return None
    return Authorization(
        from_=match.group(3),
        to=pay_to.lower(),
        value=int(record["amount"]),
        valid_after=0,
        valid_before=0,
        nonce=bytes.fromhex(match.group(4)),
    )


def reconcile(ledger: Ledger, chain: Chain, settings: Settings, since_seconds: int) -> list[Finding]:
    """Check every payment that claims money moved within the window (``since_seconds``) and every
    open one, whatever its age, on every master, resolving the open ones from the chain:

    - pending → redeemable (the chain shows the transfer; its request was answered 503, so the
      header buys its call) or failed (reverted);
    - settling for longer than any request takes (its worker died mid-call) → redeemable when the
      money moved, failed when it reverted; a younger one is listed as in flight;
    - failed, when someone settled the still-live authorization afterwards → redeemable;
    - settled for ``STALE_SETTLED`` seconds (the request died mid-answer) → redeemable.

    On a cluster a master that does not answer is one finding (a problem), not the end of the run.
    """
    cutoff = time.time() - since_seconds
    findings = []
    skipped: list[str] = []  # cluster masters that did not answer: reported, the others still checked
    sweep_credit(ledger, skipped)  # expired credit written as such, abandoned holds returned
    for key in ledger.store.scan(PAYMENT_KEYS, skipped=skipped):
        record = ledger.get(key)
        state, tx = record.get("state", ""), record.get("tx", "")
        if state not in CHECKED or (state in DONE and float(record.get("updated") or 0) < cutoff):
            continue  # open payments are resolved whatever their age; done ones within the window
        auth = _authorization(key, record, settings.pay_to)
        if auth is None:
            findings.append(Finding(key, state, tx, "malformed payment record"))
            continue
        age = time.time() - float(record.get("updated") or 0)
        if state == State.SETTLING and age <= abandoned_after(settings):
            findings.append(Finding(key, state, tx, "", open=f"in flight for {age:.0f} s"))
            continue
        try:
            receipt = chain.receipt(tx) if tx else None
            confirmed = receipt is not None and transfer_logged(receipt, chain.asset, auth)
            settled_by = tx if confirmed else chain.find_settlement(auth)
        except (ChainUnavailable, RpcFailure) as exc:
            findings.append(Finding(key, state, tx, f"{CHAIN_UNAVAILABLE}: {type(exc).__name__}"))
            continue
        findings += _checked(ledger, key, state, tx, age, settled_by, receipt is not None)
        if state == State.SERVED and record.get("change", "").isdigit():
            findings += _credit_change(ledger, settings, key, record)
    findings += _reconcile_upto(ledger, chain, settings, cutoff, skipped)
    findings += _reconcile_channels(ledger, chain, settings, skipped)
    findings += [
        Finding(master, "", "", "Redis master did not answer: its payments were not checked")
        for master in sorted(set(skipped))
    ]
    return findings


def _credit_change(ledger: Ledger, settings: Settings, key: str, record: dict[str, str]) -> list[Finding]:
    """A served exact payment's change is in its wallet's credit (the proxy credits it right after
    recording the payment served; if Redis failed in between, it is credited here, once)."""
    updated = int(float(record.get("updated") or 0))
    added = Credit(settings, ledger).add(
        record.get("payer", ""), f"change:{key}", int(record["change"]), "change", record.get("model", ""),
        record.get("tx", ""), updated,
    )  # fmt: skip
    return [Finding(key, State.SERVED, record.get("tx", ""), "", resolved="change credited")] if added else []


def _reconcile_channels(
    ledger: Ledger, chain: Chain, settings: Settings, skipped: list[str]
) -> list[Finding]:
    """The ``batch-settlement`` channels against the escrow's ``channels(id)``: what was charged and
    not claimed yet is open (the claims take it); a claimed total above what Redis counts charged is
    a problem, and Redis takes the chain's (it lost charges: the chain and the payer's vouchers are
    the record); a charge above the channel's balance is a problem (the payer left before a claim)."""
    channels = Channels(ledger, settings.network.chain_id, settings.network.caip2)
    findings = []
    for stored in channels.every(skipped):
        try:
            answers = chain.rpc.batch(channel_reads(stored.channel_id))
        except (ChainUnavailable, RpcFailure) as exc:
            findings.append(Finding(stored.key, "channel", "", f"{CHAIN_UNAVAILABLE}: {type(exc).__name__}"))
            continue
        view = channel_view(answers)
        if view is None:
            findings.append(Finding(stored.key, "channel", "", "the escrow's channel could not be read"))
            continue
        balance, claimed = view.balance, view.claimed
        channels.sync(stored.channel_id, view)
        if claimed > stored.charged:
            problem = f"claimed {claimed} on chain, above the {stored.charged} charged here (now counted)"
            findings.append(Finding(stored.key, "channel", "", problem))
        elif stored.charged > max(balance, claimed):
            problem = f"charged {stored.charged}, above the channel's balance {balance} (payer left)"
            findings.append(Finding(stored.key, "channel", "", problem))
        elif stored.charged > claimed:
            findings.append(
                Finding(
                    stored.key, "channel", "", "", open=f"{stored.charged - claimed} charged, not claimed yet"
                )
            )
    return findings


def _reconcile_upto(
    ledger: Ledger, chain: Chain, settings: Settings, cutoff: float, skipped: list[str]
) -> list[Finding]:
    """The ``upto`` permits: a served one (within the window) must show ``Transfer(payer, payTo,
    amount charged)``; a pending one becomes served (the chain shows the charge) or owed (it
    reverted: its answer went out, so the payer owes it and is refused until it is collected); one
    held past any call's length is released when nothing moved, a problem when its charge moved
    (whether its answer went out is unknown); an owed one is listed."""
    findings = []
    for key in ledger.store.scan(PERMIT_KEYS, skipped=skipped):
        record = ledger.get(key)
        state, tx, amount = record.get("state", ""), record.get("tx", ""), record.get("amount", "")
        age = time.time() - float(record.get("updated") or 0)
        match = PERMIT_KEY_RE.match(key)
        if not match or not amount.isdigit():
            findings.append(Finding(key, state, tx, "malformed payment record"))
            continue
        if state == State.OWED:
            findings.append(
                Finding(key, state, tx, "", open=f"owed {amount} atomic units by {match.group(3)}")
            )
            continue
        held_too_long = state == State.SETTLING and age > abandoned_after(settings)
        checked = state == State.SERVED and time.time() - age >= cutoff and (tx or amount != "0")
        if not (checked or state == State.PENDING or held_too_long):
            continue
        try:
            receipt = chain.receipt(tx) if tx else None
        except (ChainUnavailable, RpcFailure) as exc:
            findings.append(Finding(key, state, tx, f"{CHAIN_UNAVAILABLE}: {type(exc).__name__}"))
            continue
        try:
            moved = receipt is not None and pulled_logged(
                receipt, chain.asset, match.group(3), settings.pay_to, int(amount)
            )
        except ReceiptContradiction:  # mined, but moved something else than the recorded charge
            findings.append(Finding(key, state, tx, "no matching Transfer on chain for the charge"))
            continue
        if state == State.SERVED:
            findings.append(
                Finding(key, state, tx, "" if moved else "no matching Transfer on chain for the charge")
            )
        elif state == State.PENDING and moved:
            findings += _resolve(ledger, key, state, State.SERVED, tx)
        elif state == State.PENDING and receipt is not None:
            debt = debt_key(settings.network.chain_id, settings.asset, match.group(3))
            calldata = bytes.fromhex(record.get("calldata", ""))
            deadline = int(record.get("valid_before") or 0)
            ledger.record_debt(debt, key, int(amount), record.get("relayer", ""), deadline, calldata)
            findings += _resolve(ledger, key, state, State.OWED, tx)
        elif state == State.PENDING:
            findings.append(Finding(key, state, tx, "", open="no receipt on chain yet"))
        elif moved:
            findings.append(
                Finding(key, state, tx, f"charged {amount}; whether its answer went out is unknown")
            )
        else:
            findings += _resolve(ledger, key, state, State.RELEASED, tx)
    return findings


def _resolve(ledger: Ledger, key: str, state: str, to: str, tx: str) -> list[Finding]:
    if ledger.transition(key, (state,), to, tx=tx):
        return [Finding(key, state, tx, "", resolved=to)]
    return []  # it moved meanwhile: the proxy got there first


def _checked(
    ledger: Ledger, key: str, state: str, tx: str, age: float, settled_by: str | None, mined: bool
) -> list[Finding]:
    """What one payment's chain state says of its record, resolving the open states."""

    def resolve(to: str, by: str) -> list[Finding]:
        return _resolve(ledger, key, state, to, by)

    if state in OPEN:
        if settled_by is not None:
            return resolve(State.REDEEMABLE, settled_by)  # its request answered 503: never served
        if state != State.FAILED and mined:
            return resolve(State.FAILED, tx)
        if state == State.FAILED:
            return []  # reverted, nothing moved: the authorization may still settle until validBefore
        return [Finding(key, state, tx, "", open="no transaction on chain yet")]
    if state == State.SETTLED and age > STALE_SETTLED and settled_by is not None:
        return resolve(State.REDEEMABLE, settled_by)
    if settled_by is None:
        problem = (
            "no transaction recorded" if not tx else "no matching Transfer on chain for the recorded amount"
        )
        return [Finding(key, state, tx, problem)]
    if settled_by != tx:
        return [Finding(key, state, tx, f"money moved by {settled_by}, not the recorded tx")]
    return [Finding(key, state, tx, "")]


def render_findings(findings: list[Finding]) -> str:
    """The reconcile report as text: a row (state, result, tx, key) per mismatched, resolved or open payment,
    followed by its problem or why it is open; one all-clear line when there is none."""
    rows = [f for f in findings if f.problem or f.resolved or f.open]
    if not rows:
        return "reconcile: every checked payment matches the chain\n"
    out = io.StringIO()
    out.write(f"{'state':<11} {'result':<10} {'tx':<68} payment / problem\n")
    for f in rows:
        result = f"→ {f.resolved}" if f.resolved else ("open" if f.open else "MISMATCH")
        out.write(f"{f.state:<11} {result:<10} {f.tx or '-':<68} {f.key}\n")
        if f.problem or f.open:
            out.write(f"{'':<11} {'':<10} {'':<68} {f.problem or f.open}\n")
    return out.getvalue()


def revenue(ledger: Ledger, since_seconds: int, by: str) -> dict[str, int]:
    """Settled amounts (atomic units) grouped by model, day (UTC), payer or scheme, from the ledger
    stream (for ``upto``, what was charged, not the maximum authorized). Credit is a liability, not
    revenue: what an exact payment left as the wallet's credit is taken off (``credit`` events) and
    counts once spent (``credit_spent``, scheme ``credit``) or expired (``credit_expired``, model
    ``(expired credit)``).

    On a cluster the events still in outboxes are moved into the stream first; ``RevenueIncomplete``
    is raised when some cannot be (a master is down), rather than a total that is short. An event
    counts at the time it happened (its ``at`` field, unix seconds), not when it reached the stream;
    events written before that field existed count at their stream id's time."""
    unswept: list[str] = []
    sweep_credit(ledger, unswept)  # credit that expired in wallets nobody touched since: its events
    if unswept:
        raise RevenueIncomplete(
            f"{len(set(unswept))} Redis masters do not answer: their credit was not swept"
        )
    missing = ledger.flush_events()
    if missing:
        raise RevenueIncomplete(f"{len(missing)} ledger outboxes cannot be read now (a Redis master is down)")
    since = time.time() - since_seconds
    totals: dict[str, int] = defaultdict(int)
    for entry_id, fields in ledger.redis.xrange(LEDGER_STREAM, min=f"{int(since * 1000)}-0", max="+"):
        entry = {text_of(k): text_of(v) for k, v in fields.items()}
        sign = REVENUE_SIGN.get(entry.get("event", ""), 0)
        if not sign or not entry.get("amount", "").isdigit():
            continue
        at = int(entry.get("at") or int(text_of(entry_id).split("-")[0]) // 1000)  # older events: no "at"
        if at < since:
            continue
        if by == "day":
            group = time.strftime("%Y-%m-%d", time.gmtime(at))
        elif by == "model" and entry.get("event") == "credit_expired":
            group = EXPIRED_CREDIT
        else:  # an exact event has no scheme field; an upto event's amount is what was charged
            group = entry.get(by, "exact" if by == "scheme" else "")
        totals[group] += sign * int(entry["amount"])
    return dict(sorted(totals.items()))


def credit_outstanding(ledger: Ledger) -> int:
    """What the proxy holds for wallets now (atomic units): the unexpired credit of every wallet,
    held or not, on every master. A liability: it is owed in service, not earned yet."""
    now, total = time.time(), 0
    for key in ledger.store.scan(CREDIT_KEYS):
        for raw_field, raw_value in ledger.redis.hgetall(key).items():
            kind = text_of(raw_field).partition(":")[0]
            parts = text_of(raw_value).split(":")
            if kind in ("lot", "hold") and len(parts) >= 2 and int(parts[1]) >= now:
                total += int(parts[0])
    return total


def dollars(atomic: int, decimals: int = 6) -> str:
    """Atomic units as "$" and the amount, thousands grouped: "$1,234.500000" for 1234500000 at 6 decimals."""
    return f"${amount_text(atomic, decimals, grouped=True)}"


def render_revenue(totals: dict[str, int], by: str, as_csv: bool) -> str:
    """The revenue report: with ``as_csv`` CSV rows (group, atomic_units, usdc), else one dollar amount per
    group and a total line."""
    out = io.StringIO()
    if as_csv:
        writer = csv.writer(out)
        writer.writerow([by, "atomic_units", "usdc"])
        for group, amount in totals.items():
            writer.writerow([group, amount, amount_text(amount)])
        return out.getvalue()
    width = max([len(by), *(len(g) for g in totals)])
    for group, amount in totals.items():
        out.write(f"{group:<{width}}  {dollars(amount):>16}\n")
    out.write(f"{'total':<{width}}  {dollars(sum(totals.values())):>16}\n")
    return out.getvalue()
