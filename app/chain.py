"""The chain, through lean JSON-RPC: batched pre-settlement checks, token reads, sends and receipts.

web3.py's default stack adds an ``eth_chainId`` round trip to every call; here each paid call's
on-chain verification is one batched JSON-RPC request (code, balance, nonce state, pause flag, gas
estimate as simulation, relayer nonce and fees). ``X402_RPC_URLS`` are tried in order; an endpoint
that fails is skipped, and when all fail the caller gets ``ChainUnavailable`` (→ 503, never free).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests
from eth_abi import decode, encode
from eth_hash.auto import keccak
from flask import Flask, current_app

from .settings import Settings, SettingsError
from .x402.eip712 import split_signature
from .x402.verdict import (
    ACCEPTED,
    INSUFFICIENT_BALANCE,
    INVALID_SIGNATURE,
    NONCE_USED,
    SIMULATION_FAILED,
    Verdict,
    reject,
)
from .x402.wire import Authorization

ASSET_PAUSED = "asset_paused"
PAYEE_BLACKLISTED = "payee_blacklisted"
# Refusals that no payment can fix: 503, never a 402 that would invite the client to pay again.
UNPAYABLE = frozenset({ASSET_PAUSED, PAYEE_BLACKLISTED})
TRANSFER_TOPIC = keccak(b"Transfer(address,address,uint256)")
AUTHORIZATION_USED_TOPIC = keccak(b"AuthorizationUsed(address,bytes32)")
# How far back to look for someone else's use of an authorization: authorizations live minutes,
# and RPC providers refuse very wide log ranges.
LOG_LOOKBACK_BLOCKS = 5_000


def selector(signature: str) -> bytes:
    return keccak(signature.encode())[:4]


SEL_BALANCE_OF = selector("balanceOf(address)")
SEL_AUTHORIZATION_STATE = selector("authorizationState(address,bytes32)")
SEL_PAUSED = selector("paused()")
SEL_NAME = selector("name()")
SEL_IS_BLACKLISTED = selector("isBlacklisted(address)")
SEL_VERSION = selector("version()")
SEL_TWA_VRS = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
SEL_TWA_BYTES = selector("transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")


class ChainUnavailable(RuntimeError):
    """No configured RPC endpoint answered."""


@dataclass(frozen=True)
class RpcError:
    code: int
    message: str
    data: str = ""


class RpcClient:
    """JSON-RPC over HTTP with batching and in-order failover. Fork-safe: one session per process.

    With ``chain_id`` set, every batch also carries ``eth_chainId`` and ``eth_blockNumber`` (same
    round trip): an endpoint on another chain is benched for a while like one that does not answer;
    one lagging more than ``lag_tolerance`` blocks behind the highest block seen is benched too, and
    its answer used only when no other endpoint answers (blocks mined while a request was in
    flight make an honest endpoint look behind).
    """

    BENCH_SECONDS = 5.0

    def __init__(
        self,
        urls: tuple[str, ...],
        timeout: float = 10.0,
        chain_id: int | None = None,
        lag_tolerance: int = 5,
    ) -> None:
        self.urls = urls
        self.timeout = timeout
        self.chain_id = chain_id
        self.lag_tolerance = lag_tolerance
        self.highest_block = 0
        self._benched: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None or getattr(self._local, "pid", None) != os.getpid():
            session = requests.Session()
            session.trust_env = False
            self._local.session, self._local.pid = session, os.getpid()
        return session

    def _in_order(self) -> list[str]:
        """Configured order, benched endpoints last (still tried when nothing else answers)."""
        now = time.monotonic()
        return sorted(self.urls, key=lambda url: self._benched.get(url, 0.0) > now)

    def _bench(self, url: str) -> None:
        self._benched[url] = time.monotonic() + self.BENCH_SECONDS

    def _checked(self, answers: list[Any]) -> tuple[list[Any] | None, bool]:
        """(answers without the guard, lagging?); None answers when on the wrong chain."""
        if self.chain_id is None:
            return answers, False
        chain_id, block = answers[0], answers[1]
        if isinstance(chain_id, RpcError) or isinstance(block, RpcError) or _uint(chain_id) != self.chain_id:
            return None, False
        lagging = _uint(block) + self.lag_tolerance < self.highest_block
        self.highest_block = max(self.highest_block, _uint(block))
        return answers[2:], lagging

    def batch(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Run calls in one HTTP request; each answer is its result or an ``RpcError``."""
        guard = [("eth_chainId", []), ("eth_blockNumber", [])] if self.chain_id is not None else []
        ids = [next(self._ids) for _ in guard + calls]
        body = [
            {"jsonrpc": "2.0", "id": i, "method": m, "params": p}
            for i, (m, p) in zip(ids, guard + calls, strict=True)
        ]
        last_error = "no RPC URL configured"
        behind: list[Any] | None = None
        for url in self._in_order():
            try:
                response = self._session().post(url, json=body, timeout=self.timeout)
                response.raise_for_status()
                by_id = {a["id"]: a for a in response.json()}
                answers, lagging = self._checked([_result(by_id[i]) for i in ids])
            except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError) as exc:
                last_error, answers, lagging = f"{url}: {type(exc).__name__}", None, False
            if answers is not None and not lagging:
                self._benched.pop(url, None)
                return answers
            if answers is None:
                last_error = last_error if last_error.startswith(url) else f"{url}: wrong chain"
            elif behind is None:
                behind = answers  # behind the others: the last resort, not a failure
            self._bench(url)
        if behind is not None:
            return behind
        raise ChainUnavailable(last_error)

    def call(self, method: str, params: list[Any]) -> Any:
        """One call; an RPC-level error is raised as ``RpcFailure``."""
        (answer,) = self.batch([(method, params)])
        if isinstance(answer, RpcError):
            raise RpcFailure(answer)
        return answer


