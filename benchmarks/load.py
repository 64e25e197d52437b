"""A bounded closed-loop load generator for paid calls: N client threads, one keep-alive session each,
each payment header used once. Stops when the time is up or the headers run out, whichever is first."""

from __future__ import annotations

import threading
import time
from collections import Counter
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
) -> LoadResult:
    """Run until ``seconds`` have passed (None: until every header is used); one call per header.
    ``result``: an empty ``LoadResult`` (of a subclass) to fill and return, instead of a new one."""
    body = CHAT_BODY if body is None else body
    result = LoadResult() if result is None else result
    lock = threading.Lock()
    position = {"next": 0}
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else float("inf")

    def take() -> dict[str, str] | None:
        with lock:
            if time.perf_counter() >= deadline:
                return None
            if position["next"] >= len(headers):
                result.exhausted = seconds is not None
                return None
            header = headers[position["next"]]
            position["next"] += 1
            return header

    def client() -> None:
        s = session()
        try:
            while (header := take()) is not None:
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

    threads = [threading.Thread(target=client, name=f"load-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join((seconds or 0) + len(headers) * timeout / max(clients, 1) + 60)
    result.elapsed = time.perf_counter() - started
    return result
