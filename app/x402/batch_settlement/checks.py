"""Offline checks of a ``batch-settlement`` voucher against our channel terms and the channel's
state, each with the scheme's reason code (``specs/schemes/batch-settlement/scheme_batch_settlement_evm.md``,
verification rules and request processing; codes as PyPI ``x402`` 2.25 ``errors.py`` spells them).

Pure: the charged total, the channel's balance and claimed total are inputs (Redis and the chain
own them); an EIP-1271 voucher signature and the deposit itself are chain checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import OfflineCheck, normalise_signature
from ..eip712 import recover_signer
from ..verdict import ACCEPTED, Verdict, reject
from ..wire import Requirement
from .payload import (
    MAX_WITHDRAW_DELAY,
    MIN_WITHDRAW_DELAY,
    ZERO_ADDRESS,
    BatchPayment,
    channel_id,
    voucher_digest,
)

# the channel config against our terms
CHANNEL_ID_MISMATCH = "invalid_batch_settlement_evm_channel_id_mismatch"
RECEIVER_MISMATCH = "invalid_batch_settlement_evm_receiver_mismatch"
RECEIVER_AUTHORIZER_MISMATCH = "invalid_batch_settlement_evm_receiver_authorizer_mismatch"
TOKEN_MISMATCH = "invalid_batch_settlement_evm_token_mismatch"
WITHDRAW_DELAY_MISMATCH = "invalid_batch_settlement_evm_withdraw_delay_mismatch"
WITHDRAW_DELAY_OUT_OF_RANGE = "invalid_batch_settlement_evm_withdraw_delay_out_of_range"
# the voucher (a cumulative mismatch is answered with the corrective 402)
INVALID_VOUCHER_SIGNATURE = "invalid_batch_settlement_evm_voucher_signature"
CUMULATIVE_AMOUNT_MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"
CUMULATIVE_BELOW_CLAIMED = "invalid_batch_settlement_evm_cumulative_below_claimed"
CUMULATIVE_EXCEEDS_BALANCE = "invalid_batch_settlement_evm_cumulative_exceeds_balance"
CHANNEL_NOT_FOUND = "invalid_batch_settlement_evm_channel_not_found"
# the server's own lifecycle (for the stateful slices; not returned here)
CHANNEL_BUSY = "invalid_batch_settlement_evm_channel_busy"
CHARGE_EXCEEDS_SIGNED_CUMULATIVE = "invalid_batch_settlement_evm_charge_exceeds_signed_cumulative"
MISSING_CHANNEL = "invalid_batch_settlement_evm_missing_channel"
VERIFICATION_STATE_UNAVAILABLE = "invalid_batch_settlement_evm_verification_state_unavailable"
DEPOSIT_BELOW_MIN_DEPOSIT = "invalid_batch_settlement_evm_deposit_below_min_deposit"
REFUND_NO_BALANCE = "invalid_batch_settlement_evm_refund_no_balance"
REFUND_AMOUNT_INVALID = "invalid_batch_settlement_evm_refund_amount_invalid"


@dataclass(frozen=True)
class ChannelTerms:
    """Our side of every channel we accept, never taken from the client: ``receiver`` (our payTo),
    ``receiver_authorizer`` (the key only the proxy holds that signs claims and refunds), ``token``
    (our asset), ``withdraw_delay`` (seconds, as offered in ``extra.withdrawDelay``), on
    ``chain_id``. Addresses in any letter case."""

    chain_id: int
    receiver: str
    receiver_authorizer: str
    token: str
    withdraw_delay: int

    @classmethod
    def of(cls, requirement: Requirement, receiver_authorizer: str, withdraw_delay: int) -> ChannelTerms:
        """The terms of a requirement: its chain, payTo and asset, with our authorizer and delay."""
        return cls(
            chain_id=requirement.chain_id,
            receiver=requirement.pay_to,
            receiver_authorizer=receiver_authorizer,
            token=requirement.asset,
            withdraw_delay=withdraw_delay,
        )


def check_config(payment: BatchPayment, terms: ChannelTerms) -> Verdict:
    """The channel is the one its config hashes to, and that config is ours: receiver,
    receiver authorizer (never zero), token, and withdraw delay (equal to ours and within the
    contract's bounds), in the order of the reference facilitator."""
    config = payment.config
    if payment.voucher.channel_id != channel_id(config, terms.chain_id):
        return reject(CHANNEL_ID_MISMATCH, "voucher.channelId is not the hash of channelConfig on this chain")
    if config.receiver != terms.receiver.lower():
        return reject(RECEIVER_MISMATCH, "channelConfig.receiver is not this resource's payTo")
    if (
        config.receiver_authorizer == ZERO_ADDRESS
        or config.receiver_authorizer != terms.receiver_authorizer.lower()
    ):
        return reject(RECEIVER_AUTHORIZER_MISMATCH, "channelConfig.receiverAuthorizer is not ours")
    if config.token != terms.token.lower():
        return reject(TOKEN_MISMATCH, "channelConfig.token is not this resource's asset")
    if config.withdraw_delay != terms.withdraw_delay:
        return reject(WITHDRAW_DELAY_MISMATCH, f"channelConfig.withdrawDelay must be {terms.withdraw_delay}")
    if not MIN_WITHDRAW_DELAY <= config.withdraw_delay <= MAX_WITHDRAW_DELAY:
        return reject(
            WITHDRAW_DELAY_OUT_OF_RANGE,
            f"withdrawDelay must be between {MIN_WITHDRAW_DELAY} and {MAX_WITHDRAW_DELAY} seconds",
        )
    return ACCEPTED


def check_amounts(
    payment: BatchPayment, *, charged: int, maximum: int, balance: int, claimed: int = 0
) -> Verdict:
    """The voucher's cumulative ``maxClaimableAmount`` (atomic units) against the channel:

    - a paid voucher (``voucher``, ``deposit``) must be exactly ``charged + maximum`` (what we
      charged on this channel so far plus this call's priced maximum); a ``refund`` voucher is
      zero-charge, exactly ``charged``. Otherwise ``cumulative_amount_mismatch``: the client's base
      is stale, and the answer is the corrective 402.
    - not below what was claimed on chain: ``claimed + maximum`` (paid) or ``claimed`` (refund);
    - the channel exists (``balance`` > 0) and the voucher is within ``balance`` — for a deposit,
      pass the on-chain balance plus the deposit's amount.
    """
    cumulative = payment.voucher.max_claimable
    paid = payment.kind != "refund"
    expected = charged + maximum if paid else charged
    if cumulative != expected:
        base = (
            f"charged so far {charged} plus this call's maximum {maximum}" if paid else f"charged {charged}"
        )
        return reject(CUMULATIVE_AMOUNT_MISMATCH, f"voucher.maxClaimableAmount must be {expected} ({base})")
    if cumulative < (claimed + maximum if paid else claimed):
        return reject(CUMULATIVE_BELOW_CLAIMED, f"voucher is below the {claimed} already claimed on chain")
    if balance <= 0:
        return reject(CHANNEL_NOT_FOUND, "the channel has no balance")
    if cumulative > balance:
        return reject(CUMULATIVE_EXCEEDS_BALANCE, f"voucher exceeds the channel's balance of {balance}")
    return ACCEPTED


def check_signed(payment: BatchPayment, terms: ChannelTerms) -> OfflineCheck:
    """``check_config``, then the voucher's signature (see ``check_voucher``); an accepting verdict
    says nothing yet about the amounts, which the channel's state decides (``check_amounts``)."""
    config_verdict = check_config(payment, terms)
    if not config_verdict:
        return OfflineCheck(config_verdict)
    signature = normalise_signature(payment.voucher.signature)
    on_chain = payment.config.payer_authorizer == ZERO_ADDRESS
    if not on_chain:
        digest = voucher_digest(payment.voucher.channel_id, payment.voucher.max_claimable, terms.chain_id)
        if len(signature) != 65 or recover_signer(digest, signature) != payment.config.payer_authorizer:
            return OfflineCheck(
                reject(
                    INVALID_VOUCHER_SIGNATURE, "the voucher is not signed by channelConfig.payerAuthorizer"
                )
            )
    return OfflineCheck(ACCEPTED, signature, ecdsa_signer=not on_chain)


def check_voucher(
    payment: BatchPayment,
    terms: ChannelTerms,
    *,
    charged: int,
    maximum: int,
    balance: int,
    claimed: int = 0,
) -> OfflineCheck:
    """Everything about a voucher that needs no I/O, in this order: ``check_config``, the signature,
    ``check_amounts`` (whose inputs are described there; integers in atomic units).

    The signature comes before the amounts so that the corrective 402, which discloses the channel's
    state and our last voucher, only answers a voucher its payer signed. With a non-zero
    ``payerAuthorizer`` the signature must be a canonical 65-byte ECDSA signature (v 27/28 or 0/1,
    low s) by that key, never a contract's, and ``ecdsa_signer`` is True. With
    the zero address the payer signs: ``ecdsa_signer`` is False with an accepting verdict, and the
    voucher holds only once the chain accepts the signature for ``config.payer`` the way
    SignatureChecker does (EIP-1271 when the payer has code, else ecrecover); that check must also
    come before a corrective 402 is sent."""
    signed = check_signed(payment, terms)
    if not signed.verdict:
        return signed
    amounts = check_amounts(payment, charged=charged, maximum=maximum, balance=balance, claimed=claimed)
    return OfflineCheck(amounts, signed.signature, ecdsa_signer=signed.ecdsa_signer)
