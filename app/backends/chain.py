"""The chain, through lean JSON-RPC: batched pre-settlement checks, token reads, sends and receipts.

web3.py's default stack adds an ``eth_chainId`` round trip to every call; here each paid call's
on-chain verification is one batched JSON-RPC request (code, balance, nonce state, pause flag, gas
estimate as simulation, relayer nonce and fees). ``X402_RPC_URLS`` are tried in order; an endpoint
that fails is skipped, and when all fail the caller gets ``ChainUnavailable`` (→ 503, never free).

One answer is not the chain: an endpoint whose answer is malformed (an ``eth_call`` that returns
``0x`` or a short word, a receipt without a status) is treated like one that does not answer, and a
receipt that contradicts itself (status 1 without this authorization's ``Transfer`` and
``AuthorizationUsed`` logs) is a fault to be resolved later, never "reverted, nothing charged".
A signed transaction that an endpoint may have taken is never treated as refused (``broadcast``).
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from eth_abi import decode, encode
from eth_hash.auto import keccak
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from app.settings import Settings, SettingsError
from app.x402.eip712 import split_signature
from app.x402.verdict import (
    ACCEPTED,
    INSUFFICIENT_BALANCE,
    INVALID_SIGNATURE,
    NONCE_USED,
    SIMULATION_FAILED,
    Verdict,
    reject,
)
from app.x402.wire import Authorization

ASSET_PAUSED = "asset_paused"
PAYEE_BLACKLISTED = "payee_blacklisted"
# Refusals that no payment can fix: 503, never a 402 that would invite the client to pay again.
UNPAYABLE = frozenset({ASSET_PAUSED, PAYEE_BLACKLISTED})
TRANSFER_TOPIC = keccak(b"Transfer(address,address,uint256)")
AUTHORIZATION_USED_TOPIC = keccak(b"AuthorizationUsed(address,bytes32)")
# How far back to look for someone else's use of an authorization: authorizations live minutes,
# and RPC providers refuse very wide log ranges.
LOG_LOOKBACK_BLOCKS = 5_000
# Node answers to eth_sendRawTransaction that mean the transaction is already in the pool: it was broadcast.
ALREADY_SENT = ("already known", "known transaction", "already imported")
# JSON-RPC encodings (Ethereum execution API): a quantity is 0x + hex without leading zeros; a
# static ABI return value (uint256, bool) is exactly one 32-byte word (Solidity ABI specification).
QUANTITY_RE = re.compile(r"0x(?:0|[1-9a-fA-F][0-9a-fA-F]{0,63})")
WORD_RE = re.compile(r"0x[0-9a-fA-F]{64}")
DATA_RE = re.compile(r"0x(?:[0-9a-fA-F]{2})*")
# What a failing endpoint can raise while we ask it and read its answer.
TRANSPORT_ERRORS = (requests.RequestException, ValueError, KeyError, TypeError, AttributeError)


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
    """No configured RPC endpoint gave a usable answer."""


class ReceiptContradiction(ChainUnavailable):
    """A receipt that contradicts itself or the token's logs: status 1 for a transaction that was to
    use this authorization, without the token's ``Transfer`` and ``AuthorizationUsed`` logs for it
    (EIP-3009 emits both), or a transaction the logs name whose receipt does not hold the log. An
    RPC fault (or a facilitator naming another transaction): resolved from chain state later."""


@dataclass(frozen=True)
class Broadcast:
    """What the endpoints made of one signed transaction: ``maybe_sent`` unless no endpoint can have
    taken it, and then ``refusal`` is the reason."""

    maybe_sent: bool
    refusal: str = ""


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

    def _request(self, calls: list[tuple[str, list[Any]]]) -> tuple[list[dict[str, Any]], list[int]]:
        """The JSON-RPC batch for ``calls`` (behind the chain guard, when set) and its ids."""
        guard = [("eth_chainId", []), ("eth_blockNumber", [])] if self.chain_id is not None else []
        ids = [next(self._ids) for _ in guard + calls]
        body = [
            {"jsonrpc": "2.0", "id": i, "method": m, "params": p}
            for i, (m, p) in zip(ids, guard + calls, strict=True)
        ]
        return body, ids

    def _ask(self, url: str, body: list[dict[str, Any]], ids: list[int]) -> tuple[list[Any] | None, bool]:
        """One endpoint's answers (see ``_checked``); raises one of ``TRANSPORT_ERRORS`` when it fails."""
        response = self._session().post(url, json=body, timeout=self.timeout)
        response.raise_for_status()
        by_id = {a["id"]: a for a in response.json()}
        return self._checked([_result(by_id[i]) for i in ids])

    def batch(
        self, calls: list[tuple[str, list[Any]]], well_formed: Callable[[list[Any]], bool] | None = None
    ) -> list[Any]:
        """Run calls in one HTTP request; each answer is its result or an ``RpcError``. An endpoint
        whose answers fail ``well_formed`` counts as one that did not answer: it is benched and the
        next one asked, so a single malformed answer is never read as the chain's."""
        body, ids = self._request(calls)
        last_error = "no RPC URL configured"
        behind: list[Any] | None = None
        for url in self._in_order():
            try:
                answers, lagging = self._ask(url, body, ids)
            except TRANSPORT_ERRORS as exc:
                last_error, answers, lagging = f"{url}: {type(exc).__name__}", None, False
            else:
                if answers is None:
                    last_error = f"{url}: wrong chain"
                elif well_formed is not None and not well_formed(answers):
                    last_error, answers = f"{url}: malformed answer", None
            if answers is not None and not lagging:
                self._benched.pop(url, None)
                return answers
            if answers is not None and behind is None:
                behind = answers  # behind the others: the last resort, not a failure
            self._bench(url)
        if behind is not None:
            return behind
        raise ChainUnavailable(last_error)

    def broadcast(self, raw: str) -> Broadcast:
        """``eth_sendRawTransaction`` of one signed transaction, never losing track of it.

        An endpoint that may have taken the transaction — it timed out or dropped the connection
        after the request was written, answered garbage or from another chain, or lags behind the
        chain — counts as having it. The same signed bytes (the same hash) then go to the next
        endpoint, but a refusal from it no longer means "not sent": the caller waits for that hash
        and never signs a different transaction for the same payment. ``maybe_sent`` is False
        only when no endpoint can have it: each was unreachable or refused it outright.
        """
        body, ids = self._request([("eth_sendRawTransaction", [raw])])
        maybe_sent, refusal = False, "no RPC endpoint answers"
        for url in self._in_order():
            try:
                answers, lagging = self._ask(url, body, ids)
            except TRANSPORT_ERRORS as exc:
                self._bench(url)
                maybe_sent = maybe_sent or not _never_reached(exc)
                continue
            if answers is None:  # another chain, or no chain id: its word is worth nothing
                self._bench(url)
                maybe_sent = True
                continue
            (answer,) = answers
            taken = not isinstance(answer, RpcError) or any(s in answer.message.lower() for s in ALREADY_SENT)
            if not lagging:
                self._benched.pop(url, None)
                if taken or maybe_sent:
                    return Broadcast(True)
                return Broadcast(False, answer.message)
            self._bench(url)  # lagging: what it says is not final, the next endpoint is told too
            maybe_sent = maybe_sent or taken
            if isinstance(answer, RpcError) and not taken:
                refusal = answer.message
        return Broadcast(maybe_sent, "" if maybe_sent else refusal)

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


