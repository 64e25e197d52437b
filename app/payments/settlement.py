"""Settlement: submit the payer's authorization from our relayer account and confirm it on chain.

A payment is settled only when our receipt has status 1 **and** the token's ``Transfer(from, payTo,
value)`` and ``AuthorizationUsed(from, nonce)`` logs (EIP-3009). The payment is marked *settling*
(and the relayer nonce reserved, in the same Redis round trip) before anything is broadcast, so a
crash or a late receipt leaves a payment that is resolved from chain state (its receipt, or the
token's logs), never broadcast a second time: a send that an RPC endpoint may have taken (timeout,
dropped connection, lag) is waited for, never re-signed. Relayer account nonces come from a Redis
counter shared by every worker and host.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount

from app.backends.chain import Chain, Preflight
from app.backends.http import Sessions
from app.backends.rpc import ChainUnavailable, RpcFailure, is_word
from app.backends.token import ReceiptContradiction, transfer_logged
from app.payments.ledger import Ledger
from app.settings import Settings, SettingsError
from app.x402.verdict import SETTLEMENT_PENDING, TRANSACTION_FAILED
from app.x402.wire import Authorization, PaymentPayload, Requirement

GAS_HEADROOM_NUMERATOR, GAS_HEADROOM_DENOMINATOR = 5, 4  # 25% over the estimate
MIN_PRIORITY_FEE = 1_000_000  # 0.001 gwei: Base's usual tip floor

SETTLED, FAILED, PENDING, NOT_SENT = "settled", "failed", "pending", "not_sent"
MAX_FEE_BUMPS = 3
REASON_CODE_RE = re.compile(r"[a-z0-9_]{1,80}")


def bumped_fees(transaction: dict[str, Any]) -> dict[str, Any]:
    """The same transaction with both EIP-1559 fees raised by 12.5% (+1 wei): the least a node
    accepts as a replacement for a transaction with the same nonce."""
    replacement = dict(transaction)
    for field in ("maxPriorityFeePerGas", "maxFeePerGas"):
        replacement[field] = transaction[field] * 9 // 8 + 1
    return replacement


@dataclass(frozen=True)
class Settlement:
    """``outcome``: settled | failed (reverted, nothing moved) | pending (sent or maybe sent, and
    not decided by the chain yet: no receipt, or one that contradicts itself) | not_sent (no RPC
    endpoint can have the transaction: nothing can move)."""

    outcome: str
    tx_hash: str = ""
    reason: str = ""


# Moves the claimed payment to "settling" right before anything is submitted; given
# (chain_id, relayer, chain_pending_nonce) it also reserves and returns the relayer's account nonce.
StartSettling = Callable[[tuple[int, str, int] | None], int]
# Records the hash of a fee-bumped replacement before it is broadcast.
RecordReplacement = Callable[[str], None]


@dataclass(frozen=True)
class Proof:
    """What a receipt of the settlement must show. ``shows(receipt)``: True when it holds the payment,
    False when it reverted; raises ``ReceiptContradiction`` for a receipt that is neither.
    ``reverted(tx_hash)``: the outcome of a reverted settlement (someone else may have paid)."""

    shows: Callable[[dict[str, Any]], bool]
    reverted: Callable[[str], Settlement]


def exact_proof(chain: Chain, auth: Authorization) -> Proof:
    """An EIP-3009 payment: ``AuthorizationUsed`` and ``Transfer`` of exactly ``value``; a revert may
    still be paid by another submitter's transaction (``preempted_or_failed``)."""
    return Proof(
        lambda receipt: transfer_logged(receipt, chain.asset, auth),
        lambda tx_hash: preempted_or_failed(chain, auth, tx_hash),
    )


