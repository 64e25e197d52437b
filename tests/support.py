"""Helpers shared by the tests: the proxy as a wallet sees it, and small decoders."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from redis.cluster import ClusterNode, RedisCluster
from werkzeug.serving import BaseWSGIServer, make_server

from app.cli.devnet import quiet_request_handler
from app.devnet import DevChain, Wallets, prepare_chain
from app.devnet.cluster import RedisClusterProcesses
from app.payments.keys import LEDGER_STREAM, payment_key, relayer_nonce_key
from app.settings import Settings
from app.x402.codec import decode_header, encode_header
from app.x402.payer import header_name, offered_requirements, sign_payment
from app.x402.wire import PaymentPayload

USDC = 10**6
OPERATOR_KEY = "operator-upstream-key"
CHAT_BODY: dict[str, Any] = {
    "model": "hermes-3-8b-tee",
    "messages": [{"role": "user", "content": "What is a trusted execution environment?"}],
    "max_tokens": 64,
}


@dataclass
class Proxy:
    """The proxy app served on a loopback port, plus helpers to pay it like a wallet would."""

    url: str
    settings: Settings
    wallets: Wallets
    chain: DevChain
    server: BaseWSGIServer | None = None

    def post(self, path: str = "/v1/chat/completions", body: Any = None, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, json=CHAT_BODY if body is None else body, timeout=30, **kwargs)

    def requirement(
        self, body: Any = None, version: int = 2, path: str = "/v1/chat/completions"
    ) -> dict[str, Any]:
        """The requirement the proxy offers for this body, read from a real 402."""
        response = self.post(path, body)
        assert response.status_code == 402, response.text
        offered_version, _, accepts = offered_requirements(
            dict(response.headers) if version == 2 else {}, response.json()
        )
        assert offered_version == version
        return accepts[0]

    def payment(
        self,
        requirement: dict[str, Any],
        version: int = 2,
        key: str | None = None,
        nonce: bytes | None = None,
        now: int | None = None,
    ) -> PaymentPayload:
        private_key = bytes.fromhex((key or self.wallets.payer_key)[2:])
        return sign_payment(
            requirement, version, private_key, now or int(time.time()), nonce or os.urandom(32)
        )

    def pay(
        self,
        payment: PaymentPayload,
        body: Any = None,
        path: str = "/v1/chat/completions",
        extra_headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        headers = {header_name(payment.version): encode_header(payment.to_wire()), **(extra_headers or {})}
        return self.post(path, body, headers=headers, **kwargs)

    def balances(self) -> tuple[int, int]:
        return self.chain.balance(self.wallets.payer), self.chain.balance(self.wallets.pay_to)


def moved_since(proxy: Proxy, before: tuple[int, int]) -> int:
    """Atomic units that moved from the payer to the payee since ``before`` (payer, payee balances);
    the two sides must match."""
    payer, payee = proxy.balances()
    assert before[0] - payer == payee - before[1]
    return payee - before[1]


def settle_response(response: requests.Response, version: int = 2) -> dict[str, Any]:
    value = decode_header(response.headers["PAYMENT-RESPONSE" if version == 2 else "X-PAYMENT-RESPONSE"])
    assert isinstance(value, dict)
    return value


def serve(app: Any) -> BaseWSGIServer:
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=quiet_request_handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# -- Redis Cluster -------------------------------------------------------------------------------------


def cluster_client(cluster: RedisClusterProcesses) -> RedisCluster:
    """A cluster client that starts from every master, so a killed one does not stop it."""
    nodes = [ClusterNode("127.0.0.1", port) for port in cluster.ports]
    return RedisCluster(startup_nodes=nodes, require_full_coverage=False)


def funded_wallets(chain: DevChain, accept: Callable[[Wallets], bool] = lambda _w: True) -> Wallets:
    """Fresh wallets whose relayer passes ``accept`` (where its nonce counter lives matters to a test)."""
    while not accept(wallets := Wallets.fresh()):
        pass
    prepare_chain(chain, wallets, 10 * USDC)
    return wallets


def key_of(proxy: Proxy, payment: PaymentPayload) -> str:
    """The ledger key of a payment to ``proxy``."""
    auth = payment.authorization
    return payment_key(proxy.settings.network.chain_id, proxy.settings.asset, auth.from_, auth.nonce)


def payment_on(
    proxy: Proxy, cluster: RedisClusterProcesses, master: int, requirement: dict[str, Any]
) -> PaymentPayload:
    """A signed payment whose ledger key lives on cluster node ``master``."""
    while True:
        payment = proxy.payment(requirement, nonce=os.urandom(32))
        if cluster.node_for_key(key_of(proxy, payment)) == master:
            return payment


def relayer_master(cluster: RedisClusterProcesses, wallets: Wallets) -> int:
    """The cluster node holding the relayer's account-nonce counter."""
    return cluster.node_for_key(relayer_nonce_key(8453, wallets.relayer))


def ledger_events(cluster: RedisClusterProcesses) -> list[dict[str, str]]:
    """Every entry of the ledger stream, oldest first, as text fields."""
    client = cluster_client(cluster)
    try:
        return [{k.decode(): v.decode() for k, v in f.items()} for _id, f in client.xrange(LEDGER_STREAM)]
    finally:
        client.close()
