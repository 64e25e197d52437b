"""Paid calls per second on one redis-server vs a 3-master Redis Cluster, side by side in one run.

Both setups use the same anvil, the same stand-in model (0 ms), the same payer and payee and the same
gunicorn config (``gunicorn.conf.py``, 2 workers x 32 threads); only ``REDIS_URL`` differs: the
devnet's redis-server, or the first master of a cluster made by ``app.devnet.cluster.
start_redis_cluster(3)`` (``REDIS_CLUSTER=auto`` finds out which). Each run starts a fresh gunicorn
on an empty Redis (the single node is flushed, a new cluster is made), and the proxy's start-up check
stamps the keyspace. On the cluster, ledger events go to per-shard outboxes and each worker's drainer
moves them into the stream ``x402:{ledger}``.

Two things would otherwise decide the result more than Redis does:

- anvil gets slower as its chain grows: its CPU per paid call went from 2.6 to 8.7 ms over four
  runs of 10 s (about 1,200 settlements each). So the chain is put back before every run
  (``evm_revert`` to a snapshot taken after the devnet was funded): every run starts from the same
  block, balances and nonces. The setups also run in ABBA order (``--rounds 2``: single, cluster,
  cluster, single), and the figures of a setup are pooled over its runs.
- ``start_redis_cluster`` makes every node write an append-only file with ``appendfsync always``;
  the devnet's redis-server keeps nothing on disk. So that only the topology differs, the cluster's
  nodes are switched to the same (``CONFIG SET appendonly no``); ``--aof`` adds a third setup, a
  cluster left as started (an fsync per write on every master).

Each run: 16 clients (threads, one ``requests`` session each, ``benchmarks.load``) pay one distinct
payment per call, signed before timing, for 10 s, after a short warm-up. Then, for the calls answered 200 (n):

- on chain: the payee's balance grew by exactly n x price and the settling account's nonce by n;
- in the ledger stream: exactly n ``settled`` events were appended during the run, for n distinct
  payments. The count is first polled for up to 5 s while the workers' drainers work, then every
  outbox is drained once more from here (``Ledger.flush_events``, a no-op on one node) and the
  entries are counted again; what is left in the outboxes is counted too.

The table gives, per setup, its runs pooled (calls/s = all calls / all seconds, latency percentiles
over all calls) and each run's calls/s; ``Redis cmds/call`` is what all nodes processed during the
runs (``INFO``), counting the commands run inside scripts, per answered call. Below it, each run's
CPU per call by process and its commands by name.

    python -m benchmarks.cluster [--seconds 10] [--clients 16] [--rounds 2] [--aof]

About 60 s on 2 cores with the defaults (90–100 s with ``--aof``). Needs ``redis-server`` and
``redis-cli`` on PATH.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from app.backends.store import Store
from app.devnet.cluster import RedisClusterProcesses, start_redis_cluster
from app.payments.keys import LEDGER_STREAM, outbox_keys
from app.payments.ledger import Ledger, text_of

from .harness import (
    CHAT_PATH,
    ChainReset,
    CpuMeter,
    Devnet,
    Gunicorn,
    LoadParser,
    Row,
    devnet,
    median,
    offered,
    percentile,
    print_table,
    reaper,
    sign_headers,
)
from .load import paid_load
from .throughput import Run as ChainRun
from .throughput import pooled as pooled_chain_runs
from .throughput import settlement_rows

MASTERS = 3
SECONDS = 10.0  # measured seconds per run
CLIENTS = 16
ROUNDS = 2  # runs per setup
MAX_HEADERS = 20_000
RATE_FLOOR = 400  # calls/s to sign payments for at least
DRAIN_WAIT = 5.0  # seconds the workers' drainers get to bring the stream up to date
PAGE = 2_000  # stream entries per XRANGE
TOTAL = "(all)"  # key of the total in a command count


@dataclass(frozen=True)
class Setup:
    """Where the ledger lives for one run."""

    name: str
    cluster: bool = False
    aof: bool = False  # keep the cluster's append-only file (fsync on every write)


SINGLE = Setup("single redis-server")
CLUSTER = Setup(f"{MASTERS}-master Redis Cluster", cluster=True)
CLUSTER_AOF = Setup(f"{MASTERS}-master cluster, AOF always", cluster=True, aof=True)


@dataclass
class Run(ChainRun):
    """A throughput run (its chain check is ``benchmarks.throughput``'s) plus the ledger stream check;
    or, with ``parts``, the runs of one setup pooled (``pooled``), which pass only if each one does."""

    parts: list[Run] = field(default_factory=list)  # the base class's, typed as runs of this class

    settled_events: int = -1  # `settled` entries appended to the stream during the run
    distinct_payments: int = -1  # distinct payment keys among them
    drained_after: float | None = None  # seconds until the workers' drainers had them all (None: not in time)
    undrained: int = 0  # outboxes ``flush_events`` could not drain
    outbox_left: int = 0  # entries still in an outbox after the final drain
    commands: Counter[str] = field(default_factory=Counter)  # Redis commands during the run, all nodes

    @property
    def ledger_once(self) -> bool:
        if self.parts:
            return all(part.ledger_once for part in self.parts)
        n = self.load.ok
        return (
            self.settled_events == n
            and self.distinct_payments == n
            and not self.undrained
            and not self.outbox_left
        )

    def ledger_text(self) -> str:
        caught_up = (
            f"the workers' drainers had them all within {self.drained_after:.1f} s"
            if self.drained_after is not None
            else f"the workers' drainers had not caught up after {DRAIN_WAIT:.0f} s"
        )
        text = (
            f"n={self.load.ok}: {self.settled_events} settled events in {LEDGER_STREAM} "
            f"({self.distinct_payments} distinct payments); {caught_up}"
        )
        if self.undrained or self.outbox_left:
            text += f"; {self.undrained} outboxes not drained, {self.outbox_left} entries left in outboxes"
        return text

    def commands_per_call(self) -> float:
        return self.commands[TOTAL] / self.load.ok if self.load.ok else float("nan")

    def commands_text(self) -> str:
        """Redis commands per answered call, in all and by name (counting those inside scripts)."""
        if not self.load.ok:
            return ""
        n = self.load.ok
        named = [(name, count / n) for name, count in self.commands.most_common() if name != TOTAL]
        parts = [f"{name} {per_call:.2f}" for name, per_call in named if per_call >= 0.01]
        return f"{self.commands_per_call():.2f} per call (with those in scripts): " + ", ".join(parts)


# --- the ledger stream ----------------------------------------------------------------------------


def last_entry(client: Any) -> str:
    """Id of the newest entry of the ledger stream, or ``0-0`` when it is empty."""
    newest = client.xrevrange(LEDGER_STREAM, count=1)
    return text_of(newest[0][0]) if newest else "0-0"


def settled_after(client: Any, mark: str) -> tuple[int, int]:
    """``settled`` entries of the ledger stream newer than ``mark``: how many, and for how many
    distinct payments (the ``key`` field)."""
    count, payments, start = 0, set(), f"({mark}"
    for _ in range(10_000):  # a bound: PAGE x 10,000 entries is far more than a run writes
        page = client.xrange(LEDGER_STREAM, min=start, max="+", count=PAGE)
        for entry_id, fields in page:
            event = {text_of(k): text_of(v) for k, v in fields.items()}
            if event.get("event") == "settled":
                count += 1
                payments.add(event.get("key", ""))
            start = f"({text_of(entry_id)}"
        if len(page) < PAGE:
            break
    return count, len(payments)


def outbox_backlog(ledger: Ledger) -> int:
    """Entries waiting in the outboxes (always 0 on one node, which has none)."""
    if ledger.single_node:
        return 0
    return sum(int(ledger.redis.xlen(key)) for key in outbox_keys())


def command_counts(urls: list[str]) -> Counter[str]:
    """Commands processed so far by the nodes at ``urls``, added up: ``TOTAL`` all of them
    (``total_commands_processed``) and by name (``INFO commandstats``). Both count the commands run
    inside scripts too (an ``EVALSHA`` whose script runs 4 commands counts 5). The ``INFO`` calls made
    here are left out."""
    counts: Counter[str] = Counter()
    for url in urls:
        with redis.Redis.from_url(url) as node:
            counts[TOTAL] += int(node.info("stats")["total_commands_processed"])
            for name, stats in node.info("commandstats").items():
                if name != "cmdstat_info":
                    counts[name.removeprefix("cmdstat_")] += int(stats["calls"])
    return counts


def check_ledger(run: Run, ledger: Ledger, mark: str) -> None:
    """Fill in ``run``'s ledger figures: wait for the workers' drainers, then drain and count."""
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_WAIT:
        if settled_after(ledger.redis, mark)[0] >= run.load.ok:
            run.drained_after = time.monotonic() - started
            break
        time.sleep(0.1)
    run.undrained = len(ledger.flush_events())
    run.settled_events, run.distinct_payments = settled_after(ledger.redis, mark)
    run.outbox_left = outbox_backlog(ledger)


# --- one run --------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_for(dev: Devnet, setup: Setup) -> Iterator[tuple[list[str], list[int]]]:
    """An empty Redis for ``setup``: the URL of each node (the first is ``REDIS_URL``) and the pids of
    its redis-server processes. The devnet's single node is flushed (its relayer nonce counter would
    be ahead of the reverted chain); a cluster is made here and stopped on exit."""
    if not setup.cluster:
        dev.flush_redis()
        yield [dev.redis.url], [dev.redis.process.pid]
        return
    cluster: RedisClusterProcesses = start_redis_cluster(MASTERS)
    pids = [process.pid for process in cluster.processes]
    watchdog = reaper(*pids)  # stops the nodes should this process die without cleaning up
    try:
        if not setup.aof:
            for port in cluster.ports:
                with redis.Redis(host="127.0.0.1", port=port) as node:
                    node.config_set("appendonly", "no")
        yield cluster.urls, pids
    finally:
        watchdog.kill()
        watchdog.wait(timeout=10)
        cluster.stop()


def measure(dev: Devnet, setup: Setup, clients: int, seconds: float) -> Run:
    """One run of ``setup``: a fresh gunicorn on an empty Redis, warm-up, ``seconds`` of paid load,
    then the chain and ledger checks."""
    with (
        redis_for(dev, setup) as (redis_urls, redis_pids),
        Gunicorn("wsgi:app", dev.proxy_env(REDIS_URL=redis_urls[0], REDIS_CLUSTER="auto")) as server,
    ):
        url = server.url + CHAT_PATH
        payee, settler = dev.wallets.pay_to, dev.wallets.relayer
        requirement = offered(url)
        price = int(requirement["amount"])
        warm = paid_load(url, sign_headers(requirement, dev.payer_key, 4 * clients), clients)
        assert warm.ok, (setup.name, warm.statuses, warm.errors)
        # A cold first warm-up can be slow: sign for at least RATE_FLOOR calls/s (0.1 ms a signature).
        wanted = min(MAX_HEADERS, max(int(warm.rate * seconds * 1.6) + 300, int(RATE_FLOOR * seconds)))
        headers = sign_headers(requirement, dev.payer_key, wanted)

        ledger = Ledger(Store(redis_urls[0]))
        try:
            ledger.flush_events()  # the warm-up's events are in the stream before the mark
            mark = last_entry(ledger.redis)
            balance, nonce = dev.chain.balance(payee), dev.nonce_of(settler)
            meter = CpuMeter(
                {
                    "gunicorn": [server.process.pid, *server.worker_pids()],
                    "anvil": [dev.anvil.process.pid],
                    "redis": redis_pids,
                }
            ).start()
            commands = command_counts(redis_urls)
            load = paid_load(url, headers, clients, seconds)
            meter.stop()
            commands = command_counts(redis_urls) - commands
            commands[TOTAL] -= len(redis_urls) * 2  # the INFO stats and commandstats of the first count
            run = Run(
                setup.name, load, price, dev.chain.balance(payee) - balance, dev.nonce_of(settler) - nonce
            )
            run.cpu_used = dict(meter.used)
            run.cpu = meter.per_call_text(load.ok)
            run.commands = commands
            check_ledger(run, ledger, mark)
        finally:
            ledger.redis.close()
    return run


def pooled(runs: list[Run]) -> Run:
    """The runs of one setup as one: ``benchmarks.throughput.pooled`` plus the ledger figures and
    Redis commands added up."""
    waits = [r.drained_after for r in runs]
    return pooled_chain_runs(
        runs,
        settled_events=sum(r.settled_events for r in runs),
        distinct_payments=sum(r.distinct_payments for r in runs),
        drained_after=None if None in waits else max(w for w in waits if w is not None),
        undrained=sum(r.undrained for r in runs),
        outbox_left=sum(r.outbox_left for r in runs),
        commands=sum((r.commands for r in runs), Counter()),
    )


# --- report ---------------------------------------------------------------------------------------


def latency_ms(run: Run, fraction: float) -> str:
    lat = run.load.latencies
    if not lat:
        return "-"
    value = median(lat) if fraction == 0.5 else percentile(lat, fraction)
    return f"{value * 1000:.0f} ms"


def yes_no(flag: bool) -> str:
    return "yes" if flag else "NO"


def comparison(setups: list[Run], clients: int) -> str:
    """The side-by-side table: one line per setup (its runs pooled), then each setup's ratio to the
    single node."""
    headers = (
        "ledger in",
        f"paid calls/s ({clients} clients)",
        "each run",
        "p50",
        "p99",
        "Redis cmds/call",
        "ok",
        "not 200",
        "settled once on chain",
        "one settled event per call",
    )
    cells = [
        (
            r.name,
            f"{r.load.rate:.1f}/s",
            ", ".join(f"{part.load.rate:.0f}" for part in r.parts or [r]),
            latency_ms(r, 0.5),
            latency_ms(r, 0.99),
            f"{r.commands_per_call():.1f}",
            str(r.load.ok),
            str(sum(v for k, v in r.load.statuses.items() if k != 200)),
            yes_no(r.settled_once),
            yes_no(r.ledger_once),
        )
        for r in setups
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip() for c in cells]
    single = setups[0]
    for r in setups[1:]:
        lines.append(f"ratio {r.name} / {single.name}: {ratio(r, single):.2f} (paid calls/s)")
    return "\n".join(lines)


def ratio(run: Run, single: Run) -> float:
    return run.load.rate / single.load.rate if single.load.rate else float("nan")


def details(r: Run) -> str:
    text = f"{r.name}: {r.load.ok} calls in {r.load.elapsed:.1f} s ({r.load.rate:.1f}/s)"
    if set(r.load.statuses) - {200}:
        text += f", statuses {dict(r.load.statuses)} e.g. {r.load.errors[:2]}"
    if r.load.exhausted:
        text += ", ran out of pre-signed payments (rate over the shorter run)"
    if r.cpu:
        text += f"; {r.cpu}"
    text += f"\n    chain: {r.check_text()}\n    ledger: {r.ledger_text()}"
    return text + f"\n    Redis commands: {r.commands_text()}"


def rows(setups: list[Run], clients: int) -> list[Row]:
    """The pooled runs of each setup as rows of the benchmarks' summary table (``python -m
    benchmarks``): the rate of each cluster setup against the single node, then the checks."""
    single, out = setups[0], []
    for r in setups[1:]:
        out.append(
            Row(
                "cluster",
                f"paid calls/s, {clients} clients ({r.name})",
                f"{r.load.rate:.1f}/s",
                f"{single.load.rate:.1f}/s single",
                f"{ratio(r, single):.2f}",
                note=f"p50 {latency_ms(r, 0.5)} vs {latency_ms(single, 0.5)}, "
                f"p99 {latency_ms(r, 0.99)} vs {latency_ms(single, 0.99)}",
            )
        )
    for r in setups:
        out += settlement_rows("cluster", r)
        out.append(
            Row(
                "cluster",
                f"one settled event per call ({r.name})",
                yes_no(r.ledger_once),
                goal="n events, n payments",
                passed=r.ledger_once,
                note=r.ledger_text(),
            )
        )
    return out


def measure_all(
    seconds: float = SECONDS, clients: int = CLIENTS, rounds: int = ROUNDS, aof: bool = False
) -> list[Run]:
    """Every setup ``rounds`` times, in ABBA order (reversed every other round), each run from the
    same chain state; returns one pooled ``Run`` per setup, the single node first."""
    setups = [SINGLE, CLUSTER, *([CLUSTER_AOF] if aof else [])]
    done: dict[Setup, list[Run]] = {setup: [] for setup in setups}
    with devnet() as dev:
        for round_, setup in ChainReset(dev).abba(setups, rounds):
            print(f"... {setup.name}, round {round_ + 1} of {rounds}", file=sys.stderr, flush=True)
            done[setup].append(measure(dev, setup, clients, seconds))
    return [pooled(done[setup]) for setup in setups]


def run(
    seconds: float = SECONDS, clients: int = CLIENTS, rounds: int = ROUNDS, aof: bool = False
) -> list[Row]:
    return rows(measure_all(seconds, clients, rounds, aof), clients)


def main() -> None:
    parser = LoadParser(
        __doc__,
        SECONDS,
        CLIENTS,
        ROUNDS,
        "measured seconds per run",
        "concurrent paying clients",
        "runs per setup, in ABBA order",
    )
    parser.add_argument(
        "--aof", action="store_true", help="also run on a cluster left with appendfsync always"
    )
    args = parser.parse_checked()
    started = time.monotonic()
    setups = measure_all(args.seconds, args.clients, args.rounds, args.aof)
    print(comparison(setups, args.clients))
    print()
    for setup in setups:
        for part in setup.parts:
            print(details(part))
    failures = [row for row in rows(setups, args.clients) if row.passed is False]
    if failures:
        print()
        print_table(failures)
    print(f"\nruntime {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
