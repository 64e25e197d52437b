"""``batch-settlement`` charges onto the chain, and the money to payTo: the receiver's side of the
escrow (``specs/schemes/batch-settlement/scheme_batch_settlement_evm.md``, "Claim" and "Settle";
``contracts/x402BatchSettlement.sol``).

The hot path (``app.payments.batch``) only adds each call's price to its channel's ``charged`` in
Redis and keeps the payer's latest voucher. ``Claims.claim`` turns what was charged and not yet
claimed into ``claimWithSignature`` transactions: at most ``MAX_CLAIMS_PER_BATCH`` channels each,
every entry ``(voucher, signature, totalClaimed = charged)``, signed as one ``ClaimBatch`` by our
receiver authorizer and sent from one of our relayers. ``Claims.settle`` then sweeps the escrow's
``receivers(payTo, token)`` (claimed minus settled) to payTo with ``settle(payTo, token)``.

Money paths fail closed. Before a batch is built the chain's view of each channel is read and
recorded (``Channels.sync``), so a channel someone already claimed drops out; a claim lands only on
a receipt with status 1 *and* the escrow's ``Claimed`` logs (status 1 without them is an RPC fault,
``ReceiptContradiction``); a settle only with the token's ``Transfer(escrow → payTo)``. A claim whose
transaction has no receipt yet is recorded (relayer and account nonce, before it is broadcast, and
its hashes) and not sent again until that nonce is used on chain or ``PENDING_GIVE_UP_SECONDS``
passed: the escrow skips a stale entry, so a second claim would only waste gas, but it is not sent
blindly either.

``ClaimLoop`` runs both on a schedule, one cycle at a time per deployment: each worker process polls
(``ensure_running``, lazily, like ``app.payments.outbox``), and the cycle runs in whichever process
takes ``keys.CLAIMS_KEY`` first. That one key holds the lock (``owner``), the deployment's schedule
(``claim_at``, ``settle_at``: unix milliseconds) and the claim transaction still pending; every
change to it is a compare-and-swap of its whole value, so two processes can never both hold it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from eth_hash.auto import keccak

from app import metrics
from app.backends.chain import Chain, Preflight
from app.backends.escrow import (
    VoucherClaim,
    channel_reads,
    channel_view,
    claim_calldata,
    receivers_read,
    settle_calldata,
    words,
)
from app.backends.rpc import ChainUnavailable, is_quantity
from app.backends.store import STORE_ERRORS, Script
from app.backends.token import (
    ReceiptContradiction,
    is_log,
    transfer_topics_between,
)
from app.payments.channels import ChainView, Channels, StoredChannel
from app.payments.keys import CLAIMS_KEY
from app.payments.ledger import Ledger, text_of
from app.payments.settlement import FAILED, NOT_SENT, PENDING, SETTLED, LocalSettler, Proof, Settlement
from app.settings import Settings
from app.x402.batch_settlement import BATCH_SETTLEMENT_ADDRESS, ChannelConfig, channel_id, claim_batch_digest
from app.x402.eip712 import address_of_key, sign_digest

log = logging.getLogger("x402.claims")

MAX_CLAIMS_PER_BATCH = 100  # channels per claimWithSignature (the reference server's default batch)
VIEWS_PER_REQUEST = 100  # channels whose views (3 eth_calls each) go in one JSON-RPC batch
PENDING_GIVE_UP_SECONDS = 600  # an undecided claim blocks new claims at most this long (capped below)
STATE_KEEP_SECONDS = 7 * 86400  # the idle schedule and a pending record live this long in Redis
CLAIM_SIMULATION_FAILED = "invalid_batch_settlement_evm_claim_simulation_failed"
CLAIM_TRANSACTION_FAILED = "invalid_batch_settlement_evm_claim_transaction_failed"
SETTLE_SIMULATION_FAILED = "invalid_batch_settlement_evm_settle_simulation_failed"
SETTLE_TRANSACTION_FAILED = "invalid_batch_settlement_evm_settle_transaction_failed"
# Claimed(bytes32 indexed channelId, address indexed receiver, address indexed token,
#         uint128 totalClaimed, uint128 delta): the escrow's log of one entry that moved
CLAIMED_TOPIC = "0x" + keccak(b"Claimed(bytes32,address,address,uint128,uint128)").hex()


class ClaimsLockLost(RuntimeError):
    """This process no longer holds ``CLAIMS_KEY`` (it expired, or another process took it after
    it expired): the cycle stops before sending anything more."""


# --- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimTx:
    """One claim (or settle) transaction: its hash, outcome (``settled``, ``failed``, ``pending``,
    ``not_sent``), how many channels it claimed, the amount it moved (atomic units, from the escrow's
    logs; 0 unless settled) and the receipt's ``gasUsed`` (0 without a receipt)."""

    tx_hash: str
    outcome: str
    channels: int
    amount: int
    gas_used: int
    reason: str = ""