class RpcFailure(RuntimeError):
    def __init__(self, error: RpcError) -> None:
        super().__init__(error.message)
        self.error = error


def _result(answer: dict[str, Any]) -> Any:
    if "error" in answer:
        error = answer["error"]
        return RpcError(int(error.get("code", 0)), str(error.get("message", "")), str(error.get("data", "")))
    return answer["result"]


def eth_call(to: str, data: bytes) -> tuple[str, list[Any]]:
    return "eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"]


def transfer_calldata(auth: Authorization, signature: bytes, use_vrs: bool) -> bytes:
    """``transferWithAuthorization`` calldata: the v,r,s overload for EOAs, bytes for contract wallets."""
    head = [auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce]
    if use_vrs:
        v, r, s = split_signature(signature)
        types = [
            "address",
            "address",
            "uint256",
            "uint256",
            "uint256",
            "bytes32",
            "uint8",
            "bytes32",
            "bytes32",
        ]
        return SEL_TWA_VRS + encode(types, [*head, v, r, s])
    types = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"]
    return SEL_TWA_BYTES + encode(types, [*head, signature])


@dataclass(frozen=True)
class Preflight:
    """What the chain says about one payment just before settlement, from one batched request."""

    verdict: Verdict
    use_vrs: bool = True
    calldata: bytes = b""
    gas_estimate: int = 0
    relayer_nonce: int = 0
    gas_price: int = 0
    priority_fee: int = 0


def _uint(hex_value: Any) -> int:
    return int(hex_value, 16) if isinstance(hex_value, str) and hex_value.startswith("0x") else 0


def _word_uint(hex_value: Any) -> int:
    if not isinstance(hex_value, str) or len(hex_value) < 66:
        return 0
    return int(hex_value[2:66], 16)


