"""``batch-settlement`` against its goals, side by side in one run: a voucher-paid call beside the same
call free, paid calls/s beside our ``exact`` and the reference stack, and the gas of a claim.

Set-up, as the other benchmarks: anvil (automine), redis-server, the stand-in model answering at
once (0 ms), the proxy under gunicorn (``gunicorn.conf.py``, 2 workers x 32 threads). Channels are
opened as the official PyPI client opens them: one call whose payload carries an ERC-3009 deposit
and the first voucher (``create_batch_settlement_eip3009_deposit_payload``, the config
``build_channel_config`` makes; ``tests/interop/test_batch_clients.py``'s ``deposit_header``), which
the proxy's relayer sends to the escrow. Every later call carries a voucher only, whose
``maxClaimableAmount`` must be exactly what the channel was charged so far plus this call's maximum.
The charge of an answer is its usage price, which for the stand-in (it always reports 6 + 5 tokens)
is the same every call: the vouchers are signed before timing on that assumption (the first of each
channel with the official client's ``sign_voucher``, the rest with ``app.x402.eip712.sign_digest``
of ``voucher_digest``, which signs the same bytes: RFC 6979 signatures are deterministic, and the
first of each channel is compared), and every answer's ``PAYMENT-RESPONSE``
``extra.channelState.chargedCumulativeAmount`` and ``extra.chargedAmount`` are checked against it
(a charge that differs would make the rest of the channel's vouchers stale; in part 1 they are then
signed again from what was charged, outside the timed window, and counted).

1. **Latency** (goal: at most 1 ms added at p50). The proxy runs as ``benchmarks.free_wsgi:app``
   with the packaged catalog copied with ``floor = 1`` (as ``benchmarks.credit``): ``CHAT_BODY`` is
   priced 51 and charged 5, so the voucher accounting follows the usage price, not the maximum.
   One channel is opened, then ``--calls`` sequential pairs (after ``WARM_PAIRS``) of a voucher-paid
   call and the same request with ``X-Bench-Free: batch`` instead of ``PAYMENT-SIGNATURE``, order
   swapped every other pair, one keep-alive session. ``free_wsgi`` serves the free one through the
   same ``_serve_batch`` with the payment replaced by constants; its docstring says exactly what
   that skips. Checked: every call 200, free ones marked served free, every charge = the usage price
   of its answer, the cumulative amounts follow one another, Redis's ``charged`` = the last one, the
   chain did not move (block number, payer, payee, escrow, relayer nonce). Then, **in-process**, on
   the same channel (``app.services.build``): each step of a voucher call's payment timed alone, and
   ``BatchGate.begin`` + ``commit`` + ``response_header`` per call with a cProfile of them.
2. **Throughput** (goals: at least 10 x the reference stack, 3 x our ``exact``). 16 clients,
   closed loop, each on its own channel of its own payer wallet (16 wallets, minted before the chain
   snapshot), each channel opened by its deposit and warmed with ``WARM_CALLS`` voucher calls
   before timing; then ``--seconds`` of voucher-paid calls. Beside it, ``benchmarks.throughput``'s
   runs of our ``exact`` (``wsgi:app``) and of the reference stack, with its machinery (the chain
   reset and Redis emptied before every run, ``ChainReset.abba``; ``--rounds N`` runs each setup N
   times in ABBA order). All three use the packaged catalog (``CHAT_BODY`` priced 1000, the floor;
   the voucher calls are charged 1000 too, what ``charge`` gives for the stand-in's usage). Checked
   after the batch run: every answer's charge = the usage price of its answer; per channel the last
   ``chargedCumulativeAmount`` = the one before the window + the sum of its answers' charges =
   Redis's ``charged``; the sum over channels = the sum of the usage prices answered; and during the
   window nothing happened on chain (block number, payee, escrow and payers' token balances,
   relayer nonce: vouchers need no transaction). A fourth setup, reported without a goal, sends the
   same calls with ``X-Bench-Free: batch`` to ``benchmarks.free_wsgi:app`` (shared headers, no
   channel): the calls/s the serving path allows on this machine without the payment, the ceiling
   of the batch figure.
3. **Gas** (reported; no goal). On the part-1 proxy (its own claim loop kept out of the way with
   ``X402_CLAIM_INTERVAL=3600``), ``MAX_CLAIMS_PER_BATCH`` (100) channels of one payer (salts 1..100)
   are opened, each with a deposit call and ``FIRST_CALLS - 1`` voucher calls (8 threads), then
   claimed by ``Claims.claim`` (``ClaimLoop.for_settings``, as the CLI builds it): one
   ``claimWithSignature``, whose receipt's ``gasUsed`` is read. Then ``SECOND_CALLS`` more calls on
   each channel and a second claim (every slot it writes is then already non-zero, as in steady
   operation), then ``Claims.settle`` (one ``settle`` to payTo). Each claim is checked: one
   transaction, 100 channels, its amount = what Redis charged, each channel's ``totalClaimed`` on
   chain = Redis's ``charged``. Gas per paid call = the claim's gas / 100 / calls per channel per
   claim (1 and 10 shown), beside ``exact``'s: two exact payments on the same proxy and chain,
   the ``gasUsed`` of each settlement's receipt (the second: the payee's balance already non-zero).
   The deposits' own gas (once per channel) is reported beside it.

    python -m benchmarks.batch [--calls 200] [--seconds 10] [--clients 16] [--rounds 1]
                               [--skip-reference]

About 60-75 s on 2 cores with the defaults.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
import requests
from eth_account import Account

from app.catalog import Model, load_catalog
from app.catalog.usage import Usage, charge
from app.payments.claims import MAX_CLAIMS_PER_BATCH, ClaimLoop, ClaimRun, SettleRun, stop_all
from app.payments.keys import channel_key
from app.services import Services, build
from app.settings import DEFAULT_CATALOG, Settings
from app.x402.batch_settlement import (
    BATCH_SETTLEMENT_ADDRESS,
    SCHEME,
    check_signed,
    payload_of,
    voucher_digest,
)
from app.x402.checks import match_requirement
from app.x402.codec import decode_header, encode_header
from app.x402.eip712 import sign_digest
from tests.interop.test_batch_clients import deposit_header, honest_config, voucher_header
from tests.support import CHAT_BODY

from .credit import FREE_HEADER, SERVED_FREE, ServerTime, mean_ms, p_ms, server_time, timed, usage_of
from .harness import (
    CHAT_PATH,
    ChainReset,
    CpuMeter,
    Devnet,
    Gunicorn,
    LoadParser,
    Row,
    devnet,
    failed_answers_row,
    print_table,
    session,
    sign_headers,
)
from .load import LoadResult, paid_load
from .throughput import REFERENCE_PRICE, Run, describe, pooled, settlement_rows
from .throughput import measure as measure_stack
from .upto import challenge, entry, floor_one_catalog, table

BENCH = "batch"
CALLS = 200  # part 1: measured pairs
WARM_PAIRS = 5  # part 1: pairs left out (connections, worker threads, script cache)
GOAL_MS = 1.0  # voucher p50 - free p50
SECONDS = 10.0  # part 2: measured seconds per run
CLIENTS = 16
ROUNDS = 1
GOAL_VS_REFERENCE = 10.0
GOAL_VS_EXACT = 3.0
WARM_CALLS = 4  # part 2: voucher calls per channel after its deposit, before timing
RATE_FLOOR = 400  # part 2: calls/s to sign vouchers for at least
MAX_PER_LANE = 4_000  # part 2: vouchers signed per channel at most (the deposit covers 5,000 calls)
LOAD_DEPOSIT = 5_000 * 1000  # part 2: each channel's deposit (atomic units; 5,000 calls at 1000)
LOAD_PAYER_USDC = 10 * 10**6  # part 2: minted to each of the 16 payers
FIRST_CALLS = 2  # part 3: calls per channel before the first claim (the deposit call among them)
SECOND_CALLS = 3  # part 3: calls per channel between the first and the second claim
GAS_THREADS = 8
HEADER = "PAYMENT-SIGNATURE"
FREE_BATCH = "batch"  # as benchmarks/free_wsgi.py (not imported here: importing it patches routes)
MODEL = str(CHAT_BODY["model"])
BODY: dict[str, Any] = dict(CHAT_BODY)
# "ours" is our exact, as benchmarks.throughput names it; "free" the same calls served free (a ceiling)
SETUPS = ("batch", "ours", "reference", "free")


# --- channels and vouchers ------------------------------------------------------------------------


def batch_entry(url: str) -> dict[str, Any]:
    """The ``batch-settlement`` requirement of a real 402 for ``BODY``."""
    return entry(challenge(url, BODY), SCHEME)


def settled(response: requests.Response) -> dict[str, Any]:
    """The decoded ``PAYMENT-RESPONSE`` ({} when absent or not decodable)."""
    try:
        value = decode_header(response.headers.get("PAYMENT-RESPONSE", ""))
    except Exception:
        return {}
    return value if isinstance(value, dict) else {}


def cumulative_of(answer: dict[str, Any]) -> int:
    return int(answer["extra"]["channelState"]["chargedCumulativeAmount"])


@dataclass
class Channel:
    """One channel opened by its deposit call: its payer key, requirement, id, the voucher wire the
    official client built (to swap the voucher into), what it was charged so far, the deposit's
    transaction and the charge of the deposit call."""

    key: str
    requirement: dict[str, Any]
    channel_id: bytes
    template: dict[str, Any]
    charged: int
    deposit_tx: str
    first_charge: int

    @property
    def maximum(self) -> int:
        return int(self.requirement["amount"])

    @property
    def chain_id(self) -> int:
        return int(str(self.requirement["network"]).split(":")[1])

    def voucher(self, cumulative: int) -> dict[str, str]:
        """A ``PAYMENT-SIGNATURE`` for a voucher of ``cumulative`` on this channel, signed now."""
        signature = sign_digest(
            bytes.fromhex(self.key[2:]), voucher_digest(self.channel_id, cumulative, self.chain_id)
        )
        payload = dict(self.template["payload"])
        payload["voucher"] = {
            "channelId": "0x" + self.channel_id.hex(),
            "maxClaimableAmount": str(cumulative),
            "signature": "0x" + signature.hex(),
        }
        return {HEADER: encode_header({**self.template, "payload": payload})}

    def vouchers(self, count: int, each: int) -> list[dict[str, str]]:
        """``count`` vouchers for the next calls, each assumed charged ``each``."""
        return [self.voucher(self.charged + i * each + self.maximum) for i in range(count)]


def open_channel(
    client: requests.Session, url: str, requirement: dict[str, Any], key: str, salt: int, deposit: int
) -> Channel:
    """A channel of ``key``'s with ``salt``, opened by a deposit call (the official client's payload);
    the official ``sign_voucher`` and ours are checked to sign the same bytes."""
    config = honest_config(requirement, key, "0x" + salt.to_bytes(32, "big").hex())
    maximum = int(requirement["amount"])
    header = deposit_header(requirement, config, key, deposit, maximum)
    response = client.post(url, json=BODY, headers={HEADER: header}, timeout=60)
    answer = settled(response)
    assert response.status_code == 200 and answer.get("success"), (response.status_code, response.text[:300])
    state = answer["extra"]["channelState"]
    official = decode_header(voucher_header(requirement, config, 2 * maximum, key)[HEADER])
    channel = Channel(
        key,
        requirement,
        bytes.fromhex(state["channelId"][2:]),
        official,
        cumulative_of(answer),
        str(answer.get("transaction", "")),
        int(answer["extra"]["chargedAmount"]),
    )
    ours = decode_header(channel.voucher(2 * maximum)[HEADER])
    assert ours == official, "our voucher differs from the official client's"
    return channel


def redis_charged(dev: Devnet, channel: Channel) -> int:
    """The channel's ``charged`` in Redis (-1 when absent)."""
    with redis.Redis.from_url(dev.redis.url) as node:
        value = node.hget(channel_key(channel.chain_id, channel.channel_id), "charged")
    return int(value) if value is not None else -1


