"""Timing probes around the app's phases, installed from outside ``app/`` (for profiles only).

``install()`` wraps a fixed list of methods with ``time.perf_counter`` stamps (CLOCK_MONOTONIC on
Linux, so stamps taken in gunicorn workers compare with the benchmark's own) and the thread's CPU
time (``time.thread_time``) spent inside. Events are kept in
memory and a daemon thread per process appends them every 50 ms to ``$BENCH_PROBE_DIR/<pid>.jsonl``,
so the measured path pays a list append, not a file write. A target the app no longer has is
skipped and listed in ``$BENCH_PROBE_DIR/missing.json``: the benchmarks then report n/a.

Served as ``benchmarks.probed_wsgi:app``.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# (label, module, class or None for a module-level function, attribute)
TARGETS: tuple[tuple[str, str, str | None, str], ...] = (
    ("catalog.quote", "app.catalog", "Catalog", "quote"),
    ("gate.begin", "app.payments.gate", "Gate", "begin"),
    ("offline.parse", "app.payments.gate", None, "parse_payment_header"),
    ("offline.match", "app.payments.gate", None, "match_requirement"),
    ("offline.check", "app.payments.gate", None, "check_authorization"),
    ("ledger.claim", "app.payments.ledger", "Ledger", "claim"),
    ("ledger.transition", "app.payments.ledger", "Ledger", "transition"),
    ("ledger.append_event", "app.payments.ledger", "Ledger", "append_event"),
    ("ledger.reserve_nonce", "app.payments.ledger", "Ledger", "reserve_relayer_nonce"),
    ("ledger.start_settlement", "app.payments.ledger", "Ledger", "start_settlement"),
    ("gate.record", "app.payments.gate", "Gate", "_record"),
    ("chain.preflight", "app.backends.chain", "Chain", "preflight"),
    ("chain.receipts", "app.backends.chain", "Chain", "receipts"),
    ("rpc.batch", "app.backends.rpc", "RpcClient", "batch"),
    ("rpc.broadcast", "app.backends.rpc", "RpcClient", "broadcast"),
    ("settle.background", "app.payments.gate", "Gate", "_settle"),
    ("settler.settle", "app.payments.settlement", "LocalSettler", "settle"),
    ("settler.sign_send", "app.payments.settlement", "LocalSettler", "_sign_and_send"),
    ("ticket.result", "app.payments.gate", "Ticket", "result"),
    ("upstream.forward", "app.backends.upstream", "Upstream", "forward"),
    ("gate.challenge", "app.payments.gate", "Gate", "challenge"),
)

_events: list[tuple[Any, ...]] = []
_lock = threading.Lock()
_writer_pid = 0
_directory: Path | None = None


def _detail(label: str, args: tuple[Any, ...]) -> str:
    """A short tag: the JSON-RPC methods of a batch, the target state of a transition."""
    try:
        if label == "rpc.batch":
            return ",".join(str(call[0]) for call in args[1])
        if label == "ledger.transition":
            return f"{'|'.join(args[2])}->{args[3]}"
    except (IndexError, TypeError):
        pass
    return ""


def _flush_forever(path: Path) -> None:
    """Every 50 ms, for at most an hour (a profile run takes seconds; the worker ends long before)."""
    for _ in range(72_000):
        time.sleep(0.05)
        with _lock:
            batch = _events[:]
            del _events[:]
        if batch:
            with path.open("a") as file:
                for event in batch:
                    file.write(json.dumps(event) + "\n")


def _record(event: tuple[Any, ...]) -> None:
    global _writer_pid
    if _writer_pid != os.getpid() and _directory is not None:  # first event in this (forked) process
        with _lock:
            if _writer_pid != os.getpid():
                _writer_pid = os.getpid()
                del _events[:]  # events copied from the parent by fork belong to the parent
                path = _directory / f"{os.getpid()}.jsonl"
                threading.Thread(target=_flush_forever, args=(path,), daemon=True).start()
    with _lock:
        _events.append(event)


def _wrap(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started, cpu_started = time.perf_counter(), time.thread_time()
        outcome = "ok"
        try:
            return function(*args, **kwargs)
        except BaseException as exc:
            outcome = type(exc).__name__
            raise
        finally:
            ended, cpu = time.perf_counter(), time.thread_time() - cpu_started
            _record(
                (label, started, ended, cpu, threading.current_thread().name, _detail(label, args), outcome)
            )

    timed.__probe__ = True  # type: ignore[attr-defined]
    return timed


def install(directory: str | None = None) -> list[str]:
    """Wrap every target that exists; returns the labels of the missing ones."""
    global _directory
    _directory = Path(directory or os.environ["BENCH_PROBE_DIR"])
    _directory.mkdir(parents=True, exist_ok=True)
    missing = []
    for label, module_name, class_name, attribute in TARGETS:
        try:
            module = importlib.import_module(module_name)
            owner = getattr(module, class_name) if class_name else module
            function = getattr(owner, attribute)
        except (ImportError, AttributeError):
            missing.append(label)
            continue
        if not getattr(function, "__probe__", False):
            setattr(owner, attribute, _wrap(label, function))
    (_directory / "missing.json").write_text(json.dumps(missing))
    return missing


def wrap_wsgi(app: Any) -> Any:
    """Time each request's WSGI call (for a streamed answer: until the body iterator is returned)."""
    inner = app.wsgi_app
    app.wsgi_app = _wrap("wsgi.call", inner)
    return app


# --- reading ---------------------------------------------------------------------------------------


def read_events(directory: str | Path, settle_seconds: float = 0.2) -> list[dict[str, Any]]:
    """Every event written so far, sorted by start (waits a little for the writer threads)."""
    time.sleep(settle_seconds)
    events = []
    for path in Path(directory).glob("*.jsonl"):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            try:
                label, started, ended, cpu, thread, detail, outcome = json.loads(line)
            except ValueError:
                continue  # a line still being written
            events.append(
                {
                    "label": label,
                    "start": started,
                    "end": ended,
                    "ms": (ended - started) * 1000,
                    "cpu_ms": cpu * 1000,
                    "thread": thread,
                    "detail": detail,
                    "outcome": outcome,
                    "pid": pid,
                }
            )
    return sorted(events, key=lambda e: e["start"])


def missing_targets(directory: str | Path) -> list[str]:
    path = Path(directory) / "missing.json"
    return json.loads(path.read_text()) if path.exists() else []


def within(events: list[dict[str, Any]], start: float, end: float) -> Iterator[dict[str, Any]]:
    return (e for e in events if start <= e["start"] <= end)