@dataclass(frozen=True)
class ClaimRun:
    """What one ``claim`` did: the channels and amount (atomic units) claimed on chain, its
    transactions, the channels it could not claim (``skipped``: one line each, why) and, when a
    claim of an earlier cycle is still undecided, a description of it (``waiting``, "" none)."""

    channels: int = 0
    amount: int = 0
    transactions: tuple[ClaimTx, ...] = ()
    skipped: tuple[str, ...] = ()
    waiting: str = ""

    @property
    def tx_hashes(self) -> tuple[str, ...]:
        return tuple(tx.tx_hash for tx in self.transactions if tx.tx_hash)

    @property
    def gas_used(self) -> int:
        """Gas of every mined claim transaction of this run (units of gas)."""
        return sum(tx.gas_used for tx in self.transactions)

    @property
    def failed(self) -> bool:
        """A transaction reverted, was not sent or is still pending."""
        return any(tx.outcome != SETTLED for tx in self.transactions)


@dataclass(frozen=True)
class SettleRun:
    """What one ``settle`` did: the amount swept to payTo (atomic units, from the token's
    ``Transfer`` log) and its transaction (None when nothing was outstanding)."""

    amount: int = 0
    transaction: ClaimTx | None = None

    @property
    def failed(self) -> bool:
        return self.transaction is not None and self.transaction.outcome != SETTLED


# --- what a sent claim leaves behind --------------------------------------------------------------


class SendRecord(Protocol):
    """Where ``Claims.claim`` records its transactions while they are in flight (``CLAIMS_KEY``)."""

    def renew(self) -> None:
        """Right before a transaction is built: still ours (raises ``ClaimsLockLost`` if not)."""
        ...

    def sending(self, relayer: str, nonce: int) -> None:
        """The claim about to be broadcast from ``relayer`` with account ``nonce``."""
        ...

    def replaced(self, tx_hash: str) -> None:
        """A fee-bumped replacement ``tx_hash`` about to be broadcast."""
        ...

    def decided(self, settlement: Settlement) -> None:
        """The claim's outcome: anything but ``pending`` clears the record."""
        ...


class _NoRecord:
    def renew(self) -> None:
        return None

    def sending(self, relayer: str, nonce: int) -> None:
        return None

    def replaced(self, tx_hash: str) -> None:
        return None

    def decided(self, settlement: Settlement) -> None:
        return None