@dataclass(frozen=True)
class ChainState:
    """What a voucher call must not change: block number, token balances of payee, escrow and the
    payers, and the relayer's account nonce."""

    block: int
    balances: tuple[int, ...]
    nonce: int


def chain_state(dev: Devnet, payers: list[str]) -> ChainState:
    holders = [dev.wallets.pay_to, BATCH_SETTLEMENT_ADDRESS, *payers]
    return ChainState(
        int(dev.chain.rpc.call("eth_blockNumber", []), 16),
        tuple(dev.chain.balance(h) for h in holders),
        dev.nonce_of(dev.wallets.relayer),
    )


def env_settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(
        env={}, overrides={k: v for k, v in env.items() if k.startswith(("X402_", "REDIS_"))}
    )


# --- 1. latency: voucher vs free --------------------------------------------------------------------


@dataclass
class Pairs:
    free: list[float] = field(default_factory=list)
    paid: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    mischarged: int = 0  # chargedAmount != the usage price of the answer
    out_of_step: int = 0  # chargedCumulativeAmount != the previous + chargedAmount
    resigned: int = 0  # vouchers signed again (a charge differed from the assumed one)
    unmarked_free: int = 0
    charges: Counter[int] = field(default_factory=Counter)
    before: ChainState | None = None
    after: ChainState | None = None
    redis_charged: int = 0
    final: int = 0  # the last chargedCumulativeAmount answered
    server: ServerTime = field(default_factory=ServerTime)
    header_bytes: int = 0

    def added_ms(self) -> float:
        return p_ms(self.paid) - p_ms(self.free)

    def diffs(self) -> list[float]:
        return [p - f for f, p in zip(self.free, self.paid, strict=True)]

    def checks(self) -> dict[str, bool]:
        half = self.statuses.total() / 2
        return {
            "every voucher call 200": self.statuses["voucher 200"] == half,
            "every free call 200 and served free": self.statuses["free 200"] == half
            and not self.unmarked_free,
            "chargedAmount = usage price of the answer": not self.mischarged,
            "chargedCumulativeAmount = previous + chargedAmount": not self.out_of_step,
            "Redis charged = last chargedCumulativeAmount": self.redis_charged == self.final,
            "chain unchanged (block, payer, payee, escrow, relayer nonce)": self.before == self.after,
        }


