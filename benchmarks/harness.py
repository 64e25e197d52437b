"""Shared set-up for the benchmarks: the devnet, gunicorn processes, pre-signed payments, result rows.

Everything listens on 127.0.0.1 and every child process is stopped in a ``finally`` (gunicorn in its
own process group, so its workers go with it). Nothing here loops without a count or a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
import requests

from app.devnet import DevChain, Service, Wallets, free_port, prepare_chain, start_anvil, start_redis
from app.devnet.standin import StandinModel
from app.x402.codec import encode_header
from app.x402.payer import offered_requirements, sign_payment
from tests.support import CHAT_BODY

ROOT = Path(__file__).resolve().parent.parent
CHAT_PATH = "/v1/chat/completions"
WORKERS = 2
THREADS = 32  # gunicorn.conf.py's default; the same for every app we compare
PAYER_USDC = 1_000 * 10**6  # 1,000 test USDC: ~1,000,000 calls at the catalog's $0.001 floor


# --- result rows ----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the summary table. ``passed`` is None for figures reported without a goal."""

    bench: str
    figure: str
    value: str
    baseline: str = "-"
    ratio: str = "-"
    goal: str = "-"
    passed: bool | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "-"}[self.passed]


def print_table(rows: list[Row], file: Any = None) -> None:
    file = file or sys.stdout
    headers = ("benchmark", "figure", "ours", "baseline", "ratio", "goal", "result")
    cells = [(r.bench, r.figure, r.value, r.baseline, r.ratio, r.goal, r.verdict) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line, file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)), file=file)
    notes = [r for r in rows if r.note]
    if notes:
        print(file=file)
        for r in notes:
            print(f"  [{r.bench}] {r.figure}: {r.note}", file=file)


