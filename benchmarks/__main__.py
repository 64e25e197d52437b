"""Run every benchmark of issue "Fast" and print one table (figure, baseline, ratio, goal, pass/fail).

    python -m benchmarks [--only challenge,stream] [--skip memory] [--no-profile]

Each benchmark also runs alone: ``python -m benchmarks.<name>`` (challenge, paid_latency, throughput,
stream, verify_cpu, io_counts, memory, phases, upto, credit, batch, tee). A benchmark that crashes is
reported as a FAIL row with its error, and the others still run. Everything is on loopback and
stops by itself.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

from .harness import Row, print_table


def _io_counts() -> list[Row]:
    from . import io_counts

    return io_counts.run()[0]


PROFILE_TEXT: list[str] = []


def _phases() -> list[Row]:
    from . import phases

    rows, text = phases.run()
    PROFILE_TEXT.append(text)
    return rows


def _module(name: str) -> Callable[[], list[Row]]:
    def run() -> list[Row]:
        module = __import__(f"benchmarks.{name}", fromlist=["run"])
        rows: list[Row] = module.run()
        return rows

    return run


BENCHMARKS: dict[str, Callable[[], list[Row]]] = {
    "challenge": _module("challenge"),
    "paid_latency": _module("paid_latency"),
    "throughput": _module("throughput"),
    "stream": _module("stream"),
    "verify_cpu": _module("verify_cpu"),
    "io_counts": _io_counts,
    "memory": _module("memory"),
    "phases": _phases,
    "upto": _module("upto"),
    "credit": _module("credit"),
    "batch": _module("batch"),
    "tee": _module("tee"),
}


def versions() -> str:
    parts = [f"python {platform.python_version()}"]
    for package in ("gunicorn", "flask", "x402"):
        try:
            from importlib.metadata import version

            parts.append(f"{package} {version(package)}")
        except Exception:
            pass
    for command in (["redis-server", "--version"], ["wrk", "--version"]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=10)
            line = (out.stdout or out.stderr).splitlines()[0]
            parts.append(line.split(" sha=")[0].replace("Redis server v=", "redis-server ").split(" [")[0])
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    try:
        from app.devnet import find_anvil

        out = subprocess.run([find_anvil(), "--version"], capture_output=True, text=True, timeout=10)
        parts.append(out.stdout.splitlines()[0].replace("Version: ", ""))
    except Exception:
        pass
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names")
    parser.add_argument("--no-profile", action="store_true", help="skip the phase profile (phases)")
    args = parser.parse_args(argv)
    chosen = [n for n in (args.only.split(",") if args.only else BENCHMARKS) if n]
    skipped = set(filter(None, args.skip.split(","))) | ({"phases"} if args.no_profile else set())
    unknown = [n for n in chosen + sorted(skipped) if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")

    print(f"# {datetime.date.today().isoformat()}  {versions()}", flush=True)
    print(f"# {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    rows: list[Row] = []
    runtimes: list[tuple[str, float]] = []
    started = time.monotonic()
    for name in chosen:
        if name in skipped:
            continue
        print(f"... {name}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            rows.extend(BENCHMARKS[name]())
        except Exception as exc:  # report and go on with the others
            traceback.print_exc()
            rows.append(
                Row(
                    name,
                    "benchmark crashed",
                    "error",
                    passed=False,
                    note=f"{type(exc).__name__}: {exc}"[:300],
                )
            )
        runtimes.append((name, time.monotonic() - t0))
    total = time.monotonic() - started

    print()
    print_table(rows)
    if PROFILE_TEXT:
        print()
        print("Phase profile (benchmarks.phases):")
        print(PROFILE_TEXT[0])
    print()
    print("runtime: " + ", ".join(f"{n} {s:.0f} s" for n, s in runtimes) + f"; total {total:.0f} s")
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    failed = [r for r in rows if r.passed is False]
    print(f"{len([r for r in rows if r.passed])} goals met, {len(failed)} missed")
    return 1 if any(r.figure == "benchmark crashed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
