"""The proxy on a real Redis Cluster of three redis-server masters (``app.devnet.cluster``): any master's
URL works, the books cover every master, and a master that dies never charges without serving, never
strands a payment on the healthy masters, and never serves a payment twice once it is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from app import create_checked_app
from app.backends.chain import Chain
from app.backends.store import Store
from app.cli import main as cli_main
from app.devnet import DevChain, Service, Wallets, free_port
from app.devnet.cluster import RedisClusterProcesses
from app.devnet.standin import StandinModel
from app.payments.books import credit_outstanding, reconcile, render_findings, revenue
from app.payments.keys import (
    DRAINED_KEY,
    KEYSPACE_KEY,
    LEDGER_STREAM,
    outbox_key,
    outbox_keys,
    payment_key,
    used_keys,
)
from app.payments.ledger import Ledger
from app.payments.outbox import _DRAIN, Outbox, drain_args
from app.settings import Settings, SettingsError
from tests.integration.test_credit import BIG_BODY, signed_in
from tests.support import (
    Proxy,
    cluster_client,
    funded_wallets,
    key_of,
    ledger_events,
    moved_since,
    payment_on,
    relayer_master,
    serve,
    settle_response,
)

pytestmark = pytest.mark.integration


class ClusterProxies:
    """Proxies (in-process WSGI servers) on the cluster, one per REDIS_URL asked for."""

    def __init__(self, settings: Settings, chain: DevChain) -> None:
        self.settings, self.chain, self.servers = settings, chain, []

    def start(self, url: str, wallets: Wallets) -> Proxy:
        settings = self.settings.with_overrides(
            redis_url=url, pay_to=wallets.pay_to, relayer_key=wallets.relayer_key
        )
        server = serve(create_checked_app(settings))
        self.servers.append(server)
        return Proxy(f"http://127.0.0.1:{server.server_port}", settings, wallets, self.chain, server)

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()


@pytest.fixture
def proxies(settings: Settings, chain: DevChain) -> Iterator[ClusterProxies]:
    made = ClusterProxies(settings, chain)
    yield made
    made.stop()


def events_of(cluster: RedisClusterProcesses, key: str) -> list[str]:
    return [entry["event"] for entry in ledger_events(cluster) if entry["key"] == key]


def state_of(cluster: RedisClusterProcesses, key: str) -> str:
    client = cluster_client(cluster)
    try:
        return (client.hget(key, "state") or b"").decode()
    finally:
        client.close()


def drained(proxy: Proxy) -> None:
    """Move every waiting ledger event into the stream now (the drainer thread does it within seconds)."""
    assert Ledger(Store(proxy.settings.redis_url)).flush_events() == set()


def test_any_master_url_detects_the_cluster_and_serves_payments_on_every_master(
    redis_cluster: RedisClusterProcesses, proxies: ClusterProxies, chain: DevChain
) -> None:
    wallets = funded_wallets(chain)
    for url in redis_cluster.urls:
        proxy = proxies.start(url, wallets)
        ready = requests.get(proxy.url + "/readyz", timeout=10).json()["checks"]["redis"]
        assert ready == {
            "ok": True,
            "mode": "cluster",
            "keyspace": 2,
            "expected": 2,
            "cluster_state": "ok",
            "masters": 3,
            "masters_down": [],
            "slots_unserved": 0,
            "require_full_coverage": [],
        }
        requirement = proxy.requirement()
        for master in range(3):
            payment = payment_on(proxy, redis_cluster, master, requirement)
            before = proxy.balances()
            answer = proxy.pay(payment)
            assert answer.status_code == 200, answer.text
            assert moved_since(proxy, before) == int(requirement["amount"])
            assert state_of(redis_cluster, key_of(proxy, payment)) == "served"
            drained(proxy)
            assert events_of(redis_cluster, key_of(proxy, payment)) == ["settled", "served"]


def test_the_stream_master_down_holds_up_no_payment_and_its_events_arrive_once(
    redis_cluster: RedisClusterProcesses, proxies: ClusterProxies, chain: DevChain
) -> None:
    stream_master = redis_cluster.node_for_key(LEDGER_STREAM)
    wallets = funded_wallets(chain, lambda w: relayer_master(redis_cluster, w) != stream_master)
    healthy = [m for m in range(3) if m != stream_master]
    proxy = proxies.start(redis_cluster.urls[healthy[0]], wallets)
    requirement = proxy.requirement()
    payments = [payment_on(proxy, redis_cluster, master, requirement) for master in healthy]
    redis_cluster.kill(stream_master)
    before = proxy.balances()
    for payment in payments:
        answer = proxy.pay(payment)
        assert answer.status_code == 200, answer.text  # served, though the stream cannot be written
        assert settle_response(answer)["success"] is True
    assert moved_since(proxy, before) == 2 * int(requirement["amount"])
    readiness = requests.get(proxy.url + "/readyz", timeout=30)
    assert readiness.status_code == 503
    redis_check = readiness.json()["checks"]["redis"]
    assert redis_check["masters_down"] == [f"127.0.0.1:{redis_cluster.ports[stream_master]}"]
    assert redis_check["slots_unserved"] > 0 and redis_check["ok"] is False
    redis_cluster.restart(stream_master)
    deadline = time.monotonic() + 30  # the drainer thread moves the events by itself
    while time.monotonic() < deadline and any(
        events_of(redis_cluster, key_of(proxy, p)) == [] for p in payments
    ):
        time.sleep(0.5)
    drained(proxy)
    drained(proxy)  # a second drain appends nothing again
    for payment in payments:
        assert events_of(redis_cluster, key_of(proxy, payment)) == ["settled", "served"]


def test_the_relayer_counter_master_down_fails_before_sending_and_the_header_pays_later(
    redis_cluster: RedisClusterProcesses, proxies: ClusterProxies, chain: DevChain
) -> None:
    wallets = funded_wallets(chain)
    counter_master = relayer_master(redis_cluster, wallets)
    healthy = next(m for m in range(3) if m != counter_master)
    proxy = proxies.start(redis_cluster.urls[healthy], wallets)
    payment = payment_on(proxy, redis_cluster, healthy, proxy.requirement())
    redis_cluster.kill(counter_master)
    before = proxy.balances()
    refused = proxy.pay(payment)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "ledger_unavailable"
    assert "PAYMENT-RESPONSE" not in refused.headers
    assert moved_since(proxy, before) == 0
    assert state_of(redis_cluster, key_of(proxy, payment)) == "released"  # nothing was sent
    redis_cluster.restart(counter_master)
    served = proxy.pay(payment)
    assert served.status_code == 200, served.text
    assert proxy.pay(payment).status_code == 402  # once
    assert moved_since(proxy, before) == payment.authorization.value


def test_a_dead_master_fails_its_payments_closed_serves_the_rest_and_each_once_after(
    redis_cluster: RedisClusterProcesses, proxies: ClusterProxies, chain: DevChain
) -> None:
    dead = 2
    wallets = funded_wallets(chain, lambda w: relayer_master(redis_cluster, w) != dead)
    proxy = proxies.start(redis_cluster.urls[0], wallets)
    requirement = proxy.requirement()
    on_dead = [payment_on(proxy, redis_cluster, dead, requirement) for _ in range(2)]
    elsewhere = [payment_on(proxy, redis_cluster, master, requirement) for master in (0, 1)]
    redis_cluster.kill(dead)
    before = proxy.balances()
    for payment in on_dead:
        refused = proxy.pay(payment)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "ledger_unavailable"
        assert refused.headers["Retry-After"]
    assert moved_since(proxy, before) == 0  # no charge
    for payment in elsewhere:
        assert proxy.pay(payment).status_code == 200
    redis_cluster.restart(dead)
    for payment in on_dead:
        assert proxy.pay(payment).status_code == 200
    for payment in on_dead + elsewhere:
        assert proxy.pay(payment).status_code == 402  # each served once
    assert moved_since(proxy, before) == 4 * int(requirement["amount"])


def test_books_and_migrate_cover_every_master(
    redis_cluster: RedisClusterProcesses,
    proxies: ClusterProxies,
    chain: DevChain,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    wallets = funded_wallets(chain)
    proxy = proxies.start(redis_cluster.urls[1], wallets)
    requirement = proxy.requirement()
    payments = [payment_on(proxy, redis_cluster, master, requirement) for master in range(3)]
    for payment in payments:
        assert proxy.pay(payment).status_code == 200
    ledger = Ledger(Store(redis_cluster.urls[1]))
    assert revenue(ledger, 3600, "model") == {"hermes-3-8b-tee": 3 * int(requirement["amount"])}
    assert ledger.count_open()["scanned"] == 3
    findings = reconcile(ledger, Chain(proxy.settings), proxy.settings, 3600)
    assert sorted(f.key for f in findings) == sorted(key_of(proxy, p) for p in payments)
    assert not any(f.problem for f in findings), render_findings(findings)
    # a bad record on a master that the URL does not name is found
    tampered = key_of(proxy, payments[0])
    client = cluster_client(redis_cluster)
    client.hset(tampered, "tx", "0x" + "ab" * 32)
    findings = reconcile(ledger, Chain(proxy.settings), proxy.settings, 3600)
    assert [f.key for f in findings if f.problem] == [tampered]
    # migrate reaches version-1 keys on every master from any one of them
    client.set(KEYSPACE_KEY, 1)
    old = []
    for payment in payments:
        auth = payment.authorization
        v1 = f"x402:{{auth:8453:{proxy.settings.asset.lower()}:{auth.from_.lower()}:0x{auth.nonce.hex()}}}"
        client.restore(v1, 0, client.dump(key_of(proxy, payment)))  # another slot: no COPY
        client.delete(key_of(proxy, payment))
        old.append(v1)
    assert len({redis_cluster.node_for_key(k) for k in old}) > 1
    monkeypatch.setenv("REDIS_URL", redis_cluster.urls[2])
    assert cli_main(["migrate"]) == 0
    assert capsys.readouterr().out == "applied: 0002_payment_shards\n"
    assert not any(client.exists(k) for k in old)
    assert all(client.hget(key_of(proxy, p), "state") == b"served" for p in payments[1:])
    client.close()


def test_outbox_drains_are_idempotent_when_cut_short_or_run_at_once(
    redis_cluster: RedisClusterProcesses,
) -> None:
    """Events reach the stream once although a drain dies between appending and trimming its outbox,
    and although many drainers (workers, hosts) run over the same outboxes at the same time."""
    ledger = Ledger(Store(redis_cluster.urls[0]))
    keys = [payment_key(8453, "0x" + "11" * 20, "0x" + "22" * 20, n.to_bytes(32, "big")) for n in range(40)]
    for key in keys:
        ledger.claim(key, int(time.time()) + 600, "0x" + "22" * 20, 10, "hermes-3-8b-tee", "eip155:8453")
        assert ledger.transition(key, ("claimed",), "settling")
        assert ledger.transition(key, ("settling",), "served", tx="0x" + "ab" * 32)
    cut_short = outbox_key(keys[0])
    entries = ledger.redis.xrange(cut_short)
    _DRAIN(
        ledger.redis, [LEDGER_STREAM, DRAINED_KEY], drain_args(cut_short, 1000, entries)
    )  # appended, then the drainer died: not trimmed
    with ThreadPoolExecutor(4) as pool:
        assert (
            list(pool.map(lambda _: Outbox(lambda: ledger.redis, 1000).drain(outbox_keys()), range(4)))
            == [set()] * 4
        )
    events = ledger_events(redis_cluster)
    assert sorted((e["key"], e["event"]) for e in events) == sorted(
        (key, event) for key in keys for event in ("settled", "served")
    )
    assert all(ledger.redis.xlen(outbox) == 0 for outbox in outbox_keys())


def test_the_store_connects_on_first_use_and_a_mode_or_database_that_does_not_fit_is_refused(
    redis_cluster: RedisClusterProcesses, redis_service: Service
) -> None:
    unreachable = Store(f"redis://127.0.0.1:{free_port()}/0")  # building it does no network I/O
    with pytest.raises(redis.ConnectionError):
        unreachable.client  # noqa: B018
    with pytest.raises(SettingsError, match=r"is yes, but .* is a single Redis") as refused:
        Store(redis_service.url, "yes").client  # noqa: B018
    assert refused.value.variable == "REDIS_CLUSTER"
    with pytest.raises(SettingsError, match=r"is no, but .* is a Redis Cluster node") as refused:
        Store(redis_cluster.urls[1], "no").client  # noqa: B018
    assert refused.value.variable == "REDIS_CLUSTER"
    with pytest.raises(SettingsError, match="only database 0") as refused:
        Store(redis_cluster.urls[1].replace("/0", "/1")).client  # noqa: B018
    assert refused.value.variable == "REDIS_URL"
    assert Store(redis_service.url).cluster is False
    assert Store(redis_service.url, "no").cluster is False
    assert Store(redis_cluster.urls[1], "yes").cluster is True


def test_readiness_names_a_master_left_at_full_coverage(redis_cluster: RedisClusterProcesses) -> None:
    """With ``cluster-require-full-coverage yes`` a master refuses every command while any master is
    down, so one dead master would stop every payment: /readyz names such masters."""
    strict = redis.Redis(port=redis_cluster.ports[2])
    strict.config_set("cluster-require-full-coverage", "yes")
    try:
        coverage = Store(redis_cluster.urls[0]).coverage(used_keys())
        assert coverage.full_coverage == (f"127.0.0.1:{redis_cluster.ports[2]}",)
        assert coverage.ok  # a warning for the operator, not a refusal
    finally:
        strict.config_set("cluster-require-full-coverage", "no")
        strict.close()


def test_reconcile_reports_a_dead_master_and_still_checks_the_others(
    redis_cluster: RedisClusterProcesses, proxies: ClusterProxies, chain: DevChain
) -> None:
    wallets = funded_wallets(chain, lambda w: relayer_master(redis_cluster, w) != 2)
    proxy = proxies.start(redis_cluster.urls[0], wallets)
    requirement = proxy.requirement()
    payments = [payment_on(proxy, redis_cluster, master, requirement) for master in (0, 1)]
    for payment in payments:
        assert proxy.pay(payment).status_code == 200
    redis_cluster.kill(2)
    findings = reconcile(Ledger(Store(redis_cluster.urls[0])), Chain(proxy.settings), proxy.settings, 3600)
    assert sorted(f.key for f in findings if not f.problem) == sorted(key_of(proxy, p) for p in payments)
    assert [(f.key, f.problem) for f in findings if f.problem] == [
        (f"127.0.0.1:{redis_cluster.ports[2]}", "Redis master did not answer: its payments were not checked")
    ]
    assert "did not answer" in render_findings(findings)


def test_credit_on_a_cluster_change_then_a_sign_in_and_the_books(
    redis_cluster: RedisClusterProcesses,
    proxies: ClusterProxies,
    chain: DevChain,
    standin: StandinModel,
    catalog_file: Path,
) -> None:
    """A wallet's credit lives in its own shard with its events' outbox: change credited on one
    proxy, spent by a sign-in on another (another master's URL), and counted by the books."""
    wallets = funded_wallets(chain)
    proxies.settings = proxies.settings.with_overrides(catalog_path=catalog_file)  # floor 1: change
    first, second = (
        proxies.start(redis_cluster.urls[0], wallets),
        proxies.start(redis_cluster.urls[2], wallets),
    )
    requirement = first.requirement(BIG_BODY)
    paid = first.pay(first.payment(requirement), BIG_BODY)
    assert paid.status_code == 200, paid.text
    change = int(paid.headers["X-Credit-Added"])
    before = second.balances()

    served = signed_in(second)

    assert served.status_code == 200, served.text
    charged = int(served.headers["X-Credit-Charged"])
    assert int(served.headers["X-Credit-Balance"]) == change - charged
    assert second.balances() == before
    ledger = Ledger(Store(redis_cluster.urls[1]))
    totals = revenue(ledger, 3600, "scheme")  # moves the outboxes' events into the stream first
    assert totals == {"exact": int(requirement["amount"]) - change, "credit": charged}
    assert credit_outstanding(ledger) == change - charged