# --- claims and settles -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One channel to claim: the stored channel, its config, the chain's view just read, and the
    claimed total to set (``total``, atomic units: what was charged, within the balance)."""

    stored: StoredChannel
    config: ChannelConfig
    view: ChainView
    total: int

    @property
    def withdrawing(self) -> bool:
        return self.view.withdraw_at > 0 or self.stored.withdraw_at > 0

    @property
    def own_signer(self) -> bool:
        """The payer signs its vouchers itself (``payerAuthorizer`` zero): SignatureChecker's
        answer, EIP-1271 for a wallet, can change between a simulation and the transaction."""
        return int(self.config.payer_authorizer, 16) == 0


def config_of(stored: StoredChannel) -> ChannelConfig:
    """The ``ChannelConfig`` of a stored channel (its ``channelConfig`` JSON, as the client sent
    it); ``ValueError`` (or ``KeyError``) for a config that is not one."""
    raw = stored.config
    salt = bytes.fromhex(str(raw["salt"]).removeprefix("0x"))
    if len(salt) != 32:
        raise ValueError("salt is not 32 bytes")
    return ChannelConfig(
        payer=str(raw["payer"]).lower(),
        payer_authorizer=str(raw["payerAuthorizer"]).lower(),
        receiver=str(raw["receiver"]).lower(),
        receiver_authorizer=str(raw["receiverAuthorizer"]).lower(),
        token=str(raw["token"]).lower(),
        withdraw_delay=int(raw["withdrawDelay"]),
        salt=salt,
    )


class Claims:
    """Claims and settles for one proxy: its channels (``channels``), chain, relayers (``settler``)
    and receiver authorizer (``authorizer_key``, 32 bytes: signs the ``ClaimBatch``)."""

    def __init__(
        self,
        settings: Settings,
        channels: Channels,
        chain: Chain,
        settler: LocalSettler,
        authorizer_key: bytes,
    ) -> None:
        self.settings = settings
        self.channels = channels
        self.chain = chain
        self.settler = settler
        self.authorizer_key = authorizer_key
        self.authorizer = address_of_key(authorizer_key).lower()
        # the operator's refund of one channel (``BatchGate.refund_channel``), for idle channels
        self.refund: Callable[[StoredChannel], Any] | None = None

    @classmethod
    def of(cls, batch: Any) -> Claims:
        """The claims of a ``BatchGate`` (its settings, channels, chain, settler and key, and its
        ``refund_channel`` for idle channels)."""
        claims = cls(batch.settings, batch.channels, batch.chain, batch.settler, batch.authorizer_key)
        claims.refund = batch.refund_channel
        return claims

    def refund_idle(self) -> tuple[Refund, ...]:
        """Give back the unused balance of every channel idle for ``X402_IDLE_REFUND_SECONDS``
        (no charge since; what was charged is claimed in the same transaction), unless a
        withdrawal is pending (the payer leaves alone). A channel that cannot be refunded now is
        logged and tried again next cycle. Raises ``redis.RedisError``."""
        if self.refund is None:
            return ()
        done: list[Refund] = []
        idle_since = time.time() - self.settings.idle_refund_seconds
        for stored in self.channels.every():
            if stored.updated > idle_since or stored.withdraw_at or stored.balance <= stored.charged:
                continue
            try:
                refunded = self.refund(stored)
            except Exception as exc:  # refused, busy, no RPC: this channel waits for the next cycle
                log.warning("idle channel 0x%s not refunded: %s", stored.channel_id.hex(), exc)
                continue
            done.append(Refund(stored.channel_id, refunded.amount, refunded.tx))
        return tuple(done)

    @property
    def chain_id(self) -> int:
        return self.settings.network.chain_id

    # -- claim ---------------------------------------------------------------------------------------

    def claim(self, record: SendRecord | None = None) -> ClaimRun:
        """Claim on chain every channel whose charges are not claimed yet, in batches of at most
        ``MAX_CLAIMS_PER_BATCH`` (channels with a pending withdrawal first, the earliest first),
        and record the chain's claimed totals in Redis. Stops at the first transaction that stays
        undecided or was not sent. Raises ``redis.RedisError`` (Redis), ``ChainUnavailable`` (no
        RPC answers) or ``ClaimsLockLost``; a reverted claim is in the result, not raised."""
        record = record or _NoRecord()
        skipped: list[str] = []
        candidates: list[tuple[StoredChannel, ChannelConfig]] = []
        every = self.channels.every()
        metrics.CHANNELS_OPEN.set(sum(1 for stored in every if stored.balance > stored.claimed))
        unclaimed = sum(stored.unclaimed for stored in every)
        for stored in every:
            if stored.charged <= stored.claimed:
                continue
            problem, config = self._claimable(stored)
            if problem:
                log.error("channel 0x%s not claimable: %s", stored.channel_id.hex(), problem)
                skipped.append(f"0x{stored.channel_id.hex()}: {problem}")
                continue
            assert config is not None
            candidates.append((stored, config))
        entries = self._entries(candidates, skipped)
        entries.sort(key=lambda e: (not e.withdrawing, e.view.withdraw_at or e.stored.withdraw_at, -e.total))
        # A payer that signs its own vouchers (payerAuthorizer zero) may be a wallet contract whose
        # EIP-1271 answer differs between our simulation and the real transaction: its claim could
        # revert a whole batch. Such channels are claimed one per transaction; the others batched.
        batches = [[e] for e in entries if e.own_signer]
        ecdsa = [e for e in entries if not e.own_signer]
        batches += [ecdsa[i : i + MAX_CLAIMS_PER_BATCH] for i in range(0, len(ecdsa), MAX_CLAIMS_PER_BATCH)]
        run = ClaimRun(skipped=tuple(skipped))
        for batch in sorted(batches, key=lambda b: (not b[0].withdrawing, b[0].view.withdraw_at)):
            sent, stop = self._claim_batch(batch, record)
            run = ClaimRun(
                run.channels + sent.channels,
                run.amount + sent.amount,
                run.transactions + sent.transactions,
                run.skipped + sent.skipped,
            )
            if stop:
                break
        metrics.CHANNELS_UNCLAIMED.set(max(unclaimed - run.amount, 0))
        return run

    def _claimable(self, stored: StoredChannel) -> tuple[str, ChannelConfig | None]:
        """Why the stored channel cannot be claimed by us ("" when it can), and its config."""
        if stored.closed:
            return f"closed ({stored.closed})", None
        if not stored.signature:
            return "no voucher signature stored", None
        try:
            bytes.fromhex(stored.signature.removeprefix("0x"))
        except ValueError:
            return "stored voucher signature is not hex", None
        if stored.signed < stored.charged:
            return f"the stored voucher ({stored.signed}) is below what was charged ({stored.charged})", None
        try:
            config = config_of(stored)
        except (KeyError, ValueError, TypeError) as exc:
            return f"stored config unreadable ({exc})", None
        if channel_id(config, self.chain_id) != stored.channel_id:
            return "stored config does not hash to the channel id", None
        if config.receiver_authorizer != self.authorizer:
            return f"its receiver authorizer {config.receiver_authorizer} is not ours", None
        return "", config

    def _entries(
        self, candidates: list[tuple[StoredChannel, ChannelConfig]], skipped: list[str]
    ) -> list[_Entry]:
        """The chain's view of each candidate (recorded in Redis); those still owed a claim."""
        entries: list[_Entry] = []
        for start in range(0, len(candidates), VIEWS_PER_REQUEST):
            chunk = candidates[start : start + VIEWS_PER_REQUEST]
            views = self.views([stored.channel_id for stored, _ in chunk])
            for (stored, config), view in zip(chunk, views, strict=True):
                self.channels.sync(stored.channel_id, view)
                total = min(stored.charged, view.balance)
                if stored.charged > view.balance:
                    note = f"charged {stored.charged} but the channel's balance is {view.balance}"
                    log.error("channel 0x%s: %s: claiming the balance", stored.channel_id.hex(), note)
                    skipped.append(f"0x{stored.channel_id.hex()}: {note} (the rest is lost)")
                if total > view.claimed:
                    entries.append(_Entry(stored, config, view, total))
        return entries

    def views(self, channel_ids: Sequence[bytes]) -> list[ChainView]:
        """``channels(id)``, ``pendingWithdrawals(id)`` and ``refundNonce(id)`` of each channel, in one
        JSON-RPC batch. Raises ``ChainUnavailable`` (also for an answer that is not the escrow's)."""
        if not channel_ids:
            return []
        calls = [call for channel in channel_ids for call in channel_reads(channel)]
        answers = self.chain.rpc.batch(calls)
        views: list[ChainView] = []
        for index in range(len(channel_ids)):
            view = channel_view(answers[3 * index : 3 * index + 3])
            if view is None:
                raise ChainUnavailable("the escrow's channel views could not be read")
            views.append(view)
        return views

    def _claim_batch(self, entries: list[_Entry], record: SendRecord) -> tuple[ClaimRun, bool]:
        """Send one ``claimWithSignature`` for ``entries``; a batch the escrow refuses (in its
        simulation, or mined) is claimed apart until the entry that fails it is found, and that
        channel closed (``_closed``). Returns what moved and whether the cycle must stop (a claim
        undecided or not sent)."""
        if not entries:
            return ClaimRun(), False
        claims = [
            VoucherClaim(
                e.config, e.stored.signed, bytes.fromhex(e.stored.signature.removeprefix("0x")), e.total
            )
            for e in entries
        ]
        digest = claim_batch_digest(
            [(e.stored.channel_id, e.stored.signed, e.total) for e in entries], self.chain_id
        )
        calldata = claim_calldata(claims, sign_digest(self.authorizer_key, digest))
        record.renew()
        relayer = self.settler.pick()
        preflight = self.chain.send_preflight(BATCH_SETTLEMENT_ADDRESS, calldata, relayer)
        if not preflight.verdict:
            if len(entries) > 1:
                return self._apart(entries, record, ())
            return self._closed(entries[0], f"claim refused in simulation: {preflight.verdict.detail}"), False
        seen: dict[str, Any] = {}
        expected = {e.stored.channel_id: e.total for e in entries}
        proof = Proof(
            lambda receipt: _claims_logged(receipt, expected, seen),
            lambda tx_hash: Settlement(FAILED, tx_hash, CLAIM_TRANSACTION_FAILED),
        )

        def reserve() -> int:
            nonce = self.channels.ledger.reserve_relayer_nonce(
                self.chain_id, relayer, preflight.relayer_nonce
            )
            record.sending(relayer, nonce)
            return nonce

        settlement = self.settler.send(
            relayer, BATCH_SETTLEMENT_ADDRESS, preflight, reserve, proof, record.replaced
        )
        record.decided(settlement)
        gas = _gas_used(seen.get("receipt"))
        if settlement.outcome == FAILED:  # mined and reverted although its simulation passed
            failed = (ClaimTx(settlement.tx_hash, FAILED, 0, 0, gas, settlement.reason),)
            if len(entries) > 1:
                log.error(
                    "claim of %d channels reverted in %s: claimed apart", len(entries), settlement.tx_hash
                )
                return self._apart(entries, record, failed)
            closed = self._closed(entries[0], f"claim reverted on chain in {settlement.tx_hash}")
            return ClaimRun(transactions=failed, skipped=closed.skipped), False
        if settlement.outcome != SETTLED:
            level = logging.WARNING if settlement.outcome == PENDING else logging.ERROR
            log.log(
                level,
                "claim of %d channels %s: %s %s",
                len(entries),
                settlement.outcome,
                settlement.tx_hash,
                settlement.reason,
            )
            tx = ClaimTx(settlement.tx_hash, settlement.outcome, 0, 0, gas, settlement.reason)
            return ClaimRun(transactions=(tx,)), settlement.outcome in (PENDING, NOT_SENT)
        deltas: dict[bytes, int] = seen.get("deltas", {})
        ids = [e.stored.channel_id for e in entries]
        for channel, view in zip(ids, self.views(ids), strict=True):
            self.channels.sync(channel, view)
        amount = sum(deltas.values())
        log.info(
            "claimed %d channels (%d atomic units) in %s, gas %d",
            len(deltas),
            amount,
            settlement.tx_hash,
            gas,
        )
        metrics.CLAIM_BATCHES.inc()
        metrics.CLAIMED.inc(amount)
        tx = ClaimTx(settlement.tx_hash, SETTLED, len(deltas), amount, gas)
        return ClaimRun(len(deltas), amount, (tx,)), False

    def _apart(
        self, entries: list[_Entry], record: SendRecord, failed: tuple[ClaimTx, ...]
    ) -> tuple[ClaimRun, bool]:
        """A batch the escrow refused (in simulation, or mined: ``failed``), claimed in halves until
        the entry that fails it is found and its channel closed; the others are claimed."""
        half = len(entries) // 2
        first, stop = self._claim_batch(entries[:half], record)
        if not stop:
            second, stop = self._claim_batch(entries[half:], record)
            first = _joined(first, second)
        return _joined(ClaimRun(transactions=failed), first), stop

    def _closed(self, entry: _Entry, why: str) -> ClaimRun:
        """A channel whose claim the escrow refuses: it takes no more calls (``Channels.close``);
        what it was charged since its last claim is lost, and logged."""
        channel = "0x" + entry.stored.channel_id.hex()
        log.error("channel %s closed: %s (%d atomic units not claimable)", channel, why, entry.total)
        self.channels.close(entry.stored.channel_id, why)
        return ClaimRun(skipped=(f"{channel}: {why}; the channel is closed",))

    # -- settle --------------------------------------------------------------------------------------

    def outstanding(self) -> tuple[int, int]:
        """``receivers(payTo, token)``: (totalClaimed, totalSettled), atomic units. Raises
        ``ChainUnavailable``."""
        (answer,) = self.chain.rpc.batch([receivers_read(self.settings.pay_to, self.settings.asset)])
        totals = words(answer, 2)
        if totals is None:
            raise ChainUnavailable("the escrow's receivers() could not be read")
        return totals[0], totals[1]

    def settle(self, record: SendRecord | None = None) -> SettleRun:
        """Sweep what was claimed for payTo and not yet settled to payTo: ``settle(payTo, token)``,
        confirmed by the token's ``Transfer(escrow → payTo)`` in its receipt. Nothing outstanding:
        nothing sent. Raises ``ChainUnavailable``, ``redis.RedisError`` or ``ClaimsLockLost``."""
        record = record or _NoRecord()
        claimed, settled = self.outstanding()
        if claimed <= settled:
            return SettleRun()
        expected = claimed - settled
        pay_to, token = self.settings.pay_to, self.settings.asset
        calldata = settle_calldata(pay_to, token)
        record.renew()
        relayer = self.settler.pick()
        preflight = self.chain.send_preflight(BATCH_SETTLEMENT_ADDRESS, calldata, relayer)
        if not preflight.verdict:
            log.error("settle refused in simulation: %s", preflight.verdict.detail)
            return SettleRun(
                0, ClaimTx("", FAILED, 0, 0, 0, f"{SETTLE_SIMULATION_FAILED}: {preflight.verdict.detail}")
            )
        seen: dict[str, Any] = {}
        proof = Proof(
            lambda receipt: _settle_logged(receipt, token, pay_to, expected, seen),
            lambda tx_hash: Settlement(FAILED, tx_hash, SETTLE_TRANSACTION_FAILED),
        )
        settlement = send_to_escrow(
            self.settler, self.channels.ledger, self.chain_id, relayer, preflight, proof
        )
        gas = _gas_used(seen.get("receipt"))
        amount = int(seen.get("amount", 0)) if settlement.outcome == SETTLED else 0
        if settlement.outcome == SETTLED:
            log.info("settled %d atomic units to %s in %s", amount, pay_to, settlement.tx_hash)
        else:
            log.error("settle %s: %s %s", settlement.outcome, settlement.tx_hash, settlement.reason)
        return SettleRun(
            amount, ClaimTx(settlement.tx_hash, settlement.outcome, 0, amount, gas, settlement.reason)
        )