def alternate(
    client: requests.Session, url: str, channel: Channel, model: Model, calls: int, warm: int
) -> Pairs:
    pairs = Pairs()
    each = channel.first_charge
    vouchers = channel.vouchers(calls + warm, each)
    pairs.header_bytes = len(vouchers[0][HEADER])

    def call(header: dict[str, str] | None) -> float:
        kind = "free" if header is None else "voucher"
        sent = {FREE_HEADER: FREE_BATCH} if header is None else header
        started = time.perf_counter()
        response = client.post(url, json=BODY, headers=sent, timeout=30)
        elapsed = time.perf_counter() - started
        pairs.statuses[f"{kind} {response.status_code}"] += 1
        if response.status_code != 200:
            pairs.errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
        elif header is None:
            pairs.unmarked_free += response.headers.get(FREE_HEADER) != SERVED_FREE
        else:
            answer = settled(response)
            amount, cumulative = int(answer["extra"]["chargedAmount"]), cumulative_of(answer)
            pairs.charges[amount] += 1
            pairs.mischarged += amount != charge(model, usage_of(response), channel.maximum)
            pairs.out_of_step += cumulative != channel.charged + amount
            channel.charged = pairs.final = cumulative
        return elapsed

    for i in range(calls + warm):
        if i % 2 == 0:
            f, p = call(None), call(vouchers[i])
        else:
            p, f = call(vouchers[i]), call(None)
        if i >= warm:
            pairs.free.append(f)
            pairs.paid.append(p)
        if i + 1 < len(vouchers) and channel.charged + channel.maximum != int(
            decode_header(vouchers[i + 1][HEADER])["payload"]["voucher"]["maxClaimableAmount"]
        ):  # the charge was not the one assumed: the rest signed again, outside the timing
            vouchers[i + 1 :] = channel.vouchers(len(vouchers) - i - 1, each)
            pairs.resigned += len(vouchers) - i - 1
    return pairs


# --- 1b. parts, in-process ---------------------------------------------------------------------------


@dataclass
class Parts:
    steps: dict[str, tuple[float, float]]  # step -> (wall, CPU) ms per call
    begin: list[float]
    commit: list[float]
    header: list[float]
    ping: list[float]
    server: ServerTime
    profile: list[tuple[float, float, str]]  # (own ms per call, calls per call, function)

    @property
    def count(self) -> int:
        return len(self.begin)

    def app_ms(self) -> float:
        return p_ms(self.begin) + p_ms(self.commit) + p_ms(self.header)


def measure_parts(services: Services, channel: Channel, usage: Usage, count: int) -> Parts:
    """The payment of a voucher call, in-process on ``channel`` (its Redis state as the proxy left
    it): each step alone over ``count`` payments, then ``begin`` + ``commit`` + ``response_header``
    per call, then the same under cProfile."""
    batch = services.gate.batch
    assert batch is not None, "batch-settlement is not offered"
    try:
        quote = services.catalog.quote("chat", dict(BODY))
        each = charge(quote.model, usage, quote.amount)
        headers = [h[HEADER] for h in channel.vouchers(count, each)]
        wires = [decode_header(h) for h in headers]
        payments = [payload_of(w) for w in wires]
        requirement = batch.requirement(quote)
        terms = batch.terms(requirement)
        steps = {
            "decode_header (base64, JSON)": timed(decode_header, headers),
            "payload_of (parse_batch_payment)": timed(payload_of, wires),
            "requirement + match_requirement": timed(
                lambda p: match_requirement(p, batch.requirement(quote)), payments
            ),
            "check_signed (config, digest, ECDSA recovery)": timed(
                lambda p: check_signed(p, terms), payments
            ),
            "charge (usage price)": timed(lambda _: charge(quote.model, usage, quote.amount), payments),
        }
        begin: list[float] = []
        commit: list[float] = []
        header: list[float] = []

        def pay(payment: Any) -> None:
            t0 = time.perf_counter()
            hold = batch.begin(quote, payment)
            t1 = time.perf_counter()
            charged = batch.commit(hold, usage)
            t2 = time.perf_counter()
            batch.response_header(hold, charged)
            t3 = time.perf_counter()
            assert charged.state is not None and charged.amount == each, charged
            begin.append(t1 - t0)
            commit.append(t2 - t1)
            header.append(t3 - t2)

        half = count // 2
        with server_time(services) as server:
            for payment in payments[:half]:
                pay(payment)
        profiler = cProfile.Profile()
        profiler.enable()
        for payment in payments[half:]:
            pay(payment)
        profiler.disable()
        del begin[half:], commit[half:], header[half:]
        channel.charged += count * each
        ping = []
        for _ in range(half):
            started = time.perf_counter()
            services.ledger.redis.ping()
            ping.append(time.perf_counter() - started)
    finally:
        stop_all()  # begin started this process's claim loop: nothing may claim behind us
    own = own_times(pstats.Stats(profiler), count - half)
    profile = sorted(((t * 1000, calls, name) for name, (t, calls) in own.items()), reverse=True)[:14]
    return Parts(steps, begin, commit, header, ping, server, profile)


