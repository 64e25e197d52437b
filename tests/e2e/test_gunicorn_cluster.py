"""Two gunicorn instances, each naming a different master of a real 3-master Redis Cluster, under
concurrent payments while a master is killed and restarted mid-run: no charge without an answer, no
payment served twice, every event in the ledger stream exactly once."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app.devnet import DevChain, Service, free_port
from app.devnet.cluster import RedisClusterProcesses
from app.devnet.standin import StandinModel
from app.settings import Settings
from app.x402.wire import PaymentPayload
from tests.e2e.test_gunicorn import gunicorn_env, start_gunicorn, wait_until_up
from tests.support import (
    Proxy,
    funded_wallets,
    key_of,
    ledger_events,
    moved_since,
    payment_on,
    relayer_master,
)

pytestmark = pytest.mark.integration
DEAD = 2  # the master killed mid-run


@pytest.fixture
def two_instances(
    anvil: Service,
    redis_service: Service,
    redis_cluster: RedisClusterProcesses,
    chain: DevChain,
    standin: StandinModel,
    settings: Settings,
) -> Iterator[tuple[Proxy, Proxy]]:
    wallets = funded_wallets(chain, lambda w: relayer_master(redis_cluster, w) != DEAD)
    processes: list[subprocess.Popen[str]] = []
    proxies = []
    for master in (0, 1):
        port = free_port()
        env = gunicorn_env(anvil, redis_service, wallets, standin.url, port)
        env["REDIS_URL"] = redis_cluster.urls[master]
        processes.append(start_gunicorn(env))
        url = f"http://127.0.0.1:{port}"
        wait_until_up(processes[-1], url)
        proxies.append(Proxy(url, settings.with_overrides(pay_to=wallets.pay_to), wallets, chain))
    yield proxies[0], proxies[1]
    for process in processes:
        process.terminate()
        process.wait(timeout=20)


def test_two_instances_on_a_cluster_lose_nothing_when_a_master_dies_mid_run(
    two_instances: tuple[Proxy, Proxy], redis_cluster: RedisClusterProcesses, standin: StandinModel
) -> None:
    first, second = two_instances
    requirement = first.requirement()
    amount = int(requirement["amount"])
    payments = [payment_on(first, redis_cluster, index % 3, requirement) for index in range(30)]
    before = first.balances()

    def pay(job: tuple[int, PaymentPayload]) -> int:
        index, payment = job
        return (first if index % 2 else second).pay(payment).status_code

    with ThreadPoolExecutor(10) as pool:
        assert list(pool.map(pay, enumerate(payments[:12]))) == [200] * 12
        redis_cluster.kill(DEAD)
        later = list(pool.map(pay, enumerate(payments[12:], start=12)))
    on_dead = [p for p in payments[12:] if redis_cluster.node_for_key(key_of(first, p)) == DEAD]
    assert later.count(503) == len(on_dead) == 6 and later.count(200) == 12
    assert moved_since(first, before) == 24 * amount  # nothing charged for the refused ones
    assert len(standin.received) == 24

    redis_cluster.restart(DEAD)
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(pay, enumerate(on_dead))) == [200] * 6  # the same headers, retried
        assert set(pool.map(pay, enumerate(payments))) == {402}  # every one was served once
    assert moved_since(first, before) == 30 * amount
    assert len(standin.received) == 30

    deadline = time.monotonic() + 30  # the workers' drainers move the events into the stream
    while time.monotonic() < deadline and len(ledger_events(redis_cluster)) < 60:
        time.sleep(0.5)
    events = ledger_events(redis_cluster)
    keys = {key_of(first, p) for p in payments}
    settled = [e["key"] for e in events if e["event"] == "settled"]
    served = [e["key"] for e in events if e["event"] == "served"]
    assert sorted(settled) == sorted(served) == sorted(keys)  # each exactly once
    assert sum(int(e["amount"]) for e in events if e["event"] == "settled") == 30 * amount
    ready = requests.get(second.url + "/readyz", timeout=10).json()["checks"]["redis"]
    assert ready["ok"] and ready["masters_down"] == []
