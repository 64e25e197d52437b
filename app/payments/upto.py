"""The ``upto`` payment path: hold a Permit2 permit for the priced maximum, call the model, then
charge what the host reports it used (``specs/schemes/upto/scheme_upto_evm.md``; README, pricing).

``UptoGate.begin`` checks the permit offline, refuses a payer with unpaid charges (after trying to
collect them), claims the permit in Redis like an ``exact`` payment, checks it on chain (signature
incl. EIP-1271 wallets, Permit2 nonce, balance and Permit2 allowance ≥ the maximum, simulation of
``settle``) and marks it ``settling``: the permit is in use until the call ends. Nothing is sent
before the answer: ``UptoGate.settle`` pulls the usage price (``app.catalog.usage.charge``: at
least the model's floor, at most the maximum) and confirms it on chain; ``UptoGate.record`` writes
the outcome. A call the host fails is released: nothing was charged, and the same header may be sent
again. An answer that went out before its settlement failed (a stream) leaves a debt: the state
``owed`` and the payer's debt hash, collected with the same permit the next time the payer pays.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

from app import metrics
from app.backends.chain import UNPAYABLE, Chain, Preflight
from app.backends.permit2 import settle_calldata
from app.backends.rpc import ChainUnavailable, RpcFailure
from app.backends.store import STORE_ERRORS
from app.backends.token import pulled_logged
from app.backends.upstream import abandoned_after
from app.catalog import Quote
from app.catalog.usage import Usage, charge
from app.logs import note
from app.payments.errors import ApiError
from app.payments.keys import debt_key, exposure_key, permit_key
from app.payments.ledger import NEW, Claim, Debt, Ledger
from app.payments.outcomes import PaymentRequired, requirement_for
from app.payments.settlement import FAILED, NOT_SENT, PENDING, SETTLED, LocalSettler, Proof, Settlement
from app.payments.states import State
from app.settings import Settings
from app.x402.checks import MIN_VALIDITY_MARGIN, match_requirement
from app.x402.upto import UPTO_PROXY_ADDRESS, UptoPayment, check_permit
from app.x402.upto.checks import (
    DEADLINE_EXPIRED,
    INSUFFICIENT_BALANCE,
    NONCE_USED,
    PAYER_IN_DEBT,
    TRANSACTION_FAILED,
)
from app.x402.verdict import SETTLEMENT_PENDING, Verdict, reject
from app.x402.wire import RESPONSE_HEADERS, Requirement, SettleResponse

log = logging.getLogger("x402.upto")

IN_PROGRESS = "payment_in_progress"


@dataclass(frozen=True)
class Hold:
    """A verified ``upto`` permit held for one call: the quote (its amount is the maximum), the
    permit's Redis key, the payment, its normalised signature and the on-chain preflight."""

    quote: Quote
    key: str
    payment: UptoPayment
    signature: bytes
    preflight: Preflight
    relayer: str  # the settling account the permit names (checksummed)

    @property
    def payer(self) -> str:
        return self.payment.authorization.from_


@dataclass(frozen=True)
class Charge:
    """What became of a held permit's charge: ``outcome`` settled | failed | pending | not_sent (see
    ``app.payments.settlement.Settlement``), ``amount`` in atomic units (never 0: a floor is at
    least 1), the transaction hash, the usage it was priced from (None: not reported, charged the
    maximum)."""

    outcome: str
    amount: int
    tx: str
    usage: Usage | None
    calldata: bytes = b""
    reason: str = ""  # why nothing was sent (not_sent): a reason code


