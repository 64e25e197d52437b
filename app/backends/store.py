"""The Redis the ledger lives in: one node, or a Redis Cluster reached through any of its masters.

``Store`` connects on first use, never at construction (``create_app`` stays free of network I/O).
It asks the node named by ``REDIS_URL`` whether cluster mode is on (``INFO cluster``) and then
uses redis-py's ``RedisCluster`` client, which learns the slot map from that node and follows
``MOVED``/``ASK`` itself. ``REDIS_CLUSTER=auto`` (the default) takes the node's word; ``yes`` and
``no`` say what the operator expects, and a node that is otherwise is a ``SettingsError``. A node
that does not answer is raised as ``redis.RedisError`` (``STORE_ERRORS``), so every caller fails
closed the same way for one node and for a cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from app.settings import REDIS_CLUSTER_MODES, SettingsError

SOCKET_TIMEOUT = 5.0  # seconds a command may take (one node)
CONNECT_TIMEOUT = 3.0  # seconds to open a connection to one node
# A cluster's masters fail one at a time: a stalled one must cost the calls waiting on it little, so
# its commands get less time and one retry (redis-py's default is three, each a full timeout).
CLUSTER_SOCKET_TIMEOUT = 2.0  # seconds a command may take on a cluster
CLUSTER_CONNECT_TIMEOUT = 1.0  # seconds, per node of a cluster: a dead master is found out quickly
CLUSTER_RETRIES = 1
FENCE_MARGIN = 1.0  # seconds: a script runs only if it starts this long before the caller gives up
PROBE_TIMEOUT = 1.0  # seconds a readiness PING of one master may take
# What a Redis that does not answer raises: redis-py's cluster client has errors of its own
# (no reachable node, a slot not covered) outside RedisError.
STORE_ERRORS = (redis.RedisError, RedisClusterException)


@dataclass(frozen=True)
class Coverage:
    """Who serves the slots a set of keys hashes to, as seen by ``Store.coverage``.

    ``masters`` and ``down`` are ``host:port`` addresses; ``unserved`` counts the keys' slots that no
    answering master holds; ``state`` is the cluster's own ``cluster_state`` (``ok``/``fail``), or
    ``standalone`` for one node; ``full_coverage`` lists the answering masters left at
    ``cluster-require-full-coverage yes`` (each stops answering while any master is down)."""

    masters: tuple[str, ...]
    down: tuple[str, ...]
    unserved: int
    state: str
    full_coverage: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Every slot is held by a master that answers."""
        return not self.down and not self.unserved and self.state in ("ok", "standalone")


# Prepended to a fenced script: its last argument is a deadline (unix milliseconds); a script that
# starts after it changes nothing and answers an error. A command whose answer the caller stopped
# waiting for (a master stalled, then resumed) would otherwise take effect long after the caller
# acted on its failure, e.g. mark "served" an answer that was withheld. Needs the hosts' clocks and
# Redis's within FENCE_MARGIN of each other (NTP).
_FENCE = """local deadline = tonumber(table.remove(ARGV))
local clock = redis.call('TIME')
if tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) > deadline then
  return redis.error_reply('LATE the caller stopped waiting; nothing was changed')
end
"""


@dataclass(frozen=True)
class Script:
    """A Lua script (``source``), run by its SHA1 (``EVALSHA``) and sent whole (``EVAL``, which also
    caches it there) to a node that does not know it yet; ``fenced`` scripts take a deadline.

    Hand-written instead of redis-py's ``Script``: that one loads a missing script with ``SCRIPT
    LOAD``, which its cluster client sends to every master, so while one master is down every
    script call on the healthy ones fails too. ``EVAL`` goes only to the node of the keys."""

    source: str
    fenced: bool = True
    text: str = field(init=False)
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", (_FENCE if self.fenced else "") + self.source)
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())

    def __call__(self, client: Any, keys: list[str], args: list[Any], deadline_ms: int = 0) -> Any:
        """Run on ``client`` (one node or a cluster, routed by ``keys``); a fenced script does
        nothing after ``deadline_ms`` (unix milliseconds; ``Store.deadline_ms``). Raises
        ``redis.RedisError`` (``ResponseError`` "LATE …" when the deadline had passed)."""
        argv = [*args, deadline_ms] if self.fenced else args
        try:
            return client.evalsha(self.sha, len(keys), *keys, *argv)
        except redis.exceptions.NoScriptError:
            return client.eval(self.text, len(keys), *keys, *argv)


