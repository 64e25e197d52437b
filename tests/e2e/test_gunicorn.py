"""The proxy as operators run it: gunicorn with several workers sharing one Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from app.devnet import DevChain, Service, Wallets, free_port
from app.devnet.standin import StandinModel
from app.settings import Settings
from app.x402.codec import encode_header
from app.x402.wire import PaymentPayload
from tests.support import CHAT_BODY, Proxy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
STREAM_BODY = {**CHAT_BODY, "stream": True}


def gunicorn_env(
    anvil: Service, redis_service: Service, wallets: Wallets, upstream: str, port: int, threads: int = 4
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
        "X402_THREADS": str(threads),
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


class HeldStream:
    """A paid stream read chunk by chunk in its own thread until ``release()``: it holds one worker
    thread of the proxy for as long as it is open. Times are ``time.monotonic()`` stamps."""

    def __init__(self, proxy: Proxy, payment: PaymentPayload) -> None:
        self.first_byte = threading.Event()
        self.ended_at: float | None = None  # the stream ended (or failed) on its own
        self.status = 0
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(proxy, payment), daemon=True)
        self._thread.start()

    def _read(self, proxy: Proxy, payment: PaymentPayload) -> None:
        try:
            with proxy.pay(payment, STREAM_BODY, stream=True) as response:
                self.status = response.status_code
                for _ in response.iter_content(None):
                    self.first_byte.set()
                    if self._released.is_set():
                        return  # closing the connection ends the proxy's relay at its next chunk
        except requests.RequestException:
            pass
        self.ended_at = time.monotonic()

    def release(self) -> None:
        self._released.set()
        self._thread.join(timeout=10)


def test_long_streams_do_not_starve_short_paid_calls(
    anvil: Service,
    redis_service: Service,
    wallets: Wallets,
    chain: DevChain,
    standin: StandinModel,
    settings: Settings,
) -> None:
    """2 workers x 8 threads, 15 paid streams of 30 s opened one by one: more than one worker's threads.

    Each worker may hold only as many connections as it has threads (``worker_connections``), so the
    streams spread 8 + 7, and short paid calls, one after another, get the last free thread while
    every stream is still open. With gunicorn's default (1000) a worker kept accepting with all its
    threads busy: streams queued behind its threads, and a short call landing there waited for a
    30 s stream to end.
    """
    threads, port = 8, free_port()
    process = start_gunicorn(gunicorn_env(anvil, redis_service, wallets, standin.url, port, threads))
    proxy = Proxy(f"http://127.0.0.1:{port}", settings, wallets, chain)
    standin.behaviour.chunks, standin.behaviour.chunk_delay = 30, 1.0
    streams: list[HeldStream] = []
    try:
        wait_until_up(process, proxy.url)
        stream_requirement, short_requirement = proxy.requirement(STREAM_BODY), proxy.requirement()
        for _ in range(2 * threads - 1):
            streams.append(HeldStream(proxy, proxy.payment(stream_requirement)))
            time.sleep(0.1)  # clients arriving one after another
        deadline = time.monotonic() + 10
        waiting = sum(not s.first_byte.wait(max(0.0, deadline - time.monotonic())) for s in streams)
        assert waiting == 0, f"{waiting} of {len(streams)} streams waited 10 s for a worker thread"
        for call in range(3):
            header = {"PAYMENT-SIGNATURE": encode_header(proxy.payment(short_requirement).to_wire())}
            try:  # a starved call waits for a stream to end, ~30 s
                short = requests.post(
                    proxy.url + "/v1/chat/completions", json=CHAT_BODY, headers=header, timeout=10
                )
            except requests.Timeout:
                pytest.fail(f"short paid call {call + 1} waited 10 s for a worker thread behind the streams")
            assert short.status_code == 200 and "stand-in answer" in short.text, short.text
        answered = time.monotonic()
        assert [s.ended_at for s in streams if s.ended_at is not None and s.ended_at < answered] == []
    finally:
        for stream in streams:
            stream.release()
        process.terminate()
        process.wait(timeout=20)
    assert [s.status for s in streams] == [200] * len(streams)


def test_the_gunicorn_settings_load_before_any_metric_exists(tmp_path: Path) -> None:
    """prometheus-client reads PROMETHEUS_MULTIPROC_DIR when a metric is created: the settings set it
    (to a fresh directory unless given one), so loading them, and the package they live in, must not
    import prometheus_client."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    check = "import sys, app.gunicorn_conf; assert 'prometheus_client' not in sys.modules, 'imported'"
    for settings in (check, check.replace("app.gunicorn_conf", "runpy; runpy.run_path('gunicorn.conf.py')")):
        done = subprocess.run(
            [sys.executable, "-c", settings],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr[-2000:]


def test_each_worker_claims_batch_charges_without_any_request(
    anvil: Service,
    redis_service: Service,
    redis_client,
    upto_proxy: Proxy,
    chain: DevChain,
    standin: StandinModel,
) -> None:
    """Charges made before gunicorn started (here by another app on the same Redis) are claimed by
    the workers' claim loops, though no request reaches gunicorn: they start with each worker."""
    from app.payments.claims import stop_all
    from tests.integration.test_batch_claims import on_chain, paid_calls

    channel, charged = paid_calls(upto_proxy, upto_proxy.wallets.payer_key, 2)
    stop_all()  # the in-process app's loop is not the one under test
    port = free_port()
    env = gunicorn_env(anvil, redis_service, upto_proxy.wallets, standin.url, port)
    env.update(X402_CLAIM_INTERVAL="1", X402_CATALOG=str(upto_proxy.settings.catalog_path))
    redis_client.set("x402:{meta}:claims", '{"claim_at": 0, "settle_at": 0}')  # due (as after a restart)
    process = start_gunicorn(env)
    try:
        deadline = time.monotonic() + 30
        while on_chain(upto_proxy, channel)[1] != charged:
            assert time.monotonic() < deadline, "the workers did not claim"
            assert process.poll() is None, process.communicate()[1][-2000:]
            time.sleep(0.2)
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_a_client_that_keeps_its_socket_open_does_not_hold_up_the_others(
    anvil: Service, redis_service: Service, wallets: Wallets, chain: DevChain, standin: StandinModel, settings
) -> None:
    """Every answer closes its connection (keep-alive is off); a client that reads its answer and
    keeps the socket open made gunicorn's worker wait up to 2 s for it on its main thread, accepting
    nothing meanwhile. With one worker, another client is now answered while that socket stays open."""
    port = free_port()
    env = {**gunicorn_env(anvil, redis_service, wallets, standin.url, port), "X402_WORKERS": "1"}
    process = start_gunicorn(env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, url)
        holder = socket.create_connection(("127.0.0.1", port))
        holder.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            answer += holder.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer  # read whole; the socket stays open
        started = time.monotonic()
        assert requests.get(url + "/healthz", timeout=10).status_code == 200
        waited = time.monotonic() - started
        holder.close()
        assert waited < 1.0, f"another client waited {waited:.2f} s behind a held socket"
    finally:
        process.terminate()
        process.communicate(timeout=30)