def send_to_escrow(
    settler: LocalSettler, ledger: Ledger, chain_id: int, relayer: str, preflight: Preflight, proof: Proof
) -> Settlement:
    """Send the preflight's calldata to the escrow from ``relayer`` with its next account nonce
    (reserved in Redis) and wait until ``proof`` decides it (``LocalSettler.send``)."""

    def reserve() -> int:
        return ledger.reserve_relayer_nonce(chain_id, relayer, preflight.relayer_nonce)

    return settler.send(relayer, BATCH_SETTLEMENT_ADDRESS, preflight, reserve, proof, lambda _tx: None)


def _joined(first: ClaimRun, second: ClaimRun) -> ClaimRun:
    return ClaimRun(
        first.channels + second.channels,
        first.amount + second.amount,
        first.transactions + second.transactions,
        first.skipped + second.skipped,
    )


def _gas_used(receipt: dict[str, Any] | None) -> int:
    if not isinstance(receipt, dict):
        return 0
    try:
        return int(str(receipt.get("gasUsed", "0x0")), 16)
    except ValueError:
        return 0


def _claims_logged(receipt: dict[str, Any], expected: dict[bytes, int], seen: dict[str, Any]) -> bool:
    """For the receipt of our ``claimWithSignature``: False when it reverted; True when it holds the
    escrow's ``Claimed`` log of at least one entry, each at the total we claimed (an entry without
    one was stale: claimed already). Status 1 without any, or with another total, is an RPC fault
    (``ReceiptContradiction``): the channels were read just before and no one else claims them.
    Fills ``seen`` with the receipt and each channel's claimed increase (atomic units)."""
    seen["receipt"] = receipt
    if receipt.get("status") == "0x0":
        return False
    escrow = BATCH_SETTLEMENT_ADDRESS.lower()
    deltas: dict[bytes, int] = {}
    for entry in receipt.get("logs", []):
        topics = [str(topic).lower() for topic in entry.get("topics", [])]
        if str(entry.get("address", "")).lower() != escrow or not topics or topics[0] != CLAIMED_TOPIC:
            continue
        channel = bytes.fromhex(topics[1][2:]) if len(topics) == 4 else b""
        values = words(entry.get("data"), 2)
        if channel not in expected or values is None or values[0] != expected[channel]:
            raise ReceiptContradiction(f"{receipt.get('transactionHash')} claims what we did not send")
        deltas[channel] = values[1]
    if not deltas:
        raise ReceiptContradiction(f"{receipt.get('transactionHash')} does not show the claim")
    seen["deltas"] = deltas
    return True


