"""Lean JSON-RPC over HTTP: batches, in-order failover between endpoints, and well-formed answers.

web3.py's default stack adds an ``eth_chainId`` round trip to every call; here a batch of calls is
one HTTP request. ``X402_RPC_URLS`` are tried in order; an endpoint that fails is benched for a
while and skipped, and when all fail the caller gets ``ChainUnavailable`` (→ 503, never free).

One answer is not the chain: an endpoint whose answer is malformed (the caller says what a
well-formed answer is, with the predicates below) is treated like one that does not answer. A
signed transaction that an endpoint may have taken is never treated as refused (``broadcast``).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from app.backends.http import Sessions

# Node answers to eth_sendRawTransaction that mean the transaction is already in the pool: it was broadcast.
ALREADY_SENT = ("already known", "known transaction", "already imported")
# JSON-RPC encodings (Ethereum execution API): a quantity is 0x + hex without leading zeros; a
# static ABI return value (uint256, bool) is exactly one 32-byte word (Solidity ABI specification).
QUANTITY_RE = re.compile(r"0x(?:0|[1-9a-fA-F][0-9a-fA-F]{0,63})")
WORD_RE = re.compile(r"0x[0-9a-fA-F]{64}")
DATA_RE = re.compile(r"0x(?:[0-9a-fA-F]{2})*")
# What a failing endpoint can raise while we ask it and read its answer.
TRANSPORT_ERRORS = (requests.RequestException, ValueError, KeyError, TypeError, AttributeError)

Call = tuple[str, list[Any]]  # (JSON-RPC method, params)


class ChainUnavailable(RuntimeError):
    """No configured RPC endpoint gave a usable answer."""


@dataclass(frozen=True)
class RpcError:
    """A JSON-RPC ``error`` object: the endpoint answered, and refused this call."""

    code: int
    message: str
    data: str = ""


class RpcFailure(RuntimeError):
    """A call that was refused (``RpcError``) where an answer was needed."""

    def __init__(self, error: RpcError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class Broadcast:
    """What the endpoints made of one signed transaction: ``maybe_sent`` unless no endpoint can have
    taken it, and then ``refusal`` is the reason."""

    maybe_sent: bool
    refusal: str = ""


class RpcClient:
    """JSON-RPC over HTTP with batching and in-order failover. Fork-safe: one session per thread
    and process (``app.backends.http.Sessions``).

    With ``chain_id`` set, every batch also carries ``eth_chainId`` and ``eth_blockNumber`` (same
    round trip): an endpoint on another chain is benched for a while like one that does not answer;
    one lagging more than ``lag_tolerance`` blocks behind the highest block seen is benched too, and
    its answer used only when no other endpoint answers (blocks mined while a request was in
    flight make an honest endpoint look behind). ``timeout`` is in seconds, per endpoint asked.
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
        self._sessions = Sessions()

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
        if (
            isinstance(chain_id, RpcError)
            or isinstance(block, RpcError)
            or quantity_value(chain_id) != self.chain_id
        ):
            return None, False
        lagging = quantity_value(block) + self.lag_tolerance < self.highest_block
        self.highest_block = max(self.highest_block, quantity_value(block))
        return answers[2:], lagging

    def _request(self, calls: list[Call]) -> tuple[list[dict[str, Any]], list[int]]:
        """The JSON-RPC batch for ``calls`` (behind the chain guard, when set) and its ids."""
        guard: list[Call] = (
            [("eth_chainId", []), ("eth_blockNumber", [])] if self.chain_id is not None else []
        )
        ids = [next(self._ids) for _ in guard + calls]
        body = [
            {"jsonrpc": "2.0", "id": i, "method": m, "params": p}
            for i, (m, p) in zip(ids, guard + calls, strict=True)
        ]
        return body, ids

    def _ask(self, url: str, body: list[dict[str, Any]], ids: list[int]) -> tuple[list[Any] | None, bool]:
        """One endpoint's answers (see ``_checked``); raises one of ``TRANSPORT_ERRORS`` when it fails."""
        response = self._sessions.get().post(url, json=body, timeout=self.timeout)
        response.raise_for_status()
        by_id = {a["id"]: a for a in response.json()}
        return self._checked([_result(by_id[i]) for i in ids])

    def batch(self, calls: list[Call], well_formed: Callable[[list[Any]], bool] | None = None) -> list[Any]:
        """Run ``calls`` in one HTTP request: one answer per call, in order, each its JSON ``result``
        or an ``RpcError``. An endpoint whose answers fail ``well_formed`` counts as one that did not
        answer: it is benched and the next one asked, so a single malformed answer is never read as
        the chain's. Raises ``ChainUnavailable`` when no endpoint gives a usable answer."""
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
        """``eth_sendRawTransaction`` of one signed transaction (``raw``: 0x-prefixed hex), never
        losing track of it. Raises nothing for an endpoint's failure: it is in the ``Broadcast``.

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
        """One call's JSON ``result``; raises ``RpcFailure`` when it is refused, ``ChainUnavailable``
        when no endpoint answers."""
        (answer,) = self.batch([(method, params)])
        if isinstance(answer, RpcError):
            raise RpcFailure(answer)
        return answer


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


def quantity_value(answer: Any) -> int:
    """A JSON-RPC quantity (``0x``-hex) as an int; 0 for anything else."""
    return int(answer, 16) if isinstance(answer, str) and answer.startswith("0x") else 0


def word_value(answer: Any) -> int:
    """The first 32-byte ABI word of an ``eth_call`` answer as an int (a uint256, a bool); 0 when
    the answer is shorter than a word."""
    if not isinstance(answer, str) or len(answer) < 66:
        return 0
    return int(answer[2:66], 16)


def is_quantity(answer: Any) -> bool:
    """A JSON-RPC quantity: ``0x`` + 1 to 64 hex digits without leading zeros (Ethereum execution API)."""
    return isinstance(answer, str) and QUANTITY_RE.fullmatch(answer) is not None


def is_word(answer: Any) -> bool:
    """Exactly 32 bytes of hex: what a uint256 view function returns, a transaction hash. ``0x``
    (an empty answer) is not one."""
    return isinstance(answer, str) and WORD_RE.fullmatch(answer) is not None


def is_data(answer: Any) -> bool:
    """Hex of whole bytes, possibly none (``eth_getCode`` of an account without code is ``0x``)."""
    return isinstance(answer, str) and DATA_RE.fullmatch(answer) is not None


def is_flag(answer: Any) -> bool:
    """An ABI-encoded bool: one word holding 0 or 1 (Solidity ABI specification)."""
    return is_word(answer) and int(answer, 16) in (0, 1)


def is_flag_or_refused(answer: Any) -> bool:
    """A bool view, or a revert (a token without ``paused()``/``isBlacklisted()`` has neither)."""
    return isinstance(answer, RpcError) or is_flag(answer)


def is_quantity_or_refused(answer: Any) -> bool:
    """A well-formed quantity, or an ``RpcError`` (the endpoint answered and refused the call)."""
    return isinstance(answer, RpcError) or is_quantity(answer)
