"""Do long streams starve short calls? gunicorn thread counts compared side by side.

For each configuration, 40 paid streams (1 s each) are opened at once through gunicorn (2
workers), and while they run, free short calls (``GET /v1/models``) are timed. A worker thread is
held for a stream's whole length, so too few threads make short calls queue behind streams.

    python -m benchmarks.stream_starvation [--streams 40] [--threads 8,32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from app.devnet import DevChain, Wallets, free_port, prepare_chain, start_anvil, start_redis
from app.standin_model import StandinModel
from app.x402.codec import encode_header
from app.x402.payer import offered_requirements, sign_payment
from tests.support import CHAT_BODY

ROOT = Path(__file__).resolve().parent.parent
STREAM_BODY = {**CHAT_BODY, "stream": True}


def run_config(threads: int, streams: int, env: dict[str, str], payer_key: bytes) -> dict[str, float]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env={**env, "X402_BIND": f"127.0.0.1:{port}", "X402_WORKERS": "2", "X402_THREADS": str(threads)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                requests.get(url + "/healthz", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        first = requests.post(url + "/v1/chat/completions", json=STREAM_BODY, timeout=10)
        _, _, accepts = offered_requirements(dict(first.headers), first.json())
        headers = [
            {
                "PAYMENT-SIGNATURE": encode_header(
                    sign_payment(accepts[0], 2, payer_key, int(time.time()), os.urandom(32)).to_wire()
                )
            }
            for _ in range(streams)
        ]

        def stream(header: dict[str, str]) -> float:
            started = time.perf_counter()
            response = requests.post(
                url + "/v1/chat/completions", json=STREAM_BODY, headers=header, timeout=120
            )
            b"".join(response.iter_content(None))
            assert response.status_code == 200
            return time.perf_counter() - started

        short: list[float] = []
        with ThreadPoolExecutor(streams) as pool:
            running = [pool.submit(stream, h) for h in headers]
            time.sleep(0.2)
            for _ in range(20):
                started = time.perf_counter()
                requests.get(url + "/v1/models", timeout=120).raise_for_status()
                short.append(time.perf_counter() - started)
                time.sleep(0.02)
            durations = [f.result() for f in running]
        return {
            "threads": threads,
            "short_p50_ms": statistics.median(short) * 1000,
            "short_max_ms": max(short) * 1000,
            "streams_all_done_s": max(durations),
        }
    finally:
        process.terminate()
        process.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--threads", default="8,32")
    args = parser.parse_args()
    anvil, redis_service = start_anvil(), start_redis()
    assert redis_service is not None, "redis-server is required"
    standin = StandinModel().start()
    standin.behaviour.chunks, standin.behaviour.chunk_delay = 10, 0.1
    wallets = Wallets.fresh()
    prepare_chain(DevChain(anvil.url), wallets, 1000 * 10**6)
    env = {
        **os.environ,
        "X402_PAY_TO": wallets.pay_to,
        "X402_RPC_URLS": anvil.url,
        "X402_RELAYER_KEY": wallets.relayer_key,
        "REDIS_URL": redis_service.url,
        "X402_UPSTREAM_URL": standin.url,
    }
    try:
        rows = [
            run_config(int(t), args.streams, env, bytes.fromhex(wallets.payer_key[2:]))
            for t in args.threads.split(",")
        ]
    finally:
        standin.stop()
        redis_service.stop()
        anvil.stop()
    print(f"{args.streams} concurrent 1 s paid streams, gunicorn gthread, 2 workers")
    print(f"{'threads':>8} {'short p50':>10} {'short max':>10} {'all streams done':>17}")
    for row in rows:
        print(
            f"{row['threads']:>8} {row['short_p50_ms']:>8.1f}ms {row['short_max_ms']:>8.1f}ms "
            f"{row['streams_all_done_s']:>15.2f}s"
        )


if __name__ == "__main__":
    main()