def _settle_logged(
    receipt: dict[str, Any], token: str, pay_to: str, expected: int, seen: dict[str, Any]
) -> bool:
    """For the receipt of our ``settle``: False when it reverted; True when it holds the token's
    ``Transfer(escrow → payTo)`` (``seen["amount"]``: its value; ``expected`` unless a claim landed
    in between). Status 1 without it is an RPC fault (``ReceiptContradiction``)."""
    seen["receipt"] = receipt
    if receipt.get("status") == "0x0":
        return False
    topics = transfer_topics_between(BATCH_SETTLEMENT_ADDRESS, pay_to)
    for entry in receipt.get("logs", []):
        value = words(entry.get("data"), 1)
        if is_log(entry, token, topics) and value is not None and value[0] > 0:
            if value[0] != expected:
                log.warning("settle moved %d, %d was outstanding when read", value[0], expected)
            seen["amount"] = value[0]
            return True
    raise ReceiptContradiction(f"{receipt.get('transactionHash')} does not show the settle's transfer")


# --- one cycle at a time per deployment ----------------------------------------------------------

# KEYS[1] the claims key. ARGV[1] the value expected there ("" absent), [2] the new value ("" delete),
# [3] its time to live (ms). Compare-and-swap of the whole value: 1 done, 0 it was not the expected.
_SWAP = Script(
    """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
""",
    fenced=False,
)