def as_store(store_or_client: Any) -> Store:
    """``store_or_client`` itself when it is a ``Store``, else a store around that ready client."""
    return store_or_client if isinstance(store_or_client, Store) else Store(client=store_or_client)


class Store:
    """A lazily connected Redis client: ``redis.Redis`` for one node, ``RedisCluster`` for a cluster.

    ``url`` is a ``redis://`` or ``rediss://`` URL of the node (any master of a cluster); ``mode`` is
    one of ``REDIS_CLUSTER_MODES``; ``client`` is a ready client (tests and the devnet's fake
    Redis), used as given.
    """

    def __init__(self, url: str = "", mode: str = "auto", client: Any = None) -> None:
        if mode not in REDIS_CLUSTER_MODES:
            raise ValueError(f"REDIS_CLUSTER must be one of {', '.join(REDIS_CLUSTER_MODES)}")
        self.url = url
        self.mode = mode
        self._client: Any = client
        self._cluster: bool | None = None if client is None else isinstance(client, RedisCluster)
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The connected client (``redis.Redis`` or ``RedisCluster``); the first call connects.
        Raises ``redis.RedisError`` when the node does not answer, ``SettingsError`` (REDIS_CLUSTER,
        REDIS_URL) when it is not what ``mode`` says or a cluster URL names a database other than 0."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    @property
    def cluster(self) -> bool:
        """Whether the store is a Redis Cluster (connects first when it has not yet)."""
        client = self.client
        if self._cluster is None:
            self._cluster = isinstance(client, RedisCluster)
        return self._cluster

    def deadline_ms(self) -> int:
        """The deadline for a fenced script sent now (unix milliseconds): before this client can give
        up on its answer (its socket timeout), by ``FENCE_MARGIN`` seconds."""
        timeout = CLUSTER_SOCKET_TIMEOUT if self._cluster else SOCKET_TIMEOUT
        return int((time.time() + timeout - FENCE_MARGIN) * 1000)

    def _connect(self) -> Any:
        probe = redis.Redis.from_url(
            self.url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT
        )
        try:
            cluster = bool(probe.info("cluster").get("cluster_enabled"))
        except redis.ResponseError as exc:  # SELECT of a database other than 0, on a cluster node
            raise SettingsError(
                "REDIS_URL", f"a Redis Cluster has only database 0, end the URL with /0 ({exc})"
            ) from None
        finally:
            probe.close()
        if self.mode != "auto" and cluster != (self.mode == "yes"):
            what = "a Redis Cluster node" if cluster else "a single Redis, not a cluster node"
            raise SettingsError("REDIS_CLUSTER", f"is {self.mode}, but {self.url} is {what}")
        if not cluster:
            self._cluster = False
            return redis.Redis.from_url(
                self.url,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=CONNECT_TIMEOUT,
                health_check_interval=30,
            )
        try:
            client = RedisCluster.from_url(
                self.url,
                socket_timeout=CLUSTER_SOCKET_TIMEOUT,
                socket_connect_timeout=CLUSTER_CONNECT_TIMEOUT,
                require_full_coverage=False,
                retry=Retry(NoBackoff(), CLUSTER_RETRIES),
            )
        except RedisClusterException as exc:  # redis-py's own class, outside RedisError
            raise redis.ConnectionError(f"Redis Cluster at {self.url}: {exc}") from exc
        self._cluster = True
        return client

    def primaries(self) -> list[tuple[str, Any]]:
        """``(host:port, client)`` per master: the cluster's primaries, or the one node (its URL)."""
        client = self.client
        if not self.cluster:
            return [(self.url, client)]
        return [(node.name, client.get_redis_connection(node)) for node in client.get_primaries()]

    def master_of(self, key: str) -> str:
        """``host:port`` of the master that holds ``key``'s slot (as ``primaries`` names it), the
        node's URL on one node. No I/O on a cluster whose slot map is known."""
        if not self.cluster:
            return self.url
        return str(self.client.get_node_from_key(key).name)

    def scan(self, match: str, count: int = 1000, skipped: list[str] | None = None) -> Iterator[str]:
        """Every key matching ``match`` on every master, as text (``SCAN`` on each primary in turn).
        A master that does not answer raises ``redis.RedisError`` — unless ``skipped`` is given and
        this is a cluster: then its address is appended there and the scan goes on with the others."""
        for name, node in self.primaries():
            try:
                for key in node.scan_iter(match=match, count=count):
                    yield key.decode() if isinstance(key, bytes) else str(key)
            except STORE_ERRORS:
                if skipped is None or not self.cluster:
                    raise
                skipped.append(name)

    def coverage(self, keys: Iterable[str]) -> Coverage:
        """Whether every slot ``keys`` hash to is held by a master that answers a ``PING`` (one
        ``CLUSTER SLOTS`` and one ``PING`` per master, each bounded by ``PROBE_TIMEOUT`` seconds).
        On one node: that node answers. Raises ``redis.RedisError`` when no node answers at all."""
        client = self.client
        if not self.cluster:
            client.ping()
            return Coverage((self.url,), (), 0, "standalone")
        slots = {key_slot(key.encode()) for key in keys}
        todo = [node.name for node in client.get_primaries()]
        seen: set[str] = set()
        down: list[str] = []
        owner: dict[int, str] = {}
        state = "fail"
        strict: list[str] = []
        while todo:
            address = todo.pop(0)
            if address in seen:
                continue
            seen.add(address)
            try:
                info, shards = _probe(address, need_slots=not owner)
            except redis.RedisError:
                down.append(address)
                continue
            state = "ok" if state == "ok" or info.get("cluster_state") == "ok" else state
            if info.get("require_full_coverage") == "yes":
                strict.append(address)
            for start, end, primary in shards:
                owner.update((slot, primary) for slot in slots if start <= slot <= end)
                todo.append(primary)
        if len(down) == len(seen):
            raise redis.ConnectionError(f"no master of the Redis Cluster at {self.url} answers")
        unserved = sum(1 for slot in slots if owner.get(slot) is None or owner[slot] in down)
        return Coverage(tuple(sorted(seen)), tuple(sorted(down)), unserved, state, tuple(sorted(strict)))


