"""Offline checks of a payment against our own requirement (PROTOCOL.md §4, steps 1–8 minus chain).

Everything here is pure: the chain-dependent checks (contract wallets, balance, nonce state,
simulation) happen in ``app.chain`` after these pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from .eip712 import authorization_digest, domain_separator, recover_signer
from .verdict import (
    ACCEPTED,
    INVALID_SIGNATURE,
    NETWORK_MISMATCH,
    RECIPIENT_MISMATCH,
    REQUIREMENTS_MISMATCH,
    UNSUPPORTED_SCHEME,
    VALID_AFTER,
    VALID_BEFORE,
    VALUE_MISMATCH,
    Verdict,
    reject,
)
from .wire import PaymentPayload, Requirement

# A signature must stay valid this long after we check it, to leave time to settle.
MIN_VALIDITY_MARGIN = 6


def match_requirement(payment: PaymentPayload, requirement: Requirement) -> Verdict:
    """The payment must be for exactly our requirement: a cheap route's payment never buys a dear one."""
    if payment.scheme != requirement.scheme:
        return reject(UNSUPPORTED_SCHEME, f"scheme {payment.scheme!r} is not offered")
    expected_network = requirement.network if payment.version == 2 else requirement.v1_network
    if payment.network != expected_network:
        return reject(NETWORK_MISMATCH, f"network {payment.network!r}, expected {expected_network!r}")
    if payment.version == 1:
        return ACCEPTED
    accepted = payment.accepted or {}
    ours = requirement.to_v2()
    for key in ("amount", "maxTimeoutSeconds"):
        if accepted.get(key) != ours[key] or isinstance(accepted.get(key), bool):
            return reject(REQUIREMENTS_MISMATCH, f"accepted.{key} differs from this resource's requirement")
    for key in ("asset", "payTo"):
        value = accepted.get(key)
        if not isinstance(value, str) or value.lower() != ours[key].lower():
            return reject(REQUIREMENTS_MISMATCH, f"accepted.{key} differs from this resource's requirement")
    extra = accepted.get("extra", {})
    if not isinstance(extra, dict) or any(ours["extra"].get(k) != v for k, v in extra.items()):
        return reject(REQUIREMENTS_MISMATCH, "accepted.extra differs from the token's EIP-712 domain")
    return ACCEPTED


@dataclass(frozen=True)
class OfflineCheck:
    """Result of the offline checks. ``ecdsa_signer`` is True when the signature recovers to ``from``;
    when False with ``verdict.ok``, the payer must prove to be a contract wallet on chain (EIP-1271)."""

    verdict: Verdict
    signature: bytes = b""
    ecdsa_signer: bool = False


def normalise_signature(signature: bytes) -> bytes:
    """Map v of 0/1 to 27/28 (same signature, the form USDC accepts); leave anything else alone."""
    if len(signature) == 65 and signature[64] in (0, 1):
        return signature[:64] + bytes([signature[64] + 27])
    return signature


def check_authorization(payment: PaymentPayload, requirement: Requirement, now: int) -> OfflineCheck:
    """Recipient, exact value, time window and signature form/recovery, in the reference order."""
    auth = payment.authorization
    if auth.to != requirement.pay_to.lower():
        return OfflineCheck(reject(RECIPIENT_MISMATCH, "authorization.to is not this resource's payTo"))
    if auth.value != requirement.amount:
        return OfflineCheck(reject(VALUE_MISMATCH, f"value must be exactly {requirement.amount}"))
    if auth.valid_before < now + MIN_VALIDITY_MARGIN:
        return OfflineCheck(reject(VALID_BEFORE, "authorization expires too soon or has expired"))
    if auth.valid_after > now:
        return OfflineCheck(reject(VALID_AFTER, "authorization is not valid yet"))
    signature = normalise_signature(payment.signature)
    if len(signature) == 65:
        separator = domain_separator(
            requirement.asset_name, requirement.asset_version, requirement.chain_id, requirement.asset
        )
        digest = authorization_digest(
            separator, auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce
        )
        signer = recover_signer(digest, signature)
        if signer is None:
            return OfflineCheck(reject(INVALID_SIGNATURE, "signature is not canonical (v, low-s)"))
        return OfflineCheck(ACCEPTED, signature, ecdsa_signer=signer == auth.from_)
    return OfflineCheck(ACCEPTED, signature, ecdsa_signer=False)
