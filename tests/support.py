"""Helpers shared by the tests: the proxy as a wallet sees it, and small decoders."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests
from eth_abi import decode, encode
from eth_account import Account
from redis.cluster import ClusterNode, RedisCluster
from werkzeug.serving import BaseWSGIServer, make_server
from x402 import x402ClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.http.x402_http_client import x402HTTPClientSync
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.types import UptoPermit2Payload
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.mechanisms.evm.upto.client import _sign_upto_permit2_authorization
from x402.schemas import PaymentRequired

from app import create_checked_app
from app.backends.rpc import RpcClient
from app.backends.token import selector
from app.catalog import load_catalog
from app.catalog.usage import Usage, charge
from app.cli.devnet import quiet_request_handler
from app.devnet import DevChain, Wallets, prepare_chain
from app.devnet.cluster import RedisClusterProcesses
from app.payments.keys import LEDGER_STREAM, payment_key, relayer_nonce_key
from app.settings import Settings
from app.x402.codec import decode_header, encode_header
from app.x402.payer import header_name, offered_requirements, sign_payment
from app.x402.upto import PERMIT2_ADDRESS
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


def proxy_with(proxy: Proxy, **changes: object) -> Iterator[Proxy]:
    """Another proxy app over the same chain, Redis and wallets, with some settings changed."""
    settings = proxy.settings.with_overrides(**changes)
    server = serve(create_checked_app(settings))
    yield Proxy(f"http://127.0.0.1:{server.server_port}", settings, proxy.wallets, proxy.chain, server)
    server.shutdown()


def usage_price(proxy: Proxy, usage: dict[str, int], model: str = "hermes-3-8b-tee") -> int:
    """What ``upto`` charges for a host's ``usage`` object on ``proxy``'s catalog (no maximum)."""
    entry = load_catalog(proxy.settings.catalog_path)[model]
    return charge(entry, Usage(usage["prompt_tokens"], usage["completion_tokens"]), 10**12)


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


# -- upto ---------------------------------------------------------------------------------------------

MAX_UINT = 2**256 - 1


def approve_permit2(chain: DevChain, owner: str, amount: int = MAX_UINT) -> None:
    """``owner`` approves Permit2 to spend ``amount`` of the token (sent as ``owner`` through anvil's
    impersonation, with gas money set first)."""
    chain.set_eth(owner, 10**18)
    chain.rpc.call("anvil_impersonateAccount", [owner])
    try:
        data = selector("approve(address,uint256)") + encode(
            ["address", "uint256"], [PERMIT2_ADDRESS, amount]
        )
        tx_hash = chain.rpc.call(
            "eth_sendTransaction", [{"from": owner, "to": chain.token, "data": "0x" + data.hex()}]
        )
        deadline = time.monotonic() + 10
        while (receipt := chain.rpc.call("eth_getTransactionReceipt", [tx_hash])) is None:
            assert time.monotonic() < deadline, "approve was not mined"
            time.sleep(0.01)
        assert receipt["status"] == "0x1"
    finally:
        chain.rpc.call("anvil_stopImpersonatingAccount", [owner])


def upto_session(key: str, rpc: RpcClient | None = None, wallet: str | None = None) -> requests.Session:
    """A requests session that pays with the official PyPI x402 client, ``upto`` scheme only. With
    ``rpc`` its signer can read the chain, so it signs the EIP-2612 permit the 402's
    ``eip2612GasSponsoring`` extension offers when the payer has no Permit2 allowance; ``wallet``
    names a contract wallet that ``key`` owns (EIP-1271) as the payer."""
    client = x402ClientSync()
    signer = RpcSigner(key, rpc, wallet) if rpc is not None else EthAccountSigner(Account.from_key(key))
    client.register("eip155:*", UptoEvmClientScheme(signer))
    return wrapRequestsWithPayment(requests.Session(), client)


def abi_type(param: dict[str, Any]) -> str:
    if param["type"].startswith("tuple"):
        return "(" + ",".join(abi_type(c) for c in param["components"]) + ")" + param["type"][5:]
    return str(param["type"])


def calldata(abi: list[dict[str, Any]], name: str, args: list[Any]) -> bytes:
    """``name``'s selector and ``args`` encoded as that function's inputs in ``abi`` (x402's own ABI)."""
    (function,) = [f for f in abi if f.get("name") == name and f["type"] == "function"]
    types = [abi_type(p) for p in function["inputs"]]
    return selector(f"{name}({','.join(types)})") + encode(types, args)


class RpcSigner(EthAccountSigner):
    """The official eth_account signer plus ``read_contract`` over our RPC client, which the client's
    EIP-2612 extension needs (the token's ``nonces``, its ``allowance`` to Permit2). ``address`` may
    name a contract wallet that ``key`` owns (EIP-1271)."""

    def __init__(self, key: str, rpc: RpcClient, address: str | None = None) -> None:
        super().__init__(Account.from_key(key))
        self._rpc = rpc
        self._wallet = address

    @property
    def address(self) -> str:
        return self._wallet or str(self._account.address)

    def read_contract(self, address: str, abi: list[dict[str, Any]], function_name: str, *args: Any) -> Any:
        (function,) = [f for f in abi if f.get("name") == function_name]
        data = calldata(abi, function_name, list(args))
        answer = self._rpc.call("eth_call", [{"to": address, "data": "0x" + data.hex()}, "latest"])
        return decode([abi_type(o) for o in function["outputs"]], bytes.fromhex(answer[2:]))[0]


def upto_header(key: str, challenge: dict[str, Any], deadline: int | None = None) -> str:
    """The ``PAYMENT-SIGNATURE`` value the official PyPI x402 ``upto`` client makes for a decoded v2
    402 challenge (it picks the ``upto`` entry); with ``deadline`` (unix seconds), the permit is
    signed again, by the client's own signing function, to end then."""
    client = x402ClientSync()
    signer = EthAccountSigner(Account.from_key(key))
    client.register("eip155:*", UptoEvmClientScheme(signer))
    http = x402HTTPClientSync(client)
    payload = http.create_payment_payload(PaymentRequired.model_validate(challenge))
    if deadline is not None:
        permit = UptoPermit2Payload.from_dict(payload.payload)
        authorization = dataclasses.replace(permit.permit2_authorization, deadline=str(deadline))
        signature = _sign_upto_permit2_authorization(signer, authorization, payload.accepted)
        payload.payload = UptoPermit2Payload(
            permit2_authorization=authorization, signature=signature
        ).to_dict()
    return str(http.encode_payment_signature_header(payload)["PAYMENT-SIGNATURE"])


def offered(response: requests.Response) -> list[dict[str, Any]]:
    """The v2 ``accepts`` of a 402."""
    challenge = decode_header(response.headers["PAYMENT-REQUIRED"])
    assert isinstance(challenge, dict)
    return list(challenge["accepts"])


def send_signed(chain: DevChain, key: str, to: str, data: bytes, gas: int = 2_000_000) -> dict[str, Any]:
    """Sign ``data`` to ``to`` with ``key`` (EIP-1559, a fixed ``gas`` limit, so a reverting call is
    mined too), broadcast it and return its receipt once mined (within 20 s)."""
    account = Account.from_key(key)
    nonce = int(chain.rpc.call("eth_getTransactionCount", [account.address, "pending"]), 16)
    fee = int(chain.rpc.call("eth_gasPrice", []), 16)
    transaction = {
        "type": 2,
        "chainId": 8453,
        "nonce": nonce,
        "to": to,
        "value": 0,
        "data": data,
        "gas": gas,
        "maxFeePerGas": 2 * fee + 10**9,
        "maxPriorityFeePerGas": 10**9,
    }
    raw = bytes(account.sign_transaction(transaction).raw_transaction)
    tx_hash = chain.rpc.call("eth_sendRawTransaction", ["0x" + raw.hex()])
    deadline = time.monotonic() + 20
    while (receipt := chain.rpc.call("eth_getTransactionReceipt", [tx_hash])) is None:
        assert time.monotonic() < deadline, f"no receipt for {tx_hash}"
        time.sleep(0.01)
    return dict(receipt)
