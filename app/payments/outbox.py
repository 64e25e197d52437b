"""Moves ledger events from the shard outboxes into the ledger stream (Redis Cluster only).

On a cluster a transition writes its events to the outbox in its payment's own slot, in the same
script as the state change (``app.payments.keys``); the stream lives in another slot, perhaps on a
master that is down. This module moves them over afterwards, at least once from each outbox and
exactly once into the stream: the move is a script in the stream's slot that appends only entries
newer than the last one it recorded for that outbox (``DRAINED_KEY``), so any number of workers and
hosts may drain the same outbox at once, and a drain cut short is simply done again. Outbox entry ids
only grow (a Redis stream keeps its last id even when emptied), which is what makes them the marks.

Each process drains the outboxes it wrote to within ``GATHER_SECONDS`` of a write (one pass for
the writes of that window), and every outbox every ``SWEEP_SECONDS`` (events left by a process that
died); after a pass that failed it waits ``RETRY_SECONDS``. While the stream's master is down events
wait in their outboxes; payments are not held up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from app.backends.store import STORE_ERRORS, Script
from app.payments.keys import DRAINED_KEY, LEDGER_STREAM, outbox_keys

log = logging.getLogger(__name__)

SWEEP_SECONDS = 10.0  # every outbox is looked at this often (seconds)
GATHER_SECONDS = 0.05  # after a write, how long the drainer waits for more before it moves them
RETRY_SECONDS = 1.0  # after a pass that failed (a master down), the pause before the next one
BATCH = 500  # outbox entries moved per script call

# KEYS[1] ledger stream, KEYS[2] drained marks. ARGV: 1 outbox key, 2 stream maxlen, then per entry
# its outbox id, its number of fields n and n name, value pairs (every field an event has: an upto
# event's scheme, a credit event's kind). Appends the entries newer than the outbox's mark, in
# order, and moves the mark. Returns {mark, appended}.
_DRAIN = Script(
    """
local function newer(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local mark = redis.call('HGET', KEYS[2], ARGV[1]) or '0-0'
local appended = 0
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  if newer(ARGV[i], mark) then
    local entry = {}
    for f = 1, 2 * n do table.insert(entry, ARGV[i + 1 + f]) end
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(entry))
    mark = ARGV[i]
    appended = appended + 1
  end
  i = i + 2 + 2 * n
end
redis.call('HSET', KEYS[2], ARGV[1], mark)
return {mark, appended}
""",
    fenced=False,  # idempotent: a late run appends nothing twice
)


def following(entry_id: str) -> str:
    """The stream id right after ``entry_id`` (``"<ms>-<seq>"``): ``XTRIM MINID`` of it drops
    ``entry_id`` and everything older."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


class Outbox:
    """The drainer of one process. ``client`` returns the (cluster) client; ``maxlen`` bounds the
    stream (approximately, entries)."""

    def __init__(self, client: Callable[[], Any], maxlen: int) -> None:
        self._client = client
        self._maxlen = maxlen
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0  # the process whose thread drains (a forked worker starts its own)
        self.last_error: Exception | None = None

    def written(self, outbox: str) -> None:
        """An event was written to ``outbox``: move it to the stream soon (starts the drainer)."""
        with self._lock:
            self._dirty.add(outbox)
        self.ensure_running()
        self._wake.set()

    def ensure_running(self) -> None:
        """Start this process's drainer thread unless it runs already."""
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
        threading.Thread(target=self._run, name="x402-outbox", daemon=True).start()

    def _run(self) -> None:
        swept = -SWEEP_SECONDS
        while True:
            self._wake.clear()  # a write from here on wakes the next round
            with self._lock:
                targets, self._dirty = self._dirty, set()
            sweep = time.monotonic() - swept >= SWEEP_SECONDS
            swept = time.monotonic() if sweep else swept
            try:
                failed = self.drain(outbox_keys() if sweep else sorted(targets))
                error = self.last_error
            except Exception as exc:  # the drainer must outlive anything (a cluster that is unreachable)
                failed, error = set(targets), exc
            if error is not None:
                log.warning("ledger outboxes not drained: %s: %s; retried later", type(error).__name__, error)
            if failed:
                with self._lock:
                    self._dirty |= targets & failed
                time.sleep(RETRY_SECONDS)
            if self._wake.wait(SWEEP_SECONDS):
                time.sleep(GATHER_SECONDS)  # one drain for the events of many calls, not one per call

    def drain(self, outboxes: Iterable[str]) -> set[str]:
        """Move every event waiting in ``outboxes`` into the stream; returns the outboxes that could
        not be drained now (their master, or the stream's, did not answer). The outboxes of a master
        that failed once are skipped for the rest of the pass, and all of them once the stream's did;
        ``last_error`` keeps the pass's first failure (None when there was none)."""
        client = self._client()
        todo = list(outboxes)
        failed: set[str] = set()
        down: set[str] = set()
        first: Exception | None = None
        for index, outbox in enumerate(todo):
            node = client.get_node_from_key(outbox).name
            if node in down:
                failed.add(outbox)
                continue
            try:
                self._drain_one(client, outbox)
            except _StreamDown as exc:
                failed.update(todo[index:])
                first = first or exc.__cause__
                break
            except STORE_ERRORS as exc:
                failed.add(outbox)
                down.add(node)
                first = first or exc
        self.last_error = first
        return failed

    def _drain_one(self, client: Any, outbox: str) -> None:
        while True:
            entries = client.xrange(outbox, count=BATCH)
            if not entries:
                return
            try:
                mark, _appended = _DRAIN(
                    client, [LEDGER_STREAM, DRAINED_KEY], drain_args(outbox, self._maxlen, entries)
                )
            except STORE_ERRORS as exc:
                raise _StreamDown from exc
            client.xtrim(outbox, minid=following(mark.decode()), approximate=False)
            if len(entries) < BATCH:
                return


def drain_args(outbox: str, maxlen: int, entries: list[tuple[Any, dict[Any, Any]]]) -> list[Any]:
    """``_DRAIN``'s arguments for ``entries`` (``XRANGE`` of ``outbox``: id and fields each), every
    field of every entry kept."""
    args: list[Any] = [outbox, maxlen]
    for entry_id, fields in entries:
        args += [entry_id, len(fields)]
        for name, value in fields.items():
            args += [name, value]
    return args


class _StreamDown(Exception):
    """The ledger stream's master did not answer: no outbox can be drained in this pass."""
