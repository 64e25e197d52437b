"""I/O per paid call: JSON-RPC HTTP requests (each a round trip; a batch counts once) before
settlement and in total, and Redis round trips, for one paid call through the proxy under gunicorn.

The proxy (1 worker: the counts do not depend on the worker count) talks to anvil through a counting
HTTP proxy and to redis-server through a counting TCP relay (``benchmarks.countingproxies``). After
warm-up calls (connections open, Lua scripts loaded), the calls are counted one at a time; "before
settlement" is everything before the request that carries ``eth_sendRawTransaction``.

Goals (issue "Fast"): <= 2 RPC round trips before settlement, <= 3 Redis round trips per call.

    python -m benchmarks.io_counts [--calls 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from typing import Any

from tests.support import CHAT_BODY

from .countingproxies import CountingRedis, CountingRpc
from .harness import CHAT_PATH, Gunicorn, Row, devnet, offered, print_table, session, sign_headers

GOAL_RPC_BEFORE = 2
GOAL_REDIS = 3
SEND = "eth_sendRawTransaction"


def _ledger_scripts() -> dict[str, str]:
    """Names for the app's Lua scripts (EVALSHA is keyed by SHA1): every module-level string of
    ``app.payments.ledger`` that calls Redis, named after its constant (``_CLAIM`` -> ``claim``)."""
    try:
        from app.payments import ledger
    except ImportError:
        return {}
    return {
        name.strip("_").lower(): value
        for name, value in vars(ledger).items()
        if isinstance(value, str) and "redis.call" in value
    }


def count_one(url: str, header: dict[str, str], rpc: CountingRpc, redis: CountingRedis) -> dict[str, Any]:
    client = session()
    mark = time.perf_counter()
    response = client.post(url, json=CHAT_BODY, headers=header, timeout=30)
    assert response.status_code == 200, response.text[:300]
    time.sleep(0.3)  # anything the call still does after answering
    client.close()
    requests_ = rpc.since(mark)
    trips = redis.since(mark)
    send_at = next((r.at for r in requests_ if SEND in r.methods), None)
    before = [r for r in requests_ if send_at is None or r.at < send_at]
    return {
        "rpc_total": len(requests_),
        "rpc_before": len(before),
        "rpc_lists": [r.methods for r in requests_],
        "redis_total": len(trips),
        "redis_before": len([t for t in trips if send_at is None or t.at < send_at]),
        "redis_lists": [t.commands for t in trips],
    }


def _compact(methods: list[str]) -> str:
    counts = Counter(methods)
    return "[" + ", ".join(f"{m}x{n}" if n > 1 else m for m, n in counts.items()) + "]"


def run(calls: int = 5) -> tuple[list[Row], dict[str, Any]]:
    with devnet() as dev:
        rpc = CountingRpc(dev.anvil.url)
        redis_port = int(dev.redis.url.rsplit(":", 1)[1].split("/")[0])
        redis = CountingRedis(redis_port, _ledger_scripts())
        try:
            env = dev.proxy_env(X402_RPC_URLS=rpc.url, REDIS_URL=redis.url)
            with Gunicorn("wsgi:app", env, workers=1) as proxy:
                url = proxy.url + CHAT_PATH
                headers = sign_headers(offered(url), dev.payer_key, calls + 3)
                warm = session()
                for header in headers[:3]:
                    assert warm.post(url, json=CHAT_BODY, headers=header, timeout=30).status_code == 200
                warm.close()
                samples = [count_one(url, h, rpc, redis) for h in headers[3:]]
        finally:
            rpc.stop()
            redis.stop()
    first = samples[0]
    rpc_before = statistics.median(s["rpc_before"] for s in samples)
    rpc_total = statistics.median(s["rpc_total"] for s in samples)
    redis_total = statistics.median(s["redis_total"] for s in samples)
    redis_before = statistics.median(s["redis_before"] for s in samples)
    spread = lambda key: f"{min(s[key] for s in samples)}..{max(s[key] for s in samples)}"  # noqa: E731
    rpc_note = (
        f"median of {len(samples)} calls (range before {spread('rpc_before')}, total {spread('rpc_total')}); "
        "one call's HTTP requests: " + " ".join(_compact(m) for m in first["rpc_lists"])
    )
    redis_note = (
        f"median of {len(samples)} calls (range {spread('redis_total')}; {redis_before:g} before the send); "
        "one call's round trips: " + " ".join("[" + ", ".join(c) + "]" for c in first["redis_lists"])
    )
    rows = [
        Row(
            "io_counts",
            "RPC round trips before settlement",
            f"{rpc_before:g}",
            goal=f"<= {GOAL_RPC_BEFORE}",
            passed=rpc_before <= GOAL_RPC_BEFORE,
            note=rpc_note,
        ),
        Row("io_counts", "RPC round trips per paid call", f"{rpc_total:g}", goal="report"),
        Row(
            "io_counts",
            "Redis round trips per paid call",
            f"{redis_total:g}",
            goal=f"<= {GOAL_REDIS}",
            passed=redis_total <= GOAL_REDIS,
            note=redis_note,
        ),
    ]
    return rows, {"samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--calls", type=int, default=5, help="calls counted one at a time, after 3 warm-up calls"
    )
    args = parser.parse_args()
    rows, _ = run(args.calls)
    print_table(rows)


if __name__ == "__main__":
    main()