# --- 1c. the whole request, in-process --------------------------------------------------------------


@dataclass
class Wsgi:
    """Whole requests through the app's WSGI callable, in-process (no sockets, no gunicorn): the
    free and voucher calls alternating, then each kind under cProfile, and the functions whose own
    time per request grew most from free to voucher."""

    free: list[float]
    paid: list[float]
    statuses: Counter[str]
    per_call: tuple[float, float]  # profiled seconds per request: free, voucher
    grown: list[tuple[float, float, str]]  # (voucher - free own ms/request, calls/request, function)

    def added_ms(self) -> float:
        return p_ms(self.paid) - p_ms(self.free)


def own_times(stats: pstats.Stats, requests_count: int) -> dict[str, tuple[float, float]]:
    """function -> (own seconds, calls) per request."""
    out: dict[str, tuple[float, float]] = {}
    for (path, line, name), (_cc, calls, own, _cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = path.split("site-packages/")[-1].split("/work/main/")[-1]
        out[f"{short}:{line}({name})"] = (own / requests_count, calls / requests_count)
    return out


def measure_wsgi(settings: Settings, channel: Channel, usage: Usage, count: int) -> Wsgi:
    from werkzeug.test import EnvironBuilder

    from app import create_checked_app

    from . import free_wsgi  # patches app.web.routes.serve in this process: see its docstring

    app = create_checked_app(settings)
    body = json.dumps(BODY).encode()
    each = charge(load_catalog(settings.catalog_path)[MODEL], usage, channel.maximum)
    statuses: Counter[str] = Counter()

    def environ(headers: dict[str, str]) -> dict[str, Any]:
        return EnvironBuilder(
            path=CHAT_PATH,
            method="POST",
            data=body,
            content_type="application/json",
            headers=headers,
            base_url="http://127.0.0.1:8402",
        ).get_environ()

    def call(kind: str, env: dict[str, Any]) -> float:
        status: list[str] = []

        def start_response(line: str, headers: list[Any], exc_info: Any = None) -> None:
            status.append(line.split()[0])

        started = time.perf_counter()
        b"".join(app(env, start_response))
        elapsed = time.perf_counter() - started
        statuses[f"{kind} {status[0] if status else '?'}"] += 1
        return elapsed

    free_env = {free_wsgi.FREE_HEADER: free_wsgi.FREE_BATCH}
    try:
        paid_envs = [environ(h) for h in channel.vouchers(2 * count, each)]
        channel.charged += 2 * count * each
        free_envs = [environ(free_env) for _ in range(2 * count)]
        free: list[float] = []
        paid: list[float] = []
        for i in range(count):
            if i % 2 == 0:
                free.append(call("free", free_envs[i]))
                paid.append(call("voucher", paid_envs[i]))
            else:
                paid.append(call("voucher", paid_envs[i]))
                free.append(call("free", free_envs[i]))
        profiled: dict[str, dict[str, tuple[float, float]]] = {}
        per_call: list[float] = []
        for kind, envs in (("free", free_envs[count:]), ("voucher", paid_envs[count:])):
            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.enable()
            for env in envs:
                call(kind, env)
            profiler.disable()
            per_call.append((time.perf_counter() - started) / count)
            profiled[kind] = own_times(pstats.Stats(profiler), count)
    finally:
        stop_all()
    grown = [
        ((own - profiled["free"].get(name, (0.0, 0.0))[0]) * 1000, calls, name)
        for name, (own, calls) in profiled["voucher"].items()
    ]
    grown.sort(reverse=True)
    return Wsgi(free, paid, statuses, (per_call[0], per_call[1]), grown[:16])


# --- 3. gas -------------------------------------------------------------------------------------------


def receipt_gas(dev: Devnet, tx_hash: str) -> int:
    receipt = dev.chain.rpc.call("eth_getTransactionReceipt", [tx_hash])
    assert receipt and receipt["status"] == "0x1", (tx_hash, receipt)
    return int(receipt["gasUsed"], 16)


@dataclass
class Claimed:
    """One ``Claims.claim`` of the gas part and what was checked of it."""

    run: ClaimRun
    calls_per_channel: int
    charged: int  # what Redis charged and had not been claimed before, over the channels
    on_chain_ok: bool  # each channel's totalClaimed = Redis charged

    @property
    def gas(self) -> int:
        return self.run.gas_used

    @property
    def ok(self) -> bool:
        return (
            len(self.run.transactions) == 1
            and not self.run.failed
            and self.run.channels == MAX_CLAIMS_PER_BATCH
            and self.run.amount == self.charged
            and self.on_chain_ok
        )


@dataclass
class Gas:
    claims: list[Claimed]
    settle: SettleRun
    deposits: list[int]  # gasUsed of each channel's deposit
    exact: list[int]  # gasUsed of two exact settlements, in order
    errors: list[str]

    @property
    def per_channel(self) -> float:
        """Of the last claim (every slot it writes already non-zero)."""
        return self.claims[-1].gas / MAX_CLAIMS_PER_BATCH

    def per_call(self, calls_per_channel: int) -> float:
        return self.per_channel / calls_per_channel

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.ok for c in self.claims) and self.settle.transaction is not None


