"""Do long streams starve short paid calls under gunicorn? The configuration before and after, side by side.

For each configuration, gunicorn (``gunicorn.conf.py``, gthread, 2 workers x 32 threads) serves the
devnet. 48 paid streams of 20 s each (the stand-in sends a chunk a second) are opened 0.1 s apart, as
clients arriving over 5 s would. One second after the last one, the client connections each worker
holds are counted (from /proc), and 10 short paid calls (non-streamed chat completions, each with its
own payment) are started 0.5 s apart while the streams run. A short call is *starved* when it is
answered only after a stream has ended: it waited for a thread of a worker full of streams.

* before: gunicorn's default ``worker_connections`` (1000) and ``keepalive = 5``: the configuration
  before issue 12, set over ``gunicorn.conf.py`` with ``GUNICORN_CMD_ARGS``. A gthread worker keeps
  accepting while all its threads are busy, so connections pile onto one worker and wait in its
  thread pool's queue while the other worker has free threads.
* after: ``gunicorn.conf.py`` as shipped: ``worker_connections = threads`` and keep-alive off. A worker
  whose threads are all taken stops accepting, and the next connection goes to a worker that has one.

    python -m benchmarks.stream_starvation [--streams 48] [--seconds 20] [--arrival 0.1] [--short 10]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from tests.support import CHAT_BODY

from .harness import CHAT_PATH, Devnet, Gunicorn, client_connections, devnet, offered, sign_headers

STREAM_BODY = {**CHAT_BODY, "stream": True}
CONFIGS = {
    "before": "--worker-connections 1000 --keep-alive 5",  # gunicorn's default, and our old keepalive
    "after": "",  # gunicorn.conf.py as it is
}
SETTLE_SECONDS = 1.0  # after the last stream is opened, before connections are counted
SHORT_SPACING = 0.5  # seconds between the starts of two short calls
LATE_FIRST_BYTE = 1.0  # a stream whose first byte takes longer than this (s) waited for a thread


@dataclass
class Outcome:
    """One configuration's figures. Latencies in seconds; ``*_end`` are perf_counter() stamps."""

    per_worker: list[int] = field(default_factory=list)  # client connections held by each worker
    stream_first_byte: list[float] = field(default_factory=list)  # from the stream's own start
    stream_end: list[float] = field(default_factory=list)
    stream_seconds: list[float] = field(default_factory=list)  # from its start to its last byte
    short_latency: list[float] = field(default_factory=list)  # from start to the full answer
    short_end: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def starved(self) -> int:
        """Short calls answered only after the first stream had ended."""
        return sum(end > min(self.stream_end) for end in self.short_end)

    @property
    def late_streams(self) -> int:
        return sum(first > LATE_FIRST_BYTE for first in self.stream_first_byte)


def run_config(
    dev: Devnet, cmd_args: str, streams: int, seconds: int, arrival: float, threads: int, shorts: int
) -> Outcome:
    """Serve with ``GUNICORN_CMD_ARGS=cmd_args`` over gunicorn.conf.py and measure one round."""
    env = dev.proxy_env(GUNICORN_CMD_ARGS=cmd_args)
    with Gunicorn("wsgi:app", env, workers=2, threads=threads) as server:
        url = server.url + CHAT_PATH
        stream_headers = sign_headers(offered(url, STREAM_BODY), dev.payer_key, streams)
        short_headers = sign_headers(offered(url, CHAT_BODY), dev.payer_key, shorts)
        dev.standin.behaviour.chunks, dev.standin.behaviour.chunk_delay = seconds, 1.0
        outcome = Outcome()
        lock = threading.Lock()
        timeout = 4 * seconds + 30

        def stream(header: dict[str, str]) -> None:
            started = time.perf_counter()
            with requests.post(url, json=STREAM_BODY, headers=header, stream=True, timeout=timeout) as r:
                chunks = r.iter_content(None)
                next(chunks, b"")
                first = time.perf_counter() - started
                for _ in chunks:
                    pass
            end = time.perf_counter()
            with lock:
                outcome.stream_first_byte.append(first)
                outcome.stream_end.append(end)
                outcome.stream_seconds.append(end - started)
                outcome.statuses[r.status_code] = outcome.statuses.get(r.status_code, 0) + 1

        def short(header: dict[str, str]) -> None:
            started = time.perf_counter()
            response = requests.post(url, json=CHAT_BODY, headers=header, timeout=timeout)
            end = time.perf_counter()
            with lock:
                outcome.short_latency.append(end - started)
                outcome.short_end.append(end)
                outcome.statuses[response.status_code] = outcome.statuses.get(response.status_code, 0) + 1

        with ThreadPoolExecutor(streams + shorts) as pool:
            running = []
            for header in stream_headers:
                running.append(pool.submit(stream, header))
                time.sleep(arrival)
            time.sleep(SETTLE_SECONDS)
            outcome.per_worker = sorted(
                (client_connections(pid, server.port) for pid in server.worker_pids()), reverse=True
            )
            for header in short_headers:
                running.append(pool.submit(short, header))
                time.sleep(SHORT_SPACING)
            for future in running:
                future.result()
    return outcome