def _probe(address: str, need_slots: bool) -> tuple[dict[str, Any], list[tuple[int, int, str]]]:
    """``CLUSTER INFO`` of one master (``host:port``), with ``require_full_coverage`` from ``CONFIG GET``
    when the server allows it, and, with ``need_slots``, its ``CLUSTER SLOTS`` as ``(first slot, last
    slot, primary host:port)``; a fresh connection with ``PROBE_TIMEOUT``."""
    host, port = address.rsplit(":", 1)
    node = redis.Redis(
        host=host,
        port=int(port),
        socket_timeout=PROBE_TIMEOUT,
        socket_connect_timeout=PROBE_TIMEOUT,
        retry=Retry(NoBackoff(), 0),  # one try: a probe reports, it does not wait
    )
    try:
        info = dict(node.cluster("info"))
        with contextlib.suppress(redis.ResponseError):  # CONFIG is renamed or refused on some services
            config = node.config_get("cluster-require-full-coverage")
            info["require_full_coverage"] = config.get("cluster-require-full-coverage", "")
        shards = []
        for start, end, primary, *_replicas in node.execute_command("CLUSTER SLOTS") if need_slots else ():
            host_of = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            shards.append((int(start), int(end), f"{host_of}:{int(primary[1])}"))
        return info, shards
    finally:
        node.close()