def confirm(
    chain: Chain,
    proof: Proof,
    hashes: list[str],
    timeout: float,
    between_polls: Callable[[float], None] | None = None,
) -> Settlement:
    """Poll the receipts of ``hashes`` (one round trip for all) until one lands or ``timeout``
    (seconds): short sleeps first (anvil and Base flashblocks answer within milliseconds), backing
    off to 250 ms. ``between_polls(now)`` may add hashes (fee-bumped replacements). A receipt that
    contradicts itself is an RPC fault: pending, never failed."""
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        try:
            receipts = chain.receipts(hashes)
        except ChainUnavailable:
            receipts = []
        for tx_hash, receipt in zip(hashes, receipts, strict=False):
            if receipt is not None:
                try:
                    paid = proof.shows(receipt)
                except ReceiptContradiction:
                    return Settlement(PENDING, tx_hash, SETTLEMENT_PENDING)
                return Settlement(SETTLED, tx_hash) if paid else proof.reverted(tx_hash)
        now = time.monotonic()
        if now >= deadline:
            return Settlement(PENDING, hashes[-1], SETTLEMENT_PENDING)
        if between_polls is not None:
            between_polls(now)
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def preempted_or_failed(chain: Chain, auth: Authorization, tx_hash: str) -> Settlement:
    """The transaction reverted. If someone else's moved the money (they submitted the same
    authorization first), the payment is settled all the same, by their transaction."""
    try:
        other = chain.find_settlement(auth)
    except (ChainUnavailable, RpcFailure):
        return Settlement(PENDING, tx_hash, SETTLEMENT_PENDING)  # decided later from chain state
    if other is not None:
        return Settlement(SETTLED, other)
    return Settlement(FAILED, tx_hash, TRANSACTION_FAILED)


@dataclass(frozen=True)
class SettlementJob:
    """One verified payment to settle: the payload, the requirement it was checked against, the
    on-chain preflight, and the ledger hooks: ``start`` moves the payment to settling right before
    anything is sent (and reserves the relayer nonce), ``on_replaced`` records a fee-bumped tx hash."""

    payment: PaymentPayload
    requirement: Requirement
    preflight: Preflight
    start: StartSettling
    on_replaced: RecordReplacement
    relayer: str = ""  # the settling account the preflight simulated from (``Settler.pick``)


class Settler(Protocol):
    """Submits a verified payment and confirms it on chain; ``address`` is the account the
    pre-settlement simulation runs from."""

    address: str
    addresses: tuple[str, ...]  # every account that may settle (or simulate)

    def pick(self) -> str:
        """The account to simulate and settle the next payment from (relayer keys in turn)."""
        ...

    def settle(self, job: SettlementJob) -> Settlement:
        """Submit the job's payment and confirm it on chain: a ``Settlement`` (settled, failed, pending
        or not_sent)."""
        ...