def _never_reached(exc: Exception) -> bool:
    """True when no connection was made, so the endpoint cannot have read the request."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError | ConnectTimeoutError)


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


def _is_quantity(answer: Any) -> bool:
    return isinstance(answer, str) and QUANTITY_RE.fullmatch(answer) is not None


def _is_word(answer: Any) -> bool:
    """One ABI word: what a uint256 view function returns. ``0x`` (an empty answer) is not one."""
    return isinstance(answer, str) and WORD_RE.fullmatch(answer) is not None


def _is_flag(answer: Any) -> bool:
    """An ABI-encoded bool: one word holding 0 or 1 (Solidity ABI specification)."""
    return _is_word(answer) and int(answer, 16) in (0, 1)


def _is_flag_or_refused(answer: Any) -> bool:
    """A bool view, or a revert (a token without ``paused()``/``isBlacklisted()`` has neither)."""
    return isinstance(answer, RpcError) or _is_flag(answer)


def _is_quantity_or_refused(answer: Any) -> bool:
    return isinstance(answer, RpcError) or _is_quantity(answer)


def _preflight_well_formed(answers: list[Any]) -> bool:
    """The pre-settlement batch as the chain gives it: a balance and an authorization state that
    are real ABI words (never ``0x`` read as zero), quantities where quantities are due."""
    code, balance, used, paused, payee_blocked, gas, nonce, gas_price, priority = answers
    return (
        isinstance(code, str)
        and DATA_RE.fullmatch(code) is not None
        and _is_word(balance)
        and _is_flag(used)
        and _is_flag_or_refused(paused)
        and _is_flag_or_refused(payee_blocked)
        and _is_quantity_or_refused(gas)
        and _is_quantity(nonce)
        and _is_quantity(gas_price)
        and _is_quantity_or_refused(priority)
    )


def _is_receipt_of(answer: Any, tx_hash: str) -> bool:
    """None (not mined yet), or a receipt of ``tx_hash`` with a status of 0 or 1 and a log list."""
    if answer is None or isinstance(answer, RpcError):
        return True
    return (
        isinstance(answer, dict)
        and str(answer.get("transactionHash", "")).lower() == tx_hash.lower()
        and answer.get("status") in ("0x0", "0x1")
        and isinstance(answer.get("logs"), list)
        and all(isinstance(log, dict) for log in answer["logs"])
    )


class Chain:
    """Reads and writes of the payment asset on the configured network."""

    def __init__(self, settings: Settings, rpc: RpcClient | None = None) -> None:
        self.settings = settings
        self.asset = settings.asset
        self.rpc = rpc or RpcClient(
            settings.rpc_urls, settings.rpc_timeout, chain_id=settings.network.chain_id
        )
        self._probes: dict[str, RpcClient] = {}  # one client (one pooled session) per endpoint probed

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
            ],
            well_formed=_preflight_well_formed,
        )
        is_contract = isinstance(code, str) and code not in ("0x", "0x0", "")
        if is_contract and use_vrs:
            # A contract wallet signs through EIP-1271: simulate and settle with the bytes overload.
            use_vrs, calldata = False, bytes_calldata
            gas = self.rpc.batch(
                [("eth_estimateGas", [{"from": relayer, "to": self.asset, "data": "0x" + calldata.hex()}])],
                well_formed=lambda answers: _is_quantity_or_refused(answers[0]),
            )[0]
        if not is_contract and not ecdsa_signer:
            return Preflight(
                reject(INVALID_SIGNATURE, "the signature does not recover to authorization.from")
            )
        if _word_uint(paused) == 1:
            return Preflight(reject(ASSET_PAUSED, "the token is paused; no payment can settle now"))
        if _word_uint(payee_blocked) == 1:
            return Preflight(reject(PAYEE_BLACKLISTED, "the token refuses transfers to this payee"))
        if int(used, 16) == 1:
            return Preflight(reject(NONCE_USED, "this authorization was already used or canceled on chain"))
        if int(balance, 16) < auth.value:
            return Preflight(reject(INSUFFICIENT_BALANCE, "the payer's balance is below the amount"))
        if isinstance(gas, RpcError):
            return Preflight(reject(SIMULATION_FAILED, gas.message[:200]))
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
        submitter (or our own earlier send) is recognised as paid.

        The token's ``AuthorizationUsed(from, nonce)`` log names the transaction; its receipt must
        agree (status 1, the log itself). One that does not is an RPC fault: ``ReceiptContradiction``.
        A use whose ``Transfer`` went elsewhere is not ours: EIP-3009 nonces are shared with the
        payer's other authorizations (``receiveWithAuthorization``)."""
        start = max(0, self.rpc.highest_block - LOG_LOOKBACK_BLOCKS)
        topics = _authorization_used_topics(auth)

        def logs_well_formed(answers: list[Any]) -> bool:
            (logs,) = answers
            return isinstance(logs, RpcError) or (
                isinstance(logs, list)
                and all(
                    isinstance(log, dict)
                    and WORD_RE.fullmatch(str(log.get("transactionHash", ""))) is not None
                    and _is_log(log, self.asset, topics)
                    for log in logs
                )
            )

        (logs,) = self.rpc.batch(
            [("eth_getLogs", [{"address": self.asset, "topics": topics, "fromBlock": hex(start)}])],
            well_formed=logs_well_formed,
        )
        if isinstance(logs, RpcError):
            raise RpcFailure(logs)
        for log in logs:
            tx_hash = str(log["transactionHash"])
            receipt = self.receipt(tx_hash)
            if receipt is None or not _logged(receipt, self.asset, topics):
                raise ReceiptContradiction(f"{tx_hash} logged AuthorizationUsed, but its receipt disagrees")
            if _logged(receipt, self.asset, _transfer_topics(auth), auth.value):
                return tx_hash
        return None

    def broadcast(self, raw: bytes) -> Broadcast:
        """Send a signed transaction (see ``RpcClient.broadcast``: a maybe is never a refusal)."""
        return self.rpc.broadcast("0x" + raw.hex())

    def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        return self.receipts([tx_hash])[0]

    def receipts(self, tx_hashes: list[str]) -> list[dict[str, Any] | None]:
        """Receipts of several transactions in one round trip (None where there is none yet). An
        endpoint answering with something that is not a receipt of the asked hash (no status, no
        logs, another transaction's) is skipped like one that does not answer."""
        answers = self.rpc.batch(
            [("eth_getTransactionReceipt", [h]) for h in tx_hashes],
            well_formed=lambda answers: all(
                _is_receipt_of(a, h) for a, h in zip(answers, tx_hashes, strict=True)
            ),
        )
        return [a if isinstance(a, dict) else None for a in answers]

    def pending_nonce(self, address: str) -> int:
        (nonce,) = self.rpc.batch(
            [("eth_getTransactionCount", [address, "pending"])],
            well_formed=lambda answers: _is_quantity(answers[0]),
        )
        return int(nonce, 16)

    def chain_id(self, url: str) -> int:
        return _uint(RpcClient((url,), timeout=5).call("eth_chainId", []))

    def endpoint_health(self, url: str) -> dict[str, Any]:
        """One RPC endpoint, asked directly (one round trip): its chain id, how old its latest
        block is, and whether an ``eth_call`` of the token's ``name()`` comes back as a well-formed
        ABI string equal to the configured name. An endpoint that answers calls with ``0x`` or
        garbage passes a chain-id check, then fails every payment: this probe notices it."""
        client = self._probes.get(url)
        if client is None:
            client = self._probes[url] = RpcClient((url,), timeout=3)
        chain_id, block, name = client.batch(
            [("eth_chainId", []), ("eth_getBlockByNumber", ["latest", False]), eth_call(self.asset, SEL_NAME)]
        )
        if not _is_quantity(chain_id) or not isinstance(block, dict):
            return {"ok": False, "error": "no answer"}
        age = time.time() - _uint(block.get("timestamp"))
        token_name = _abi_string(name)
        health: dict[str, Any] = {
            "ok": _uint(chain_id) == self.settings.network.chain_id
            and token_name == self.settings.asset_name,
            "chain_id": _uint(chain_id),
            "block": _uint(block.get("number")),
            "block_age_s": round(age, 1),
        }
        if not token_name:
            health["error"] = "eth_call_malformed"
        elif token_name != self.settings.asset_name:
            health["error"] = "token_mismatch"
        return health

    def asset_status(self, pay_to: str, relayer: str) -> tuple[bool, bool, int]:
        """(token paused, payTo blacklisted, relayer ETH balance in wei) in one round trip."""
        paused, blacklisted, balance = self.rpc.batch(
            [
                eth_call(self.asset, SEL_PAUSED),
                eth_call(self.asset, SEL_IS_BLACKLISTED + encode(["address"], [pay_to])),
                ("eth_getBalance", [relayer, "latest"]),
            ],
            well_formed=lambda answers: (
                _is_flag_or_refused(answers[0])
                and _is_flag_or_refused(answers[1])
                and _is_quantity(answers[2])
            ),
        )
        return _word_uint(paused) == 1, _word_uint(blacklisted) == 1, int(balance, 16)

    def token_domain(self) -> tuple[str, str]:
        """The token's EIP-712 domain ``name()`` and ``version()``, from an endpoint whose answers
        are both well-formed ABI strings."""
        name, version = self.rpc.batch(
            [eth_call(self.asset, SEL_NAME), eth_call(self.asset, SEL_VERSION)],
            well_formed=lambda answers: all(_abi_string(answer) for answer in answers),
        )
        return _abi_string(name), _abi_string(version)


