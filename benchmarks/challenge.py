"""Unpaid 402 throughput: POST /v1/chat/completions without payment, through gunicorn, vs a plain Flask
hello-world (``benchmarks.hello_app``) under the same gunicorn config (2 workers, 32 threads).

Load generator: ``wrk`` (Debian package ``wrk``), 1 thread, 16 keep-alive connections, the same JSON
body for both apps; rounds alternate hello / ours so both see the same machine. Without wrk, a bounded
Python client (16 threads, one keep-alive ``http.client`` connection each) is used instead, and the
table says so: it saturates the client's GIL long before gunicorn, so its ratio means less.

    python -m benchmarks.challenge [--seconds 3] [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from tests.support import CHAT_BODY

from .harness import CHAT_PATH, Gunicorn, Row, devnet, gunicorns, median, print_table

CONNECTIONS = 16
GOAL = 0.8


def wrk_rate(url: str, seconds: float, script: Path) -> tuple[float, int, int]:
    """(requests/s, requests, non-2xx) from one wrk run."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    total = re.search(r"([0-9]+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+([0-9]+)", out)
    if not rate or not total:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    return float(rate.group(1)), int(total.group(1)), int(non2xx.group(1)) if non2xx else 0


def python_rate(url: str, seconds: float, body: bytes) -> tuple[float, int, int]:
    """The fallback load generator: 16 threads, keep-alive, for ``seconds``."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    counts = {"n": 0, "non2xx": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        n = bad = 0
        while time.monotonic() < deadline:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            n += 1
            bad += response.status >= 300
        conn.close()
        with lock:
            counts["n"] += n
            counts["non2xx"] += bad

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return counts["n"] / (time.monotonic() - started), counts["n"], counts["non2xx"]


def run(seconds: float = 3.0, rounds: int = 3) -> list[Row]:
    body = json.dumps(CHAT_BODY)
    use_wrk = shutil.which("wrk") is not None
    tool = "wrk -t1 -c16" if use_wrk else "python client, 16 threads (wrk not installed)"
    with devnet() as dev, tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        env = dev.proxy_env()
        ours_rates: list[float] = []
        hello_rates: list[float] = []
        checks: list[str] = []
        with gunicorns(Gunicorn("benchmarks.hello_app:app", env), Gunicorn("wsgi:app", env)) as (hello, ours):
            first = requests.post(ours.url + CHAT_PATH, json=CHAT_BODY, timeout=10)
            assert first.status_code == 402 and first.headers.get("PAYMENT-REQUIRED"), first.text[:300]
            for round_ in range(rounds):
                for target, rates in ((hello, hello_rates), (ours, ours_rates)):
                    url = target.url + CHAT_PATH
                    if use_wrk:
                        if round_ == 0:
                            wrk_rate(url, 1, script)  # warm-up: connections, worker threads, caches
                        rate, total, non2xx = wrk_rate(url, seconds, script)
                    else:
                        rate, total, non2xx = python_rate(url, seconds, body.encode())
                    rates.append(rate)
                    expected_non2xx = total if target is ours else 0  # every answer of ours is a 402
                    if abs(non2xx - expected_non2xx) > CONNECTIONS:  # wrk cuts the last in-flight ones
                        checks.append(f"{target.app_spec}: {non2xx} non-2xx of {total}")
    ours_rate, hello_rate = median(ours_rates), median(hello_rates)
    ratio = ours_rate / hello_rate
    note = f"load: {tool}, {rounds} x {seconds:g} s rounds, median; each round: {ours_rates} vs {hello_rates}"
    if checks:
        note += "; unexpected statuses: " + "; ".join(checks)
    return [
        Row(
            "challenge",
            "unpaid 402 req/s (gunicorn 2x32)",
            f"{ours_rate:.0f}/s",
            f"{hello_rate:.0f}/s hello",
            f"{ratio:.2f}",
            f">= {GOAL}",
            ratio >= GOAL and not checks,
            note,
        )
    ]


def profile(requests_count: int = 3000) -> str:
    """In-process, no sockets: WSGI time per request of our 402 vs the hello app, and a cProfile of
    ours (cumulative, our code and Flask's), to see where the 402 path spends its CPU."""
    import cProfile
    import io
    import pstats

    from werkzeug.test import EnvironBuilder

    from app import create_checked_app
    from app.settings import Settings

    from .hello_app import app as hello_app

    body = json.dumps(CHAT_BODY).encode()

    def call(app: Any, n: int) -> float:
        def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
            return None

        environs = [
            EnvironBuilder(
                path=CHAT_PATH,
                method="POST",
                data=body,
                content_type="application/json",
                base_url="http://127.0.0.1:8402",
            ).get_environ()
            for _ in range(n)
        ]
        started = time.perf_counter()
        for environ in environs:
            b"".join(app(environ, start_response))
        return (time.perf_counter() - started) / n

    with devnet() as dev:
        overrides = {k: v for k, v in dev.proxy_env().items() if k.startswith(("X402_", "REDIS_"))}
        ours = create_checked_app(Settings.from_env(env={}, overrides=overrides))
        call(ours, 200), call(hello_app, 200)  # warm
        ours_s, hello_s = call(ours, requests_count), call(hello_app, requests_count)
        profiler = cProfile.Profile()
        profiler.enable()
        call(ours, requests_count)
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    stats.print_stats(r"app/|flask/app|flask/json|werkzeug/sansio/request", 30)
    return (
        f"WSGI time per request, in process: ours (402) {ours_s * 1000:.3f} ms, "
        f"hello {hello_s * 1000:.3f} ms (difference {(ours_s - hello_s) * 1000:.3f} ms)\n" + out.getvalue()
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also profile the 402 path in process")
    args = parser.parse_args()
    print_table(run(args.seconds, args.rounds))
    if args.profile:
        print()
        print(profile())


if __name__ == "__main__":
    main()