@dataclass(frozen=True)
class Refund:
    """An idle channel's unused balance returned to its payer: ``amount`` atomic units, ``tx``."""

    channel: bytes
    amount: int
    tx: str


@dataclass(frozen=True)
class Cycle:
    """One cycle's outcome: ``status`` is ``ran``, ``busy`` (another process holds the lock: it
    names the owner) or ``waiting`` (nothing due yet); ``claimed`` and ``settled`` what ran."""

    status: str
    claimed: ClaimRun | None = None
    settled: SettleRun | None = None
    owner: str = ""
    refunded: tuple[Refund, ...] = ()  # idle channels given back this cycle

    @property
    def failed(self) -> bool:
        return bool((self.claimed and self.claimed.failed) or (self.settled and self.settled.failed))


@dataclass
class _Held:
    """The claims key while this process holds it: its value as last written by us (``raw``) and
    that value decoded (``state``). Every write is a swap from ``raw``, renewing ``lock_ms``."""

    loop: ClaimLoop
    raw: str
    state: dict[str, Any]

    def write(self, ttl_ms: int) -> bool:
        new = json.dumps(self.state, sort_keys=True)
        done = bool(int(_SWAP(self.loop.redis, [CLAIMS_KEY], [self.raw, new, ttl_ms])))
        if done:
            self.raw = new
        return done

    def renew(self) -> None:
        if not self.write(self.loop.lock_ms):
            raise ClaimsLockLost("the claims lock was lost (it expired): nothing more is sent")

    def sending(self, relayer: str, nonce: int) -> None:
        # the nonce is reserved already: the transaction goes out even if the record cannot be written
        self.state["pending"] = {"relayer": relayer, "nonce": nonce, "since": _now_ms(), "hashes": []}
        if not self.write(self.loop.lock_ms):
            log.warning(
                "the claims lock was lost; the claim from %s (nonce %d) is not recorded", relayer, nonce
            )

    def replaced(self, tx_hash: str) -> None:
        pending = self.state.get("pending")
        if isinstance(pending, dict):
            pending["hashes"].append(tx_hash)
            if not self.write(self.loop.lock_ms):
                log.warning("the claims lock was lost while a claim is in flight: %s", tx_hash)

    def decided(self, settlement: Settlement) -> None:
        pending = self.state.get("pending")
        if settlement.outcome == PENDING and isinstance(pending, dict):
            if settlement.tx_hash and settlement.tx_hash not in pending["hashes"]:
                pending["hashes"].append(settlement.tx_hash)
        else:
            self.state["pending"] = None
        if not self.write(self.loop.lock_ms):
            log.warning(
                "the claims lock was lost; a claim's outcome (%s) was not recorded", settlement.outcome
            )


