"""Offline checks of an ``upto`` payment against our requirement, in the order of the reference
facilitator (``specs/schemes/upto/scheme_upto_evm.md``, verification), each with its reason code.
Pure: allowance, balance, nonce and simulation are chain checks (``app.backends.chain``)."""

from __future__ import annotations

from ..checks import MAX_CLOCK_SKEW, MIN_VALIDITY_MARGIN, OfflineCheck, normalise_signature
from ..eip712 import recover_signer
from ..verdict import ACCEPTED, Verdict, reject
from ..wire import Requirement
from .payload import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS, UptoPayment, permit_digest

INVALID_SPENDER = "invalid_permit2_spender"
RECIPIENT_MISMATCH = "invalid_permit2_recipient_mismatch"
FACILITATOR_MISMATCH = "upto_facilitator_mismatch"
DEADLINE_EXPIRED = "permit2_deadline_expired"
DEADLINE_TOO_FAR = "permit2_deadline_too_far"
DEADLINE_TOO_SHORT = "permit2_deadline_too_short"
NOT_YET_VALID = "permit2_not_yet_valid"
AMOUNT_MISMATCH = "permit2_amount_mismatch"
TOKEN_MISMATCH = "permit2_token_mismatch"
INVALID_SIGNATURE = "invalid_permit2_signature"
# chain checks (app.backends.chain) and settlement
ALLOWANCE_REQUIRED = "permit2_allowance_required"
INSUFFICIENT_BALANCE = "permit2_insufficient_balance"
NONCE_USED = "permit2_nonce_already_used"
SIMULATION_FAILED = "invalid_upto_evm_transaction_simulation_failed"
TRANSACTION_FAILED = "invalid_upto_evm_transaction_failed"
PAYER_IN_DEBT = "upto_payer_in_debt"
# the eip2612GasSponsoring extension's permit (spelled as the reference facilitator spells them)
EIP2612_FROM_MISMATCH = "eip2612_from_mismatch"
EIP2612_ASSET_MISMATCH = "eip2612_asset_mismatch"
EIP2612_SPENDER = "eip2612_spender_not_permit2"
EIP2612_AMOUNT_MISMATCH = "eip2612_amount_mismatch"
EIP2612_DEADLINE = "eip2612_deadline_expired"


def _terms(payment: UptoPayment, requirement: Requirement, now: int) -> Verdict:
    auth = payment.authorization
    if auth.spender != UPTO_PROXY_ADDRESS.lower():
        return reject(INVALID_SPENDER, "permit2Authorization.spender must be the x402UptoPermit2Proxy")
    if auth.to != requirement.pay_to.lower():
        return reject(RECIPIENT_MISMATCH, "witness.to is not this resource's payTo")
    if auth.facilitator != requirement.facilitator.lower():
        return reject(FACILITATOR_MISMATCH, "witness.facilitator is not extra.facilitatorAddress")
    if auth.deadline < now + MIN_VALIDITY_MARGIN:
        return reject(DEADLINE_EXPIRED, "the permit expires too soon or has expired")
    if auth.deadline > now + requirement.max_timeout_seconds + MAX_CLOCK_SKEW:
        return reject(DEADLINE_TOO_FAR, "deadline is further ahead than maxTimeoutSeconds allows")
    if auth.deadline < now + requirement.max_timeout_seconds - MAX_CLOCK_SKEW:
        return reject(
            DEADLINE_TOO_SHORT,
            "the permit must live for the whole call and its settlement: deadline = now + maxTimeoutSeconds",
        )
    if auth.valid_after > now:
        return reject(NOT_YET_VALID, "witness.validAfter is in the future")
    if auth.amount != requirement.amount:
        return reject(AMOUNT_MISMATCH, f"permitted.amount must be exactly {requirement.amount}")
    if auth.token != requirement.asset.lower():
        return reject(TOKEN_MISMATCH, "permitted.token is not this resource's asset")
    return _permit2612_terms(payment, now)


def _permit2612_terms(payment: UptoPayment, now: int) -> Verdict:
    """The EIP-2612 permit of the ``eip2612GasSponsoring`` extension, when sent: the payer's, for
    the token, letting Permit2 spend exactly the permitted amount (``x402UptoPermit2Proxy``
    ``settleWithPermit`` requires it), valid long enough to settle."""
    permit, auth = payment.permit2612, payment.authorization
    if permit is None:
        return ACCEPTED
    if permit.owner != auth.from_:
        return reject(EIP2612_FROM_MISMATCH, "the EIP-2612 permit is not the payer's")
    if permit.asset != auth.token:
        return reject(EIP2612_ASSET_MISMATCH, "the EIP-2612 permit is for another token")
    if permit.spender != PERMIT2_ADDRESS.lower():
        return reject(EIP2612_SPENDER, "the EIP-2612 permit's spender must be Permit2")
    if permit.value != auth.amount:
        return reject(EIP2612_AMOUNT_MISMATCH, "the EIP-2612 permit's amount must equal permitted.amount")
    if permit.deadline < now + MIN_VALIDITY_MARGIN:
        return reject(EIP2612_DEADLINE, "the EIP-2612 permit expires too soon or has expired")
    return ACCEPTED


def check_permit(payment: UptoPayment, requirement: Requirement, now: int) -> OfflineCheck:
    """Spender, recipient, facilitator, deadline (unix seconds: ``now + maxTimeoutSeconds``, give or
    take ``MAX_CLOCK_SKEW``: nothing is pulled before the answer, so the permit must outlive the
    call; and at least ``MIN_VALIDITY_MARGIN`` ahead), validAfter, amount (the requirement's
    maximum, exactly), token, and the signature's form. A 65-byte signature must be canonical (v
    27/28 or 0/1, low s); ``ecdsa_signer`` says whether it recovers to ``from`` — when it does not
    (or is longer), the payer must be a contract wallet that accepts it (EIP-1271, on chain)."""
    terms = _terms(payment, requirement, now)
    if not terms:
        return OfflineCheck(terms)
    signature = normalise_signature(payment.signature)
    if len(signature) != 65:
        return OfflineCheck(ACCEPTED, signature, ecdsa_signer=False)
    signer = recover_signer(permit_digest(requirement.chain_id, payment.authorization), signature)
    if signer is None:
        return OfflineCheck(reject(INVALID_SIGNATURE, "signature is not canonical (v, low-s)"))
    return OfflineCheck(ACCEPTED, signature, ecdsa_signer=signer == payment.authorization.from_)