def failed_answers_row(bench: str, statuses: dict[Any, int], examples: list[str] | None = None) -> Row | None:
    """A FAIL row when some paid calls were not answered 200 (None when all were)."""
    total = sum(statuses.values())
    bad = {k: v for k, v in statuses.items() if k != 200}
    if not bad:
        return None
    return Row(
        bench,
        "paid calls not answered 200",
        f"{sum(bad.values())} of {total}",
        goal="0",
        passed=False,
        note=f"statuses {bad}" + (f"; e.g. {examples[:2]}" if examples else ""),
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


# --- command line ---------------------------------------------------------------------------------


class LoadParser(argparse.ArgumentParser):
    """The command line of a load benchmark's ``main``: its docstring as the description, and
    ``--seconds``, ``--clients`` and ``--rounds`` with these defaults and help texts."""

    def __init__(
        self,
        description: str | None,
        seconds: float,
        clients: int,
        rounds: int,
        seconds_help: str | None = None,
        clients_help: str | None = None,
        rounds_help: str | None = None,
    ) -> None:
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_argument("--seconds", type=float, default=seconds, help=seconds_help)
        self.add_argument("--clients", type=int, default=clients, help=clients_help)
        self.add_argument("--rounds", type=int, default=rounds, help=rounds_help)

    def parse_checked(
        self, counts: Sequence[str] = (), named: str = "--rounds and --clients"
    ) -> argparse.Namespace:
        """The arguments, refused unless ``--rounds``, ``--clients`` and the options ``counts`` (their
        ``dest``) are at least 1 and ``--seconds`` above 0 (``named``: how the message names the
        counted options)."""
        args = self.parse_args()
        if (
            args.rounds < 1
            or args.seconds <= 0
            or args.clients < 1
            or any(getattr(args, c) < 1 for c in counts)
        ):
            self.error(f"{named} must be at least 1, --seconds above 0")
        return args


# --- devnet ---------------------------------------------------------------------------------------


@dataclass
class Devnet:
    """anvil (Base, our token at the USDC address), redis-server, the stand-in model, fresh keys."""

    anvil: Service
    redis: Service
    standin: StandinModel
    wallets: Wallets
    chain: DevChain

    def proxy_env(self, **extra: str) -> dict[str, str]:
        """Environment for ``gunicorn -c gunicorn.conf.py wsgi:app`` against this devnet."""
        env = {
            **os.environ,
            "X402_PAY_TO": self.wallets.pay_to,
            "X402_RPC_URLS": self.anvil.url,
            "X402_RELAYER_KEY": self.wallets.relayer_key,
            "REDIS_URL": self.redis.url,
            "X402_UPSTREAM_URL": self.standin.url,
        }
        env.update(extra)
        return env

    @property
    def payer_key(self) -> bytes:
        return bytes.fromhex(self.wallets.payer_key[2:])

    def nonce_of(self, address: str) -> int:
        return int(self.chain.rpc.call("eth_getTransactionCount", [address, "latest"]), 16)

    def flush_redis(self) -> None:
        """Empty the devnet's redis-server. Needed after ``ChainReset.reset``: our relayer's nonce
        counter there would be ahead of the reverted chain."""
        with redis.Redis.from_url(self.redis.url) as node:
            node.flushall()


T = TypeVar("T")


class ChainReset:
    """The devnet's chain put back before every run to the state it had when this was made.

    anvil gets slower as its chain grows (its CPU per paid call went from 2.6 to 8.7 ms over four
    runs of 10 s, about 1,200 settlements each), so setups run one after another on one anvil favour
    the first. ``evm_snapshot`` here, ``evm_revert`` in ``reset``: every run starts from the same block,
    balances and nonces. Make it after the devnet is funded and before anything is measured.
    """

    def __init__(self, dev: Devnet) -> None:
        self.dev = dev
        self.block = self._block()
        self.snapshot = dev.chain.rpc.call("evm_snapshot", [])

    def _block(self) -> int:
        return int(self.dev.chain.rpc.call("eth_blockNumber", []), 16)

    def reset(self) -> None:
        """Empty anvil's transaction pool (``evm_revert`` keeps it: a settlement still queued from the
        last run would be mined again on the reverted chain), ``evm_revert`` to the snapshot (which
        that uses up) and take a new one of the same state."""
        self.dev.chain.rpc.call("anvil_dropAllTransactions", [])
        reverted = self.dev.chain.rpc.call("evm_revert", [self.snapshot])
        if reverted is not True or self._block() != self.block:
            raise RuntimeError(f"anvil did not go back to block {self.block} (evm_revert: {reverted!r})")
        self.snapshot = self.dev.chain.rpc.call("evm_snapshot", [])

    def abba(self, setups: Sequence[T], rounds: int) -> Iterator[tuple[int, T]]:
        """Every setup ``rounds`` times, in ABBA order (the order reversed every other round), the
        chain reset before each run: yields (round, setup)."""
        for round_ in range(rounds):
            for setup in setups if round_ % 2 == 0 else setups[::-1]:
                self.reset()
                yield round_, setup


def _deep_standin_backlog() -> None:
    """The stand-in's server listens with socketserver's default backlog of 5: 64 streams opened at
    once overflow it and some upstream connects fail (the proxy answers 502). A load test needs a
    model host that accepts them, so the class attribute is raised here, in this process only."""
    from app.devnet import standin as standin_model

    server_class = getattr(standin_model, "_Server", None)
    if server_class is not None and getattr(server_class, "request_queue_size", 128) < 128:
        server_class.request_queue_size = 128


def die_with_parent() -> None:
    """``preexec_fn`` for children: the kernel sends them SIGTERM if the benchmark dies (even by
    SIGKILL), so nothing outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# A watchdog for children this process cannot give a parent-death signal (anvil and redis-server are
# started by app.devnet): it gets SIGTERM from the kernel when the benchmark dies, even by SIGKILL,
# and then stops them. On a normal exit it is killed first, before the services are stopped.
_REAPER = """
import os, signal, sys, time
pids = [int(p) for p in sys.argv[1:]]
def stop(*_):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
for _ in range(86400):
    time.sleep(1)
"""


def reaper(*pids: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, *map(str, pids)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )


@contextlib.contextmanager
def devnet(payer_usdc: int = PAYER_USDC) -> Iterator[Devnet]:
    _deep_standin_backlog()
    anvil = start_anvil()
    redis_service = None
    standin = None
    watchdog = None
    try:
        redis_service = start_redis()
        if redis_service is None:
            raise SystemExit("redis-server is required (apt-get install redis-server)")
        watchdog = reaper(anvil.process.pid, redis_service.process.pid)
        standin = StandinModel().start()
        wallets = Wallets.fresh()
        chain = DevChain(anvil.url)
        prepare_chain(chain, wallets, payer_usdc)
        yield Devnet(anvil, redis_service, standin, wallets, chain)
    finally:
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait(timeout=10)
        if standin is not None:
            standin.stop()
        if redis_service is not None:
            redis_service.stop()
        anvil.stop()


# --- gunicorn -------------------------------------------------------------------------------------


@dataclass
class Gunicorn:
    """``python -m gunicorn -c gunicorn.conf.py <app>`` on a free loopback port, in its own session."""

    app_spec: str
    env: dict[str, str]
    workers: int = WORKERS
    threads: int = THREADS
    ready_path: str = "/healthz"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Gunicorn:
        return self.launch().wait_ready(timeout)

    def launch(self) -> Gunicorn:
        """Spawn the master; ``wait_ready`` then waits for it (launch several, then wait for each)."""
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by stop())
        env = {
            **self.env,
            "X402_BIND": f"127.0.0.1:{self.port}",
            "X402_WORKERS": str(self.workers),
            "X402_THREADS": str(self.threads),
            "PYTHONPATH": str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", ""),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", self.app_spec],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        return self

    def wait_ready(self, timeout: float = 60.0) -> Gunicorn:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn {self.app_spec} exited at start:\n{self.log_tail()}")
            try:
                answered = requests.get(self.url + self.ready_path, timeout=1).status_code < 500
                if answered and len(self.worker_pids()) >= self.workers:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn {self.app_spec} did not come up in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def worker_pids(self) -> list[int]:
        """The master's children (its workers), from /proc."""
        assert self.process is not None
        master = self.process.pid
        children = Path(f"/proc/{master}/task/{master}/children")
        with contextlib.suppress(OSError):
            return [int(p) for p in children.read_text().split()]
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                    pids.append(int(stat.parent.name))
        return pids

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)  # gunicorn: quick shutdown
            try:
                self.process.wait(timeout=4)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def gunicorns(*servers: Gunicorn) -> Iterator[tuple[Gunicorn, ...]]:
    """Start several at once (their boots overlap), stop them all on exit."""
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by named groups of processes between ``start()`` and ``stop()``."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.groups.items()}
        times = os.times()
        now["benchmark process (clients, stand-in)"] = times.user + times.system
        return now

    def start(self) -> CpuMeter:
        self._start = self._now()
        return self

    def stop(self) -> dict[str, float]:
        end = self._now()
        self.used = {name: end[name] - self._start[name] for name in end}
        return self.used

    def per_call_text(self, calls: int) -> str:
        return cpu_per_call_text(self.used, calls)


