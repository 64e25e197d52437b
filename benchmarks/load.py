"""A bounded closed-loop load generator for paid calls: N client threads, one keep-alive session each,
each payment header used once. Stops when the time is up or the headers run out, whichever is first.
With ``lanes``, each client has its own headers, taken in order (``benchmarks.batch``: one channel
per client, whose vouchers must come one after another)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from tests.support import CHAT_BODY

from .harness import session


@dataclass
class LoadResult:
    ok: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[Any] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    exhausted: bool = False  # the headers ran out before the time did

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    def answered(self, response: requests.Response) -> None:
        """Called by ``paid_load``, under its lock, for every call answered 200: a subclass reads
        more of the answer here (``benchmarks.upto.ChargedLoad``: its ``PAYMENT-RESPONSE``)."""


def paid_load(
    url: str,
    headers: list[dict[str, str]],
    clients: int = 16,
    seconds: float | None = None,
    body: Any = None,
    timeout: float = 30.0,
    result: LoadResult | None = None,
    lanes: Sequence[Sequence[dict[str, str]]] | None = None,
) -> LoadResult:
    """Run until ``seconds`` have passed (None: until every header is used); one call per header.
    ``result``: an empty ``LoadResult`` (of a subclass) to fill and return, instead of a new one.
    ``lanes``: one list of headers per client instead of ``headers`` shared by ``clients``."""
    body = CHAT_BODY if body is None else body
    result = LoadResult() if result is None else result
    sources = [headers] * clients if lanes is None else list(lanes)
    clients = len(sources)
    lock = threading.Lock()
    position = [0] * clients  # shared (index 0) without lanes, one per client with them
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else float("inf")

    def take(lane: int) -> dict[str, str] | None:
        index = 0 if lanes is None else lane
        with lock:
            if time.perf_counter() >= deadline:
                return None
            if position[index] >= len(sources[lane]):
                result.exhausted = seconds is not None
                return None
            header = sources[lane][position[index]]
            position[index] += 1
            return header

    def client(lane: int) -> None:
        s = session()
        try:
            while (header := take(lane)) is not None:
                t0 = time.perf_counter()
                try:
                    response = s.post(url, json=body, headers=header, timeout=timeout)
                    status: Any = response.status_code
                    detail = "" if status == 200 else response.text[:200]
                except requests.RequestException as exc:
                    status, detail = type(exc).__name__, str(exc)[:200]
                t1 = time.perf_counter()
                with lock:
                    result.statuses[status] += 1
                    if status == 200:
                        result.ok += 1
                        result.latencies.append(t1 - t0)
                        result.answered(response)
                    elif len(result.errors) < 5:
                        result.errors.append(f"{status}: {detail}")
        finally:
            s.close()

    threads = [threading.Thread(target=client, args=(i,), name=f"load-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    calls = len(headers) if lanes is None else max(map(len, sources), default=0) * clients
    for t in threads:
        t.join((seconds or 0) + calls * timeout / max(clients, 1) + 60)
    result.elapsed = time.perf_counter() - started
    return result