class Chain:
    """Reads and writes of the payment asset on the configured network."""

    def __init__(self, settings: Settings, rpc: RpcClient | None = None) -> None:
        self.settings = settings
        self.asset = settings.asset
        self.rpc = rpc or RpcClient(
            settings.rpc_urls, settings.rpc_timeout, chain_id=settings.network.chain_id
        )

    def preflight(self, auth: Authorization, signature: bytes, ecdsa_signer: bool, relayer: str) -> Preflight:
        """Verify the payment against chain state (PROTOCOL.md §4 steps 8–10) in one round trip."""
        use_vrs = len(signature) == 65
        calldata = transfer_calldata(auth, signature, use_vrs)
        bytes_calldata = calldata if not use_vrs else transfer_calldata(auth, signature, False)
        code, balance, used, paused, payee_blocked, gas, nonce, gas_price, priority = self.rpc.batch(
            [
                ("eth_getCode", [auth.from_, "latest"]),
                eth_call(self.asset, SEL_BALANCE_OF + encode(["address"], [auth.from_])),
                eth_call(
                    self.asset,
                    SEL_AUTHORIZATION_STATE + encode(["address", "bytes32"], [auth.from_, auth.nonce]),
                ),
                eth_call(self.asset, SEL_PAUSED),
                eth_call(self.asset, SEL_IS_BLACKLISTED + encode(["address"], [auth.to])),
                ("eth_estimateGas", [{"from": relayer, "to": self.asset, "data": "0x" + calldata.hex()}]),
                ("eth_getTransactionCount", [relayer, "pending"]),
                ("eth_gasPrice", []),
                ("eth_maxPriorityFeePerGas", []),
            ]
        )
        is_contract = isinstance(code, str) and code not in ("0x", "0x0", "")
        if is_contract and use_vrs:
            # A contract wallet signs through EIP-1271: simulate and settle with the bytes overload.
            use_vrs, calldata = False, bytes_calldata
            gas = self.rpc.batch(
                [("eth_estimateGas", [{"from": relayer, "to": self.asset, "data": "0x" + calldata.hex()}])]
            )[0]
        if not is_contract and not ecdsa_signer:
            return Preflight(
                reject(INVALID_SIGNATURE, "the signature does not recover to authorization.from")
            )
        if _word_uint(paused) == 1:
            return Preflight(reject(ASSET_PAUSED, "the token is paused; no payment can settle now"))
        if _word_uint(payee_blocked) == 1:
            return Preflight(reject(PAYEE_BLACKLISTED, "the token refuses transfers to this payee"))
        if _word_uint(used) == 1:
            return Preflight(reject(NONCE_USED, "this authorization was already used or canceled on chain"))
        if _word_uint(balance) < auth.value:
            return Preflight(reject(INSUFFICIENT_BALANCE, "the payer's balance is below the amount"))
        if isinstance(gas, RpcError) or isinstance(nonce, RpcError) or isinstance(gas_price, RpcError):
            detail = gas.message if isinstance(gas, RpcError) else "the node refused the simulation"
            return Preflight(reject(SIMULATION_FAILED, detail[:200]))
        return Preflight(
            ACCEPTED,
            use_vrs=use_vrs,
            calldata=calldata,
            gas_estimate=_uint(gas),
            relayer_nonce=_uint(nonce),
            gas_price=_uint(gas_price),
            priority_fee=0 if isinstance(priority, RpcError) else _uint(priority),
        )

    def find_settlement(self, auth: Authorization) -> str | None:
        """The hash of a transaction (anyone's) that used this authorization *and* moved exactly
        its value from ``from`` to ``to``, or None. This is how a payment preempted by another
        submitter (or our own earlier send) is recognised as paid."""
        start = max(0, self.rpc.highest_block - LOG_LOOKBACK_BLOCKS)
        topics = [
            "0x" + AUTHORIZATION_USED_TOPIC.hex(),
            "0x" + bytes(12).hex() + auth.from_[2:],
            "0x" + auth.nonce.hex(),
        ]
        logs = self.rpc.call(
            "eth_getLogs", [{"address": self.asset, "topics": topics, "fromBlock": hex(start)}]
        )
        for log in logs or []:
            tx_hash = str(log.get("transactionHash", ""))
            receipt = self.receipt(tx_hash)
            if receipt is not None and transfer_logged(receipt, self.asset, auth):
                return tx_hash
        return None

    def send_raw_transaction(self, raw: bytes) -> Any:
        """The node's answer: the tx hash, or an ``RpcError`` it returned."""
        return self.rpc.batch([("eth_sendRawTransaction", ["0x" + raw.hex()])])[0]

    def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        return self.receipts([tx_hash])[0]

    def receipts(self, tx_hashes: list[str]) -> list[dict[str, Any] | None]:
        """Receipts of several transactions in one round trip (None where there is none yet)."""
        answers = self.rpc.batch([("eth_getTransactionReceipt", [h]) for h in tx_hashes])
        return [a if isinstance(a, dict) else None for a in answers]

    def pending_nonce(self, address: str) -> int:
        return _uint(self.rpc.call("eth_getTransactionCount", [address, "pending"]))

    def chain_id(self, url: str) -> int:
        return _uint(RpcClient((url,), timeout=5).call("eth_chainId", []))

    def endpoint_health(self, url: str) -> dict[str, Any]:
        """One RPC endpoint, asked directly: its chain id and how old its latest block is."""
        chain_id, block = RpcClient((url,), timeout=3).batch(
            [("eth_chainId", []), ("eth_getBlockByNumber", ["latest", False])]
        )
        if isinstance(chain_id, RpcError) or not isinstance(block, dict):
            return {"ok": False, "error": "no answer"}
        age = time.time() - _uint(block.get("timestamp"))
        right_chain = _uint(chain_id) == self.settings.network.chain_id
        return {
            "ok": right_chain,
            "chain_id": _uint(chain_id),
            "block": _uint(block.get("number")),
            "block_age_s": round(age, 1),
        }

    def asset_status(self, pay_to: str, relayer: str) -> tuple[bool, bool, int]:
        """(token paused, payTo blacklisted, relayer ETH balance in wei) in one round trip."""
        paused, blacklisted, balance = self.rpc.batch(
            [
                eth_call(self.asset, SEL_PAUSED),
                eth_call(self.asset, SEL_IS_BLACKLISTED + encode(["address"], [pay_to])),
                ("eth_getBalance", [relayer, "latest"]),
            ]
        )
        return _word_uint(paused) == 1, _word_uint(blacklisted) == 1, _uint(balance)

    def token_domain(self) -> tuple[str, str]:
        name, version = self.rpc.batch([eth_call(self.asset, SEL_NAME), eth_call(self.asset, SEL_VERSION)])
        return _abi_string(name), _abi_string(version)


