"""Settlement: submit the payer's authorization from our relayer account and confirm it on chain.

A payment is settled only when our receipt has status 1 **and** the token's ``Transfer(from, payTo,
value)`` log. The transaction hash is recorded (``on_signed``) before the transaction is broadcast,
so a crash or a late receipt leaves a *pending* payment with its hash, never a second broadcast.
Relayer account nonces come from a Redis counter shared by every worker and host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from flask import Flask, current_app

from .chain import Chain, ChainUnavailable, Preflight, RpcError, RpcFailure, transfer_logged
from .ledger import Ledger
from .settings import Settings
from .x402.verdict import SETTLEMENT_PENDING, TRANSACTION_FAILED
from .x402.wire import Authorization

GAS_HEADROOM_NUMERATOR, GAS_HEADROOM_DENOMINATOR = 5, 4  # 25% over the estimate
MIN_PRIORITY_FEE = 1_000_000  # 0.001 gwei: Base's usual tip floor
# Node answers that mean the transaction is already in the pool: it was broadcast.
ALREADY_SENT = ("already known", "known transaction", "already imported")

SETTLED, FAILED, PENDING, NOT_SENT = "settled", "failed", "pending", "not_sent"
MAX_FEE_BUMPS = 3


def bumped_fees(transaction: dict[str, Any]) -> dict[str, Any]:
    """The same transaction with both EIP-1559 fees raised by 12.5% (+1 wei): the least a node
    accepts as a replacement for a transaction with the same nonce."""
    replacement = dict(transaction)
    for field in ("maxPriorityFeePerGas", "maxFeePerGas"):
        replacement[field] = transaction[field] * 9 // 8 + 1
    return replacement


@dataclass(frozen=True)
class Settlement:
    """``outcome``: settled | failed (reverted, nothing moved) | pending (sent, no receipt yet) |
    not_sent (refused by the node before broadcast: nothing can move)."""

    outcome: str
    tx_hash: str = ""
    reason: str = ""


class LocalSettler:
    """Settles with our own relayer key (``X402_RELAYER_KEY``)."""

    def __init__(self, settings: Settings, chain: Chain, ledger: Ledger) -> None:
        self.settings = settings
        self.chain = chain
        self.ledger = ledger
        self.account = Account.from_key(settings.relayer_key)
        self.address = str(self.account.address)

    def settle(
        self, auth: Authorization, preflight: Preflight, on_signed: Callable[[str], None]
    ) -> Settlement:
        """Send the settlement and wait for it. ``on_signed`` records each transaction hash before
        it is broadcast (the first, and any fee-bumped replacement of it)."""
        chain_id = self.settings.network.chain_id
        nonce = self.ledger.reserve_relayer_nonce(chain_id, self.address, preflight.relayer_nonce)
        priority = max(preflight.priority_fee, MIN_PRIORITY_FEE)
        transaction = {
            "type": 2,
            "chainId": chain_id,
            "nonce": nonce,
            "to": self.chain.asset,
            "value": 0,
            "data": preflight.calldata,
            "gas": preflight.gas_estimate * GAS_HEADROOM_NUMERATOR // GAS_HEADROOM_DENOMINATOR + 10_000,
            "maxPriorityFeePerGas": priority,
            "maxFeePerGas": preflight.gas_price * 2 + priority,
        }
        sent = self._sign_and_send(transaction, on_signed)
        if isinstance(sent, Settlement):
            return sent
        return self.wait(auth, transaction, [sent], on_signed)

    def _sign_and_send(
        self, transaction: dict[str, Any], on_signed: Callable[[str], None]
    ) -> str | Settlement:
        """The tx hash once the node has it (or may have it); a ``Settlement`` when it refused it."""
        signed = self.account.sign_transaction(transaction)
        tx_hash = "0x" + bytes(signed.hash).hex()
        on_signed(tx_hash)
        try:
            answer = self.chain.send_raw_transaction(bytes(signed.raw_transaction))
        except ChainUnavailable:
            return tx_hash  # the node may have it: keep waiting, resolved from chain state at worst
        if isinstance(answer, RpcError) and not any(s in answer.message.lower() for s in ALREADY_SENT):
            self._resync_nonce()
            return Settlement(NOT_SENT, tx_hash, f"the node refused the settlement: {answer.message[:120]}")
        return tx_hash

    def wait(
        self,
        auth: Authorization,
        transaction: dict[str, Any],
        hashes: list[str],
        on_signed: Callable[[str], None],
    ) -> Settlement:
        """Poll the receipts of every version of the transaction until ``X402_RECEIPT_TIMEOUT``:
        short sleeps first (anvil and Base flashblocks answer within milliseconds), backing off to
        250 ms. Past ``X402_FEE_BUMP_AFTER`` without a receipt, replace the transaction (same
        account nonce, so only one can ever be mined) with both EIP-1559 fees raised by 12.5%."""
        start = time.monotonic()
        deadline = start + self.settings.receipt_timeout
        bump_at = start + self.settings.fee_bump_after
        pause = 0.002
        while True:
            try:
                receipts = self.chain.receipts(hashes)
            except ChainUnavailable:
                receipts = []
            for tx_hash, receipt in zip(hashes, receipts, strict=False):
                if receipt is not None:
                    if transfer_logged(receipt, self.chain.asset, auth):
                        return Settlement(SETTLED, tx_hash)
                    return self._preempted_or_failed(auth, tx_hash)
            now = time.monotonic()
            if now >= deadline:
                return Settlement(PENDING, hashes[-1], SETTLEMENT_PENDING)
            if now >= bump_at and len(hashes) <= MAX_FEE_BUMPS:
                transaction = bumped_fees(transaction)
                replacement = self._sign_and_send(transaction, on_signed)
                if isinstance(replacement, str):
                    hashes.append(replacement)
                bump_at = now + self.settings.fee_bump_after
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def _preempted_or_failed(self, auth: Authorization, tx_hash: str) -> Settlement:
        """Our transaction did not move the money. If someone else's did (they submitted the same
        authorization first), the payment is settled all the same, by their transaction."""
        try:
            other = self.chain.find_settlement(auth)
        except (ChainUnavailable, RpcFailure):
            return Settlement(PENDING, tx_hash, SETTLEMENT_PENDING)  # decided later from chain state
        if other is not None:
            return Settlement(SETTLED, other)
        return Settlement(FAILED, tx_hash, TRANSACTION_FAILED)

    def _resync_nonce(self) -> None:
        try:
            pending = self.chain.pending_nonce(self.address)
        except Exception:
            return
        self.ledger.resync_relayer_nonce(self.settings.network.chain_id, self.address, pending)


def init_app(app: Flask) -> None:
    from .chain import get_chain
    from .ledger import get_ledger

    with app.app_context():
        app.extensions["x402.settler"] = LocalSettler(app.config["X402_SETTINGS"], get_chain(), get_ledger())


def get_settler() -> LocalSettler:
    settler: LocalSettler = current_app.extensions["x402.settler"]
    return settler
