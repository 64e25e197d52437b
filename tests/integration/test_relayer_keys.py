"""Several relayer keys (``X402_RELAYER_KEYS``): 402s name them in turn, each payment is settled by
the key it names (upto) or the key whose turn it was (exact), and each key keeps its own account
nonce counter in Redis. Real anvil, Redis and the official PyPI x402 clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import requests
from eth_account import Account

from app import create_checked_app
from app.devnet import DevChain, Wallets
from app.devnet.standin import StandinModel
from app.payments.keys import relayer_nonce_key
from app.settings import Settings
from app.x402.codec import decode_header
from tests.support import CHAT_BODY as BODY
from tests.support import Proxy, approve_permit2, offered, serve, settle_response, upto_session

pytestmark = pytest.mark.integration

KEYS = 3


@pytest.fixture
def keys_proxy(settings: Settings, wallets: Wallets, chain: DevChain) -> Iterator[Proxy]:
    keys = (wallets.relayer_key, *(Wallets.fresh().relayer_key for _ in range(KEYS - 1)))
    for key in keys:
        chain.set_eth(Account.from_key(key).address, 10**20)
    configured = settings.with_overrides(relayer_keys=keys, relayer_key=keys[0])
    server = serve(create_checked_app(configured))
    yield Proxy(f"http://127.0.0.1:{server.server_port}", configured, wallets, chain, server)
    server.shutdown()


def relayers(proxy: Proxy) -> list[str]:
    return [str(Account.from_key(key).address) for key in proxy.settings.settling_keys]


def sender(proxy: Proxy, response: requests.Response) -> str:
    receipt = proxy.chain.rpc.call("eth_getTransactionReceipt", [settle_response(response)["transaction"]])
    return str(receipt["from"]).lower()


def test_402s_name_the_relayers_in_turn(keys_proxy: Proxy) -> None:
    named = [offered(keys_proxy.post())[1]["extra"]["facilitatorAddress"] for _ in range(2 * KEYS)]
    assert named[:KEYS] == named[KEYS:]  # a fixed turn
    assert sorted(named[:KEYS]) == sorted(relayers(keys_proxy))  # every key, once per turn


def test_an_upto_payment_is_settled_by_the_key_it_names(keys_proxy: Proxy, standin: StandinModel) -> None:
    approve_permit2(keys_proxy.chain, keys_proxy.wallets.payer)
    settled_by = set()
    for _ in range(KEYS):
        response = upto_session(keys_proxy.wallets.payer_key).post(
            keys_proxy.url + "/v1/chat/completions", json=BODY, timeout=60
        )
        assert response.status_code == 200, response.text
        sent = decode_header(response.request.headers["PAYMENT-SIGNATURE"])
        named = sent["accepted"]["extra"]["facilitatorAddress"]
        assert sent["payload"]["permit2Authorization"]["witness"]["facilitator"].lower() == named.lower()
        assert sender(keys_proxy, response) == named.lower()
        settled_by.add(named.lower())
    assert settled_by == {r.lower() for r in relayers(keys_proxy)}


def test_exact_payments_are_settled_by_every_key_each_with_its_own_nonce(
    keys_proxy: Proxy, standin: StandinModel, redis_client: redis.Redis
) -> None:
    requirement = keys_proxy.requirement()
    senders = []
    for _ in range(2 * KEYS):
        response = keys_proxy.pay(keys_proxy.payment(requirement))
        assert response.status_code == 200, response.text
        senders.append(sender(keys_proxy, response))
    assert sorted(set(senders)) == sorted(r.lower() for r in relayers(keys_proxy))
    for relayer in relayers(keys_proxy):
        counter = redis_client.get(relayer_nonce_key(8453, relayer))
        assert counter is not None and int(counter) == senders.count(relayer.lower())


def test_readyz_shows_every_relayers_balance(keys_proxy: Proxy) -> None:
    ready = requests.get(keys_proxy.url + "/readyz", timeout=10).json()
    balances = ready["checks"]["asset"]["relayer_balances_wei"]
    assert sorted(balances) == sorted(relayers(keys_proxy))
    assert ready["checks"]["asset"]["relayer_balance_wei"] == min(balances.values())