def _abi_string(answer: Any) -> str:
    if not isinstance(answer, str) or len(answer) < 130:
        return ""
    try:
        return str(decode(["string"], bytes.fromhex(answer[2:]))[0])
    except Exception:
        return ""


def _address_topic(address: str) -> str:
    return "0x" + bytes(12).hex() + address[2:].lower()


def _transfer_topics(auth: Authorization) -> list[str]:
    """ERC-20 ``Transfer(from, to, value)``: from and to indexed, value in the data."""
    return ["0x" + TRANSFER_TOPIC.hex(), _address_topic(auth.from_), _address_topic(auth.to)]


def _authorization_used_topics(auth: Authorization) -> list[str]:
    """EIP-3009 ``AuthorizationUsed(authorizer, nonce)``: both indexed."""
    return ["0x" + AUTHORIZATION_USED_TOPIC.hex(), _address_topic(auth.from_), "0x" + auth.nonce.hex()]


def _is_log(log: dict[str, Any], asset: str, topics: list[str]) -> bool:
    return (
        str(log.get("address", "")).lower() == asset.lower()
        and [str(t).lower() for t in log.get("topics", [])] == topics
    )


def _logged(receipt: dict[str, Any], asset: str, topics: list[str], value: int | None = None) -> bool:
    """The receipt is a success holding the asset's log with these topics (and this one-word value)."""
    return receipt.get("status") == "0x1" and any(
        _is_log(log, asset, topics) and (value is None or _word_uint(log.get("data")) == value)
        for log in receipt.get("logs", [])
    )