def gas_part(dev: Devnet, url: str, settings: Settings, requirement: dict[str, Any]) -> Gas:
    errors: list[str] = []
    key, maximum = dev.wallets.payer_key, int(requirement["amount"])
    deposit = (FIRST_CALLS + SECOND_CALLS + 5) * maximum

    def calls(channel: Channel, count: int) -> None:
        client = session()
        try:
            for header in channel.vouchers(count, channel.first_charge):
                response = client.post(url, json=BODY, headers=header, timeout=30)
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                    return
                channel.charged = cumulative_of(settled(response))
        finally:
            client.close()

    def opened(salt: int) -> Channel:
        client = session()
        try:
            channel = open_channel(client, url, requirement, key, salt, deposit)
        finally:
            client.close()
        calls(channel, FIRST_CALLS - 1)
        return channel

    loop = ClaimLoop.for_settings(settings)
    left = loop.claims.claim()  # part 1's channel, so that the claims measured hold only these 100
    if left.failed:
        errors.append(f"the claim of part 1's channel failed: {left}")
    with ThreadPoolExecutor(GAS_THREADS) as pool:
        channels = list(pool.map(opened, range(1, MAX_CLAIMS_PER_BATCH + 1)))
    claims = [claim_checked(dev, loop, channels, FIRST_CALLS, 0)]
    claimed = [c.charged for c in channels]
    with ThreadPoolExecutor(GAS_THREADS) as pool:
        list(pool.map(lambda c: calls(c, SECOND_CALLS), channels))
    claims.append(claim_checked(dev, loop, channels, SECOND_CALLS, sum(claimed)))
    settle = loop.claims.settle()
    client = session()
    exact = []
    try:
        exact_requirement = entry(challenge(url, BODY), "exact")
        for header in sign_headers(exact_requirement, dev.payer_key, 2):
            response = client.post(url, json=BODY, headers=header, timeout=30)
            assert response.status_code == 200, (response.status_code, response.text[:300])
            exact.append(receipt_gas(dev, str(settled(response)["transaction"])))
    finally:
        client.close()
    deposits = [receipt_gas(dev, c.deposit_tx) for c in channels]
    return Gas(claims, settle, deposits, exact, errors)


def claim_checked(dev: Devnet, loop: ClaimLoop, channels: list[Channel], calls: int, before: int) -> Claimed:
    """``Claims.claim`` of every channel, checked against Redis and the chain."""
    charged = [redis_charged(dev, c) for c in channels]
    run = loop.claims.claim()
    views = loop.claims.views([c.channel_id for c in channels])
    on_chain = all(v.claimed == r for v, r in zip(views, charged, strict=True))
    return Claimed(run, calls, sum(charged) - before, on_chain)


# --- 2. throughput --------------------------------------------------------------------------------


@dataclass
class VoucherLoad(LoadResult):
    """A ``LoadResult`` keeping every 200's ``PAYMENT-RESPONSE`` and body, read after the run (so
    the clients do no more work per call than the other setups' clients)."""

    answers: list[tuple[str, bytes]] = field(default_factory=list)

    def answered(self, response: requests.Response) -> None:
        self.answers.append((response.headers.get("PAYMENT-RESPONSE", ""), response.content))


@dataclass
class BatchRun(Run):
    """A batch load run: ``problems`` are the checks that failed (docstring, part 2)."""

    problems: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def settled_once(self) -> bool:
        if self.parts:
            return all(part.settled_once for part in self.parts)
        return not self.problems

    def check_text(self) -> str:
        if self.parts:
            return "; ".join(part.check_text() for part in self.parts)
        return self.summary + ("; PROBLEMS: " + "; ".join(self.problems[:4]) if self.problems else "")


def load_checks(
    dev: Devnet, channels: list[Channel], load: VoucherLoad, model: Model, maximum: int
) -> tuple[list[str], str]:
    """Every answer's charge against its usage, each channel's cumulative against its answers and
    Redis, the sum against the usage prices (docstring, part 2)."""
    problems: list[str] = []
    start = {c.channel_id: c.charged for c in channels}
    last = dict(start)
    summed: Counter[bytes] = Counter()
    priced = 0
    for value, content in load.answers:
        answer = decode_header(value)
        state = answer["extra"]["channelState"]
        channel = bytes.fromhex(state["channelId"][2:])
        amount = int(answer["extra"]["chargedAmount"])
        reported = json.loads(content)["usage"]
        price = charge(model, Usage(reported["prompt_tokens"], reported["completion_tokens"]), maximum)
        priced += price
        if amount != price:
            problems.append(f"charged {amount}, usage price {price}")
        summed[channel] += amount
        last[channel] = max(last.get(channel, 0), int(state["chargedCumulativeAmount"]))
    moved = 0
    for c in channels:
        stored = redis_charged(dev, c)
        moved += last[c.channel_id] - start[c.channel_id]
        if not last[c.channel_id] == start[c.channel_id] + summed[c.channel_id] == stored:
            problems.append(
                f"channel 0x{c.channel_id.hex()[:8]}: last {last[c.channel_id]}, start "
                f"{start[c.channel_id]} + charged {summed[c.channel_id]}, Redis {stored}"
            )
    if moved != priced:
        problems.append(f"sum of cumulative increases {moved} != sum of usage prices {priced}")
    summary = (
        f"n={len(load.answers)} on {len(channels)} channels: sum of chargedCumulativeAmount increases "
        f"{moved} = sum of usage prices answered {priced}, Redis charged = last cumulative on every channel"
    )
    return problems, summary