class UptoGate:
    """The ``upto`` scheme for one proxy: its requirement, the hold on a permit, the charge."""

    def __init__(self, settings: Settings, ledger: Ledger, chain: Chain, settler: LocalSettler) -> None:
        self.settings = settings
        self.ledger = ledger
        self.chain = chain
        self.settler = settler

    @property
    def max_timeout_seconds(self) -> int:
        """How long a permit must live (seconds): the whole call and its settlement, since nothing
        is pulled before the answer — ``X402_MAX_TIMEOUT_SECONDS``, or, if longer, the longest a
        call may hold a payment (``abandoned_after``: every try at the host, the receipt wait, 30 s)
        plus one more wait for the host (``X402_UPSTREAM_TIMEOUT``), so a stream has that long too."""
        longest = abandoned_after(self.settings) + self.settings.upstream_timeout
        return max(self.settings.max_timeout_seconds, math.ceil(longest))

    def settle_by(self, hold: Hold) -> float:
        """Unix time by which a held permit's charge must be sent: its deadline less the receipt wait
        and the validity margin. Past it nothing is sent (it could only revert)."""
        return hold.payment.authorization.deadline - self.settings.receipt_timeout - MIN_VALIDITY_MARGIN

    def stream_until(self, hold: Hold) -> float:
        """Unix time after which no more of a stream is passed on: ``settle_by`` less one wait for
        the host (a chunk read returns within ``X402_UPSTREAM_TIMEOUT``, or fails), so the stream's
        charge is sent in time however the host paces it."""
        return self.settle_by(hold) - self.settings.upstream_timeout

    def requirement(self, quote: Quote, facilitator: str) -> Requirement:
        """Our ``upto`` requirement for this quote: at most its price (atomic units), to ``pay_to``,
        settled by ``facilitator`` (one of our relayers: the 402s name them in turn)."""
        timeout = self.max_timeout_seconds
        return replace(
            requirement_for(self.settings, quote.amount),
            max_timeout_seconds=timeout,
            scheme="upto",
            facilitator=facilitator,
        )

    def response_header(self, charge: Charge, payer: str, reason: str = "") -> tuple[str, str]:
        """(``PAYMENT-RESPONSE``, base64 value) with the amount charged."""
        success = charge.outcome == SETTLED
        response = SettleResponse(
            success, charge.tx, self.settings.network.caip2, payer, reason, charge.amount
        )
        return RESPONSE_HEADERS[2], response.to_header()

    def begin(self, quote: Quote, payment: UptoPayment) -> Hold:
        """Verify and hold the permit for this call. Raises ``PaymentRequired`` (402 with the reason
        code) or ``ApiError`` (503: Redis or RPC trouble, a payment in progress)."""
        extra = payment.accepted.get("extra")
        named = extra.get("facilitatorAddress") if isinstance(extra, dict) else None
        relayer = self.settler.owns(named) if isinstance(named, str) else None
        requirement = self.requirement(quote, relayer or self.settler.address)
        refusal = match_requirement(payment, requirement)  # another facilitatorAddress fails here
        if not refusal:
            raise PaymentRequired(refusal)
        offline = check_permit(payment, requirement, int(time.time()))
        if not offline.verdict:
            raise PaymentRequired(offline.verdict)
        auth = payment.authorization
        note(model=quote.model.name, amount=quote.amount, payer=auth.from_, x402_version=2, scheme="upto")
        debts = self._debts(auth.from_)  # read now, collected once the payer is proven
        key = permit_key(requirement.chain_id, requirement.asset, auth.from_, auth.nonce)
        claim = self._claim(quote, payment, key)
        if claim.outcome != "claimed":
            raise self._taken(claim)
        try:
            preflight = self.chain.upto_preflight(
                payment, offline.signature, offline.ecdsa_signer, requirement.facilitator
            )
        except (ChainUnavailable, RpcFailure) as exc:
            self._move(key, State.CLAIMED, State.RELEASED)
            raise ApiError(
                503, "rpc_unavailable", "no RPC endpoint answers; nothing was charged", {"Retry-After": "5"}
            ) from exc
        if not preflight.verdict:
            self._move(key, State.CLAIMED, State.RELEASED)
            if preflight.verdict.reason in UNPAYABLE:
                raise ApiError(503, preflight.verdict.reason, preflight.verdict.detail, {"Retry-After": "60"})
            if debts:
                owed = sum(debt.amount for debt in debts)
                raise PaymentRequired(_in_debt(owed, f" (and {preflight.verdict.reason})"))
            raise PaymentRequired(preflight.verdict)
        try:  # only now is the payer proven (the simulation checked its signature): collect its debts
            spendable = preflight.spendable - self._collect_debts(auth.from_, debts)
        except BaseException:
            self._move(key, State.CLAIMED, State.RELEASED)
            raise
        cap = payment.permit2612.value if payment.permit2612 is not None else 0
        self._hold_exposure(key, auth.from_, quote.amount, auth.deadline, spendable, cap)
        try:
            held = self.ledger.transition(
                key, (State.CLAIMED,), State.SETTLING, scheme="upto", authorized=str(quote.amount)
            )
        except STORE_ERRORS as exc:
            self._release_exposure(key, auth.from_)
            raise _ledger_down() from exc
        if not held:
            self._release_exposure(key, auth.from_)
            raise ApiError(503, "ledger_conflict", "the payment changed state during verification")
        return Hold(quote, key, payment, offline.signature, preflight, requirement.facilitator)

    def _hold_exposure(
        self, key: str, payer: str, maximum: int, deadline: int, spendable: int, cap: int
    ) -> None:
        """Count this call's maximum against what the payer can pay, with its other ``upto`` calls in
        flight: their sum never exceeds the balance and Permit2 allowance the chain showed, which
        bounds what a payer who moves its funds during its calls can leave unpaid. Refused: 402
        ``permit2_insufficient_balance``, the permit released."""
        try:
            held, others = self.ledger.hold_exposure(
                self._exposure_key(payer), key, maximum, deadline, spendable, cap
            )
        except STORE_ERRORS as exc:
            self._move(key, State.CLAIMED, State.RELEASED)
            raise _ledger_down() from exc
        if not held:
            self._move(key, State.CLAIMED, State.RELEASED)
            raise PaymentRequired(
                reject(
                    INSUFFICIENT_BALANCE,
                    f"the payer's balance and Permit2 allowance ({spendable}) cover its calls in flight "
                    f"({others}) but not this call's maximum ({maximum}); retry when one ends",
                )
            )

    def _release_exposure(self, key: str, payer: str) -> None:
        try:
            self.ledger.release_exposure(self._exposure_key(payer), key)
        except STORE_ERRORS as exc:  # it expires with the permit's deadline
            log.warning("could not release an upto hold: %s", type(exc).__name__)

    def _exposure_key(self, payer: str) -> str:
        return exposure_key(self.settings.network.chain_id, self.settings.asset, payer)

    def _claim(self, quote: Quote, payment: UptoPayment, key: str) -> Claim:
        auth = payment.authorization
        try:
            return self.ledger.claim(
                key,
                auth.deadline,
                auth.from_,
                auth.amount,
                quote.model.name,
                payment.network,
                NEW,
                quote.amount,
            )
        except Exception as exc:
            log.warning("ledger unavailable at claim: %s: %s", type(exc).__name__, exc)
            raise _ledger_down() from exc

    @staticmethod
    def _taken(claim: Claim) -> Exception:
        """A permit seen before: in use by another request, or already used for a call."""
        if claim.state in (State.CLAIMED, State.SETTLING):
            return ApiError(
                503,
                IN_PROGRESS,
                "this permit is in use by another request; sign a new one or retry once it ends",
                {"Retry-After": "5"},
            )
        return PaymentRequired(reject(NONCE_USED, f"this permit was already presented ({claim.state})"))

    def _move(self, key: str, from_state: State, to_state: State, **fields: str) -> bool:
        """A transition whose failure is logged, not raised (the permit then waits for its deadline)."""
        try:
            return self.ledger.transition(key, (from_state,), to_state, **fields)
        except STORE_ERRORS as exc:
            log.error(
                "could not record an upto payment (%s → %s): %s", from_state, to_state, type(exc).__name__
            )
            return False

    def release(self, hold: Hold) -> None:
        """The call failed before an answer went out: nothing is charged, and the same header may be
        sent again while the permit lives."""
        self._move(hold.key, State.SETTLING, State.RELEASED)
        self._release_exposure(hold.key, hold.payer)
        note(outcome="released")

    def settle(self, hold: Hold, usage: Usage | None) -> Charge:
        """Pull the usage price (atomic units: ``charge``) with the held permit and wait for the chain
        to decide. Never raises: trouble is a ``Charge`` whose outcome says whether
        anything may have been sent (pending) or not (not_sent)."""
        amount = charge(hold.quote.model, usage, hold.quote.amount)  # ≥ the floor, ≥ 1: never 0
        if time.time() > self.settle_by(hold):  # the call outlasted its permit: a send could only revert
            return Charge(NOT_SENT, amount, "", usage, reason=DEADLINE_EXPIRED)
        auth = hold.payment.authorization
        calldata = settle_calldata(auth, amount, hold.signature, hold.payment.permit2612)
        settlement = self._send(hold.relayer, calldata, hold.preflight, hold.key, auth.from_, auth.to, amount)
        return Charge(settlement.outcome, amount, settlement.tx_hash, usage, calldata)

    def _send(
        self,
        relayer: str,
        calldata: bytes,
        preflight: Preflight,
        key: str,
        payer: str,
        pay_to: str,
        amount: int,
    ) -> Settlement:
        chain_id = self.settings.network.chain_id
        proof = Proof(
            lambda receipt: pulled_logged(receipt, self.chain.asset, payer, pay_to, amount),
            lambda tx_hash: Settlement(FAILED, tx_hash, TRANSACTION_FAILED),
        )

        def record_tx(tx_hash: str) -> None:
            self._move(key, State.SETTLING, State.SETTLING, tx=tx_hash)

        started = time.perf_counter()
        try:
            settlement = self.settler.send(
                relayer,
                UPTO_PROXY_ADDRESS,
                preflight,
                lambda: self.ledger.reserve_relayer_nonce(chain_id, relayer, preflight.relayer_nonce),
                proof,
                record_tx,
                calldata,
            )
        except STORE_ERRORS:
            return Settlement(NOT_SENT, "", "ledger_unavailable")
        except Exception as exc:  # signed, maybe sent: decided by the chain later
            log.error("upto settlement error: %s", type(exc).__name__)
            return Settlement(PENDING, "", SETTLEMENT_PENDING)
        if settlement.outcome == SETTLED:
            metrics.SETTLEMENT_SECONDS.observe(time.perf_counter() - started)
        return settlement

    def record(self, hold: Hold, result: Charge, answered: bool) -> None:
        """Record what became of the charge (ledger events carry the amount charged and the maximum).
        ``answered``: the answer already went out (a stream), so a charge that did not settle is
        owed by the payer. A settlement that did not land before an answer was withheld leaves the
        permit ``failed`` (nothing moved; the same header may be sent again) or ``released``."""
        model = hold.quote.model.name
        amount = str(result.amount)
        if result.outcome == SETTLED:
            self._move(hold.key, State.SETTLING, State.SERVED, tx=result.tx, amount=amount)
            metrics.REVENUE.labels(model).inc(result.amount)
            metrics.UPTO_AUTHORIZED.labels(model).inc(hold.quote.amount)
            metrics.UPTO_CHARGED.labels(model).inc(result.amount)
            metrics.payment_outcome(State.SERVED)
        elif result.outcome == PENDING:  # what collects it if it reverts: for `reconcile`
            fields = {
                "tx": result.tx,
                "amount": amount,
                "relayer": hold.relayer,
                "calldata": result.calldata.hex(),
            }
            self._move(hold.key, State.SETTLING, State.PENDING, **fields)
            metrics.payment_outcome(State.PENDING, SETTLEMENT_PENDING)
        elif answered:
            self._owe(hold, result)
        elif result.outcome == FAILED:
            self._move(hold.key, State.SETTLING, State.FAILED, tx=result.tx)
            metrics.payment_outcome(State.FAILED, TRANSACTION_FAILED)
        else:
            self._move(hold.key, State.SETTLING, State.RELEASED, tx="")
        self._release_exposure(hold.key, hold.payer)
        note(outcome=result.outcome, tx=result.tx, charged=result.amount)

    def _owe(self, hold: Hold, result: Charge) -> None:
        """An answered call whose charge did not settle: the payer owes it, and is refused ``upto``
        until it is collected."""
        payer = hold.payer
        try:
            deadline = hold.payment.authorization.deadline
            self.ledger.record_debt(
                self._debt_key(payer), hold.key, result.amount, hold.relayer, deadline, result.calldata
            )
        except STORE_ERRORS as exc:
            log.error("could not record an upto debt: %s", type(exc).__name__)
        self._move(hold.key, State.SETTLING, State.OWED, tx=result.tx, amount=str(result.amount))
        metrics.DEBT_RECORDED.labels(hold.quote.model.name).inc(result.amount)
        metrics.payment_outcome(State.OWED, TRANSACTION_FAILED)

    def _debt_key(self, payer: str) -> str:
        return debt_key(self.settings.network.chain_id, self.settings.asset, payer)

    def _debts(self, payer: str) -> list[Debt]:
        try:
            return self.ledger.debts(self._debt_key(payer))
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc

    def _collect_debts(self, payer: str, debts: list[Debt]) -> int:
        """Before a payer's new ``upto`` call: collect what it owes with the permits it signed, while
        they live (an expired one costs no RPC: it stays owed). Returns the amount collected (atomic
        units); raises 402 ``upto_payer_in_debt`` while anything stays owed."""
        owed = collected = 0
        for debt in debts:
            live = debt.deadline >= time.time() + MIN_VALIDITY_MARGIN
            if not live or self.settler.owns(debt.relayer) is None:  # expired, or a key since removed
                owed += debt.amount
                continue
            try:
                preflight = self.chain.send_preflight(UPTO_PROXY_ADDRESS, debt.calldata, debt.relayer)
            except ChainUnavailable as exc:
                raise ApiError(
                    503,
                    "rpc_unavailable",
                    "no RPC endpoint answers; nothing was charged",
                    {"Retry-After": "5"},
                ) from exc
            settled = False
            if preflight.verdict:
                to = self.settings.pay_to
                settlement = self._send(
                    debt.relayer, debt.calldata, preflight, debt.key, payer, to, debt.amount
                )
                settled = settlement.outcome == SETTLED
                if settled:
                    self._move(debt.key, State.OWED, State.SERVED, tx=settlement.tx_hash)
                    self.ledger.clear_debt(self._debt_key(payer), debt.key)
                    metrics.DEBT_COLLECTED.inc(debt.amount)
                    collected += debt.amount
            if not settled:
                owed += debt.amount
        if owed:
            raise PaymentRequired(_in_debt(owed))
        return collected


def _in_debt(owed: int, why: str = "") -> Verdict:
    return reject(
        PAYER_IN_DEBT,
        f"this payer owes {owed} atomic units for answered calls whose settlement failed{why}; restore "
        "the balance and the Permit2 allowance, then pay again",
    )


def _ledger_down() -> ApiError:
    return ApiError(
        503, "ledger_unavailable", "payment ledger unavailable; nothing was charged", {"Retry-After": "5"}
    )
