"""The ``batch-settlement`` payment path: a call paid by a signed cumulative voucher on an escrow
channel, charged its usage price (``specs/schemes/batch-settlement/scheme_batch_settlement_evm.md``;
README, "Which scheme").

``BatchGate.begin`` checks the voucher (config ours, signature by ``payerAuthorizer``, EIP-1271 for a
payer that signs itself), holds the channel in Redis for this call alone (``app.payments.channels``:
the voucher must be exactly what was charged so far plus this call's maximum, within the balance),
and for a ``deposit`` payload first sends the deposit (``x402BatchSettlement.deposit`` through a
collector) from one of our relayers and waits for it. No transaction per call: ``commit`` adds the
call's usage price (``app.catalog.usage.charge``) to the channel once the answer succeeded; a call
the host fails is ``release``d, uncharged. A stale voucher gets the corrective 402, whose
``channelState`` and ``voucherState`` let the official clients resynchronise. The charges reach the
chain in batches (``app.payments.claims``).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from eth_utils import to_checksum_address

from app import metrics
from app.backends.chain import Chain
from app.backends.escrow import (
    VoucherClaim,
    channel_reads,
    channel_view,
    claim_calldata,
    deposit_authorization_read,
    deposit_authorization_used,
    deposit_calldata,
    deposit_logged,
    escrow_moved,
    multicall_calldata,
    refund_calldata,
)
from app.backends.rpc import ChainUnavailable, RpcFailure
from app.backends.store import STORE_ERRORS
from app.backends.upstream import abandoned_after
from app.catalog import Quote
from app.catalog.usage import Usage, charge
from app.logs import note
from app.payments.channels import (
    BUSY,
    CLOSED,
    HELD,
    MISSING,
    ChainView,
    Channels,
    ChannelState,
    StoredChannel,
)
from app.payments.claims import ClaimLoop, Claims, config_of, send_to_escrow
from app.payments.errors import ApiError
from app.payments.outcomes import PaymentRequired, requirement_for
from app.payments.receipts import derived_key
from app.payments.settlement import FAILED, SETTLED, LocalSettler, Proof, Settlement
from app.settings import Settings
from app.x402.batch_settlement import (
    BATCH_SETTLEMENT_ADDRESS,
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    SCHEME,
    BatchPayment,
    ChannelConfig,
    ChannelTerms,
    Erc3009Deposit,
    channel_id,
    check_amounts,
    check_signed,
    claim_batch_digest,
    refund_digest,
    voucher_digest,
)
from app.x402.batch_settlement.checks import (
    CHANNEL_BUSY,
    CUMULATIVE_AMOUNT_MISMATCH,
    DEPOSIT_BELOW_MIN_DEPOSIT,
    INVALID_VOUCHER_SIGNATURE,
    REFUND_NO_BALANCE,
)
from app.x402.batch_settlement.payload import (
    DEPOSIT_PAYLOAD_INVALID,
    REFUND_PAYLOAD_INVALID,
    VOUCHER_PAYLOAD_INVALID,
)
from app.x402.checks import MIN_VALIDITY_MARGIN, match_requirement
from app.x402.eip712 import address_of_key, recover_signer, sign_digest
from app.x402.verdict import reject
from app.x402.wire import RESPONSE_HEADERS, Requirement, SettleResponse

log = logging.getLogger("x402.batch")

DEPOSIT_SIMULATION_FAILED = "invalid_batch_settlement_evm_deposit_simulation_failed"
REFUND_SIMULATION_FAILED = "invalid_batch_settlement_evm_refund_simulation_failed"
REFUND_TRANSACTION_FAILED = "invalid_batch_settlement_evm_refund_transaction_failed"
DEPOSIT_TRANSACTION_FAILED = "invalid_batch_settlement_evm_deposit_transaction_failed"
RPC_READ_FAILED = "invalid_batch_settlement_evm_rpc_read_failed"
# ours: the escrow lets a payer leave alone (initiateWithdraw, then finalizeWithdraw after the delay);
# while that is pending the proxy honours no more vouchers on the channel
WITHDRAWAL_PENDING = "invalid_batch_settlement_evm_withdrawal_pending"
# ours: a channel whose vouchers the escrow refused in a claim (a wallet contract's EIP-1271 answer
# changed) takes no more calls
CHANNEL_CLOSED = "invalid_batch_settlement_evm_channel_closed"
MIN_DEPOSIT_CALLS = 10  # without X402_MIN_DEPOSIT, the deposit hint is this many calls' maximum
# Channel amounts go through Redis Lua numbers (doubles): exact below 2**53 atomic units (≈ 9·10^9
# USDC); a voucher or deposit at or above it is refused before any script runs.
AMOUNT_LIMIT = 2**53


@dataclass(frozen=True)
class ChannelHold:
    """One call holding its channel: the quote (its amount is the maximum), the payment, the hold's
    id, the channel as it was when taken, and the deposit transaction when this call made one."""

    quote: Quote
    payment: BatchPayment
    hold_id: str
    state: ChannelState
    until: float  # unix seconds: the hold lapses then, and the channel is another call's
    deposit_tx: str = ""

    @property
    def channel(self) -> bytes:
        return self.payment.voucher.channel_id

    @property
    def payer(self) -> str:
        return self.payment.config.payer


@dataclass(frozen=True)
class Refunded:
    """A cooperative refund that landed: ``amount`` returned to the payer (atomic units), its
    transaction, and the channel after it."""

    amount: int
    tx: str
    state: ChannelState


@dataclass(frozen=True)
class VoucherCharge:
    """What a call was charged on its channel (atomic units, ≥ 1: the floor), the usage it was
    priced from (None: not reported, charged the maximum), and the channel after it; ``state`` is
    None when the hold had lapsed and nothing was charged."""

    amount: int
    usage: Usage | None
    state: ChannelState | None


class BatchGate:
    """The ``batch-settlement`` scheme for one proxy: its requirement, a call's hold on its channel,
    the deposit that opens or tops up a channel, and the charge."""

    def __init__(self, settings: Settings, channels: Channels, chain: Chain, settler: LocalSettler) -> None:
        self.settings = settings
        self.channels = channels
        self.chain = chain
        self.settler = settler
        key = settings.receiver_authorizer_key or derived_key(
            settings.settling_keys[0], "receiver authorizer"
        )
        self.authorizer_key = bytes.fromhex(key.removeprefix("0x"))
        self.authorizer = to_checksum_address(address_of_key(self.authorizer_key))
        # the charges reach the chain in batches: one claim loop per process, one cycle at a time
        self.claims = ClaimLoop(Claims.of(self))

    @property
    def max_timeout_seconds(self) -> int:
        """How long a call may hold its channel (seconds): ``X402_MAX_TIMEOUT_SECONDS``, or the
        longest a call may run with its deposit (``abandoned_after``) plus one wait for the host."""
        longest = abandoned_after(self.settings) + self.settings.upstream_timeout
        return max(self.settings.max_timeout_seconds, math.ceil(longest))

    def requirement(self, quote: Quote) -> Requirement:
        """Our ``batch-settlement`` requirement for this quote: at most its price per call (atomic
        units), to ``pay_to``, with our receiver authorizer, withdraw delay and deposit hint."""
        configured = self.settings.min_deposit
        hint = max(quote.amount, configured) if configured else quote.amount * MIN_DEPOSIT_CALLS
        return replace(
            requirement_for(self.settings, quote.amount),
            scheme=SCHEME,
            max_timeout_seconds=self.max_timeout_seconds,
            receiver_authorizer=self.authorizer,
            withdraw_delay=self.settings.withdraw_delay,
            min_deposit=hint,
        )

    def terms(self, requirement: Requirement) -> ChannelTerms:
        return ChannelTerms.of(requirement, self.authorizer, self.settings.withdraw_delay)

    def begin(self, quote: Quote, payment: BatchPayment) -> ChannelHold:
        """Check the voucher, hold its channel for this call, and send a deposit the payload
        carries. Raises ``PaymentRequired`` (402: its reason code; a stale voucher's 402 carries the
        channel for the client to resynchronise) or ``ApiError`` (503: Redis or RPC trouble)."""
        self.claims.ensure_running()
        if payment.kind == "refund":  # serve.py sends refunds to ``refund``; never a call's payment
            raise PaymentRequired(reject(REFUND_PAYLOAD_INVALID, "a refund pays for no call"))
        requirement = self.requirement(quote)
        refusal = match_requirement(payment, requirement)
        if not refusal:
            raise PaymentRequired(refusal)
        deposit = payment.deposit
        incoming = deposit.amount if deposit is not None else 0
        signature = self._signed(payment, requirement)
        if deposit is not None:
            self._check_deposit(payment, requirement.min_deposit)
        note(model=quote.model.name, amount=quote.amount, payer=payment.config.payer, scheme=SCHEME)
        hold_id = secrets.token_hex(16)
        until = time.time() + self.max_timeout_seconds
        state = self._hold(payment, hold_id, int(until), quote.amount, signature, incoming)
        hold = ChannelHold(quote, payment, hold_id, state, until)
        try:
            if deposit is not None:
                return self._deposit(hold)
            if state.withdraw_at or time.time() - state.synced > self.settings.withdraw_delay / 2:
                return self._resync(hold)
            return hold
        except BaseException:
            self.release(hold)
            raise

    def _resync(self, hold: ChannelHold) -> ChannelHold:
        """Read the channel from the chain again before a voucher is honoured, when Redis last did
        more than half a withdraw delay ago (a payer's unilateral withdrawal takes a whole delay, so
        one started since cannot have finalized unseen) or a withdrawal was seen pending. A pending
        withdrawal refuses vouchers until a deposit cancels it; a balance that no longer covers the
        voucher (a withdrawal finalized) refuses it too."""
        view = self._view(hold.channel)
        try:
            self.channels.sync(hold.channel, view)
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc
        if view.withdraw_at:
            raise PaymentRequired(
                reject(
                    WITHDRAWAL_PENDING,
                    "the payer started a withdrawal from this channel: deposit to cancel it, or pay "
                    "from a new channel",
                )
            )
        verdict = check_amounts(
            hold.payment,
            charged=hold.state.charged,
            maximum=hold.quote.amount,
            balance=view.balance,
            claimed=view.claimed,
        )
        if not verdict:
            raise PaymentRequired(verdict)
        return replace(hold, state=replace(hold.state, balance=view.balance, claimed=view.claimed))

    def _signed(self, payment: BatchPayment, requirement: Requirement) -> bytes:
        """The voucher's normalised signature once its amounts are within what Redis counts exactly,
        its config is ours and its signer the channel's (``check_signed``; EIP-1271 for a payer that
        signs itself). Raises ``PaymentRequired`` or ``ApiError`` (RPC trouble)."""
        deposit = payment.deposit.amount if payment.deposit is not None else 0
        if payment.voucher.max_claimable >= AMOUNT_LIMIT or deposit >= AMOUNT_LIMIT:
            malformed = DEPOSIT_PAYLOAD_INVALID if payment.deposit is not None else VOUCHER_PAYLOAD_INVALID
            raise PaymentRequired(reject(malformed, f"amounts must be below {AMOUNT_LIMIT} atomic units"))
        signed = check_signed(payment, self.terms(requirement))
        if not signed.verdict:
            raise PaymentRequired(signed.verdict)
        if not signed.ecdsa_signer:
            self._check_payer_signature(payment, signed.signature)
        return signed.signature

    def _check_payer_signature(self, payment: BatchPayment, signature: bytes) -> None:
        """A voucher whose ``payerAuthorizer`` is zero is the payer's own, checked as the escrow's
        SignatureChecker does: EIP-1271 ``isValidSignature`` when the payer has code (a wallet
        contract, an EIP-7702 account), strict ECDSA otherwise (one RPC round trip)."""
        digest = voucher_digest(payment.voucher.channel_id, payment.voucher.max_claimable, self.chain_id)
        payer = payment.config.payer
        try:
            accepted = self.chain.signature_checker_accepts(payer, digest, signature)
        except ChainUnavailable as exc:
            raise _rpc_down() from exc
        if accepted is None:  # no code: strict ECDSA by the payer
            accepted = len(signature) == 65 and recover_signer(digest, signature) == payer
        if not accepted:
            raise PaymentRequired(reject(INVALID_VOUCHER_SIGNATURE, "the voucher is not signed by the payer"))

    def _check_deposit(self, payment: BatchPayment, minimum: int) -> None:
        """The parts of a deposit the chain cannot tell apart from a bad signature: at least the
        ``minDeposit`` we offered (atomic units; our relayer pays each deposit's gas, so it is never
        sent for a token amount), and the collector's terms. The signature and funds are the
        simulation's to check."""
        assert payment.deposit is not None
        auth, now = payment.deposit.authorization, int(time.time())
        if payment.deposit.amount < minimum:
            raise PaymentRequired(
                reject(DEPOSIT_BELOW_MIN_DEPOSIT, f"a deposit here is at least extra.minDeposit ({minimum})")
            )
        if isinstance(auth, Erc3009Deposit):
            if auth.valid_before < now + MIN_VALIDITY_MARGIN or auth.valid_after > now:
                raise PaymentRequired(
                    reject(DEPOSIT_PAYLOAD_INVALID, "the deposit authorization is not valid now")
                )
            return
        if (
            auth.spender != PERMIT2_DEPOSIT_COLLECTOR_ADDRESS.lower()
            or auth.from_ != payment.config.payer
            or auth.token != payment.config.token
            or auth.amount != payment.deposit.amount
            or auth.channel_id != payment.voucher.channel_id
            or auth.deadline < now + MIN_VALIDITY_MARGIN
        ):
            raise PaymentRequired(
                reject(
                    DEPOSIT_PAYLOAD_INVALID,
                    "the Permit2 deposit must let the Permit2 deposit collector pull deposit.amount of "
                    "the channel's token from its payer for this channel, and be valid now",
                )
            )

    @property
    def chain_id(self) -> int:
        return self.settings.network.chain_id

    def _hold(
        self, payment: BatchPayment, hold_id: str, until: int, maximum: int, signature: bytes, incoming: int
    ) -> ChannelState:
        channel, signed = payment.voucher.channel_id, payment.voucher.max_claimable
        try:
            state = self.channels.hold(channel, hold_id, until, maximum, signed, signature, incoming)
            if state.status == MISSING:  # rebuilt from the chain and this voucher
                view = self._view(channel)
                rebuild = (payment.config, view)
                state = self.channels.hold(
                    channel, hold_id, until, maximum, signed, signature, incoming, rebuild
                )
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc
        if state.status == HELD:
            return state
        if state.status == BUSY:
            raise PaymentRequired(
                reject(CHANNEL_BUSY, "another call is using this channel; retry once it ends")
            )
        if state.status == CLOSED:
            raise PaymentRequired(
                reject(
                    CHANNEL_CLOSED,
                    "this channel's vouchers could not be claimed on chain (the payer's wallet refused "
                    "them): it takes no more calls; open another channel",
                )
            )
        verdict = check_amounts(
            payment,
            charged=state.charged,
            maximum=maximum,
            balance=state.balance + incoming,
            claimed=state.claimed,
        )
        if verdict.reason == CUMULATIVE_AMOUNT_MISMATCH:
            raise PaymentRequired(verdict, corrective=self.corrective(channel, state))
        if not verdict:
            raise PaymentRequired(verdict)
        raise ApiError(503, "ledger_conflict", "the channel changed while this call was checked; retry")

    def corrective(self, channel: bytes, state: ChannelState) -> dict[str, Any]:
        """What the corrective 402 adds to our requirement's ``extra``: the channel as we hold it
        (``channelState``: amounts as decimal strings) and, when we hold one, the payer's latest
        voucher (``voucherState``), from which the official clients resynchronise."""
        extra: dict[str, Any] = {"channelState": self._channel_state(channel, state)}
        if state.signature:
            extra["voucherState"] = {"signedMaxClaimable": str(state.signed), "signature": state.signature}
        return extra

    @staticmethod
    def _channel_state(channel: bytes, state: ChannelState) -> dict[str, Any]:
        return {
            "channelId": "0x" + channel.hex(),
            "balance": str(state.balance),
            "totalClaimed": str(state.claimed),
            "withdrawRequestedAt": state.withdraw_at,
            "refundNonce": str(state.refund_nonce),
            "chargedCumulativeAmount": str(state.charged),
        }

    def _view(self, channel: bytes) -> ChainView:
        """The chain's ``channels(id)``, ``pendingWithdrawals(id)`` and ``refundNonce(id)``."""
        try:
            answers = self.chain.rpc.batch(channel_reads(channel))
        except (ChainUnavailable, RpcFailure) as exc:
            raise _rpc_down() from exc
        view = channel_view(answers)
        if view is None:
            raise ApiError(
                503, RPC_READ_FAILED, "the escrow's channel could not be read; nothing was charged"
            )
        return view

    def _deposit(self, hold: ChannelHold) -> ChannelHold:
        """Send the payload's deposit and wait for it, unless its authorization was used already (a
        retry of the same header: the ERC-3009 authorization's state, or the Permit2 nonce); then
        the channel's balance must cover the voucher. Raises ``PaymentRequired`` (the deposit
        reverted or cannot) or ``ApiError``."""
        payment = hold.payment
        try:
            (answer,) = self.chain.rpc.batch([deposit_authorization_read(payment)])
        except (ChainUnavailable, RpcFailure) as exc:
            raise _rpc_down() from exc
        used = deposit_authorization_used(payment, answer)
        if used is None:
            raise ApiError(
                503, RPC_READ_FAILED, "the deposit's authorization could not be read; nothing was charged"
            )
        tx = "" if used else self._send_deposit(payment)  # used: only the balance counts now
        view = self._view(hold.channel)
        try:
            self.channels.sync(hold.channel, view)
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc
        state = replace(hold.state, balance=view.balance, claimed=max(view.claimed, hold.state.claimed))
        if payment.voucher.max_claimable > view.balance:
            raise PaymentRequired(
                reject(
                    DEPOSIT_TRANSACTION_FAILED,
                    f"the channel's balance ({view.balance}) does not cover the voucher after the deposit",
                )
            )
        return replace(hold, state=state, deposit_tx=tx)

    def _send_deposit(self, payment: BatchPayment) -> str:
        assert payment.deposit is not None
        amount, token = payment.deposit.amount, payment.config.token
        settlement = self.send(
            deposit_calldata(payment),
            lambda receipt: deposit_logged(receipt, token, amount),
            DEPOSIT_SIMULATION_FAILED,
            DEPOSIT_TRANSACTION_FAILED,
        )
        metrics.payment_outcome("deposited")
        note(deposit_tx=settlement.tx_hash, deposit=amount)
        return settlement.tx_hash

    def send(
        self,
        calldata: bytes,
        shows: Callable[[dict[str, Any]], bool],
        simulation_failed: str,
        transaction_failed: str,
    ) -> Settlement:
        """Send ``calldata`` to the escrow from one of our relayers and wait for the chain: the
        settled ``Settlement`` once ``shows(receipt)``. Raises ``PaymentRequired`` with
        ``simulation_failed`` (it would revert: nothing sent) or ``transaction_failed`` (it
        reverted), ``ApiError`` 503 when RPC or Redis fail or the transaction is not decided yet."""
        relayer = self.settler.pick()
        try:
            preflight = self.chain.send_preflight(BATCH_SETTLEMENT_ADDRESS, calldata, relayer)
        except ChainUnavailable as exc:
            raise _rpc_down() from exc
        if not preflight.verdict:
            raise PaymentRequired(reject(simulation_failed, preflight.verdict.detail))
        proof = Proof(shows, lambda tx_hash: Settlement(FAILED, tx_hash, transaction_failed))
        try:
            settlement = send_to_escrow(
                self.settler, self.channels.ledger, self.chain_id, relayer, preflight, proof
            )
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc
        if settlement.outcome == SETTLED:
            return settlement
        if settlement.outcome == FAILED:
            raise PaymentRequired(
                reject(transaction_failed, f"the transaction {settlement.tx_hash} reverted")
            )
        raise ApiError(
            503,
            "transaction_pending",
            f"the transaction {settlement.tx_hash or ''} was sent and is not decided yet; send the same "
            "header again shortly",
            {"Retry-After": "5"},
        )

    def refund(self, quote: Quote, payment: BatchPayment) -> Refunded:
        """A cooperative refund (a ``refund`` payload: a zero-charge voucher for exactly what was
        charged, signed by the payer): claim what was charged and return ``payment.refund_amount``
        (None: all) of the rest to the payer, in one ``multicall`` from our relayer under our
        receiver authorizer's ``Refund`` signature. The channel is held meanwhile. Raises
        ``PaymentRequired`` (``refund_no_balance`` when nothing or less than asked is left; the
        corrective 402 for a stale voucher) or ``ApiError``."""
        requirement = self.requirement(quote)
        refusal = match_requirement(payment, requirement)
        if not refusal:
            raise PaymentRequired(refusal)
        signed = self._signed(payment, requirement)
        hold_id = secrets.token_hex(16)
        until = time.time() + self.max_timeout_seconds
        state = self._hold(payment, hold_id, int(until), 0, signed, 0)
        try:
            voucher = (state.charged, payment.voucher.signature)  # the payer's own, fresh
            return self._give_back(payment.config, state, voucher, payment.refund_amount)
        finally:
            self._let_go(payment.voucher.channel_id, hold_id)

    def refund_channel(self, stored: StoredChannel) -> Refunded:
        """The operator's refund of a channel (``x402-proxy channels refund``, and idle channels):
        what was charged is claimed with the latest voucher we hold, and all the rest goes back to
        the payer, in one ``multicall``; the channel is held meanwhile. Raises ``PaymentRequired``
        (``channel_busy``; ``refund_no_balance`` when nothing is left), ``ApiError``, ``ValueError``
        (a stored record that is not ours to claim)."""
        config = config_of(stored)
        if channel_id(config, self.chain_id) != stored.channel_id:
            raise ValueError("the stored config does not hash to the channel id")
        signature = bytes.fromhex(stored.signature.removeprefix("0x"))
        if stored.charged > stored.claimed and (not signature or stored.signed < stored.charged):
            raise ValueError("no stored voucher covers what was charged")
        hold_id = secrets.token_hex(16)
        until = int(time.time()) + self.max_timeout_seconds
        try:  # a zero-charge hold: it only keeps calls off the channel while it is refunded
            state = self.channels.hold(stored.channel_id, hold_id, until, 0, stored.charged, signature)
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc
        if state.status != HELD:
            raise PaymentRequired(reject(CHANNEL_BUSY, f"the channel is {state.status}; try again later"))
        try:
            return self._give_back(config, state, (stored.signed, signature), None)
        finally:
            self._let_go(stored.channel_id, hold_id)

    def _let_go(self, channel: bytes, hold_id: str) -> None:
        """Give the channel back (a hold whose end is noted by its caller, if at all)."""
        try:
            self.channels.release(channel, hold_id)
        except STORE_ERRORS as exc:  # the hold lapses at its time
            log.warning("could not release a refunded channel: %s", type(exc).__name__)

    def _give_back(
        self, config: ChannelConfig, state: ChannelState, voucher: tuple[int, bytes], requested: int | None
    ) -> Refunded:
        """Claim what was charged (``state.charged``, with ``voucher``: its cumulative amount and
        signature) and return ``requested`` (None: all) of the rest to the payer, in one transaction.
        Raises ``PaymentRequired`` (``refund_no_balance``, a reverted or refused refund) or
        ``ApiError``."""
        channel, charged = channel_id(config, self.chain_id), state.charged
        view = self._view(channel)
        left = view.balance - max(charged, view.claimed)
        amount = left if requested is None else requested
        if left <= 0 or amount > left:
            raise PaymentRequired(
                reject(REFUND_NO_BALANCE, f"the channel has {max(left, 0)} atomic units left to refund")
            )
        calls = []
        if charged > view.claimed:  # the charges are claimed first
            signed, signature = voucher
            claim = VoucherClaim(config, signed, signature, charged)
            digest = claim_batch_digest([(channel, signed, charged)], self.chain_id)
            calls.append(claim_calldata([claim], sign_digest(self.authorizer_key, digest)))
        digest = refund_digest(channel, view.refund_nonce, amount, self.chain_id)
        calls.append(
            refund_calldata(config, amount, view.refund_nonce, sign_digest(self.authorizer_key, digest))
        )
        token, payer = config.token, config.payer
        try:  # whatever becomes of the refund, the next call reads the chain's balance first
            self.channels.mark_stale(channel)
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc
        settlement = self.send(
            multicall_calldata(calls) if len(calls) > 1 else calls[0],
            lambda receipt: escrow_moved(receipt, token, amount, to=payer, from_=BATCH_SETTLEMENT_ADDRESS),
            REFUND_SIMULATION_FAILED,
            REFUND_TRANSACTION_FAILED,
        )
        after = self._view(channel)
        try:
            self.channels.sync(channel, after)
        except STORE_ERRORS:  # marked stale before the refund was sent: the next call reads the chain
            log.warning("could not record a refund's channel state")
        state = replace(state, balance=after.balance, claimed=after.claimed, refund_nonce=after.refund_nonce)
        note(outcome="refunded", refunded=amount, tx=settlement.tx_hash)
        metrics.REFUNDED.inc(amount)
        if len(calls) > 1:  # its claim landed with it
            metrics.CLAIMED.inc(charged - view.claimed)
        return Refunded(amount, settlement.tx_hash, state)

    def refund_header(self, payment: BatchPayment, refunded: Refunded) -> tuple[str, str]:
        """(``PAYMENT-RESPONSE``, value) of a refund: its transaction, ``amount`` refunded (atomic
        units) and ``extra.channelState`` after it."""
        extra = {"channelState": self._channel_state(payment.voucher.channel_id, refunded.state)}
        response = SettleResponse(
            True,
            refunded.tx,
            self.settings.network.caip2,
            payment.config.payer,
            amount=refunded.amount,
            extra=extra,
        )
        return RESPONSE_HEADERS[2], response.to_header()

    def release(self, hold: ChannelHold) -> None:
        """The call failed before an answer went out: the channel is free again, uncharged (the
        client's next voucher is the same cumulative)."""
        self._let_go(hold.channel, hold.hold_id)
        note(outcome="released")

    def commit(self, hold: ChannelHold, usage: Usage | None) -> VoucherCharge:
        """Charge the call its usage price (at least the model's floor, at most the maximum) on its
        channel. A lapsed hold (the call outlived it) or a Redis failure charges nothing (``state``
        None)."""
        quote = hold.quote
        amount = charge(quote.model, usage, quote.amount)
        try:
            state = self.channels.commit(
                hold.channel, hold.hold_id, amount, quote.amount, quote.model.name, hold.payer
            )
        except STORE_ERRORS as exc:
            log.error("could not charge a voucher: %s", type(exc).__name__)
            return VoucherCharge(amount, usage, None)
        if state.status != "committed":
            return VoucherCharge(amount, usage, None)
        metrics.REVENUE.labels(quote.model.name).inc(amount)
        metrics.payment_outcome("served")
        note(outcome="served", amount_charged=amount)
        return VoucherCharge(amount, usage, state)

    def response_header(self, hold: ChannelHold, charged: VoucherCharge) -> tuple[str, str]:
        """(``PAYMENT-RESPONSE``, value): success with the deposit's transaction ("" for a voucher),
        ``extra.chargedAmount`` (decimal string) and ``extra.channelState`` after the charge."""
        assert charged.state is not None
        extra = {
            "chargedAmount": str(charged.amount),
            "channelState": self._channel_state(hold.channel, charged.state),
        }
        response = SettleResponse(
            True, hold.deposit_tx, self.settings.network.caip2, hold.payer, amount=charged.amount, extra=extra
        )
        return RESPONSE_HEADERS[2], response.to_header()


def _rpc_down() -> ApiError:
    return ApiError(
        503, "rpc_unavailable", "no RPC endpoint answers; nothing was charged", {"Retry-After": "5"}
    )


def _ledger_down() -> ApiError:
    return ApiError(
        503, "ledger_unavailable", "payment ledger unavailable; nothing was charged", {"Retry-After": "5"}
    )
