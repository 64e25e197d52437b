"""Shared fixtures: real anvil (chain id 8453, our token at the Base USDC address), a real
redis-server, the stand-in model, and the proxy served over loopback.

The chain and Redis are started once per session; each test gets a fresh payee, payer and a
flushed Redis, so balances and ledger states are its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app import create_checked_app
from app.devnet import (
    DevChain,
    Service,
    Wallets,
    place_upto_contracts,
    prepare_chain,
    start_anvil,
    start_redis,
)
from app.devnet.cluster import RedisClusterProcesses, start_redis_cluster
from app.devnet.standin import Behaviour, StandinModel
from app.payments.claims import stop_all
from app.settings import DEFAULT_CATALOG, Settings
from tests.rpc_proxy import FaultyRpc
from tests.support import OPERATOR_KEY, USDC, Proxy, proxy_with, serve
from tests.tee_support import Enclave, KdsStandin, write_enclave_files


@pytest.fixture(scope="session")
def anvil() -> Iterator[Service]:
    service = start_anvil()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def redis_service() -> Iterator[Service]:
    service = start_redis()
    if service is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server); integration tests need it")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def chain(anvil: Service) -> DevChain:
    dev = DevChain(anvil.url)
    dev.place_token()
    place_upto_contracts(dev)
    return dev


@pytest.fixture(autouse=True)
def _claim_loops_end_with_their_test() -> Iterator[None]:
    """Each proxy app's batch-settlement claim loop (a daemon thread per process) stops when its
    test ends, so no loop of an earlier test's proxy claims, or holds the claims lock, in a later
    one."""
    yield
    stop_all()


@pytest.fixture
def time_travel(chain: DevChain) -> Iterator[None]:
    """An anvil snapshot, reverted after the test: its ``evm_increaseTime`` (and state) does not leak."""
    snapshot = chain.rpc.call("evm_snapshot", [])
    yield
    assert chain.rpc.call("evm_revert", [snapshot]) is True


@pytest.fixture
def redis_client(redis_service: Service) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_service.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def standin_server() -> Iterator[StandinModel]:
    with StandinModel() as server:
        yield server


@pytest.fixture
def standin(standin_server: StandinModel) -> StandinModel:
    standin_server.behaviour = Behaviour()
    standin_server.received.clear()
    return standin_server


@pytest.fixture
def wallets(chain: DevChain) -> Wallets:
    fresh = Wallets.fresh()
    prepare_chain(chain, fresh, 10 * USDC)
    return fresh


@pytest.fixture
def settings(
    anvil: Service, redis_service: Service, redis_client: redis.Redis, wallets: Wallets, standin: StandinModel
) -> Settings:
    return Settings.from_env(
        env={},
        overrides={
            "X402_PAY_TO": wallets.pay_to,
            "X402_RPC_URLS": anvil.url,
            "X402_RELAYER_KEY": wallets.relayer_key,
            "REDIS_URL": redis_service.url,
            "X402_UPSTREAM_URL": standin.url,
            "X402_UPSTREAM_API_KEY": OPERATOR_KEY,
            "X402_RECEIPT_TIMEOUT": "10",
        },
    )


@pytest.fixture
def proxy(settings: Settings, wallets: Wallets, chain: DevChain) -> Iterator[Proxy]:
    server = serve(create_checked_app(settings))
    yield Proxy(f"http://127.0.0.1:{server.server_port}", settings, wallets, chain, server)
    server.shutdown()


@pytest.fixture
def faulty(anvil: Service) -> Iterator[FaultyRpc]:
    """An RPC stand-in in front of anvil that can delay, hide or falsify answers."""
    rpc = FaultyRpc(anvil.url)
    yield rpc
    rpc.stop()


@pytest.fixture(scope="session")
def redis_cluster_processes() -> Iterator[RedisClusterProcesses]:
    """A real Redis Cluster: three redis-server masters, no replicas (``app.devnet.cluster``)."""
    with start_redis_cluster(masters=3) as processes:
        yield processes


@pytest.fixture
def redis_cluster(redis_cluster_processes: RedisClusterProcesses) -> Iterator[RedisClusterProcesses]:
    """The cluster with every master running and no keys; left with every master running too, so
    the outbox drainers of this test's proxies (daemon threads) do not keep failing into later
    tests' logs."""

    def all_running() -> None:
        for index in range(len(redis_cluster_processes.ports)):
            if not redis_cluster_processes.alive(index):
                redis_cluster_processes.restart(index)

    all_running()
    redis_cluster_processes.flushall()
    yield redis_cluster_processes
    all_running()


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    """The packaged catalog with a floor of 1 atomic unit: an upto charge then lies strictly between
    the floor and the maximum, so a test can tell the three apart."""
    path = tmp_path / "catalog.toml"
    path.write_text(DEFAULT_CATALOG.read_text().replace("floor = 1000", "floor = 1"))
    return path


@pytest.fixture
def upto_proxy(proxy: Proxy, catalog_file: Path) -> Iterator[Proxy]:
    yield from proxy_with(proxy, catalog_path=catalog_file)


@pytest.fixture
def cli_env(upto_proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``upto_proxy``'s settings as the environment ``x402-proxy`` reads (set for this test)."""
    settings = upto_proxy.settings
    env = {
        "X402_PAY_TO": settings.pay_to,
        "X402_RELAYER_KEY": settings.relayer_key,
        "REDIS_URL": settings.redis_url,
        "X402_RPC_URLS": ",".join(settings.rpc_urls),
        "X402_RECEIPT_TIMEOUT": "10",
    }
    for name in [n for n in os.environ if n.startswith("X402_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def enclave(tmp_path: Path) -> Iterator[Enclave]:
    """An HTTPS enclave stand-in serving an RA-TLS certificate of the tests' chain (issue 18)."""
    path, key, der = write_enclave_files(tmp_path / "enclave-first")
    with StandinModel(tls=(path, key)) as host:
        yield Enclave(host, tmp_path, der)


@pytest.fixture
def kds() -> Iterator[KdsStandin]:
    """A stand-in of AMD's key distribution service serving the tests' chain's VCEK."""
    with KdsStandin() as service:
        yield service