def measure_batch(dev: Devnet, keys: list[str], seconds: float) -> BatchRun:
    """One batch run (on a chain just reset): a fresh gunicorn over an empty Redis, one channel per
    key opened and warmed, then ``seconds`` of voucher calls, one client per channel."""
    dev.flush_redis()
    model = load_catalog(DEFAULT_CATALOG)[MODEL]
    with Gunicorn("wsgi:app", dev.proxy_env()) as proxy:
        url = proxy.url + CHAT_PATH
        requirement = batch_entry(url)
        maximum = int(requirement["amount"])
        client = session()
        try:
            channels = [open_channel(client, url, requirement, k, 0, LOAD_DEPOSIT) for k in keys]
        finally:
            client.close()
        each = channels[0].first_charge
        warm = VoucherLoad()
        paid_load(url, [], result=warm, lanes=[c.vouchers(WARM_CALLS, each) for c in channels])
        assert warm.ok == WARM_CALLS * len(keys), (warm.statuses, warm.errors)
        for c in channels:
            c.charged = redis_charged(dev, c)
            assert c.charged == (WARM_CALLS + 1) * each, (c.charged, each)
        per_lane = min(MAX_PER_LANE, int(max(warm.rate, RATE_FLOOR) * seconds * 1.6 / len(keys)) + 50)
        lanes = [c.vouchers(per_lane, each) for c in channels]
        payers = [str(Account.from_key(k).address) for k in keys]
        before = chain_state(dev, payers)
        meter = CpuMeter(
            {
                "gunicorn": [proxy.process.pid, *proxy.worker_pids()],
                "anvil": [dev.anvil.process.pid],
                "redis": [dev.redis.process.pid],
            }
        ).start()
        load = VoucherLoad()
        paid_load(url, [], seconds=seconds, result=load, lanes=lanes)
        meter.stop()
        after = chain_state(dev, payers)
        problems, summary = load_checks(dev, channels, load, model, maximum)
    if before != after:
        problems.append(f"the chain moved during the window: {before} -> {after}")
    summary += f"; chain during the window: block {before.block} -> {after.block}, relayer nonce +"
    still = "unchanged" if before.balances == after.balances else "CHANGED"
    summary += f"{after.nonce - before.nonce}, token balances {still}"
    run = BatchRun("batch", load, maximum, 0, after.nonce - before.nonce, problems=problems, summary=summary)
    run.cpu_used = dict(meter.used)
    run.cpu = meter.per_call_text(load.ok)
    return run


def measure_free(dev: Devnet, clients: int, seconds: float) -> BatchRun:
    """The same load served free (``benchmarks.free_wsgi:app``, ``X-Bench-Free: batch``): what the
    serving path allows without the payment, on this machine (reported, no goal)."""
    dev.flush_redis()
    with Gunicorn("benchmarks.free_wsgi:app", dev.proxy_env()) as proxy:
        url = proxy.url + CHAT_PATH
        free = [{FREE_HEADER: FREE_BATCH}] * int(RATE_FLOOR * 4 * seconds)
        warm = paid_load(url, free[: WARM_CALLS * clients], clients)
        assert warm.ok, (warm.statuses, warm.errors)
        meter = CpuMeter(
            {
                "gunicorn": [proxy.process.pid, *proxy.worker_pids()],
                "anvil": [dev.anvil.process.pid],
                "redis": [dev.redis.process.pid],
            }
        ).start()
        load = paid_load(url, free, clients, seconds)
        meter.stop()
    run = BatchRun("free", load, 0, 0, 0, summary=f"n={load.ok} served free, nothing paid")
    run.cpu_used = dict(meter.used)
    run.cpu = meter.per_call_text(load.ok)
    return run


# --- everything -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    calls: int = CALLS
    seconds: float = SECONDS
    clients: int = CLIENTS
    rounds: int = ROUNDS
    reference: bool = True


@dataclass
class Results:
    pairs: Pairs
    parts: Parts
    wsgi: Wsgi
    gas: Gas
    runs: dict[str, Run]
    options: Options
    latency_maximum: int


def latency_and_gas(dev: Devnet, calls: int) -> tuple[Pairs, Parts, Wsgi, Gas, int]:
    with tempfile.TemporaryDirectory(prefix="x402-batch-bench-") as tmp:
        catalog = floor_one_catalog(tmp)
        model = load_catalog(catalog)[MODEL]
        env = dev.proxy_env(X402_CATALOG=str(catalog), X402_CLAIM_INTERVAL="3600")
        settings = env_settings(env)
        with Gunicorn("benchmarks.free_wsgi:app", env) as proxy:
            url = proxy.url + CHAT_PATH
            requirement = batch_entry(url)
            client = session()
            try:
                channel = open_channel(client, url, requirement, dev.wallets.payer_key, 0, 10**6)
                assert channel.first_charge < channel.maximum, (
                    "the floor-1 catalog should charge below the max"
                )
                print(f"... batch: {calls + WARM_PAIRS} free/voucher pairs", file=sys.stderr, flush=True)
                payers = [dev.wallets.payer]
                services = build(settings)
                before = chain_state(dev, payers)
                with server_time(services) as server:
                    pairs = alternate(client, url, channel, model, calls, WARM_PAIRS)
                pairs.before, pairs.after, pairs.server = before, chain_state(dev, payers), server
                pairs.redis_charged = redis_charged(dev, channel)
                usage = usage_of(client.post(url, json=BODY, headers={FREE_HEADER: FREE_BATCH}, timeout=30))
            finally:
                client.close()
            print("... batch: parts, in-process", file=sys.stderr, flush=True)
            parts = measure_parts(services, channel, usage, calls + WARM_PAIRS)
            wsgi = measure_wsgi(settings, channel, usage, calls + WARM_PAIRS)
            print(f"... batch: gas, {MAX_CLAIMS_PER_BATCH} channels", file=sys.stderr, flush=True)
            gas = gas_part(dev, url, settings, requirement)
    return pairs, parts, wsgi, gas, channel.maximum


def measure_all(options: Options | None = None) -> Results:
    opts = options or Options()
    with devnet() as dev:
        keys = ["0x" + os.urandom(32).hex() for _ in range(opts.clients)]
        for key in keys:
            dev.chain.mint(str(Account.from_key(key).address), LOAD_PAYER_USDC)
        reset = ChainReset(dev)  # every load run starts from here (the 16 payers funded)
        pairs, parts, wsgi, gas, maximum = latency_and_gas(dev, opts.calls)
        setups = [s for s in SETUPS if opts.reference or s != "reference"]
        done: dict[str, list[Run]] = {s: [] for s in setups}
        for round_, setup in reset.abba(setups, opts.rounds):
            print(f"... batch: {setup}, round {round_ + 1} of {opts.rounds}", file=sys.stderr, flush=True)
            if setup == "batch":
                done[setup].append(measure_batch(dev, keys, opts.seconds))
            elif setup == "free":
                done[setup].append(measure_free(dev, opts.clients, opts.seconds))
            else:
                price = done["ours"][0].price if done.get("ours") else REFERENCE_PRICE
                done[setup].append(measure_stack(dev, setup, opts.clients, opts.seconds, price))
    runs = {s: pooled(r) for s, r in done.items()}
    return Results(pairs, parts, wsgi, gas, runs, opts, maximum)


# --- report ---------------------------------------------------------------------------------------


