"""Paid calls per second with 16 concurrent clients: ours vs the reference stack built from the official
``x402`` package (``benchmarks.reference_stack``: the SDK's Flask middleware + the SDK's facilitator),
both under gunicorn with ``gunicorn.conf.py`` (2 workers x 32 threads), on the same anvil, Redis and
stand-in model (0 ms).

Every payment is distinct and signed before timing. After each run the chain is checked: the payee's
balance grew by exactly n x price and the settling account's nonce by exactly n, n = the 200 answers,
so every answered call was settled exactly once.

anvil gets slower as its chain grows, so a stack run second on the same anvil would be measured on a
longer chain than the first. Before every run the chain is put back (``evm_revert`` to a snapshot taken
after the devnet was funded, ``harness.ChainReset``) and our Redis is emptied: each run starts from the
same block, balances and nonces, and the checks above are deltas from that state. With ``--rounds 2``
or more the stacks alternate ABBA (ours, reference, reference, ours, ...) and each stack's runs are
pooled (calls/s = all calls / all seconds).

    python -m benchmarks.throughput [--seconds 15] [--clients 16] [--rounds 1] [--only ours|reference]
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from .harness import (
    CHAT_PATH,
    ChainReset,
    CpuMeter,
    Devnet,
    Gunicorn,
    LoadParser,
    Row,
    cpu_per_call_text,
    devnet,
    failed_answers_row,
    median,
    offered,
    percentile,
    print_table,
    sign_headers,
)
from .load import LoadResult, paid_load
from .reference_stack import reference_stack

GOAL_RATIO = 2.0
MAX_HEADERS = 12_000
RATE_FLOOR = 200  # calls/s to sign payments for at least (a cold warm-up can underestimate the rate)
STACKS = ("ours", "reference")
REFERENCE_PRICE = 1000  # the reference's price when ours is not run to offer its own


@dataclass
class Run:
    """One run of one stack; or, with ``parts``, several pooled (``pooled``)."""

    name: str
    load: LoadResult
    price: int
    paid_delta: int
    nonce_delta: int
    cpu: str = ""
    cpu_used: dict[str, float] = field(default_factory=dict)  # CPU seconds by process group
    parts: list[Run] = field(default_factory=list)

    @property
    def settled_once(self) -> bool:
        """Pooled: of every part (a surplus in one run cannot hide a shortfall in another)."""
        if self.parts:
            return all(part.settled_once for part in self.parts)
        return self.paid_delta == self.load.ok * self.price and self.nonce_delta == self.load.ok

    def check_text(self) -> str:
        return (
            f"n={self.load.ok}: payee +{self.paid_delta} (n x price = {self.load.ok * self.price}), "
            f"settler nonce +{self.nonce_delta}"
        )


RunT = TypeVar("RunT", bound=Run)


def pooled(runs: list[RunT], **extra: Any) -> RunT:
    """The runs of one setup as one, of their class (``extra``: a subclass's own figures): calls,
    time, latencies, chain deltas and CPU added up, the runs kept as ``parts``."""
    load = LoadResult(
        ok=sum(r.load.ok for r in runs),
        elapsed=sum(r.load.elapsed for r in runs),
        latencies=[t for r in runs for t in r.load.latencies],
        statuses=sum((r.load.statuses for r in runs), Counter()),
        errors=[e for r in runs for e in r.load.errors][:5],
        exhausted=any(r.load.exhausted for r in runs),
    )
    cpu_used = {name: sum(r.cpu_used.get(name, 0.0) for r in runs) for name in runs[0].cpu_used}
    return replace(
        runs[0],
        load=load,
        paid_delta=sum(r.paid_delta for r in runs),
        nonce_delta=sum(r.nonce_delta for r in runs),
        cpu=cpu_per_call_text(cpu_used, load.ok),
        cpu_used=cpu_used,
        parts=list(runs),
        **extra,
    )


def paid_run(
    dev: Devnet,
    name: str,
    url: str,
    payee: str,
    settler: str,
    clients: int,
    seconds: float,
    processes: dict[str, list[int]],
) -> Run:
    requirement = offered(url)
    price = int(requirement["amount"])
    warm = paid_load(url, sign_headers(requirement, dev.payer_key, 4 * clients), clients)
    assert warm.ok, (name, warm.statuses, warm.errors)
    wanted = min(MAX_HEADERS, int(max(warm.rate, RATE_FLOOR) * seconds * 1.6) + 300)
    headers = sign_headers(requirement, dev.payer_key, wanted)
    balance, nonce = dev.chain.balance(payee), dev.nonce_of(settler)
    meter = CpuMeter(
        {**processes, "anvil": [dev.anvil.process.pid], "redis": [dev.redis.process.pid]}
    ).start()
    load = paid_load(url, headers, clients, seconds)
    meter.stop()
    run = Run(name, load, price, dev.chain.balance(payee) - balance, dev.nonce_of(settler) - nonce)
    run.cpu_used = dict(meter.used)
    run.cpu = meter.per_call_text(load.ok)
    return run


def measure(dev: Devnet, stack: str, clients: int, seconds: float, price: int) -> Run:
    """One run of ``stack`` (``ours`` or ``reference``, at ``price``), started here and stopped after
    its warm-up and ``seconds`` of paid load. Run it on a chain just reset (``ChainReset``)."""
    if stack == "ours":
        dev.flush_redis()  # our relayer's nonce counter starts again from the reset chain
        with Gunicorn("wsgi:app", dev.proxy_env()) as ours:
            workers = {"gunicorn": [ours.process.pid, *ours.worker_pids()]}
            url = ours.url + CHAT_PATH
            return paid_run(
                dev, "ours", url, dev.wallets.pay_to, dev.wallets.relayer, clients, seconds, workers
            )
    with reference_stack(dev, price) as ref:
        processes = {
            "gunicorn": [ref.gunicorn.process.pid, *ref.gunicorn.worker_pids()],
            "facilitator": [ref.facilitator_pid],
        }
        url = ref.gunicorn.url + CHAT_PATH
        return paid_run(dev, "reference", url, ref.pay_to, ref.relayer, clients, seconds, processes)


def measure_all(seconds: float, clients: int, rounds: int, only: str | None) -> dict[str, Run]:
    """Each stack ``rounds`` times in ABBA order, every run from the same chain state; one pooled
    ``Run`` per stack."""
    stacks = [stack for stack in STACKS if only in (None, stack)]
    done: dict[str, list[Run]] = {stack: [] for stack in stacks}
    with devnet() as dev:
        for round_, stack in ChainReset(dev).abba(stacks, rounds):
            print(f"... {stack}, round {round_ + 1} of {rounds}", file=sys.stderr, flush=True)
            price = done["ours"][0].price if done.get("ours") else REFERENCE_PRICE
            done[stack].append(measure(dev, stack, clients, seconds, price))
    return {stack: pooled(runs) for stack, runs in done.items()}


def describe(run: Run) -> str:
    lat = run.load.latencies
    text = (
        f"{run.load.ok} calls in {run.load.elapsed:.1f} s, latency p50 {median(lat) * 1000:.0f} ms "
        f"p90 {percentile(lat, 0.9) * 1000:.0f} ms"
        if lat
        else "no successful call"
    )
    if len(run.parts) > 1:
        text += " (runs: " + ", ".join(f"{part.load.rate:.1f}" for part in run.parts) + " calls/s)"
    if set(run.load.statuses) != {200}:
        text += f", statuses {dict(run.load.statuses)} e.g. {run.load.errors[:2]}"
    if run.cpu:
        text += f"; {run.cpu}"
    if run.load.exhausted:
        text += ", ran out of pre-signed payments (rate measured over the shorter run)"
    return text


def run(seconds: float = 15.0, clients: int = 16, only: str | None = None, rounds: int = 1) -> list[Row]:
    runs = measure_all(seconds, clients, rounds, only)
    figure = f"paid calls/s, {clients} clients" + (f", {rounds} runs each, ABBA" if rounds > 1 else "")
    rows = []
    ours, ref = runs.get("ours"), runs.get("reference")
    if ours and ref:
        ratio = ours.load.rate / ref.load.rate if ref.load.rate else float("inf")
        rows.append(
            Row(
                "throughput",
                figure,
                f"{ours.load.rate:.1f}/s",
                f"{ref.load.rate:.1f}/s ref",
                f"{ratio:.2f}",
                f">= {GOAL_RATIO:g}",
                ratio >= GOAL_RATIO,
                f"ours: {describe(ours)}; reference: {describe(ref)}",
            )
        )
    else:
        only_run: Any = ours or ref
        rows.append(
            Row(
                "throughput",
                f"{figure} ({only_run.name})",
                f"{only_run.load.rate:.1f}/s",
                note=describe(only_run),
            )
        )
    for r in (ours, ref):
        if r is not None:
            rows += settlement_rows("throughput", r)
    return rows


class Settled(Protocol):
    """A run whose answered calls are checked against the chain: ``Run`` here, ``upto.Run``."""

    @property
    def name(self) -> str: ...

    @property
    def load(self) -> LoadResult: ...

    @property
    def settled_once(self) -> bool: ...

    def check_text(self) -> str: ...


def settlement_rows(
    bench: str,
    r: Settled,
    figure: str = "settled once on chain",
    goal: str = "n x price, nonce +n",
) -> list[Row]:
    """A FAIL row when some of ``r``'s calls were not answered 200, and whether every answered call
    was settled exactly once on chain (``figure``, ``goal``: how the benchmark words that check)."""
    rows = []
    failed = failed_answers_row(bench, r.load.statuses, r.load.errors)
    if failed is not None:
        failed.figure += f" ({r.name})"
        rows.append(failed)
    rows.append(
        Row(
            bench,
            f"{figure} ({r.name})",
            "yes" if r.settled_once else "NO",
            goal=goal,
            passed=r.settled_once,
            note=r.check_text(),
        )
    )
    return rows


def main() -> None:
    parser = LoadParser(__doc__, 15.0, 16, 1, rounds_help="runs per stack, in ABBA order")
    parser.add_argument("--only", choices=list(STACKS))
    args = parser.parse_checked()
    print_table(run(args.seconds, args.clients, args.only, args.rounds))


if __name__ == "__main__":
    main()
