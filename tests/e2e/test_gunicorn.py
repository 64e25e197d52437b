"""The proxy as operators run it: gunicorn with several workers sharing one Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from app.devnet import DevChain, Service, Wallets, free_port
from app.standin_model import StandinModel
from app.x402.codec import encode_header
from tests.support import CHAT_BODY, Proxy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def gunicorn_env(
    anvil: Service, redis_service: Service, wallets: Wallets, upstream: str, port: int
) -> dict[str, str]:
    return {
        **os.environ,
        "X402_PAY_TO": wallets.pay_to,
        "X402_RPC_URLS": anvil.url,
        "X402_RELAYER_KEY": wallets.relayer_key,
        "REDIS_URL": redis_service.url,
        "X402_UPSTREAM_URL": upstream,
        "X402_BIND": f"127.0.0.1:{port}",
        "X402_WORKERS": "2",
        "X402_THREADS": "4",
    }


def start_gunicorn(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_up(process: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:  # the socket is bound before the workers have booted
            time.sleep(0.1)
    process.kill()
    pytest.fail("gunicorn did not come up: " + process.communicate()[1][-2000:])


@pytest.fixture
def gunicorn_proxy(
    anvil: Service,
    redis_service: Service,
    redis_client,
    wallets: Wallets,
    chain: DevChain,
    standin: StandinModel,
    settings,
) -> Iterator[Proxy]:
    port = free_port()
    process = start_gunicorn(gunicorn_env(anvil, redis_service, wallets, standin.url, port))
    url = f"http://127.0.0.1:{port}"
    wait_until_up(process, url)
    yield Proxy(url, settings, wallets, chain)
    process.terminate()
    process.wait(timeout=20)


def test_workers_share_one_ledger_each_payment_serves_once(
    gunicorn_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = gunicorn_proxy
    requirement = proxy.requirement()
    payments = [proxy.payment(requirement) for _ in range(4)]
    payer_before, payee_before = proxy.balances()
    attempts = [p for p in payments for _ in range(3)]  # three copies of every payment, racing
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda p: proxy.pay(p).status_code, attempts))
    assert statuses.count(200) == 4 and set(statuses) <= {200, 402, 503}  # 503: still in progress
    amount = int(requirement["amount"])
    assert proxy.balances() == (payer_before - 4 * amount, payee_before + 4 * amount)
    assert len(standin.received) == 4
    assert requests.get(proxy.url + "/readyz", timeout=5).json()["ready"] is True


def test_one_header_raced_across_two_gunicorn_instances_is_served_once(
    gunicorn_proxy: Proxy, anvil: Service, redis_service: Service, wallets: Wallets, standin: StandinModel
) -> None:
    """Two gunicorn instances (2 workers each) on one Redis: 16 copies of one payment, one call."""
    second_port = free_port()
    second = start_gunicorn(gunicorn_env(anvil, redis_service, wallets, standin.url, second_port))
    try:
        second_url = f"http://127.0.0.1:{second_port}"
        wait_until_up(second, second_url)
        proxy = gunicorn_proxy
        payment = proxy.payment(proxy.requirement())
        header = {"PAYMENT-SIGNATURE": encode_header(payment.to_wire())}
        payer_before, _ = proxy.balances()
        urls = [proxy.url, second_url] * 8
        with ThreadPoolExecutor(16) as pool:
            statuses = list(
                pool.map(
                    lambda url: (
                        requests.post(
                            url + "/v1/chat/completions", json=CHAT_BODY, headers=header, timeout=60
                        ).status_code
                    ),
                    urls,
                )
            )
        assert statuses.count(200) == 1 and set(statuses) <= {200, 402, 503}  # 503: in progress
        assert len(standin.received) == 1
        assert proxy.balances()[0] == payer_before - payment.authorization.value  # one Transfer
    finally:
        second.terminate()
        second.wait(timeout=20)


def test_fifty_payments_at_once_use_contiguous_relayer_nonces(
    gunicorn_proxy: Proxy, standin: StandinModel
) -> None:
    """Two workers settle 50 payments at once with one relayer account: no nonce clash, no gap."""
    proxy = gunicorn_proxy
    proxy.chain.mint(proxy.wallets.payer, 10**8)
    requirement = proxy.requirement()
    payments = [proxy.payment(requirement) for _ in range(50)]
    payer_before, payee_before = proxy.balances()
    sent_before = relayer_tx_count(proxy)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda p: proxy.pay(p).status_code, payments))
    assert statuses == [200] * 50
    amount = int(requirement["amount"])
    assert proxy.balances() == (payer_before - 50 * amount, payee_before + 50 * amount)
    assert relayer_tx_count(proxy) == sent_before + 50  # 50 sends, no gap, no lost nonce
    pending = int(proxy.chain.rpc.call("eth_getTransactionCount", [proxy.wallets.relayer, "pending"]), 16)
    assert pending == sent_before + 50  # nothing stuck behind a gap
    assert len(standin.received) == 50


def relayer_tx_count(proxy: Proxy) -> int:
    return int(proxy.chain.rpc.call("eth_getTransactionCount", [proxy.wallets.relayer, "latest"]), 16)


def test_misconfigured_gunicorn_exits_with_one_clear_line(
    anvil: Service, redis_service: Service, wallets: Wallets
) -> None:
    env = gunicorn_env(anvil, redis_service, wallets, "http://127.0.0.1:9", free_port())
    env["X402_NETWORK"] = "eip155:84532"  # anvil runs as Base mainnet (8453)
    process = start_gunicorn(env)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    lines = [line for line in stderr.splitlines() if "refusing to start" in line]
    assert lines and all("X402_RPC_URLS" in line and "8453" in line for line in lines)
    assert "Traceback" not in stderr