def rate_ratio(a: Run, b: Run) -> float:
    return a.load.rate / b.load.rate if b.load.rate else float("nan")


def latency_text(res: Results) -> str:
    pairs = res.pairs

    def lat(samples: list[float]) -> tuple[str, ...]:
        return str(len(samples)), *(
            f"{x:.2f} ms" for x in (p_ms(samples), p_ms(samples, 0.9), mean_ms(samples))
        )

    cells = [
        ("free (X-Bench-Free: batch)", *lat(pairs.free), ""),
        ("voucher", *lat(pairs.paid), f"{pairs.added_ms():+.2f} ms"),
    ]
    lines = [
        table(("call", "n", "p50", "p90", "mean", "voucher - free p50"), cells),
        f"p50 of pairwise differences {p_ms(pairs.diffs()):+.2f} ms, p90 difference "
        f"{p_ms(pairs.paid, 0.9) - p_ms(pairs.free, 0.9):+.2f} ms; redis-server "
        f"{pairs.server.calls} EVALSHA x {pairs.server.ms:.3f} ms during the pairs; voucher header "
        f"{pairs.header_bytes} bytes; charges {dict(pairs.charges)} of a maximum of {res.latency_maximum}; "
        f"{pairs.resigned} vouchers signed again",
        "Checks:",
        *(f"  {'yes' if ok else 'NO '}  {name}" for name, ok in pairs.checks().items()),
    ]
    if pairs.errors:
        lines.append(f"  errors: {pairs.errors[:3]}")
    return "\n".join(lines)


def parts_text(parts: Parts) -> str:
    cells = [(name, f"{wall:.3f}", f"{cpu:.3f}") for name, (wall, cpu) in parts.steps.items()]
    cells += [
        (name, f"{value:.3f}", "")
        for name, value in (
            ("BatchGate.begin (all checks + hold script round trip)", p_ms(parts.begin)),
            ("BatchGate.commit (usage price + commit script round trip)", p_ms(parts.commit)),
            ("BatchGate.response_header (SettleResponse encoded)", p_ms(parts.header)),
            ("begin + commit + response_header", parts.app_ms()),
            ("redis-server time per EVALSHA (INFO commandstats)", parts.server.ms),
            ("PING round trip (redis-py, same pool)", p_ms(parts.ping)),
        )
    ]
    legend = (
        f"{parts.count} calls untraced (p50 for begin/commit/header/PING; the steps: mean of one pass "
        f"each over {2 * parts.count} payments); cProfile of {parts.count} more, by own time:"
    )
    headers = ("part (in-process, no HTTP)", "wall ms/call", "CPU ms/call")
    profile = table(
        ("own ms/call", "calls/call", "function"), [(f"{t:.4f}", f"{n:g}", f) for t, n, f in parts.profile]
    )
    return f"{table(headers, cells)}\n{legend}\n{profile}"


def wsgi_text(wsgi: Wsgi) -> str:
    cells = [(f"{delta:+.4f}", f"{calls:g}", name) for delta, calls, name in wsgi.grown]
    return "\n".join(
        [
            f"{len(wsgi.paid)} pairs, statuses {dict(wsgi.statuses)}: free p50 {p_ms(wsgi.free):.3f} ms, "
            f"voucher p50 {p_ms(wsgi.paid):.3f} ms, added {wsgi.added_ms():+.3f} ms (p90 "
            f"{p_ms(wsgi.free, 0.9):.3f} / {p_ms(wsgi.paid, 0.9):.3f} ms); under cProfile "
            f"{wsgi.per_call[0] * 1000:.3f} / {wsgi.per_call[1] * 1000:.3f} ms per request. "
            "The functions whose own time per request grew most (voucher - free):",
            table(("own ms/request", "voucher calls/request", "function"), cells),
        ]
    )


