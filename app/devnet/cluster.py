"""A real local Redis Cluster for tests and benchmarks: ``masters`` ``redis-server`` processes on
127.0.0.1 (no replicas), joined with ``redis-cli --cluster create``.

Every node keeps an append-only file written on every command (``--appendfsync always``) in its own
temporary directory, so a master that was killed and started again (``kill`` then ``restart``) comes back
with its keys and its ``nodes.conf``. ``--cluster-require-full-coverage no`` keeps the slots of the live
masters serving while one master is down, and ``--cluster-node-timeout 1000`` (milliseconds) makes the
others flag it failed after about one second.

A cluster has database 0 only, so every URL ends in ``/0``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis
from redis.crc import key_slot

from app.devnet import DevnetError, _wait_until, free_port

HOST = "127.0.0.1"
SLOTS = 16384
BUS_PORT_OFFSET = 10000
NODE_TIMEOUT_MS = 1000
START_TIMEOUT = 20.0


def _port_is_free(port: int) -> bool:
    """Whether a TCP socket can be bound to ``HOST``:``port`` right now (it is released again)."""
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int] | frozenset[int] = frozenset(), attempts: int = 200) -> int:
    """A free port P on 127.0.0.1 whose cluster bus port P + 10000 is free too, and neither of which is in
    ``taken`` (ports and bus ports already handed out). Both are released again, so another process may
    take one first. Raises ``DevnetError`` when no such pair is found in ``attempts`` tries."""
    for _ in range(attempts):
        port = free_port()
        bus = port + BUS_PORT_OFFSET
        if bus > 65535 or {port, bus} & taken:
            continue
        if _port_is_free(bus):
            return port
    raise DevnetError(f"no free port pair P, P+{BUS_PORT_OFFSET} on {HOST} in {attempts} tries")


def _find(binary: str) -> str:
    """``binary`` as a path (absolute or relative) or a name looked up on PATH; raises ``DevnetError``."""
    found = shutil.which(binary)
    if found is None:
        raise DevnetError(f"{binary} not found: install Redis (e.g. `apt-get install redis-server`)")
    return found


def _client(port: int, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis(
        host=HOST, port=port, socket_connect_timeout=0.5, socket_timeout=timeout, decode_responses=True
    )


def _cluster_info(port: int) -> dict[str, str]:
    """``CLUSTER INFO`` of the node on ``port`` as a dict of strings; raises ``redis.RedisError``."""
    with _client(port) as client:
        answer = client.execute_command("CLUSTER INFO")
    if isinstance(answer, dict):  # redis-py parses it
        return {str(name): str(value) for name, value in answer.items()}
    info: dict[str, str] = {}
    for line in str(answer).splitlines():
        name, sep, value = line.partition(":")
        if sep:
            info[name.strip()] = value.strip()
    return info


@dataclass
class RedisClusterProcesses:
    """The nodes of a local Redis Cluster, all masters; node ``i`` listens on ``ports[i]`` (its bus on
    ``ports[i] + 10000``) and keeps its files in ``workdirs[i]`` (``nodes.conf``, the AOF,
    ``redis.log``). Use ``start_redis_cluster`` to make one; ``with`` stops it at the end."""

    ports: list[int]
    workdirs: list[str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    binary: str = "redis-server"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<ports[0]>/0``: a seed for ``redis.cluster.RedisCluster.from_url``."""
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        """One ``redis://127.0.0.1:<port>/0`` for every master, in node order."""
        return [f"redis://{HOST}:{port}/0" for port in self.ports]

    def alive(self, i: int) -> bool:
        """Whether node ``i``'s process is running (it has not exited or been killed)."""
        return self.processes[i].poll() is None

    def _live(self) -> list[int]:
        return [i for i in range(len(self.ports)) if self.alive(i)]

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        workdir = self.workdirs[i]
        options = {
            "bind": HOST,
            "port": str(self.ports[i]),
            "dir": workdir,
            "logfile": str(Path(workdir) / "redis.log"),
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(NODE_TIMEOUT_MS),
            "cluster-require-full-coverage": "no",
            "appendonly": "yes",
            "appendfsync": "always",
            "save": "",
        }
        command = [self.binary]
        for name, value in options.items():
            command += [f"--{name}", value]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _start_node(self, i: int, timeout: float = START_TIMEOUT) -> None:
        """Start node ``i`` on its port and directory and wait until it answers PING; raises
        ``DevnetError`` when it exits or does not answer within ``timeout`` seconds."""
        process = self._spawn(i)
        if i < len(self.processes):
            self.processes[i] = process
        else:
            self.processes.append(process)
        with _client(self.ports[i]) as client:
            _wait_until(
                client.ping,
                f"redis-server cluster node {i} on port {self.ports[i]} (log: {self.workdirs[i]}/redis.log)",
                process,
                timeout,
            )

    def _unhealthy(self) -> str:
        """Why the cluster is not yet healthy from every live node's view, or ``""`` when it is. Healthy:
        each live node says ``cluster_state:ok``, has all 16384 slots assigned, knows every node, and
        counts as ok every slot that no killed master owns."""
        live = self._live()
        if not live:
            return "no node is running"
        dead_slots = 0
        if len(live) < len(self.ports):
            owners = self._slot_owners()
            dead_slots = sum(end - start + 1 for start, end, owner in owners if owner not in live)
        for i in live:
            try:
                info = _cluster_info(self.ports[i])
            except redis.RedisError as exc:
                return f"node {i}: {exc}"
            state = info.get("cluster_state")
            assigned = int(info.get("cluster_slots_assigned", "0"))
            ok_slots = int(info.get("cluster_slots_ok", "0"))
            known = int(info.get("cluster_known_nodes", "0"))
            if state != "ok" or assigned != SLOTS or ok_slots < SLOTS - dead_slots or known < len(self.ports):
                return (
                    f"node {i}: cluster_state:{state} slots_assigned:{assigned} slots_ok:{ok_slots} "
                    f"known_nodes:{known}"
                )
        return ""

    def wait_ok(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every live node reports ``cluster_state:ok``, all 16384 slots assigned, every node
        known, and every slot of a live master ok (not flagged PFAIL/FAIL). With a killed master its slots
        stay assigned but may count as failed. Polls every 50 ms; raises ``DevnetError`` (with the last
        reason) when that is not so within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reason = self._unhealthy()
            except (redis.RedisError, DevnetError) as exc:
                reason = str(exc)
            if not reason:
                return
            if time.monotonic() >= deadline:
                raise DevnetError(f"Redis Cluster not healthy within {timeout:.0f} s: {reason}")
            time.sleep(0.05)

    def _slot_owners(self) -> list[tuple[int, int, int]]:
        """``(first slot, last slot, node index)`` for every slot range, from ``CLUSTER SLOTS`` of the
        first live node that answers (killed masters still own their slots there). Raises
        ``DevnetError`` when no live node answers."""
        index = {port: i for i, port in enumerate(self.ports)}
        errors: list[str] = []
        for i in self._live():
            try:
                with _client(self.ports[i]) as client:
                    answer = client.execute_command("CLUSTER SLOTS")
            except redis.RedisError as exc:
                errors.append(f"node {i}: {exc}")
                continue
            return [(int(row[0]), int(row[1]), index[int(row[2][1])]) for row in answer]
        raise DevnetError(
            f"no live cluster node answered CLUSTER SLOTS: {'; '.join(errors) or 'none running'}"
        )

    def node_for_key(self, key: str | bytes) -> int:
        """Index (into ``ports``) of the master serving ``key``'s hash slot (CRC16 of the key or of its
        ``{hash tag}``, mod 16384), which may be a killed one. Raises ``DevnetError`` when no live node
        answers or no node owns the slot."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for start, end, owner in self._slot_owners():
            if start <= slot <= end:
                return owner
        raise DevnetError(f"slot {slot} of key {key!r} is not assigned to any node")

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (no shutdown, no final save: what it has is its AOF) and wait for it to
        exit. A node already stopped is left as it is."""
        process = self.processes[i]
        if process.poll() is None:
            process.kill()
        process.wait()

    def restart(self, i: int, timeout: float = START_TIMEOUT) -> None:
        """Start node ``i`` again on the same port and directory (it reloads ``nodes.conf`` and its AOF),
        wait until it answers PING, then ``wait_ok`` (every live node sees the cluster ok and this
        node's slots served again; a master that rejoins takes about 2 s). Raises ``DevnetError`` when
        it is still running, exits, or the cluster is not healthy within ``timeout`` seconds (each step)."""
        if self.alive(i):
            raise DevnetError(f"cluster node {i} (port {self.ports[i]}) is still running: kill it first")
        self._start_node(i, timeout)
        self.wait_ok(timeout)

    def flushall(self) -> None:
        """FLUSHALL on every live master (each holds only its own slots' keys); raises
        ``redis.RedisError`` when one does not answer."""
        for i in self._live():
            with _client(self.ports[i]) as client:
                client.flushall()

    def stop(self) -> None:
        """Terminate every node (SIGKILL after 5 s) and remove their directories. Safe to call twice."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for workdir in self.workdirs:
            shutil.rmtree(workdir, ignore_errors=True)

    def __enter__(self) -> RedisClusterProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _create(cli: str, ports: list[int], timeout: float) -> None:
    command = [cli, "--cluster", "create"]
    command += [f"{HOST}:{port}" for port in ports]
    command += ["--cluster-replicas", "0", "--cluster-yes"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise DevnetError(f"`redis-cli --cluster create` did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise DevnetError(f"`redis-cli --cluster create` failed (code {done.returncode}):\n{output}")


def start_redis_cluster(
    masters: int = 3,
    timeout: float = START_TIMEOUT,
    *,
    server: str = "redis-server",
    cli: str = "redis-cli",
) -> RedisClusterProcesses:
    """A new Redis Cluster of ``masters`` (at least 3, Redis's minimum) master nodes and no replicas on
    free loopback ports, joined and healthy (``wait_ok``). Each node gets its own temporary directory,
    removed by ``stop``. A node that exits at start (its port was taken meanwhile) is started again on
    another port, up to 3 times. Raises ``DevnetError`` when ``redis-server`` or ``redis-cli`` is not
    installed, a node does not come up, the join fails, or the cluster is not healthy within ``timeout``
    seconds; the nodes already started are stopped then. ``server`` and ``cli`` name the binaries (on PATH,
    or paths): e.g. ``valkey-server`` and ``valkey-cli``, which take the same options."""
    if masters < 3:
        raise DevnetError(f"a Redis Cluster needs at least 3 masters, not {masters}")
    cli = _find(cli)
    cluster = RedisClusterProcesses(ports=[], workdirs=[], binary=_find(server))
    try:
        taken: set[int] = set()
        for i in range(masters):
            cluster.workdirs.append(tempfile.mkdtemp(prefix=f"x402-redis-cluster-{i}-"))
            cluster.ports.append(0)
            for attempt in range(3):
                port = free_cluster_port(taken)
                taken |= {port, port + BUS_PORT_OFFSET}
                cluster.ports[i] = port
                try:
                    cluster._start_node(i, timeout)
                    break
                except DevnetError:
                    code = cluster.processes[i].returncode
                    if attempt == 2 or code is None or code < 0:  # not exited, or killed on timeout
                        raise
        _create(cli, cluster.ports, timeout)
        cluster.wait_ok(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
