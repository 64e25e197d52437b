"""Operating the proxy under gunicorn (2 workers) with redis-server: metrics summed across
workers, readiness that follows its dependencies, reconciliation, revenue, and clean logs."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator

import pytest
import redis
import requests

from app.cli import main
from app.devnet import Service, Wallets, free_port, start_anvil
from app.devnet.standin import StandinModel
from app.logs import JsonFormatter
from app.payments.keys import KEYSPACE_KEY, KEYSPACE_VERSION, payment_key
from app.web.ops import READY_CACHE_SECONDS
from tests.e2e.test_gunicorn import gunicorn_env, start_gunicorn, wait_until_up
from tests.integration.test_failing_parts import RestartableRedis
from tests.rpc_proxy import FaultyRpc
from tests.support import Proxy

pytestmark = pytest.mark.integration


@pytest.fixture
def operated(
    anvil: Service, wallets: Wallets, chain, standin: StandinModel, settings
) -> Iterator[tuple[Proxy, RestartableRedis, FaultyRpc]]:
    """gunicorn on its own Redis (so it can be stopped) and its own RPC path (so it can be
    pointed at another chain)."""
    own_redis, rpc = RestartableRedis(), FaultyRpc(anvil.url)
    port = free_port()
    env = gunicorn_env(anvil, own_redis.service, wallets, standin.url, port)  # type: ignore[arg-type]
    env["X402_RPC_URLS"] = rpc.url
    process = start_gunicorn(env)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(process, url)
    yield Proxy(url, settings.with_overrides(redis_url=own_redis.url), wallets, chain), own_redis, rpc
    process.terminate()
    process.wait(timeout=20)
    own_redis.stop()
    rpc.stop()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.e+-]+)$", re.MULTILINE)
    for found_labels, value in pattern.findall(text):
        if all(part in found_labels.split(",") for part in wanted.split(",") if part):
            return float(value)
    return 0.0


def test_metrics_add_up_across_workers(operated: tuple[Proxy, RestartableRedis, FaultyRpc]) -> None:
    proxy, _, _ = operated
    for _ in range(20):  # spread over both workers by the kernel
        assert proxy.post().status_code == 402
    requirement = proxy.requirement()  # one more 402
    for _ in range(3):
        assert proxy.pay(proxy.payment(requirement)).status_code == 200
    text = requests.get(proxy.url + "/metrics", timeout=10).text
    route = "/v1/chat/completions"
    assert metric(text, "x402_requests_total", route=route, status="402") == 21
    assert metric(text, "x402_requests_total", route=route, status="200") == 3
    assert metric(text, "x402_challenges_total", reason="payment_required") == 21
    assert metric(text, "x402_payments_total", outcome="served") == 3
    assert metric(text, "x402_revenue_atomic_total", model="hermes-3-8b-tee") == 3 * int(
        requirement["amount"]
    )
    assert metric(text, "x402_settlement_seconds_count") == 3


def ready(proxy: Proxy) -> tuple[int, dict]:
    time.sleep(READY_CACHE_SECONDS)  # each worker answers /readyz from one evaluation per this long
    proxy.chain.rpc.call("evm_mine", [])  # a fresh block: anvil only mines on demand
    response = requests.get(proxy.url + "/readyz", timeout=20)
    return response.status_code, response.json()


def test_readyz_follows_redis_the_token_and_the_rpc_chain(
    operated: tuple[Proxy, RestartableRedis, FaultyRpc],
) -> None:
    proxy, own_redis, rpc = operated
    status, body = ready(proxy)
    assert status == 200, body
    assert body["checks"]["asset"]["relayer_ok"] is True and body["checks"]["upstream"]["ok"] is True

    own_redis.kill()
    status, body = ready(proxy)
    assert status == 503 and body["checks"]["redis"]["ok"] is False
    own_redis.start()
    redis.Redis.from_url(own_redis.url).set(KEYSPACE_KEY, KEYSPACE_VERSION)  # a fresh Redis after the loss
    assert ready(proxy)[0] == 200

    proxy.chain.token_call("pause()", [], [])
    try:
        status, body = ready(proxy)
        assert status == 503 and body["checks"]["asset"]["paused"] is True
    finally:
        proxy.chain.token_call("unpause()", [], [])
    assert ready(proxy)[0] == 200

    other = start_anvil(chain_id=1)
    try:
        rpc.upstream = other.url
        status, body = ready(proxy)
        assert status == 503 and body["checks"]["rpc_0"]["chain_id"] == 1
    finally:
        rpc.upstream = proxy.chain.url
        other.stop()
    assert ready(proxy)[0] == 200


def books_env(monkeypatch: pytest.MonkeyPatch, proxy: Proxy) -> None:
    for name, value in {
        "X402_PAY_TO": proxy.wallets.pay_to,
        "X402_RELAYER_KEY": proxy.wallets.relayer_key,
        "X402_RPC_URLS": proxy.chain.url,
        "REDIS_URL": proxy.settings.redis_url,
    }.items():
        monkeypatch.setenv(name, value)


def test_reconcile_says_the_rpc_did_not_answer_rather_than_report_mismatches(
    proxy: Proxy, standin: StandinModel, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's exit code 3: with no RPC answering, the payments cannot be checked; that is not
    a mismatch (exit 1)."""
    books_env(monkeypatch, proxy)
    assert proxy.pay(proxy.payment(proxy.requirement())).status_code == 200
    monkeypatch.setenv("X402_RPC_URLS", f"http://127.0.0.1:{free_port()}")
    assert main(["reconcile", "--since", "1h"]) == 3
    assert "the RPC did not answer for 1 payments" in capsys.readouterr().err