def transfer_logged(receipt: dict[str, Any], asset: str, auth: Authorization) -> bool:
    """For the receipt of a transaction that was to settle this authorization (ours, or the one a
    facilitator names): True when it holds the token's ``AuthorizationUsed(from, nonce)`` **and**
    ``Transfer(from, to, value)`` (EIP-3009 emits both); False when it reverted (status 0), or when
    it used the authorization and moved another amount than ``value`` (not the payment expected).

    A status of 1 is not enough: some tokens skip a used nonce without reverting and move nothing,
    and a ``Transfer`` alone may be another authorization's payment of the same amount. Status 1
    without this authorization's ``AuthorizationUsed``, or without any ``Transfer`` from the payer
    to the payee, is not an answer but a contradiction: ``ReceiptContradiction`` (an RPC fault, to
    be resolved from chain state later; never "reverted, nothing charged").
    """
    if receipt.get("status") == "0x0":
        return False
    transfers = [log for log in receipt.get("logs", []) if _is_log(log, asset, _transfer_topics(auth))]
    if _logged(receipt, asset, _authorization_used_topics(auth)) and transfers:
        return any(_word_uint(log.get("data")) == auth.value for log in transfers)
    raise ReceiptContradiction(f"{receipt.get('transactionHash')} does not show this authorization's payment")


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
    try:
        name, version = chain.token_domain()
    except ChainUnavailable:
        raise SettingsError(
            "X402_ASSET",
            f"token {settings.asset} gives no well-formed name()/version(): no token at this address, "
            "or every RPC endpoint answers calls malformed",
        ) from None
    if (name, version) != (settings.asset_name, settings.asset_version):
        raise SettingsError(
            "X402_ASSET",
            f"token {settings.asset} reports name/version {name!r}/{version!r}, "
            f"expected {settings.asset_name!r}/{settings.asset_version!r}",
        )