def comparison(before: Outcome, after: Outcome) -> list[tuple[str, str, str, str]]:
    """(figure, before, after, before/after) lines."""

    def seconds(value: float) -> str:
        return f"{value:.3f} s"

    def ratio(b: float, a: float) -> str:
        return f"{b / a:.1f}" if a > 0 else "-"

    def statuses(o: Outcome) -> str:
        return ", ".join(f"{count} x {status}" for status, count in sorted(o.statuses.items()))

    p50 = statistics.median
    shorts = len(before.short_end)
    return [
        (
            "client connections per worker",
            " + ".join(map(str, before.per_worker)),
            " + ".join(map(str, after.per_worker)),
            "-",
        ),
        (
            f"streams waiting > {LATE_FIRST_BYTE:g} s for a first byte",
            str(before.late_streams),
            str(after.late_streams),
            "-",
        ),
        (
            "short paid call p50",
            seconds(p50(before.short_latency)),
            seconds(p50(after.short_latency)),
            ratio(p50(before.short_latency), p50(after.short_latency)),
        ),
        (
            "short paid call max",
            seconds(max(before.short_latency)),
            seconds(max(after.short_latency)),
            ratio(max(before.short_latency), max(after.short_latency)),
        ),
        (
            "short calls answered only after a stream ended",
            f"{before.starved} of {shorts}",
            f"{after.starved} of {shorts}",
            "-",
        ),
        (
            "longest stream, start to end",
            seconds(max(before.stream_seconds)),
            seconds(max(after.stream_seconds)),
            ratio(max(before.stream_seconds), max(after.stream_seconds)),
        ),
        ("HTTP statuses", statuses(before), statuses(after), "-"),
    ]


def print_table(lines: list[tuple[str, str, str, str]]) -> None:
    header = ("figure", "before", "after", "before/after")
    widths = [max(len(line[i]) for line in (header, *lines)) for i in range(4)]
    for line in (header, tuple("-" * w for w in widths), *lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=48, help="paid streams (default 48)")
    parser.add_argument("--seconds", type=int, default=20, help="length of each stream, s (default 20)")
    parser.add_argument("--arrival", type=float, default=0.1, help="s between stream opens (default 0.1)")
    parser.add_argument("--threads", type=int, default=32, help="threads per worker (default 32)")
    parser.add_argument("--short", type=int, default=10, help="short paid calls (default 10)")
    args = parser.parse_args(argv)
    with devnet() as dev:
        before, after = (
            run_config(dev, cmd_args, args.streams, args.seconds, args.arrival, args.threads, args.short)
            for cmd_args in (CONFIGS["before"], CONFIGS["after"])
        )
    print(
        f"{args.streams} paid streams of {args.seconds} s opened {args.arrival:g} s apart, then {args.short} "
        f"short paid calls {SHORT_SPACING:g} s apart; gunicorn gthread, 2 workers x {args.threads} threads"
    )
    print(f"before: GUNICORN_CMD_ARGS={CONFIGS['before']!r} over gunicorn.conf.py; after: gunicorn.conf.py")
    print_table(comparison(before, after))


if __name__ == "__main__":
    main()