def test_reconcile_finds_a_tampered_amount_and_resolves_a_pending_payment(
    proxy: Proxy, standin: StandinModel, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    books_env(monkeypatch, proxy)
    honest = proxy.payment(proxy.requirement())
    assert proxy.pay(honest).status_code == 200
    assert main(["reconcile", "--since", "1h"]) == 0
    assert "every checked payment matches" in capsys.readouterr().out

    key = payment_key(8453, proxy.settings.asset, honest.authorization.from_, honest.authorization.nonce)
    client = redis.Redis.from_url(proxy.settings.redis_url)
    client.hset(key, "amount", honest.authorization.value + 1)  # the books now claim more than was paid
    assert main(["reconcile", "--since", "1h"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and key in out and "no matching Transfer" in out
    client.hset(key, "amount", honest.authorization.value)

    late = proxy.payment(proxy.requirement())
    proxy.chain.rpc.call("evm_setAutomine", [False])
    try:
        from tests.integration.test_settlement_engine import proxy_with

        for quick in proxy_with(proxy, receipt_timeout=0.5):
            assert quick.pay(late).status_code == 503  # pending
    finally:
        proxy.chain.rpc.call("evm_setAutomine", [True])
        proxy.chain.rpc.call("evm_mine", [])
    assert main(["reconcile", "--since", "1h"]) == 0
    assert "→ redeemable" in capsys.readouterr().out  # its request was answered 503: never served
    late_key = payment_key(8453, proxy.settings.asset, late.authorization.from_, late.authorization.nonce)
    assert client.hget(late_key, "state") == b"redeemable"
    assert proxy.pay(late).status_code == 200  # the buyer's retry is served, not refused


def test_revenue_reports_settled_amounts(
    proxy: Proxy, standin: StandinModel, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    books_env(monkeypatch, proxy)
    requirement = proxy.requirement()
    for _ in range(2):
        assert proxy.pay(proxy.payment(requirement)).status_code == 200
    amount = 2 * int(requirement["amount"])
    assert main(["revenue", "--by", "model"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"hermes-3-8b-tee\s+\${amount / 10**6:,.6f}", out), out
    assert main(["revenue", "--by", "payer", "--csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert (
        rows[0] == "payer,atomic_units,usdc"
        and rows[1] == f"{proxy.wallets.payer.lower()},{amount},{amount / 10**6:.6f}"
    )


def test_a_paid_call_logs_one_clean_line(
    proxy: Proxy, standin: StandinModel, caplog: pytest.LogCaptureFixture
) -> None:
    marker = "secret-prompt-" + os.urandom(6).hex()
    body = {"model": "hermes-3-8b-tee", "messages": [{"role": "user", "content": marker}], "max_tokens": 8}
    payment = proxy.payment(proxy.requirement(body))
    caplog.clear()
    with caplog.at_level("DEBUG"):
        response = proxy.pay(payment, body)
        time.sleep(0.1)
    assert response.status_code == 200
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "x402.access"]
    (line,) = [entry for entry in lines if entry.get("outcome") == "served"]
    assert line["payer"] == proxy.wallets.payer.lower() and line["tx"].startswith("0x")
    assert line["amount"] == payment.authorization.value and line["route"] == "/v1/chat/completions"
    assert line["request_id"] == response.headers["X-Request-Id"] and line["logger"] == "x402.access"
    everything = "\n".join(r.getMessage() + formatter.format(r) for r in caplog.records)
    ours = "\n".join(formatter.format(r) for r in caplog.records if r.name.startswith("x402"))
    from app.x402.codec import encode_header

    for forbidden in (marker, encode_header(payment.to_wire()), proxy.settings.relayer_key[2:]):
        assert forbidden not in everything
    assert "127.0.0.1" not in ours  # no client address (the HTTP client's own debug lines name servers)