class LocalSettler:
    """Settles with our own relayer keys (``X402_RELAYER_KEYS``, or ``X402_RELAYER_KEY``), taken in
    turn; each keeps its own account nonce counter in Redis."""

    def __init__(self, settings: Settings, chain: Chain, ledger: Ledger) -> None:
        self.settings = settings
        self.chain = chain
        self.ledger = ledger
        accounts = [Account.from_key(key) for key in settings.settling_keys]
        self.accounts = {str(account.address): account for account in accounts}
        self.addresses = tuple(self.accounts)
        self.address = self.addresses[0]
        self._turn = itertools.count()

    def pick(self) -> str:
        """The relayer whose turn it is (round robin in this process; ``next`` on a count is atomic
        under the GIL)."""
        return self.addresses[next(self._turn) % len(self.addresses)]

    def owns(self, address: str) -> str | None:
        """The checksummed relayer address equal to ``address`` (any case), or None."""
        return next((ours for ours in self.addresses if ours.lower() == address.lower()), None)

    def settle(self, job: SettlementJob) -> Settlement:
        """Send the settlement and wait for it, replacing it with higher fees if it is stuck."""
        auth = job.payment.authorization
        chain_id = self.settings.network.chain_id
        relayer = job.relayer or self.address
        return self.send(
            relayer,
            self.chain.asset,
            job.preflight,
            lambda: job.start((chain_id, relayer, job.preflight.relayer_nonce)),
            exact_proof(self.chain, auth),
            job.on_replaced,
        )

    def send(
        self,
        relayer: str,
        to: str,
        preflight: Preflight,
        reserve_nonce: Callable[[], int],
        proof: Proof,
        on_replaced: RecordReplacement,
        calldata: bytes | None = None,
    ) -> Settlement:
        """Send ``calldata`` (default: the preflight's) to ``to`` from ``relayer`` (one of
        ``addresses``) with the account nonce ``reserve_nonce()`` gives, at the preflight's fees
        (gas = estimate × 1.25 + 10 000), and wait until ``proof`` decides it."""
        chain_id = self.settings.network.chain_id
        nonce = reserve_nonce()
        priority = max(preflight.priority_fee, MIN_PRIORITY_FEE)
        transaction = {
            "type": 2,
            "chainId": chain_id,
            "nonce": nonce,
            "to": to,
            "value": 0,
            "data": preflight.calldata if calldata is None else calldata,
            "gas": preflight.gas_estimate * GAS_HEADROOM_NUMERATOR // GAS_HEADROOM_DENOMINATOR + 10_000,
            "maxPriorityFeePerGas": priority,
            "maxFeePerGas": preflight.gas_price * 2 + priority,
        }
        account = self.accounts[relayer]
        sent = self._sign_and_send(account, transaction, None)
        if isinstance(sent, Settlement):
            return sent
        return self.wait(account, proof, transaction, [sent], on_replaced)

    def _sign_and_send(
        self, account: LocalAccount, transaction: dict[str, Any], before_send: RecordReplacement | None
    ) -> str | Settlement:
        """The tx hash once a node has it or may have it (then it is waited for and resolved from
        chain state, never signed again); a ``Settlement`` when no endpoint can have it."""
        signed = account.sign_transaction(transaction)
        tx_hash = "0x" + bytes(signed.hash).hex()
        if before_send is not None:
            before_send(tx_hash)
        sent = self.chain.broadcast(bytes(signed.raw_transaction))
        if not sent.maybe_sent:
            self._resync_nonce(str(account.address))
            return Settlement(NOT_SENT, tx_hash, f"the node refused the settlement: {sent.refusal[:120]}")
        return tx_hash

    def wait(
        self,
        account: LocalAccount,
        proof: Proof,
        transaction: dict[str, Any],
        hashes: list[str],
        on_replaced: RecordReplacement,
    ) -> Settlement:
        """Wait for any version of the transaction. Past ``X402_FEE_BUMP_AFTER`` without a receipt,
        replace it (same account nonce, so only one can ever be mined) with both EIP-1559 fees
        raised by 12.5%, up to ``MAX_FEE_BUMPS`` times."""
        bump_at = time.monotonic() + self.settings.fee_bump_after

        def bump_if_stuck(now: float) -> None:
            nonlocal transaction, bump_at
            if now >= bump_at and len(hashes) <= MAX_FEE_BUMPS:
                transaction = bumped_fees(transaction)
                replacement = self._sign_and_send(account, transaction, on_replaced)
                if isinstance(replacement, str):
                    hashes.append(replacement)
                bump_at = now + self.settings.fee_bump_after

        return confirm(self.chain, proof, hashes, self.settings.receipt_timeout, bump_if_stuck)

    def _resync_nonce(self, relayer: str) -> None:
        try:
            pending = self.chain.pending_nonce(relayer)
        except Exception:
            return
        self.ledger.resync_relayer_nonce(self.settings.network.chain_id, relayer, pending)


