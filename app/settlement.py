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
        signed = self.account.sign_transaction(transaction)
        tx_hash = "0x" + bytes(signed.hash).hex()
        on_signed(tx_hash)
        try:
            answer = self.chain.send_raw_transaction(bytes(signed.raw_transaction))
        except ChainUnavailable:
            # We cannot know whether the node took it: pending, resolved later from chain state.
            return Settlement(PENDING, tx_hash, SETTLEMENT_PENDING)
        if isinstance(answer, RpcError) and not any(s in answer.message.lower() for s in ALREADY_SENT):
            self._resync_nonce()
            return Settlement(NOT_SENT, tx_hash, f"the node refused the settlement: {answer.message[:120]}")
        return self.wait(auth, tx_hash)

    def wait(self, auth: Authorization, tx_hash: str) -> Settlement:
        """Poll for the receipt until ``X402_RECEIPT_TIMEOUT``: short sleeps first (anvil and Base
        flashblocks answer within milliseconds), then backing off to 250 ms."""
        deadline = time.monotonic() + self.settings.receipt_timeout
        pause = 0.002
        while True:
            try:
                receipt = self.chain.receipt(tx_hash)
            except ChainUnavailable:
                receipt = None
            if receipt is not None:
                if transfer_logged(receipt, self.chain.asset, auth):
                    return Settlement(SETTLED, tx_hash)
                return self._preempted_or_failed(auth, tx_hash)
            if time.monotonic() >= deadline:
                return Settlement(PENDING, tx_hash, SETTLEMENT_PENDING)
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
