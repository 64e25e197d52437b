"""Redis failing under the proxy: fail closed with 503 + Retry-After, lose no payment, and serve
again by itself once Redis is back (real redis-server processes, killed and paused)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app import create_checked_app
from app.backends.store import SOCKET_TIMEOUT
from app.devnet import Service, free_port, start_redis
from app.devnet.standin import StandinModel
from app.payments.keys import payment_key
from app.payments.ledger import Ledger
from tests.rpc_proxy import FaultyRpc
from tests.support import Proxy, serve, settle_response

pytestmark = pytest.mark.integration


class RestartableRedis:
    """A redis-server on a fixed port that can be killed, paused and started again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.service: Service | None = start_redis(self.port)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        assert self.service is not None
        self.service.process.send_signal(signal.SIGKILL)
        self.service.process.wait()
        self.service.stop()
        self.service = None

    def start(self) -> None:
        self.service = start_redis(self.port)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()


@pytest.fixture
def own_redis() -> Iterator[RestartableRedis]:
    server = RestartableRedis()
    yield server
    server.stop()


@pytest.fixture
def fragile(proxy: Proxy, own_redis: RestartableRedis, anvil: Service) -> Iterator[tuple[Proxy, FaultyRpc]]:
    rpc = FaultyRpc(anvil.url)
    settings = proxy.settings.with_overrides(redis_url=own_redis.url, rpc_urls=(rpc.url,))
    server = serve(create_checked_app(settings))
    yield Proxy(f"http://127.0.0.1:{server.server_port}", settings, proxy.wallets, proxy.chain, server), rpc
    server.shutdown()
    rpc.stop()


def test_redis_killed_then_back_fails_closed_and_recovers(
    fragile: tuple[Proxy, FaultyRpc], own_redis: RestartableRedis, standin: StandinModel
) -> None:
    proxy, _ = fragile
    payment = proxy.payment(proxy.requirement())
    balances = proxy.balances()
    own_redis.kill()
    down = proxy.pay(payment)
    assert down.status_code == 503 and down.headers["Retry-After"]
    assert down.json()["error"]["code"] == "ledger_unavailable"
    assert proxy.balances() == balances and standin.received == []
    own_redis.start()
    back = proxy.pay(payment)  # same process, no restart
    assert back.status_code == 200, back.text
    assert len(standin.received) == 1


def test_redis_paused_fails_closed(
    fragile: tuple[Proxy, FaultyRpc], own_redis: RestartableRedis, standin: StandinModel
) -> None:
    proxy, _ = fragile
    payment = proxy.payment(proxy.requirement())
    assert own_redis.service is not None
    pid = own_redis.service.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        paused = proxy.pay(payment)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert paused.status_code == 503 and paused.json()["error"]["code"] == "ledger_unavailable"
    assert standin.received == []
    assert proxy.pay(payment).status_code == 200


def test_client_pause_fails_closed_and_recovers(
    fragile: tuple[Proxy, FaultyRpc], own_redis: RestartableRedis, standin: StandinModel
) -> None:
    proxy, _ = fragile
    payment = proxy.payment(proxy.requirement())
    redis.Redis.from_url(own_redis.url).execute_command("CLIENT", "PAUSE", "7000", "ALL")
    paused = proxy.pay(payment)
    assert paused.status_code == 503 and standin.received == []
    time.sleep(2)
    assert proxy.pay(payment).status_code == 200


def test_redis_lost_after_settlement_withholds_the_answer_and_the_retry_is_served_once(
    fragile: tuple[Proxy, FaultyRpc], own_redis: RestartableRedis, standin: StandinModel
) -> None:
    """Redis dies (losing everything: no persistence) between the claim and the end of the call.
    The payment settles on chain; the answer is withheld (503 + PAYMENT-RESPONSE); once Redis is
    back the same header is recognised from the token's logs and served, with no second charge."""
    proxy, rpc = fragile
    payment = proxy.payment(proxy.requirement())
    payer_before, payee_before = proxy.balances()
    rpc.before_send = own_redis.kill
    try:
        lost = proxy.pay(payment)
    finally:
        rpc.before_send = None
    assert lost.status_code == 503 and lost.json()["error"]["code"] == "ledger_unavailable"
    assert "stand-in answer" not in lost.text
    tx = settle_response(lost)["transaction"]
    amount = payment.authorization.value
    assert proxy.balances() == (payer_before - amount, payee_before + amount)
    own_redis.start()
    served = proxy.pay(payment)
    assert served.status_code == 200, served.text
    assert settle_response(served)["transaction"] == tx
    assert proxy.balances() == (payer_before - amount, payee_before + amount)
    assert proxy.pay(payment).status_code == 402


