"""Sequential paid calls through the proxy vs the same call straight to the model host.

Everything runs on loopback in one process tree: anvil (automine), redis-server, the stand-in model
and the proxy (werkzeug, threaded). Payments are signed before timing. For each upstream delay the
paid and direct calls alternate, so both see the same machine load.

    python -m benchmarks.paid_latency [--calls 40] [--delays 0,0.3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import requests

from app import create_app
from app.devnet import DevChain, Wallets, prepare_chain, start_anvil, start_redis
from app.settings import Settings
from app.standin_model import StandinModel
from app.x402.codec import encode_header
from app.x402.payer import offered_requirements, sign_payment
from tests.support import CHAT_BODY, serve


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(calls: int, delays: list[float]) -> list[dict[str, Any]]:
    anvil, redis_service = start_anvil(), start_redis()
    if redis_service is None:
        raise SystemExit("redis-server is required")
    standin = StandinModel().start()
    wallets = Wallets.fresh()
    chain = DevChain(anvil.url)
    prepare_chain(chain, wallets, 1000 * 10**6)
    settings = Settings.from_env(
        env={},
        overrides={
            "X402_PAY_TO": wallets.pay_to,
            "X402_RPC_URLS": anvil.url,
            "X402_RELAYER_KEY": wallets.relayer_key,
            "REDIS_URL": redis_service.url,
            "X402_UPSTREAM_URL": standin.url,
        },
    )
    server = serve(create_app(settings))
    url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
    session = requests.Session()
    rows = []
    try:
        first = session.post(url, json=CHAT_BODY, timeout=30)
        _, _, accepts = offered_requirements(dict(first.headers), first.json())
        key = bytes.fromhex(wallets.payer_key[2:])
        for delay in delays:
            standin.behaviour.delay = delay
            payments = [
                encode_header(sign_payment(accepts[0], 2, key, int(time.time()), os.urandom(32)).to_wire())
                for _ in range(calls)
            ]
            paid, direct = [], []
            for header in payments:
                started = time.perf_counter()
                response = session.post(
                    url, json=CHAT_BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=30
                )
                paid.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
                started = time.perf_counter()
                session.post(
                    standin.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30
                ).raise_for_status()
                direct.append(time.perf_counter() - started)
            rows.append(
                {
                    "upstream_delay_ms": delay * 1000,
                    "paid_p50_ms": statistics.median(paid) * 1000,
                    "paid_p90_ms": percentile(paid, 0.9) * 1000,
                    "direct_p50_ms": statistics.median(direct) * 1000,
                    "added_p50_ms": (statistics.median(paid) - statistics.median(direct)) * 1000,
                    "ratio_p50": statistics.median(paid) / statistics.median(direct),
                }
            )
    finally:
        server.shutdown()
        standin.stop()
        redis_service.stop()
        anvil.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--delays", default="0,0.3", help="upstream delays in seconds, comma-separated")
    args = parser.parse_args()
    rows = run(args.calls, [float(d) for d in args.delays.split(",")])
    print(
        f"{'upstream':>9} {'paid p50':>9} {'paid p90':>9} {'direct p50':>10} {'added p50':>10} {'ratio':>6}"
    )
    for row in rows:
        print(
            f"{row['upstream_delay_ms']:>7.0f}ms {row['paid_p50_ms']:>7.1f}ms {row['paid_p90_ms']:>7.1f}ms "
            f"{row['direct_p50_ms']:>8.1f}ms {row['added_p50_ms']:>8.1f}ms {row['ratio_p50']:>6.2f}"
        )


if __name__ == "__main__":
    main()
