"""Sequential paid calls through the proxy vs the same call straight to the model host.

Everything runs on loopback: anvil (automine), redis-server, the stand-in model and the proxy under
gunicorn (``gunicorn.conf.py``, 2 workers x 32 threads; ``--server werkzeug`` runs it in-process
instead). Payments are signed before timing. For each upstream delay the paid and direct calls
alternate, so both see the same machine load.

Goals (issue "Fast"): with a 300 ms model, paid p50 <= 1.05 x direct p50 (settlement overlaps the
model call); with a 0 ms model, the added milliseconds are reported.

    python -m benchmarks.paid_latency [--calls 40] [--slow-calls 20] [--delays 0,0.3] [--server gunicorn]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from app import create_checked_app
from app.settings import Settings
from tests.support import CHAT_BODY, serve

from .harness import (
    CHAT_PATH,
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

GOAL_RATIO_SLOW = 1.05
SLOW_DELAY = 0.3


def measure(
    url: str, direct_url: str, standin: Any, payer_key: bytes, delay: float, calls: int
) -> dict[str, Any]:
    standin.behaviour.delay = delay
    headers = sign_headers(offered(url), payer_key, calls + 2)
    client = session()
    paid: list[float] = []
    direct: list[float] = []
    statuses: dict[int, int] = {}
    examples: list[str] = []
    for i, header in enumerate(headers):
        started = time.perf_counter()
        response = client.post(url, json=CHAT_BODY, headers=header, timeout=30)
        elapsed = time.perf_counter() - started
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code != 200:
            examples.append(response.text[:200])
            continue
        started = time.perf_counter()
        client.post(direct_url, json=CHAT_BODY, timeout=30).raise_for_status()
        direct_elapsed = time.perf_counter() - started
        if i >= 2:  # the first two warm connections and worker threads
            paid.append(elapsed)
            direct.append(direct_elapsed)
    client.close()
    return {
        "delay_ms": delay * 1000,
        "paid_p50": statistics.median(paid),
        "paid_p90": percentile(paid, 0.9),
        "direct_p50": statistics.median(direct),
        "added_p50": statistics.median(paid) - statistics.median(direct),
        "ratio": statistics.median(paid) / statistics.median(direct),
        "calls": len(paid),
        "statuses": statuses,
        "examples": examples,
    }


def run(
    calls: int = 40,
    slow_calls: int = 20,
    delays: tuple[float, ...] = (0.0, SLOW_DELAY),
    server: str = "gunicorn",
) -> list[Row]:
    results = []
    with devnet() as dev:
        direct_url = dev.standin.url + CHAT_PATH
        if server == "gunicorn":
            proxy = Gunicorn("wsgi:app", dev.proxy_env()).start()
            url, stop = proxy.url + CHAT_PATH, proxy.stop
        else:
            settings = Settings.from_env(
                env={},
                overrides={k: v for k, v in dev.proxy_env().items() if k.startswith(("X402_", "REDIS_"))},
            )
            werkzeug = serve(create_checked_app(settings))
            url, stop = f"http://127.0.0.1:{werkzeug.server_port}{CHAT_PATH}", werkzeug.shutdown
        try:
            for delay in delays:
                n = slow_calls if delay >= 0.1 else calls
                results.append(measure(url, direct_url, dev.standin, dev.payer_key, delay, n))
        finally:
            stop()
    rows = []
    for r in results:
        detail = (
            f"{server}, {r['calls']} sequential calls: paid p50 {r['paid_p50'] * 1000:.1f} ms "
            f"(p90 {r['paid_p90'] * 1000:.1f}), direct p50 {r['direct_p50'] * 1000:.1f} ms"
        )
        if r["delay_ms"] >= 100:
            rows.append(
                Row(
                    "paid_latency",
                    f"paid p50, model {r['delay_ms']:.0f} ms",
                    f"{r['paid_p50'] * 1000:.1f} ms",
                    f"{r['direct_p50'] * 1000:.1f} ms direct",
                    f"{r['ratio']:.3f}",
                    f"<= {GOAL_RATIO_SLOW}",
                    r["ratio"] <= GOAL_RATIO_SLOW,
                    detail,
                )
            )
        else:
            rows.append(
                Row(
                    "paid_latency",
                    f"added p50, model {r['delay_ms']:.0f} ms",
                    f"+{r['added_p50'] * 1000:.1f} ms",
                    f"{r['direct_p50'] * 1000:.1f} ms direct",
                    f"{r['ratio']:.2f}",
                    "report",
                    None,
                    detail,
                )
            )
    statuses: dict[int, int] = {}
    for r in results:
        for status, n in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + n
    failed = failed_answers_row("paid_latency", statuses, [e for r in results for e in r["examples"]])
    return [*rows, failed] if failed else rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=40, help="calls per fast (< 100 ms) delay")
    parser.add_argument("--slow-calls", type=int, default=20, help="calls per slow delay")
    parser.add_argument("--delays", default="0,0.3", help="upstream delays in seconds, comma-separated")
    parser.add_argument("--server", choices=["gunicorn", "werkzeug"], default="gunicorn")
    args = parser.parse_args()
    delays = tuple(float(d) for d in args.delays.split(","))
    print_table(run(args.calls, args.slow_calls, delays, args.server))


if __name__ == "__main__":
    main()