@pytest.mark.parametrize("fault", ["reset", "hang"])
def test_upstream_reset_or_hang_leaves_the_payment_redeemable(
    proxy: Proxy, standin: StandinModel, fault: str
) -> None:
    """The model host drops the connection, or does not answer in X402_UPSTREAM_TIMEOUT: the
    buyer gets 502 with PAYMENT-RESPONSE, and the same header is served later, charged once."""
    quick = proxy.settings.with_overrides(upstream_timeout=1.0)
    server = serve(create_checked_app(quick))
    slow = Proxy(f"http://127.0.0.1:{server.server_port}", quick, proxy.wallets, proxy.chain, server)
    try:
        payment = slow.payment(slow.requirement())
        payer_before, _ = slow.balances()
        if fault == "reset":
            standin.behaviour.reset = True
        else:
            standin.behaviour.delay = 3.0
        failed = slow.pay(payment)
        assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_unavailable"
        assert settle_response(failed)["success"] is True
        standin.behaviour.reset, standin.behaviour.delay = False, 0.0
        served = slow.pay(payment)
        assert served.status_code == 200, served.text
        assert slow.balances()[0] == payer_before - payment.authorization.value
    finally:
        server.shutdown()


def test_hanging_rpc_fails_closed_and_the_header_pays_later(
    proxy: Proxy, standin: StandinModel, anvil: Service
) -> None:
    rpc = FaultyRpc(anvil.url)
    settings = proxy.settings.with_overrides(rpc_urls=(rpc.url,), rpc_timeout=1.0)
    server = serve(create_checked_app(settings))
    hanging = Proxy(f"http://127.0.0.1:{server.server_port}", settings, proxy.wallets, proxy.chain, server)
    try:
        payment = hanging.payment(hanging.requirement())
        balances = hanging.balances()
        rpc.delays["eth_estimateGas"] = 3.0  # the preflight batch hangs past the timeout
        stuck = hanging.pay(payment)
        assert stuck.status_code == 503 and stuck.json()["error"]["code"] == "rpc_unavailable"
        assert stuck.headers["Retry-After"] and standin.received == []
        assert hanging.balances() == balances
        rpc.delays.clear()
        assert hanging.pay(payment).status_code == 200
    finally:
        server.shutdown()
        rpc.stop()


def test_a_command_sent_to_a_stalled_redis_is_not_applied_when_it_resumes(
    own_redis: RestartableRedis,
) -> None:
    """The proxy gives up on a stalled Redis and answers as if the write failed; when Redis resumes
    it must not apply that write (here: a payment marked served whose answer was withheld)."""
    assert own_redis.service is not None
    client = redis.Redis.from_url(own_redis.url, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    ledger = Ledger(client)
    key = payment_key(8453, "0x" + "11" * 20, "0x" + "22" * 20, bytes(32))
    ledger.claim(key, int(time.time()) + 600, "0x" + "22" * 20, 1000, "hermes-3-8b-tee", "eip155:8453")
    assert ledger.transition(key, ("claimed",), "settling")
    pid = own_redis.service.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        sent = time.time()
        with pytest.raises(redis.TimeoutError):
            ledger.transition(key, ("settling",), "served", tx="0x" + "ab" * 32)
        time.sleep(max(0.0, sent + SOCKET_TIMEOUT - time.time()))  # past the script's deadline
    finally:
        os.kill(pid, signal.SIGCONT)
    assert ledger.get(key)["state"] == "settling"  # the queued command ran, late, and changed nothing
    assert ledger.events() == []
