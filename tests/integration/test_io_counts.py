"""Round trips per paid call, counted (not timed): every call pays for each one of them.

Before settlement: one JSON-RPC round trip (the batched preflight). Redis: three for a JSON answer
— claim, start settling (with the relayer nonce), and the final state with its ledger events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from app import create_checked_app
from app.devnet import Service
from app.devnet.standin import StandinModel
from tests.rpc_proxy import FaultyRpc
from tests.support import CHAT_BODY, Proxy, approve_permit2, serve, upto_session

pytestmark = pytest.mark.integration


class CountingRedis(redis.Redis):
    """A Redis client that counts round trips (each command or script call is one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round_trips = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.round_trips += 1
        return super().execute_command(*args, **options)


@pytest.fixture
def counted(proxy: Proxy, anvil: Service) -> Iterator[tuple[Proxy, FaultyRpc, CountingRedis]]:
    rpc = FaultyRpc(anvil.url)
    client = CountingRedis.from_url(proxy.settings.redis_url)
    settings = proxy.settings.with_overrides(rpc_urls=(rpc.url,), redis_client=client)
    server = serve(create_checked_app(settings))
    yield (
        Proxy(f"http://127.0.0.1:{server.server_port}", settings, proxy.wallets, proxy.chain, server),
        rpc,
        client,
    )
    server.shutdown()
    rpc.stop()


def test_a_paid_call_costs_one_rpc_round_trip_before_settlement_and_three_redis_round_trips(
    counted: tuple[Proxy, FaultyRpc, CountingRedis], standin: StandinModel
) -> None:
    proxy, rpc, client = counted
    requirement = proxy.requirement()
    proxy.pay(proxy.payment(requirement))  # warm up: Lua scripts loaded, connections open
    rpc.requests.clear()
    client.round_trips = 0

    response = proxy.pay(proxy.payment(requirement))

    assert response.status_code == 200
    assert client.round_trips == 3
    sends = [i for i, methods in enumerate(rpc.requests) if "eth_sendRawTransaction" in methods]
    assert sends == [1]  # the only round trip before the send is the batched preflight
    assert {"eth_getCode", "eth_estimateGas", "eth_getTransactionCount"} <= set(rpc.requests[0])
    assert all(methods[-1] == "eth_getTransactionReceipt" for methods in rpc.requests[2:])


def test_an_unfunded_payment_costs_two_redis_round_trips_one_rpc_round_trip_and_a_short_lived_key(
    counted: tuple[Proxy, FaultyRpc, CountingRedis], standin: StandinModel
) -> None:
    """What SECURITY.md says one unfunded request can cost at most."""
    proxy, rpc, client = counted
    requirement = proxy.requirement()
    proxy.pay(proxy.payment(requirement))  # warm up
    rpc.requests.clear()
    client.round_trips = 0
    unfunded = proxy.payment(requirement, key="0x" + bytes(range(3, 35)).hex())

    refused = proxy.pay(unfunded)

    assert refused.json()["error"] == "invalid_exact_evm_insufficient_balance"
    assert (client.round_trips, len(rpc.requests)) == (2, 1)  # claim + release; the preflight batch
    assert standin.received == [standin.received[0]]  # only the warm-up reached the model host
    auth = unfunded.authorization
    key = next(client.scan_iter(match=f"x402:{{p*}}:auth:*{auth.from_.lower()}*"))
    assert client.memory_usage(key) < 512  # bytes
    assert client.ttl(key) <= 120 + 60  # maxTimeoutSeconds + the released grace (seconds)

    far = proxy.payment(requirement, key="0x" + bytes(range(4, 36)).hex(), now=10**10)
    client.round_trips, rpc.requests[:] = 0, []
    assert proxy.pay(far).json()["error"] == "invalid_exact_evm_payload_authorization_valid_before"
    assert (client.round_trips, rpc.requests) == (0, [])


def test_an_upto_call_costs_one_rpc_round_trip_before_the_host_and_its_redis_round_trips(
    counted: tuple[Proxy, FaultyRpc, CountingRedis], standin: StandinModel
) -> None:
    """``upto``: the on-chain checks are one batch; then the host, then the settlement. Redis: the
    debts read, the claim, the hold (exposure, settling), the relayer nonce, the outcome and the
    hold's release."""
    proxy, rpc, client = counted
    approve_permit2(proxy.chain, proxy.wallets.payer)
    session = upto_session(proxy.wallets.payer_key)
    url = proxy.url + "/v1/chat/completions"
    session.post(url, json=CHAT_BODY, timeout=30)  # warm up
    rpc.requests.clear()
    client.round_trips = 0
    calls_before = len(standin.received)

    response = session.post(url, json=CHAT_BODY, timeout=30)

    assert response.status_code == 200 and len(standin.received) == calls_before + 1
    sends = [i for i, methods in enumerate(rpc.requests) if "eth_sendRawTransaction" in methods]
    assert sends == [1]  # the batched preflight, then (after the host) the settlement
    assert {"eth_getCode", "eth_estimateGas", "eth_getTransactionCount"} <= set(rpc.requests[0])
    assert client.round_trips == 7