def gas_text(gas: Gas) -> str:
    cells = []
    for i, c in enumerate(gas.claims, 1):
        cells.append(
            (
                f"claim {i} ({c.calls_per_channel} calls/channel)",
                f"{c.gas:,}",
                f"{c.gas / MAX_CLAIMS_PER_BATCH:,.0f}",
                f"{c.gas / MAX_CLAIMS_PER_BATCH / c.calls_per_channel:,.0f}",
                "yes" if c.ok else "NO",
            )
        )
    settle = gas.settle.transaction
    cells.append(("settle to payTo (all claims)", f"{settle.gas_used:,}" if settle else "-", "", "", ""))
    deposit = sorted(gas.deposits)[len(gas.deposits) // 2] if gas.deposits else 0
    cells.append(("deposit (once per channel), median", f"{deposit:,}", f"{deposit:,}", "", ""))
    for i, used in enumerate(gas.exact, 1):
        cells.append((f"exact settlement {i}", f"{used:,}", "", f"{used:,}", ""))
    lines = [table(("transaction", "gasUsed", "per channel", "per paid call", "checked"), cells)]
    lines.append(
        "per paid call from the last claim: "
        + ", ".join(f"{n} call{'s' * (n > 1)}/channel/claim {gas.per_call(n):,.0f}" for n in (1, 10))
        + f"; exact {gas.exact[-1]:,} per call"
    )
    if gas.errors:
        lines.append(f"errors: {gas.errors[:3]}")
    return "\n".join(lines)


def rows(res: Results) -> list[Row]:
    pairs, parts, gas, opts = res.pairs, res.parts, res.gas, res.options
    added = pairs.added_ms()
    out = [
        Row(
            BENCH,
            "voucher p50 - free p50 (sequential, model 0 ms)",
            f"{added:+.2f} ms",
            f"{p_ms(pairs.free):.2f} ms free",
            f"{p_ms(pairs.paid) / p_ms(pairs.free):.2f}",
            f"<= {GOAL_MS:g} ms",
            added <= GOAL_MS,
            f"{len(pairs.paid)} calls each, voucher p50 {p_ms(pairs.paid):.2f} ms (p90 "
            f"{p_ms(pairs.paid, 0.9):.2f}), free p90 {p_ms(pairs.free, 0.9):.2f} ms; p50 of pairwise "
            f"differences {p_ms(pairs.diffs()):+.2f} ms",
        ),
        Row(
            BENCH,
            "in-process: BatchGate.begin + commit + header per call",
            f"{parts.app_ms():.2f} ms",
            goal="report",
            note=", ".join(f"{name} {wall:.3f}" for name, (wall, _cpu) in parts.steps.items())
            + f"; PING {p_ms(parts.ping):.3f} ms, redis-server {parts.server.ms:.3f} ms per EVALSHA",
        ),
    ]
    wsgi = res.wsgi
    out.append(
        Row(
            BENCH,
            "in-process WSGI: voucher p50 - free p50",
            f"{wsgi.added_ms():+.2f} ms",
            f"{p_ms(wsgi.free):.2f} ms free",
            goal="report",
            note=f"{len(wsgi.paid)} pairs through the app's WSGI callable, no sockets; statuses "
            f"{dict(wsgi.statuses)}",
        )
    )
    ok = all(pairs.checks().values()) and set(wsgi.statuses) == {"free 200", "voucher 200"}
    out.append(
        Row(
            BENCH,
            "latency: charged = usage price, Redis = answers, chain still",
            "yes" if ok else "NO",
            goal="all",
            passed=ok,
            note=", ".join(name for name, good in pairs.checks().items() if not good),
        )
    )
    statuses = Counter({int(k.split()[1]): v for k, v in pairs.statuses.items()})
    failed = failed_answers_row(BENCH, dict(statuses), pairs.errors)
    if failed is not None:
        failed.figure = "latency: calls not answered 200 (free or voucher)"
        out.append(failed)
    batch, ours, ref = res.runs["batch"], res.runs.get("ours"), res.runs.get("reference")
    figure = f"paid calls/s, {opts.clients} clients" + (
        f", {opts.rounds} runs ABBA" if opts.rounds > 1 else ""
    )
    for other, goal, name in ((ref, GOAL_VS_REFERENCE, "reference"), (ours, GOAL_VS_EXACT, "our exact")):
        if other is None:
            continue
        ratio = rate_ratio(batch, other)
        out.append(
            Row(
                BENCH,
                f"{figure} (batch vs {name})",
                f"{batch.load.rate:.1f}/s",
                f"{other.load.rate:.1f}/s {name.split()[-1]}",
                f"{ratio:.2f}",
                f">= {goal:g}",
                ratio >= goal,
                f"batch: {describe(batch)}; {name}: {describe(other)}",
            )
        )
    free = res.runs.get("free")
    if free is not None:
        out.append(
            Row(
                BENCH,
                f"{figure} (batch vs the same served free)",
                f"{batch.load.rate:.1f}/s",
                f"{free.load.rate:.1f}/s free",
                f"{rate_ratio(batch, free):.2f}",
                "report",
                note=f"free: {describe(free)}",
            )
        )
    out += settlement_rows(BENCH, batch, "charged = usage prices = Redis, chain still", "all")
    for other in (ours, ref):
        if other is not None:
            out += settlement_rows(BENCH, other)
    last = gas.claims[-1]
    out.append(
        Row(
            BENCH,
            f"gas: one claim of {MAX_CLAIMS_PER_BATCH} channels",
            f"{last.gas:,}",
            f"{gas.exact[-1]:,} exact/call",
            f"{gas.per_channel / gas.exact[-1]:.3f}",
            "report",
            note=f"claim 1 {gas.claims[0].gas:,} (each channel's first claim), claim 2 "
            f"{last.gas:,}; per channel {gas.per_channel:,.0f}; settle "
            f"{gas.settle.transaction.gas_used if gas.settle.transaction else 0:,}; deposit median "
            f"{sorted(gas.deposits)[len(gas.deposits) // 2]:,} once per channel; exact settlements "
            f"{', '.join(f'{g:,}' for g in gas.exact)}",
        )
    )
    for n in (1, 10):
        out.append(
            Row(
                BENCH,
                f"gas per paid call, {n} call{'s' * (n > 1)}/channel/claim",
                f"{gas.per_call(n):,.0f}",
                f"{gas.exact[-1]:,} exact",
                f"{gas.per_call(n) / gas.exact[-1]:.3f}",
                "report",
            )
        )
    out.append(
        Row(
            BENCH,
            "gas: claims land, amounts = Redis = chain",
            "yes" if gas.ok else "NO",
            goal="all",
            passed=gas.ok,
            note="; ".join(gas.errors[:2])
            + "; ".join(
                f"claim {i}: {c.run.channels} channels, {c.run.amount} claimed of {c.charged} charged, "
                f"{len(c.run.transactions)} tx, skipped {list(c.run.skipped)[:2]}"
                for i, c in enumerate(gas.claims, 1)
                if not c.ok
            ),
        )
    )
    return out


def report(res: Results) -> str:
    runs = res.runs
    load = "\n".join(f"{name}: {describe(run)}\n    chain: {run.check_text()}" for name, run in runs.items())
    return "\n".join(
        [
            f"1. Sequential calls of CHAT_BODY, free and voucher alternating after {WARM_PAIRS} warm-up "
            "pairs (model 0 ms, floor-1 catalog)\n",
            latency_text(res),
            "\n1b. The voucher payment, in-process\n",
            parts_text(res.parts),
            "\n1c. The whole request in-process (the app's WSGI callable, no sockets, no gunicorn)\n",
            wsgi_text(res.wsgi),
            f"\n2. Paid load, {res.options.clients} clients, {res.options.seconds:g} s a run, chain reset "
            "before each\n",
            load,
            f"\n3. Gas, {MAX_CLAIMS_PER_BATCH} channels claimed in one transaction\n",
            gas_text(res.gas),
        ]
    )


def run(options: Options | None = None) -> list[Row]:
    return rows(measure_all(options))


def main() -> None:
    parser = LoadParser(__doc__, SECONDS, CLIENTS, ROUNDS, "measured seconds per load run")
    parser.add_argument("--calls", type=int, default=CALLS, help="part 1: measured pairs")
    parser.add_argument("--skip-reference", action="store_true", help="part 2 without the reference stack")
    args = parser.parse_checked(("calls",), "--rounds, --clients and --calls")
    started = time.monotonic()
    print(f"# {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    res = measure_all(Options(args.calls, args.seconds, args.clients, args.rounds, not args.skip_reference))
    print()
    print(report(res))
    print()
    print_table(rows(res))
    print(f"\nruntime {time.monotonic() - started:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