class FacilitatorSettler:
    """Settles through an x402 facilitator (``X402_FACILITATOR_URL``): ``POST /settle`` with *our*
    requirement, never the client's. Its answer is a claim, not a payment: the transaction it names
    must show, from the token, this authorization's ``AuthorizationUsed(from, nonce)`` (EIP-3009)
    and ``Transfer(from, payTo, value)`` on chain before anything is served — a transfer of the same
    amount by another authorization of the same payer is not this payment.

    Only an explicit refusal (no 5xx, ``success: false`` with an ``errorReason`` and no
    transaction) fails the payment. Anything else — a timeout, a 5xx, garbled JSON, a success
    without a usable transaction, a transaction that does not show this payment — may follow a
    broadcast: the payment is pending and resolved later from the token's logs."""

    def __init__(self, settings: Settings, chain: Chain) -> None:
        self.settings = settings
        self.chain = chain
        self.url = settings.facilitator_url
        self.address = settings.pay_to  # simulations run from the payee; the facilitator pays the gas
        self.addresses = (self.address,)
        self._sessions = Sessions()  # made in each worker, never the gunicorn master's connections

    def pick(self) -> str:
        """The payee: simulations run from it (the facilitator's own account sends)."""
        return self.address

    def supported(self) -> list[dict[str, Any]]:
        """The ``kinds`` the facilitator's ``GET /supported`` lists (objects such as ``{"scheme",
        "network"}``). Raises ``requests.RequestException`` or ``ValueError`` when it does not answer
        with JSON."""
        response = self._sessions.get().get(self.url + "/supported", timeout=10)
        response.raise_for_status()
        kinds = response.json().get("kinds", [])
        return [k for k in kinds if isinstance(k, dict)]

    def settle(self, job: SettlementJob) -> Settlement:
        """``POST /settle`` with our requirement, then check the named transaction on chain: settled only
        when the chain shows this payment; failed on an explicit refusal (or a reported revert); else
        pending."""
        payment, requirement, start = job.payment, job.requirement, job.start
        auth = payment.authorization
        start(None)  # settling from here on: the facilitator may broadcast at any moment
        if payment.version == 2:
            ours: dict[str, Any] = requirement.to_v2()
        else:
            ours = requirement.to_v1(str(requirement.pay_to), "", "application/json")
        body = {
            "x402Version": payment.version,
            "paymentPayload": payment.to_wire(),
            "paymentRequirements": ours,
        }
        # It may have broadcast whenever it did not clearly refuse: pending, resolved from the
        # token's logs on retry. Its hash is recorded only once the chain shows it is this payment.
        unknown = Settlement(PENDING, "", SETTLEMENT_PENDING)
        try:
            response = self._sessions.get().post(
                self.url + "/settle", json=body, timeout=self.settings.receipt_timeout
            )
            answer = response.json()
        except (requests.RequestException, ValueError):
            return unknown
        if not isinstance(answer, dict):
            return unknown
        tx_hash = answer.get("transaction")
        refused = answer.get("success") is False and response.status_code < 500
        if not isinstance(tx_hash, str) or not is_word(tx_hash):
            reason = answer.get("errorReason")
            if refused and not tx_hash and isinstance(reason, str) and reason:
                code = reason if REASON_CODE_RE.fullmatch(reason) else TRANSACTION_FAILED
                return Settlement(FAILED, "", code)
            return unknown
        # believe the chain, not the facilitator: the named transaction must show this payment
        settlement = confirm(
            self.chain, exact_proof(self.chain, auth), [tx_hash], self.settings.receipt_timeout
        )
        if settlement.outcome == SETTLED or (settlement.outcome == FAILED and refused):
            return settlement  # paid; or it says it failed and the chain shows the revert
        return unknown  # not mined yet, or not this payment: decided by the token's logs


def check_facilitator(settler: FacilitatorSettler, settings: Settings) -> None:
    """At start: the facilitator must answer and support exact payments on our network."""
    try:
        kinds = settler.supported()
    except (requests.RequestException, ValueError) as exc:
        raise SettingsError(
            "X402_FACILITATOR_URL", f"{settler.url}/supported does not answer: {exc}"
        ) from None
    if not any(k.get("scheme") == "exact" and k.get("network") == settings.network.caip2 for k in kinds):
        raise SettingsError(
            "X402_FACILITATOR_URL", f"the facilitator does not settle exact on {settings.network.caip2}"
        )
