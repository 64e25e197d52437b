"""A call paid from a wallet's credit (``SIGN-IN-WITH-X``) beside the same call free, in one run.

Goal (issue "credit": "``benchmarks/`` measures a paid call served from credit beside a free call"):
the credit call's p50 within 2 ms of the free call's.

Set-up, as the other benchmarks: anvil (automine), redis-server, the stand-in model answering at
once, and the proxy under gunicorn (``gunicorn.conf.py``, 2 workers x 32 threads) as
``benchmarks.free_wsgi:app``, with the packaged catalog copied with ``floor = 1`` (``X402_CATALOG``,
as ``tests/integration/test_credit.py``): with the shipped floor (1000) the credit body leaves no
change; with floor 1 ``CHAT_BODY`` is priced 51 atomic units and charged its usage price, 5 (the
stand-in reports 6 + 5 tokens). Amounts change nothing the path does.

A wallet's credit (``app.payments.credit``): a hash of its lots, holds and pointers, read whole by
``sweep()`` in the add, hold and settle scripts (once; twice when an abandoned hold was returned). Credit
added within one step (``Credit.step``, a thirtieth of ``X402_CREDIT_SECONDS``) shares a lot
``lot:<expires>``, so a wallet holds at most ``LOTS_PER_LIFETIME + 1`` = 31 live lots; an emptied lot
is deleted. Beside the hash two sorted sets (member, score its expiry): the sign-in nonces it used
(the hold script) and the sources it was credited for (the add and convert scripts), of which a script
touches only the expired ones and the one asked (``ZREMRANGEBYSCORE``, ``ZSCORE``, ``ZADD``).

1. **Credit.** Exact payments (``harness.sign_headers``) of ``CHAT_BODY`` at max_tokens 4096, priced
   2470 and charged 5, each leave 2465 of change (``X-Credit-Added``, checked against
   ``catalog.usage.charge`` of the answer's usage; all in one lot, as they come within a step),
   until the credit covers every measured call at its priced maximum.
2. **Free vs credit.** Sequential calls of ``CHAT_BODY``, free and credit alternating (the order
   swapped every other pair), ``--calls`` of each after ``WARM_PAIRS`` warm-up pairs, one client
   session. A credit call carries only ``SIGN-IN-WITH-X``: the EIP-4361 fields of its own fresh
   402's ``extensions["sign-in-with-x"].info`` (one nonce per call), signed EIP-191 by the payer; all
   402s are fetched and all sign-ins signed before timing. The free call is the same request with
   ``X-Bench-Free: 1``, which ``benchmarks/free_wsgi.py`` serves through the same ``_serve_credit``
   with the payment replaced by nothing; its docstring says what that skips (``SignInGate.begin``:
   the sign-in checks, the signature and the hold script; ``SignInGate.settle``: the charge and the
   settle script; the header).

   Checked while measuring: every credit call is answered 200 with ``X-Credit-Charged`` = the usage
   price of its answer's usage and ``X-Credit-Balance`` = the previous balance less that charge;
   every free call 200 and marked served free; the chain did not move (payer and payee balances,
   relayer nonce); the credit at the end (``Credit.statement``) = the credit at the start - the sum
   charged.

   Pass 1 is the goal's, on the wallet as the funding left it. Pass 2 (``--busy-calls`` pairs, 0
   skips it) comes after ``--busy-nonces`` used nonces (3300) were added to the payer's set as the
   scripts add them: a nonce stays there ``MAX_AGE + FUTURE_SKEW`` = 330 s, so 3300 is what a wallet
   spending its credit 10 times a second carries. redis-server's own time per ``EVALSHA`` during
   each pass is read from ``INFO commandstats``.
3. **Parts, in-process** (no HTTP; a fresh wallet given credit with ``Credit.add``, sign-ins against
   challenges of ``SignInGate.extension``): wall and CPU time per call of each step of
   ``SignInGate.wallet`` (each in its own pass over all the sign-ins) and of ``wallet`` whole;
   ``SignInGate.begin`` and ``settle`` per call, redis-server's time per ``EVALSHA`` and a
   ``PING``; then the scripts alone, on fresh wallets shaped as ``SHAPES`` (``shaped_wallet``):
   ``SHAPE_CALLS`` ``Credit.add`` of a new source (an exact payment's change; the first one trims the
   expired sources), then as many ``Credit.hold`` (a fresh nonce) + ``Credit.settle``. The shapes:
   an empty wallet (one lot); the most a wallet reaches (31 lots; 44,640 sources, one payment a
   minute for the 31 days the live lots span, the oldest day's 1440 expired a moment ago; 3300 used
   nonces); and a wallet that paid so, then nothing for 29 days (41,760 of its 44,640 sources
   expired, still in the set: only an add or a convert trims it).

    python -m benchmarks.credit [--calls 200] [--busy-calls 100] [--busy-nonces 3300]

About 10 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
from eth_account import Account
from eth_account.messages import encode_defunct

from app.catalog import Model, load_catalog
from app.catalog.usage import Usage, charge
from app.payments.credit import HELD, LOTS_PER_LIFETIME, source_id
from app.payments.keys import CreditKeys, credit_keys, payment_key
from app.services import Services, build
from app.settings import Settings
from app.x402.challenge import CREDIT_ADDED_HEADER, CREDIT_BALANCE_HEADER, CREDIT_CHARGED_HEADER
from app.x402.codec import decode_header, encode_header
from app.x402.extensions import sign_in_with_x as siwx
from tests.support import CHAT_BODY

from .harness import (
    CHAT_PATH,
    Devnet,
    Gunicorn,
    Row,
    devnet,
    failed_answers_row,
    offered,
    percentile,
    print_table,
    session,
    sign_headers,
)
from .upto import floor_one_catalog, table

BENCH = "credit"
CALLS = 200  # measured calls of each kind
WARM_PAIRS = 5  # pairs left out of the latencies (connections, worker threads, script cache)
GOAL_MS = 2.0  # credit p50 - free p50
MAX_PAYMENTS = 50  # exact payments made at most to fund the credit
MODEL = str(CHAT_BODY["model"])
BODY: dict[str, Any] = dict(CHAT_BODY)  # the measured body: priced 51, charged 5 (floor-1 catalog)
BIG_BODY: dict[str, Any] = {**CHAT_BODY, "max_tokens": 4096}  # priced 2470, charged 5: change 2465
# as in benchmarks/free_wsgi.py (not imported here: importing it patches routes and builds the app)
FREE_HEADER, SERVED_FREE = "X-Bench-Free", "served"
NONCE_LIFE = siwx.MAX_AGE + siwx.FUTURE_SKEW  # seconds a used nonce stays in the wallet's set
BUSY_CALLS = 100  # pass 2: calls of each kind with ...
BUSY_NONCES = 10 * NONCE_LIFE  # ... this many used nonces put in the payer's set first (10 calls/s)
# Fresh wallets the scripts are timed on: (used nonces, lots, sources credited, of which expired). A
# payment a minute credits 44,640 sources in the 31 steps of 1 day the live lots span.
SHAPES = ((0, 1, 1, 0), (BUSY_NONCES, LOTS_PER_LIFETIME + 1, 44_640, 1440), (0, 1, 44_640, 41_760))
SHAPE_CALLS = 40  # adds, then hold + settle pairs, per shape

T = TypeVar("T")


def p_ms(samples: list[float], fraction: float = 0.5) -> float:
    """The median (or another percentile) of ``samples`` (seconds), in ms."""
    if not samples:
        return float("nan")
    return (statistics.median(samples) if fraction == 0.5 else percentile(samples, fraction)) * 1000


def mean_ms(samples: list[float]) -> float:
    return statistics.fmean(samples) * 1000 if samples else float("nan")


# --- the wallet in Redis ----------------------------------------------------------------------------


def wallet_keys(services: Services, payer: str) -> CreditKeys:
    return credit_keys(services.settings.network.chain_id, services.settings.asset, payer)


def sizes(services: Services, payer: str) -> tuple[int, int]:
    """(fields of the wallet's credit hash, used nonces in its set)."""
    keys = wallet_keys(services, payer)
    return services.ledger.redis.hlen(keys.wallet), services.ledger.redis.zcard(keys.nonces)


def sizes_text(before: tuple[int, int], after: tuple[int, int]) -> str:
    return "{}/{} -> {}/{}".format(*before, *after)


def put_used_nonces(services: Services, payer: str, count: int) -> None:
    """``count`` used nonces in ``payer``'s set as the scripts add them (member the nonce, score its
    expiry, the set kept as long): what ``count`` credit calls of the last ``NONCE_LIFE`` s leave."""
    if count:
        nonces, expires = wallet_keys(services, payer).nonces, int(time.time()) + NONCE_LIFE
        services.ledger.redis.zadd(nonces, {os.urandom(20).hex(): expires for _ in range(count)})
        services.ledger.redis.expire(nonces, NONCE_LIFE)


@dataclass
class ServerTime:
    """EVALSHA run by redis-server over a stretch of the benchmark (``INFO commandstats``)."""

    calls: int = 0
    usec: int = 0

    @property
    def ms(self) -> float:
        """redis-server's own time per EVALSHA."""
        return self.usec / self.calls / 1000 if self.calls else float("nan")


@contextmanager
def server_time(services: Services) -> Iterator[ServerTime]:
    def read() -> tuple[int, int]:
        stats = services.ledger.redis.info("commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("calls", 0)), int(stats.get("usec", 0))

    out, (calls, usec) = ServerTime(), read()
    yield out
    after = read()
    out.calls, out.usec = after[0] - calls, after[1] - usec


# --- signing in -----------------------------------------------------------------------------------


def sign_in_header(info: dict[str, Any], key: str) -> str:
    """A ``SIGN-IN-WITH-X`` value for the 402 challenge ``info``, signed EIP-191 by ``key`` (as
    ``tests/integration/test_credit.py``'s ``sign_in_header``; the message is the app's own
    ``message_text`` of the payload)."""
    account = Account.from_key(key)
    sent = ("domain", "statement", "uri", "version", "nonce", "issuedAt", "expirationTime")
    payload = {k: info[k] for k in sent if info.get(k) is not None}
    payload |= {"address": account.address, "chainId": "eip155:8453", "type": "eip191"}
    unsigned = siwx.parse(encode_header(payload | {"signature": "0x00"}))
    assert isinstance(unsigned, siwx.SignIn), unsigned
    signature = account.sign_message(encode_defunct(text=siwx.message_text(unsigned))).signature
    return encode_header(payload | {"signature": "0x" + bytes(signature).hex()})


def sign_ins(client: requests.Session, url: str, key: str, count: int) -> list[str]:
    """``count`` sign-ins, each against the challenge of its own fresh 402 for ``BODY``."""
    out = []
    for _ in range(count):
        response = client.post(url, json=BODY, timeout=30)
        assert response.status_code == 402, (response.status_code, response.text[:300])
        challenge = decode_header(response.headers["PAYMENT-REQUIRED"])
        out.append(sign_in_header(challenge["extensions"][siwx.SIGN_IN_WITH_X]["info"], key))
    assert len({decode_header(h)["nonce"] for h in out}) == count, "a nonce came twice"
    return out


def usage_of(response: requests.Response) -> Usage:
    usage = response.json()["usage"]
    return Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"]))


# --- 1. credit ------------------------------------------------------------------------------------


@dataclass
class Funding:
    price: int  # the 402's amount for BIG_BODY
    added: list[int] = field(default_factory=list)  # X-Credit-Added of each payment
    expected: list[int] = field(default_factory=list)  # price - the usage price of its answer
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.added == self.expected


def fund(dev: Devnet, client: requests.Session, url: str, model: Model, needed: int) -> Funding:
    """Exact payments of ``BIG_BODY`` until their change covers ``needed`` atomic units."""
    requirement = offered(url, BIG_BODY)
    funding = Funding(int(requirement["amount"]))
    while sum(funding.added) < needed and len(funding.added) < MAX_PAYMENTS:
        (header,) = sign_headers(requirement, dev.payer_key, 1)
        response = client.post(url, json=BIG_BODY, headers=header, timeout=30)
        if response.status_code != 200 or CREDIT_ADDED_HEADER not in response.headers:
            funding.errors.append(f"{response.status_code} {response.text[:200]}")
            break
        funding.added.append(int(response.headers[CREDIT_ADDED_HEADER]))
        funding.expected.append(funding.price - charge(model, usage_of(response), funding.price))
    return funding


# --- 2. free vs credit ----------------------------------------------------------------------------


@dataclass
class Calls:
    """The sequential pairs: latencies (seconds, warm-up left out) and what every answer said."""

    free: list[float] = field(default_factory=list)
    credit: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)  # "free 200", "credit 200", ...
    errors: list[str] = field(default_factory=list)
    charged: list[int] = field(default_factory=list)  # X-Credit-Charged of every credit call
    balances: list[int] = field(default_factory=list)  # X-Credit-Balance of every credit call
    mischarged: int = 0  # credit answers whose X-Credit-Charged is not the usage price of their usage
    unmarked_free: int = 0  # free answers without X-Bench-Free: served
    marked_credit: int = 0  # credit answers with it
    usage: Usage | None = None  # of the last credit answer

    def balances_follow(self, start: int) -> bool:
        """Each X-Credit-Balance = the one before (``start`` first) less the call's charge."""
        before = [start, *self.balances]
        return all(after == b - c for b, c, after in zip(before, self.charged, self.balances, strict=False))

    def diffs(self) -> list[float]:
        """credit - free of each pair (the pair's two calls were made one right after the other)."""
        return [c - f for f, c in zip(self.free, self.credit, strict=True)]


def alternate(
    client: requests.Session, url: str, headers: list[str], model: Model, maximum: int, warm: int
) -> Calls:
    calls = Calls()

    def call(sign_in: str | None) -> float:
        """One call, free (``sign_in`` None) or paid from credit; its latency."""
        kind = "free" if sign_in is None else "credit"
        started = time.perf_counter()
        sent = {FREE_HEADER: "1"} if sign_in is None else {siwx.HEADER: sign_in}
        response = client.post(url, json=BODY, headers=sent, timeout=30)
        elapsed = time.perf_counter() - started
        calls.statuses[f"{kind} {response.status_code}"] += 1
        if response.status_code != 200:
            calls.errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
        elif sign_in is None:
            calls.unmarked_free += response.headers.get(FREE_HEADER) != SERVED_FREE
        else:
            calls.marked_credit += FREE_HEADER in response.headers
            calls.usage = usage_of(response)
            calls.charged.append(int(response.headers.get(CREDIT_CHARGED_HEADER, "-1")))
            calls.balances.append(int(response.headers.get(CREDIT_BALANCE_HEADER, "-1")))
            calls.mischarged += calls.charged[-1] != charge(model, calls.usage, maximum)
        return elapsed

    for i, header in enumerate(headers):
        if i % 2 == 0:
            f, c = call(None), call(header)
        else:
            c, f = call(header), call(None)
        if i >= warm:
            calls.free.append(f)
            calls.credit.append(c)
    return calls


@dataclass(frozen=True)
class Snapshot:
    """Read before and after a pass: what only its charges may change, and the wallet's size."""

    credit: int  # the payer's balance (``Credit.statement``)
    chain: tuple[int, int, int]  # payer and payee balances, relayer nonce
    sizes: tuple[int, int]  # the wallet's hash fields and used nonces


def snapshot(dev: Devnet, services: Services) -> Snapshot:
    payer, wallets = dev.wallets.payer.lower(), dev.wallets
    chain = (
        dev.chain.balance(wallets.payer),
        dev.chain.balance(wallets.pay_to),
        dev.nonce_of(wallets.relayer),
    )
    return Snapshot(services.gate.credit.statement(payer).balance, chain, sizes(services, payer))


@dataclass
class Pass:
    """One run of alternating free/credit pairs, and what was read around it."""

    nonces: int  # used nonces put in the payer's set just before (0: as the earlier calls left it)
    calls: Calls
    before: Snapshot
    after: Snapshot
    signing_seconds: float  # the 402s fetched and the sign-ins signed, before timing
    header_bytes: int  # the length of a SIGN-IN-WITH-X value
    server: ServerTime  # EVALSHA run by redis-server during the calls

    @property
    def name(self) -> str:
        return f"{self.nonces} used nonces put in the set first" if self.nonces else "wallet as used"

    def added_ms(self) -> float:
        return p_ms(self.calls.credit) - p_ms(self.calls.free)

    def checks(self) -> dict[str, bool]:
        calls, start = self.calls, self.before.credit
        half = calls.statuses.total() / 2
        return {
            "every credit call 200": calls.statuses["credit 200"] == half and not calls.marked_credit,
            "every free call 200 and served free": calls.statuses["free 200"] == half
            and not calls.unmarked_free,
            "X-Credit-Charged = usage price": not calls.mischarged,
            "X-Credit-Balance = previous - charged": calls.balances_follow(start),
            "chain unchanged (payer, payee, relayer nonce)": self.before.chain == self.after.chain,
            "credit at end = start - sum charged": self.after.credit == start - sum(calls.charged),
        }


def run_pass(
    dev: Devnet,
    services: Services,
    client: requests.Session,
    url: str,
    model: Model,
    maximum: int,
    calls: int,
    nonces: int,
) -> Pass:
    put_used_nonces(services, dev.wallets.payer.lower(), nonces)
    total = calls + WARM_PAIRS
    print(f"... credit: {total} sign-ins (402 + signature each)", file=sys.stderr, flush=True)
    started = time.perf_counter()
    headers = sign_ins(client, url, dev.wallets.payer_key, total)
    signing = time.perf_counter() - started
    print(f"... credit: {total} free/credit pairs ({nonces} nonces put first)", file=sys.stderr, flush=True)
    before = snapshot(dev, services)
    with server_time(services) as server:
        measured = alternate(client, url, headers, model, maximum, WARM_PAIRS)
    return Pass(nonces, measured, before, snapshot(dev, services), signing, len(headers[0]), server)


# --- 3. parts, in-process -------------------------------------------------------------------------


def timed(fn: Callable[[T], object], items: list[T]) -> tuple[float, float]:
    """(wall, CPU) ms per item of ``fn`` over ``items``, one pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    for item in items:
        fn(item)
    n = len(items)
    return (time.perf_counter() - wall) / n * 1000, (time.process_time() - cpu) / n * 1000


@dataclass
class Shape:
    """The scripts on a fresh wallet with ``nonces`` used nonces, ``lots`` lots and ``sources``
    sources credited, ``expired`` of them expired (not trimmed yet)."""

    nonces: int
    lots: int
    sources: int
    expired: int
    add: list[float]  # Credit.add round trips (a new source each), seconds
    hold: list[float]  # Credit.hold round trips
    settle: list[float]  # Credit.settle round trips
    adds: ServerTime  # EVALSHA during the adds
    pairs: ServerTime  # ... during the holds and settles

    @property
    def name(self) -> str:
        return (
            f"{self.lots} lot{'s' * (self.lots != 1)}, {self.sources:,} source{'s' * (self.sources != 1)}"
            f" ({self.expired:,} expired), {self.nonces:,} used nonces"
        )

    def both_ms(self) -> float:
        return p_ms(self.hold) + p_ms(self.settle)


@dataclass
class Parts:
    steps: dict[str, tuple[float, float]]  # step -> (wall, CPU) ms per call
    begin: list[float]  # SignInGate.begin, seconds
    settle: list[float]  # SignInGate.settle (charge + the settle script)
    ping: list[float]
    server: ServerTime  # EVALSHA during the begin/settle pass
    sizes: tuple[tuple[int, int], tuple[int, int]]  # the wallet's (hash fields, used nonces) around it
    shapes: list[Shape]

    @property
    def count(self) -> int:
        return len(self.begin)


def shaped_wallet(services: Services, nonces: int, lots: int, sources: int, expired: int) -> str:
    """A fresh wallet (its payer) as the scripts leave it: ``lots`` lots of 10**9 a step apart, the
    newest the one credit added now goes to (written by ``Credit.add``: ``lot:<expires>`` =
    ``<left>:<expires>``, its source in the set), the oldest a minute away at least; the other
    sources (the ``source_id`` of ``change:<payment key>``) ``ZADD``ed with their lot's expiry as
    score (the expired ones a second ago); the used nonces as ``put_used_nonces``."""
    credit = services.gate.credit
    payer, now = "0x" + os.urandom(20).hex(), int(time.time())
    newest = -(-(now + 60 + credit.lifetime) // credit.step) * credit.step
    expiries = [newest - i * credit.step for i in range(lots)]
    for expires in expiries:
        assert credit.add(
            payer, source(services, payer), 10**9, "change", MODEL, "", expires - credit.lifetime
        )
    scores = [now - 1] * expired + [expiries[i % lots] for i in range(sources - lots - expired)]
    if scores:
        services.ledger.redis.zadd(
            wallet_keys(services, payer).sources,
            {source_id(source(services, payer)): score for score in scores},
        )
    put_used_nonces(services, payer, nonces)
    return payer


def source(services: Services, payer: str) -> str:
    """A new source of credit: the change of a payment of ``payer``'s."""
    settings = services.settings
    return f"change:{payment_key(settings.network.chain_id, settings.asset, payer, os.urandom(32))}"


def lap(fn: Callable[..., T], *args: Any, ok: Callable[[T], bool] = bool) -> float:
    """Seconds ``fn(*args)`` took; its result must be ``ok``."""
    started = time.perf_counter()
    result = fn(*args)
    elapsed = time.perf_counter() - started
    assert ok(result), result
    return elapsed


def by_shape(services: Services, amount: int, charged: int) -> list[Shape]:
    """On a fresh wallet of each of ``SHAPES``: ``SHAPE_CALLS`` ``Credit.add`` of a new source
    (``amount``), then as many ``Credit.hold`` (a fresh nonce) and ``Credit.settle`` (``charged``),
    as ``SignInGate.begin`` and ``settle`` call them. The wallets are deleted afterwards."""
    credit, out = services.gate.credit, []
    for shape in SHAPES:
        payer, now = shaped_wallet(services, *shape), int(time.time())
        with server_time(services) as adds:
            add = [
                lap(credit.add, payer, source(services, payer), amount, "change", MODEL, "", now)
                for _ in range(SHAPE_CALLS)
            ]
        hold: list[float] = []
        settle: list[float] = []
        with server_time(services) as pairs:
            for i in range(SHAPE_CALLS):
                nonce = os.urandom(20).hex()
                args = (payer, f"h{i}", amount, now + 600, nonce, now + NONCE_LIFE)
                hold.append(lap(credit.hold, *args, ok=lambda held: held.outcome == HELD))
                settle.append(lap(credit.settle, payer, f"h{i}", charged, MODEL, ok=lambda r: r is not None))
        services.ledger.redis.delete(*wallet_keys(services, payer))
        out.append(Shape(*shape, add, hold, settle, adds, pairs))
    return out


def measure_parts(services: Services, url: str, usage: Usage, count: int) -> Parts:
    gate, settings = services.gate, services.settings
    signin, credit = gate.signin, gate.credit
    origin = siwx.origin_of(url)
    account = Account.create()
    key, payer = "0x" + bytes(account.key).hex(), account.address.lower()
    credit.add(payer, "change:benchmark-parts", 10**9, "change", MODEL, "", int(time.time()))
    quote = services.catalog.quote("chat", dict(BODY))
    challenges = [signin.extension(url, origin) for _ in range(count)]
    headers = [sign_in_header(c["info"], key) for c in challenges if c is not None]
    assert len(headers) == count, "SignInGate.extension gave no challenge (Redis?)"
    sign_ins_ = [p for p in map(siwx.parse, headers) if isinstance(p, siwx.SignIn)]
    assert len(sign_ins_) == count, headers[:1]
    secret, network = signin.secret(), settings.network.caip2
    assert all(siwx.signer(s) == payer for s in sign_ins_)
    assert all(signin.wallet(h, origin)[0] == payer for h in headers[:5])
    steps = {
        "parse (base64, strict JSON, field checks)": timed(siwx.parse, headers),
        "check (domain, uri, chain, ISO 8601 times)": timed(
            lambda s: siwx.check(s, origin, network, time.time()), sign_ins_
        ),
        "nonce_issued (HMAC-SHA256)": timed(lambda s: siwx.nonce_issued(secret, s.nonce), sign_ins_),
        "signed_digest (EIP-4361 text, EIP-191 keccak)": timed(siwx.signed_digest, sign_ins_),
        "signer (digest + secp256k1 recovery + address)": timed(siwx.signer, sign_ins_),
        "SignInGate.wallet (all of the above)": timed(lambda h: signin.wallet(h, origin), headers),
    }

    before = sizes(services, payer)
    begin: list[float] = []
    settle: list[float] = []
    with server_time(services) as server:
        for header in headers:
            started = time.perf_counter()
            hold = signin.begin(quote, header, origin)
            held = time.perf_counter()
            assert signin.settle(hold, usage) is not None
            begin.append(held - started)
            settle.append(time.perf_counter() - held)
    after = sizes(services, payer)
    ping = []
    for _ in range(count):
        started = time.perf_counter()
        services.ledger.redis.ping()
        ping.append(time.perf_counter() - started)
    shapes = by_shape(services, quote.amount, charge(quote.model, usage, quote.amount))
    return Parts(steps, begin, settle, ping, server, (before, after), shapes)


# --- everything -----------------------------------------------------------------------------------


@dataclass
class Results:
    funding: Funding
    passes: list[Pass]  # the first is the goal's
    parts: Parts
    body_price: int  # the 402's amount for BODY: what a credit call holds


def measure_all(calls: int = CALLS, busy_calls: int = BUSY_CALLS, busy_nonces: int = BUSY_NONCES) -> Results:
    with devnet() as dev, tempfile.TemporaryDirectory(prefix="x402-credit-bench-") as tmp:
        catalog = floor_one_catalog(tmp)
        model = load_catalog(catalog)[MODEL]
        env = dev.proxy_env(X402_CATALOG=str(catalog))
        settings = Settings.from_env(
            env={}, overrides={k: v for k, v in env.items() if k.startswith(("X402_", "REDIS_"))}
        )
        services = build(settings)
        with Gunicorn("benchmarks.free_wsgi:app", env) as proxy:
            url = proxy.url + CHAT_PATH
            client = session()
            try:
                body_price = int(offered(url, BODY)["amount"])
                plan = [(calls, 0)] + ([(busy_calls, busy_nonces)] if busy_calls else [])
                needed = sum(n + WARM_PAIRS for n, _ in plan) * body_price
                print("... credit: exact payments", file=sys.stderr, flush=True)
                funding = fund(dev, client, url, model, needed)
                passes = [
                    run_pass(dev, services, client, url, model, body_price, n, nonces) for n, nonces in plan
                ]
            finally:
                client.close()
            print("... credit: parts, in-process", file=sys.stderr, flush=True)
            usage = passes[0].calls.usage or Usage(6, 5)
            parts = measure_parts(services, url, usage, calls + WARM_PAIRS)
    return Results(funding, passes, parts, body_price)


# --- report ---------------------------------------------------------------------------------------


def checks(res: Results) -> dict[str, bool]:
    """Every check of every pass (named with its pass when there are several), and the funding's."""
    out = {"funding: X-Credit-Added = price - usage price": res.funding.ok}
    for i, one in enumerate(res.passes):
        for name, ok in one.checks().items():
            out[f"{name} (pass {i + 1})" if len(res.passes) > 1 else name] = ok
    return out


def latency_table(res: Results) -> str:
    def lat(samples: list[float]) -> tuple[str, ...]:
        return str(len(samples)), *(
            f"{x:.2f} ms" for x in (p_ms(samples), p_ms(samples, 0.9), mean_ms(samples))
        )

    cells, lines = [], []
    for i, one in enumerate(res.passes, 1):
        calls, added = one.calls, one.added_ms()
        grew = sizes_text(one.before.sizes, one.after.sizes)
        server, diffs = f"{one.server.calls} x {one.server.ms:.3f} ms", f"{p_ms(calls.diffs()):+.2f} ms"
        cells.append((f"{i}. {one.name}", "free", *lat(calls.free), "", "", "", ""))
        cells.append(("", "credit", *lat(calls.credit), f"{added:+.2f} ms", diffs, grew, server))
        lines.append(
            f"pass {i}: credit - free p50 {added:+.2f} ms (goal <= {GOAL_MS:g} ms: "
            f"{'met' if added <= GOAL_MS else 'MISSED'}), mean "
            f"{mean_ms(calls.credit) - mean_ms(calls.free):+.2f} ms, ratio of p50s "
            f"{p_ms(calls.credit) / p_ms(calls.free):.2f}"
        )
    header = "pass|call|n|p50|p90|mean|credit - free p50|p50 of pair diffs|hash fields/used nonces|EVALSHA"
    return "\n".join([table(tuple(header.split("|")), cells), *lines])


def parts_table(res: Results) -> str:
    parts = res.parts
    cells = [(name, f"{wall:.3f}", f"{cpu:.3f}") for name, (wall, cpu) in parts.steps.items()]
    cells += [
        (name, f"{value:.3f}", "")
        for name, value in (
            ("SignInGate.begin (wallet + hold script round trip)", p_ms(parts.begin)),
            ("SignInGate.settle (charge + settle script round trip)", p_ms(parts.settle)),
            ("begin + settle (what a credit call adds in the app)", app_ms(parts)),
            ("redis-server time per EVALSHA (INFO commandstats)", parts.server.ms),
            ("PING round trip (redis-py, same connection pool)", p_ms(parts.ping)),
        )
    ]
    legend = (
        f"{parts.count} sign-ins; steps: mean over one pass each; begin/settle/PING: p50; the scripts "
        f"alone: the next table. The wallet's hash fields/used nonces went {sizes_text(*parts.sizes)}."
    )
    return f"{table(('part (in-process, no HTTP)', 'wall ms/call', 'CPU ms/call'), cells)}\n{legend}"


def app_ms(parts: Parts) -> float:
    return p_ms(parts.begin) + p_ms(parts.settle)


def shapes_table(res: Results) -> str:
    def ms(s: Shape) -> tuple[float, ...]:
        return s.add[0] * 1000, p_ms(s.add), s.adds.ms, p_ms(s.hold), p_ms(s.settle), s.pairs.ms

    cells = [(s.name, *(f"{x:.3f}" for x in ms(s))) for s in res.parts.shapes]
    headers = ("wallet", "1st add", "add p50", "server/add", "hold p50", "settle p50", "server/hold|settle")
    return f"{table(headers, cells)}\nms; server: redis-server's own time per EVALSHA (INFO commandstats)"


def checks_text(res: Results) -> str:
    funding = res.funding
    lines = [f"  {'yes' if ok else 'NO '}  {name}" for name, ok in checks(res).items()]
    lines.append(
        f"  funding: {len(funding.added)} exact payments of {funding.price} (max_tokens 4096), change "
        f"{'+'.join(str(a) for a in funding.added) or '-'} = {sum(funding.added)}; each credit call "
        f"holds {res.body_price}"
    )
    for i, one in enumerate(res.passes, 1):
        calls = one.calls
        charged = ", ".join(f"{n} x {c}" for c, n in Counter(calls.charged).most_common())
        lines.append(
            f"  pass {i}: credit {one.before.credit} -> {one.after.credit}, charged {sum(calls.charged)} "
            f"over {len(calls.charged)} credit calls ({charged}); chain (payer, payee, relayer nonce) "
            f"{one.before.chain} -> {one.after.chain}; {len(calls.charged)} sign-ins of "
            f"{one.header_bytes} bytes made in {one.signing_seconds:.1f} s before timing"
        )
    errors = funding.errors + [e for one in res.passes for e in one.calls.errors]
    if errors:
        lines.append(f"  errors: {errors[:3]}")
    return "\n".join(lines)


def pass_row(one: Pass) -> Row:
    calls, added = one.calls, one.added_ms()
    figure = "credit p50 - free p50 (sequential, model 0 ms)"
    return Row(
        BENCH,
        f"the same, {one.nonces} used nonces in the wallet's set" if one.nonces else figure,
        f"{added:+.2f} ms",
        f"{p_ms(calls.free):.2f} ms free",
        f"{p_ms(calls.credit) / p_ms(calls.free):.2f}",
        f"<= {GOAL_MS:g} ms",
        added <= GOAL_MS,
        f"{len(calls.credit)} calls each, credit p50 {p_ms(calls.credit):.2f} ms "
        f"(p90 {p_ms(calls.credit, 0.9):.2f}), free p90 {p_ms(calls.free, 0.9):.2f} ms; "
        f"p50 of pairwise differences {p_ms(calls.diffs()):+.2f} ms; redis-server "
        f"{one.server.ms:.3f} ms per EVALSHA",
    )


def rows(res: Results) -> list[Row]:
    parts = res.parts
    all_ok = all(checks(res).values())
    out = [pass_row(one) for one in res.passes]
    out += [
        Row(
            BENCH,
            "in-process: SignInGate.begin + settle per call",
            f"{app_ms(parts):.2f} ms",
            goal="report",
            note=f"wallet checks {parts.steps['SignInGate.wallet (all of the above)'][0]:.2f} ms "
            f"(signer {parts.steps['signer (digest + secp256k1 recovery + address)'][0]:.2f}), "
            f"PING {p_ms(parts.ping):.2f} ms; hold + settle with "
            + ", ".join(f"{s.name} {s.both_ms():.2f} ms (add {p_ms(s.add):.2f})" for s in parts.shapes),
        ),
        Row(
            BENCH,
            "charged = usage price, chain still, credit = start - charged",
            "yes" if all_ok else "NO",
            goal="all",
            passed=all_ok,
            note=", ".join(name for name, ok in checks(res).items() if not ok),
        ),
    ]
    statuses: Counter[int] = Counter()
    for one in res.passes:
        statuses.update({int(k.split()[1]): v for k, v in one.calls.statuses.items()})
    errors = [e for one in res.passes for e in one.calls.errors]
    failed = failed_answers_row(BENCH, dict(statuses), errors)
    if failed is not None:
        failed.figure = "calls not answered 200 (free or credit)"
        out.append(failed)
    return out


def report(res: Results) -> str:
    return "\n".join(
        [
            f"1-2. Sequential calls of CHAT_BODY, free and credit alternating after {WARM_PAIRS} warm-up "
            "pairs (model 0 ms)\n",
            latency_table(res),
            "",
            "Checks:",
            checks_text(res),
            "",
            "3. Parts of the credit payment, in-process\n",
            parts_table(res),
            "",
            f"The scripts alone by the wallet's shape ({SHAPE_CALLS} calls each, in-process)\n",
            shapes_table(res),
        ]
    )


def run(calls: int = CALLS, busy_calls: int = BUSY_CALLS) -> list[Row]:
    return rows(measure_all(calls, busy_calls))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=CALLS, help="measured calls of each kind, pass 1")
    parser.add_argument("--busy-calls", type=int, default=BUSY_CALLS, help="the same for pass 2 (0: skip it)")
    parser.add_argument(
        "--busy-nonces", type=int, default=BUSY_NONCES, help="used nonces put in the set before pass 2"
    )
    args = parser.parse_args()
    if args.calls < 1 or args.busy_calls < 0 or args.busy_nonces < 0:
        parser.error("--calls must be at least 1, --busy-calls and --busy-nonces at least 0")
    started = time.monotonic()
    print(f"# {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    res = measure_all(args.calls, args.busy_calls, args.busy_nonces)
    print()
    print(report(res))
    print()
    print_table(rows(res))
    print(f"\nruntime {time.monotonic() - started:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