def _abi_string(answer: Any) -> str:
    if not isinstance(answer, str) or len(answer) < 130:
        return ""
    try:
        return str(decode(["string"], bytes.fromhex(answer[2:]))[0])
    except Exception:
        return ""


def transfer_logged(receipt: dict[str, Any], asset: str, auth: Authorization) -> bool:
    """True when the receipt holds the token's ``Transfer(from, to, value)`` for this payment.

    A status of 1 is not enough: some tokens skip a used nonce without reverting and move nothing.
    """
    if _uint(receipt.get("status")) != 1:
        return False
    topics_wanted = [
        "0x" + TRANSFER_TOPIC.hex(),
        "0x" + bytes(12).hex() + auth.from_[2:],
        "0x" + bytes(12).hex() + auth.to[2:],
    ]
    for log in receipt.get("logs", []):
        if (
            str(log.get("address", "")).lower() == asset.lower()
            and [str(t).lower() for t in log.get("topics", [])] == topics_wanted
            and _word_uint(log.get("data")) == auth.value
        ):
            return True
    return False


def check_startup(chain: Chain, settings: Settings) -> None:
    """Every RPC that answers must be on the configured network; the token's domain must match."""
    answered = 0
    for url in settings.rpc_urls:
        try:
            chain_id = chain.chain_id(url)
        except (ChainUnavailable, RpcFailure):
            continue
        answered += 1
        if chain_id != settings.network.chain_id:
            raise SettingsError(
                "X402_RPC_URLS", f"{url} is on chain {chain_id}, but X402_NETWORK is {settings.network.caip2}"
            )
    if not answered:
        raise SettingsError("X402_RPC_URLS", "no RPC endpoint answers")
    name, version = chain.token_domain()
    if (name, version) != (settings.asset_name, settings.asset_version):
        raise SettingsError(
            "X402_ASSET",
            f"token {settings.asset} reports name/version {name!r}/{version!r}, "
            f"expected {settings.asset_name!r}/{settings.asset_version!r}",
        )


def init_app(app: Flask) -> None:
    settings: Settings = app.config["X402_SETTINGS"]
    chain = Chain(settings)
    check_startup(chain, settings)
    app.extensions["x402.chain"] = chain


def get_chain() -> Chain:
    chain: Chain = current_app.extensions["x402.chain"]
    return chain