def cpu_per_call_text(used: dict[str, float], calls: int) -> str:
    """CPU seconds by process group (``CpuMeter.used``, or several added up) as ms per call."""
    if not calls or not used:
        return ""
    parts = [f"{name} {seconds / calls * 1000:.1f}" for name, seconds in used.items()]
    return "CPU ms per call: " + ", ".join(parts)


def client_connections(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` (a server's side of its clients) that process
    ``pid`` holds open, from /proc: accepted ones, whether a thread serves them or they wait for one."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()  # sl, local address:port (hex), remote, state, ..., inode (10th)
                established = fields[3] == "01"
                if established and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    count += 1
    return count


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- payments -------------------------------------------------------------------------------------


def offered(url: str, body: Any = None) -> dict[str, Any]:
    """The v2 requirement a server offers for this body, read from its real 402."""
    response = requests.post(url, json=CHAT_BODY if body is None else body, timeout=30)
    assert response.status_code == 402, (response.status_code, response.text[:300])
    _, _, accepts = offered_requirements(dict(response.headers), response.json() if response.content else {})
    assert accepts, "the 402 offers nothing"
    return accepts[0]


def sign_headers(requirement: dict[str, Any], payer_key: bytes, count: int) -> list[dict[str, str]]:
    """``count`` distinct v2 payments (fresh random nonces), signed now, before any timing."""
    now = int(time.time())
    return [
        {
            "PAYMENT-SIGNATURE": encode_header(
                sign_payment(requirement, 2, payer_key, now, os.urandom(32)).to_wire()
            )
        }
        for _ in range(count)
    ]


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s
