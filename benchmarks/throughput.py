"""Paid calls per second with 16 concurrent clients: ours vs the reference stack built from the official
``x402`` package (``benchmarks.reference_stack``: the SDK's Flask middleware + the SDK's facilitator),
both under gunicorn with ``gunicorn.conf.py`` (2 workers x 32 threads), on the same anvil, Redis and
stand-in model (0 ms).

Every payment is distinct and signed before timing. After each run the chain is checked: the payee's
balance grew by exactly n x price and the settling account's nonce by exactly n, n = the 200 answers,
so every answered call was settled exactly once.

    python -m benchmarks.throughput [--seconds 15] [--clients 16] [--only ours|reference]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from .harness import (
    CHAT_PATH,
    CpuMeter,
    Devnet,
    Gunicorn,
    Row,
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


@dataclass
class Run:
    name: str
    load: LoadResult
    price: int
    paid_delta: int
    nonce_delta: int
    cpu: str = ""

    @property
    def settled_once(self) -> bool:
        return self.paid_delta == self.load.ok * self.price and self.nonce_delta == self.load.ok

    def check_text(self) -> str:
        return (
            f"n={self.load.ok}: payee +{self.paid_delta} (n x price = {self.load.ok * self.price}), "
            f"settler nonce +{self.nonce_delta}"
        )


def measure(
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
    wanted = min(MAX_HEADERS, int(warm.rate * seconds * 1.6) + 300)
    headers = sign_headers(requirement, dev.payer_key, wanted)
    balance, nonce = dev.chain.balance(payee), dev.nonce_of(settler)
    meter = CpuMeter(
        {**processes, "anvil": [dev.anvil.process.pid], "redis": [dev.redis.process.pid]}
    ).start()
    load = paid_load(url, headers, clients, seconds)
    meter.stop()
    run = Run(name, load, price, dev.chain.balance(payee) - balance, dev.nonce_of(settler) - nonce)
    run.cpu = meter.per_call_text(load.ok)
    return run


def describe(run: Run) -> str:
    lat = run.load.latencies
    text = (
        f"{run.load.ok} calls in {run.load.elapsed:.1f} s, latency p50 {median(lat) * 1000:.0f} ms "
        f"p90 {percentile(lat, 0.9) * 1000:.0f} ms"
        if lat
        else "no successful call"
    )
    if set(run.load.statuses) != {200}:
        text += f", statuses {dict(run.load.statuses)} e.g. {run.load.errors[:2]}"
    if run.cpu:
        text += f"; {run.cpu}"
    if run.load.exhausted:
        text += ", ran out of pre-signed payments (rate measured over the shorter run)"
    return text


def run(seconds: float = 15.0, clients: int = 16, only: str | None = None) -> list[Row]:
    runs: dict[str, Run] = {}
    with devnet() as dev:
        if only in (None, "ours"):
            with Gunicorn("wsgi:app", dev.proxy_env()) as ours:
                workers = {"gunicorn": [ours.process.pid, *ours.worker_pids()]}
                runs["ours"] = measure(
                    dev,
                    "ours",
                    ours.url + CHAT_PATH,
                    dev.wallets.pay_to,
                    dev.wallets.relayer,
                    clients,
                    seconds,
                    workers,
                )
        if only in (None, "reference"):
            price = int(runs["ours"].price) if "ours" in runs else 1000
            with reference_stack(dev, price) as ref:
                processes = {
                    "gunicorn": [ref.gunicorn.process.pid, *ref.gunicorn.worker_pids()],
                    "facilitator": [ref.facilitator_pid],
                }
                runs["reference"] = measure(
                    dev,
                    "reference",
                    ref.gunicorn.url + CHAT_PATH,
                    ref.pay_to,
                    ref.relayer,
                    clients,
                    seconds,
                    processes,
                )
    rows = []
    ours, ref = runs.get("ours"), runs.get("reference")
    if ours and ref:
        ratio = ours.load.rate / ref.load.rate if ref.load.rate else float("inf")
        rows.append(
            Row(
                "throughput",
                f"paid calls/s, {clients} clients",
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
                f"paid calls/s, {clients} clients ({only_run.name})",
                f"{only_run.load.rate:.1f}/s",
                note=describe(only_run),
            )
        )
    for r in (ours, ref):
        if r is not None:
            failed = failed_answers_row("throughput", r.load.statuses, r.load.errors)
            if failed is not None:
                failed.figure += f" ({r.name})"
                rows.append(failed)
            rows.append(
                Row(
                    "throughput",
                    f"settled once on chain ({r.name})",
                    "yes" if r.settled_once else "NO",
                    goal="n x price, nonce +n",
                    passed=r.settled_once,
                    note=r.check_text(),
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--only", choices=["ours", "reference"])
    args = parser.parse_args()
    print_table(run(args.seconds, args.clients, args.only))


if __name__ == "__main__":
    main()
