"""A gunicorn worker killed mid-call (a crash, an OOM kill) never strands a settled payment.

gunicorn with one worker, the real chain, Redis and the stand-in model. The worker is killed with
SIGKILL after the settlement is mined and before the model answers. The payment stays "settling"
(in flight) until no request can still hold it; then the same header is served from chain state,
or ``x402-proxy reconcile`` makes it redeemable. Elapsed time is simulated by ageing the payment's
``updated`` field in Redis: the wait itself (``app.backends.upstream.abandoned_after``, about five minutes
with the default timeouts) would add nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from app.cli import main
from app.devnet import DevChain, Service, Wallets, free_port
from app.devnet.standin import Behaviour, StandinModel
from app.payments.keys import payment_key
from app.settings import Settings
from app.x402.wire import PaymentPayload
from tests.e2e.test_gunicorn import gunicorn_env, start_gunicorn, wait_until_up
from tests.support import Proxy

pytestmark = pytest.mark.integration
# Older than ``abandoned_after`` for gunicorn's default settings (about five minutes).
LONG_AGO = 3600


def workers_of(master: int) -> list[int]:
    """The pids whose parent is ``master`` (read from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            children.append(int(stat.parent.name))
    return children


@pytest.fixture
def one_worker(
    anvil: Service,
    redis_service: Service,
    redis_client: redis.Redis,
    wallets: Wallets,
    chain: DevChain,
    standin: StandinModel,
    settings: Settings,
) -> Iterator[tuple[Proxy, int]]:
    port = free_port()
    env = {**gunicorn_env(anvil, redis_service, wallets, standin.url, port), "X402_WORKERS": "1"}
    process = start_gunicorn(env)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(process, url)
    yield Proxy(url, settings, wallets, chain), process.pid
    process.terminate()
    process.wait(timeout=20)


def killed_mid_call(proxy: Proxy, master: int, standin: StandinModel) -> PaymentPayload:
    """Pay; once the settlement is mined (the model still working), SIGKILL the worker."""
    standin.behaviour = Behaviour(delay=3.0)
    payment = proxy.payment(proxy.requirement())
    before = proxy.balances()[1]
    caller = threading.Thread(target=lambda: _swallow(lambda: proxy.pay(payment)), daemon=True)
    caller.start()
    deadline = time.monotonic() + 10
    while proxy.balances()[1] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.balances()[1] == before + payment.authorization.value, "the settlement was not mined"
    for worker in workers_of(master):
        os.kill(worker, signal.SIGKILL)
    caller.join(timeout=10)
    standin.behaviour = Behaviour()
    wait_until_workers_answer(proxy)
    return payment


def _swallow(call: object) -> None:
    with contextlib.suppress(requests.RequestException):  # the worker dies under this request
        call()  # type: ignore[operator]


def wait_until_workers_answer(proxy: Proxy) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(proxy.url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.1)
    pytest.fail("gunicorn did not replace the killed worker")


def age(proxy: Proxy, payment: PaymentPayload, seconds: float) -> str:
    """Move the payment's last change ``seconds`` into the past; return its key."""
    auth = payment.authorization
    key = payment_key(8453, proxy.settings.asset, auth.from_, auth.nonce)
    client = redis.Redis.from_url(proxy.settings.redis_url, decode_responses=True)
    client.hset(key, "updated", int(time.time() - seconds))
    return key


def state(proxy: Proxy, key: str) -> str:
    return str(redis.Redis.from_url(proxy.settings.redis_url, decode_responses=True).hget(key, "state"))


def test_a_settled_payment_whose_worker_was_killed_is_served_by_its_header(
    one_worker: tuple[Proxy, int], standin: StandinModel
) -> None:
    proxy, master = one_worker
    payer_before = proxy.balances()[0]
    payment = killed_mid_call(proxy, master, standin)
    in_flight = proxy.pay(payment)
    assert in_flight.status_code == 503 and in_flight.json()["error"]["code"] == "payment_in_progress"
    age(proxy, payment, LONG_AGO)
    served = proxy.pay(payment)
    assert served.status_code == 200, served.text
    assert payer_before - proxy.balances()[0] == payment.authorization.value  # charged once
    assert proxy.pay(payment).status_code == 402  # and served once


def test_reconcile_lists_an_open_settlement_and_makes_an_abandoned_one_redeemable(
    one_worker: tuple[Proxy, int],
    standin: StandinModel,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy, master = one_worker
    payment = killed_mid_call(proxy, master, standin)
    for name, value in {
        "X402_PAY_TO": proxy.settings.pay_to,
        "X402_RPC_URLS": ",".join(proxy.settings.rpc_urls),
        "REDIS_URL": proxy.settings.redis_url,
        "X402_RELAYER_KEY": proxy.wallets.relayer_key,
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["reconcile", "--since", "1h"]) == 0
    assert "in flight" in capsys.readouterr().out
    key = age(proxy, payment, LONG_AGO)
    assert main(["reconcile", "--since", "1h"]) == 0
    assert "→ redeemable" in capsys.readouterr().out
    assert state(proxy, key) == "redeemable"
    assert proxy.pay(payment).status_code == 200
