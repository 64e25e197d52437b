"""Where a paid call's time goes: the proxy under gunicorn with timing probes around its phases
(``benchmarks.probed_wsgi``; ``benchmarks.probe`` lists them), model delay 0.

1. Sequential calls: the median wall time of each phase per call, and how many times it ran.
2. 16 concurrent clients: the CPU milliseconds per call spent in each phase (thread CPU time inside
   the wrapped call, inclusive of what it calls), next to the workers' whole CPU per call from /proc;
   the difference is Flask, gunicorn and the upstream relay.

Phases are inclusive: ``gate.begin`` contains the offline checks, the claim and the preflight;
``settle.background`` contains ``settler.settle``, which contains the send and the receipt polls.

    python -m benchmarks.phases [--calls 30] [--concurrent-calls 400] [--delay 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

from tests.support import CHAT_BODY

from . import probe
from .harness import CHAT_PATH, CpuMeter, Gunicorn, Row, devnet, offered, print_table, session, sign_headers
from .load import paid_load

ORDER = (
    "wsgi.call",
    "catalog.quote",
    "gate.begin",
    "offline.parse",
    "offline.match",
    "offline.check",
    "ledger.claim",
    "chain.preflight",
    "upstream.forward",
    "ticket.result",
    "settle.background",
    "ledger.start_settlement",
    "ledger.reserve_nonce",
    "settler.settle",
    "settler.sign_send",
    "chain.receipts",
    "rpc.batch",
    "gate.record",
    "ledger.transition",
    "ledger.append_event",
    "gate.challenge",
)


def sequential(
    url: str, headers: list[dict[str, str]], probe_dir: str
) -> tuple[list[dict[str, Any]], list[float]]:
    client = session()
    windows = []
    for header in headers:
        t0 = time.perf_counter()
        response = client.post(url, json=CHAT_BODY, headers=header, timeout=30)
        t1 = time.perf_counter()
        assert response.status_code == 200, response.text[:300]
        windows.append((t0, t1))
        time.sleep(0.02)  # let the settlement thread's last events land in this call's window
    client.close()
    events = probe.read_events(probe_dir)
    per_call: list[dict[str, Any]] = []
    for t0, t1 in windows:
        calls: dict[str, list[float]] = defaultdict(list)
        details: dict[str, list[str]] = defaultdict(list)
        for e in probe.within(events, t0, t1 + 0.015):
            calls[e["label"]].append(e["ms"])
            if e["detail"]:
                details[e["label"]].append(e["detail"])
        per_call.append({"ms": calls, "details": details})
    return per_call, [(t1 - t0) * 1000 for t0, t1 in windows]


def summarize_sequential(per_call: list[dict[str, Any]]) -> list[tuple[str, float, float, float]]:
    """(label, median count per call, median total ms per call, median ms per occurrence)."""
    rows = []
    labels = {label for c in per_call for label in c["ms"]}
    for label in [name for name in ORDER if name in labels] + sorted(labels - set(ORDER)):
        counts = [len(c["ms"].get(label, [])) for c in per_call]
        totals = [sum(c["ms"].get(label, [])) for c in per_call]
        each = [ms for c in per_call for ms in c["ms"].get(label, [])]
        rows.append((label, statistics.median(counts), statistics.median(totals), statistics.median(each)))
    return rows


def concurrent(url: str, headers: list[dict[str, str]], probe_dir: str, meter: CpuMeter) -> dict[str, Any]:
    mark = time.perf_counter()
    meter.start()
    load = paid_load(url, headers, clients=16)
    meter.stop()
    events = [e for e in probe.read_events(probe_dir) if e["start"] >= mark]
    cpu: dict[str, float] = defaultdict(float)
    wall: dict[str, list[float]] = defaultdict(list)
    count: dict[str, int] = defaultdict(int)
    for e in events:
        cpu[e["label"]] += e["cpu_ms"]
        wall[e["label"]].append(e["ms"])
        count[e["label"]] += 1
    return {"load": load, "cpu": cpu, "wall": wall, "count": count, "meter": meter}


def run(calls: int = 30, concurrent_calls: int = 400, delay: float = 0.0) -> tuple[list[Row], str]:
    with devnet() as dev, tempfile.TemporaryDirectory(prefix="bench-probe-") as probe_dir:
        dev.standin.behaviour.delay = delay
        env = dev.proxy_env(BENCH_PROBE_DIR=probe_dir)
        with Gunicorn("benchmarks.probed_wsgi:app", env) as proxy:
            url = proxy.url + CHAT_PATH
            requirement = offered(url)
            missing = probe.missing_targets(probe_dir)
            headers = sign_headers(requirement, dev.payer_key, calls + 3 + concurrent_calls)
            warm = session()
            for header in headers[:3]:
                assert warm.post(url, json=CHAT_BODY, headers=header, timeout=30).status_code == 200
            warm.close()
            per_call, client_ms = sequential(url, headers[3 : 3 + calls], probe_dir)
            meter = CpuMeter({"workers": proxy.worker_pids()})
            conc = concurrent(url, headers[3 + calls :], probe_dir, meter)
    seq = summarize_sequential(per_call)
    lines = [
        f"Sequential, {calls} paid calls, model {delay * 1000:g} ms: "
        f"client-side p50 {statistics.median(client_ms):.1f} ms",
        f"  {'phase':<26}{'per call':>9}{'ms/call':>10}{'ms each':>10}",
    ]
    for label, n, total, each in seq:
        lines.append(f"  {label:<26}{n:>9g}{total:>10.2f}{each:>10.2f}")
    rpc_details = [d for c in per_call for d in c["details"].get("rpc.batch", [])]
    if rpc_details:
        kinds = defaultdict(int)
        for d in rpc_details:
            kinds[d] += 1
        lines.append(
            "  rpc.batch kinds over all calls: " + "; ".join(f"{n}x [{k}]" for k, n in kinds.items())
        )
    load, ok = conc["load"], conc["load"].ok
    lines.append(
        f"Concurrent, 16 clients, {ok} paid calls at {load.rate:.1f}/s: " + conc["meter"].per_call_text(ok)
    )
    lines.append(f"  {'phase':<26}{'per call':>9}{'CPU ms/call':>13}{'wall p50 ms':>13}")
    for label in [name for name in ORDER if name in conc["cpu"]] + sorted(set(conc["cpu"]) - set(ORDER)):
        lines.append(
            f"  {label:<26}{conc['count'][label] / max(ok, 1):>9.2f}{conc['cpu'][label] / max(ok, 1):>13.2f}"
            f"{statistics.median(conc['wall'][label]):>13.2f}"
        )
    if missing:
        lines.append("  probes not installed (the app changed): " + ", ".join(missing))
    text = "\n".join(lines)
    workers_cpu = conc["meter"].used.get("workers", 0.0) / max(ok, 1) * 1000
    rows = [
        Row(
            "phases",
            f"sequential paid call p50 (model {delay * 1000:g} ms)",
            f"{statistics.median(client_ms):.1f} ms",
            goal="report",
        ),
        Row("phases", "worker CPU per paid call (16 clients)", f"{workers_cpu:.1f} ms", goal="report"),
    ]
    return rows, text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--concurrent-calls", type=int, default=400)
    parser.add_argument("--delay", type=float, default=0.0, help="model delay in seconds")
    args = parser.parse_args()
    rows, text = run(args.calls, args.concurrent_calls, args.delay)
    print(text)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