class ClaimLoop:
    """The claim and settle schedule of one deployment: ``run`` does one cycle if it is due and no
    other process runs one; ``ensure_running`` starts this process's polling thread (once per
    process: a forked worker starts its own)."""

    def __init__(self, claims: Claims) -> None:
        self.claims = claims
        self.settings = claims.settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._pid = 0
        self._stop = threading.Event()
        self.last: Cycle | None = None  # this process's last cycle that ran (tests, logs)
        self.last_error: Exception | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> ClaimLoop:
        """The loop of a proxy with ``settings`` built from scratch (the CLI; no network I/O until
        used): its own Redis client, chain and relayers, the receiver authorizer ``BatchGate`` uses.
        ``ValueError`` with a facilitator (batch-settlement needs our own relayers and key)."""
        from app.payments.batch import BatchGate
        from app.payments.ledger import Ledger, connect

        if settings.facilitator_url:
            raise ValueError("batch-settlement channels are claimed by the proxy's own relayer")
        ledger = Ledger(connect(settings))
        chain = Chain(settings)
        channels = Channels(ledger, settings.network.chain_id, settings.network.caip2)
        gate = BatchGate(settings, channels, chain, LocalSettler(settings, chain, ledger))
        return cls(Claims.of(gate))

    @property
    def redis(self) -> Any:
        return self.claims.channels.ledger.redis

    @property
    def lock_ms(self) -> int:
        """How long the lock lives without renewal (ms): one transaction's wait and a few reads; it
        is renewed before every transaction."""
        settings = self.settings
        return int((settings.receipt_timeout + 4 * settings.rpc_timeout + 10) * 1000)

    @property
    def poll_seconds(self) -> float:
        """How often each process asks whether a cycle is due (seconds)."""
        return max(0.2, min(5.0, self.settings.claim_interval / 2, self.settings.settle_interval / 2))

    @property
    def give_up_ms(self) -> int:
        """How long an undecided claim blocks new ones (ms): ``PENDING_GIVE_UP_SECONDS``, at most a
        quarter of the withdraw delay."""
        return 1000 * min(PENDING_GIVE_UP_SECONDS, self.settings.withdraw_delay // 4)

    def state(self) -> dict[str, Any]:
        """The claims key as stored (``{}`` when absent). Raises ``redis.RedisError``."""
        raw = self.redis.get(CLAIMS_KEY)
        return _decoded(text_of(raw) if raw is not None else "")

    def run(self, *, claim: bool = True, settle: bool = True, force: bool = False) -> Cycle:
        """One cycle: take the lock if no process holds it and (``force``, or) a claim or settle is
        due, run what is due of ``claim`` and ``settle``, schedule the next ones and let go.
        Raises ``redis.RedisError``, ``ChainUnavailable`` or ``ClaimsLockLost`` (the lock is let
        go first when Redis answers)."""
        raw_bytes = self.redis.get(CLAIMS_KEY)
        raw = text_of(raw_bytes) if raw_bytes is not None else ""
        state = _decoded(raw)
        if state.get("owner"):
            return Cycle("busy", owner=str(state["owner"]))
        now = _now_ms()
        if not force and "claim_at" not in state:  # a new deployment (or Redis lost): the first run
            # is one interval away, as if one had just run (the interval is below a quarter of the
            # withdraw delay, so no withdrawal can finalize before it)
            first = {**state, "claim_at": now + 1000 * self.settings.claim_interval}
            first["settle_at"] = now + 1000 * self.settings.settle_interval
            _Held(self, raw, first).write(1000 * STATE_KEEP_SECONDS)
            return Cycle("waiting")
        do_claim = claim and (force or now >= int(state.get("claim_at", 0)))
        do_settle = settle and (force or now >= int(state.get("settle_at", 0)))
        if not (do_claim or do_settle):
            return Cycle("waiting")
        held = _Held(self, raw, {**state, "owner": self.owner})
        if not held.write(self.lock_ms):
            return Cycle("busy")
        claimed: ClaimRun | None = None
        settled: SettleRun | None = None
        refunded: tuple[Refund, ...] = ()
        try:
            # the next run is scheduled whatever this one does: a failure is retried then, not at once
            if do_claim:
                held.state["claim_at"] = now + 1000 * self.settings.claim_interval
                claimed = self._claim(held)
                refunded = self.claims.refund_idle()
            if do_settle:
                held.state["settle_at"] = now + 1000 * self.settings.settle_interval
                settled = self.claims.settle(held)
        finally:
            held.state["owner"] = ""
            try:
                if not held.write(1000 * STATE_KEEP_SECONDS):
                    log.warning("the claims lock had expired before the cycle ended")
            except STORE_ERRORS as exc:  # it expires on its own (lock_ms)
                log.warning("could not let go of the claims lock: %s", type(exc).__name__)
        cycle = Cycle("ran", claimed, settled, self.owner, refunded)
        self.last = cycle
        return cycle

    def _claim(self, held: _Held) -> ClaimRun:
        """``Claims.claim``, unless a claim of an earlier cycle is still undecided: its relayer
        nonce not used on chain yet, for less than ``give_up_ms``."""
        pending = held.state.get("pending")
        if isinstance(pending, dict):
            (latest,) = self.claims.chain.rpc.batch(
                [("eth_getTransactionCount", [pending["relayer"], "latest"])],
                well_formed=lambda answers: is_quantity(answers[0]),
            )
            hashes = ", ".join(pending.get("hashes") or []) or f"nonce {pending['nonce']}"
            if int(latest, 16) > int(pending["nonce"]):
                held.state["pending"] = None  # mined (ours or a replacement): the views tell the rest
            elif _now_ms() - int(pending.get("since", 0)) < self.give_up_ms:
                log.warning("a claim is still pending (%s): not claiming again yet", hashes)
                return ClaimRun(waiting=f"claim pending: {hashes} from {pending['relayer']}")
            else:
                log.warning("a claim stayed pending too long (%s): claiming again", hashes)
                held.state["pending"] = None
            held.renew()
        return self.claims.claim(held)

    def ensure_running(self) -> None:
        """Start this process's polling thread unless it runs already (no I/O here)."""
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stop.clear()
        _RUNNING.add(self)
        threading.Thread(target=self._poll, name="x402-claims", daemon=True).start()

    def stop(self) -> None:
        """Stop this process's polling thread after its current cycle (tests)."""
        self._stop.set()
        with self._lock:
            self._pid = 0

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                cycle = self.run()
                self.last_error = None
                if cycle.failed:
                    log.warning("claims cycle: a transaction did not land (see above); retried next cycle")
            except Exception as exc:  # the loop must outlive Redis and RPC trouble
                self.last_error = exc
                log.warning("claims cycle failed: %s: %s; retried later", type(exc).__name__, exc)


_RUNNING: weakref.WeakSet[ClaimLoop] = weakref.WeakSet()  # the loops polling in this process


def stop_all() -> None:
    """Stop every claim loop polling in this process after its current cycle (an app being torn
    down: tests, a worker exiting)."""
    for loop in list(_RUNNING):
        loop.stop()
    _RUNNING.clear()


def _decoded(raw: str) -> dict[str, Any]:
    """The claims key's JSON value as a dict (``{}`` for absent or garbled: the lock is free and
    the schedule due)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _now_ms() -> int:
    return int(time.time() * 1000)


__all__ = [
    "MAX_CLAIMS_PER_BATCH",
    "ClaimLoop",
    "ClaimRun",
    "ClaimTx",
    "Claims",
    "ClaimsLockLost",
    "Cycle",
    "Refund",
    "SettleRun",
    "config_of",
    "stop_all",
]
