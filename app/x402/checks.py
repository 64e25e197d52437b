"""Offline checks of a payment against our own requirement (``docs/flow.md``, the offline checks).

Everything here is pure: the chain-dependent checks (contract wallets, balance, nonce state,
simulation) happen in ``app.backends.chain`` after these pass.
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
from .wire import ADDRESS_RE, PaymentPayload, Requirement, V2Payment

# A signature must stay valid this long after we check it, to leave time to settle.
MIN_VALIDITY_MARGIN = 6
# A client's clock may run this far ahead of ours (seconds): validBefore may be at most
# now + maxTimeoutSeconds + this. A farther validBefore would keep an unfunded claim alive for long.
MAX_CLOCK_SKEW = 30


# What a corrective 402 adds to a batch-settlement requirement's extra (the channel as we hold it): a
# client that pays the requirement as it came may send it back; it is ours to say, never matched.
ECHOED_EXTRA = frozenset({"channelState", "voucherState"})


def match_requirement(payment: PaymentPayload | V2Payment, requirement: Requirement) -> Verdict:
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
    if not isinstance(extra, dict) or any(
        not _same_extra(ours["extra"].get(k), v) for k, v in extra.items() if k not in ECHOED_EXTRA
    ):
        return reject(REQUIREMENTS_MISMATCH, "accepted.extra differs from the token's EIP-712 domain")
    return ACCEPTED


def _same_extra(ours: object, theirs: object) -> bool:
    """An ``extra`` value as we offered it; an address (``facilitatorAddress``) in any letter case."""
    if isinstance(ours, str) and isinstance(theirs, str) and ADDRESS_RE.fullmatch(ours):
        return ours.lower() == theirs.lower()
    return ours == theirs


@dataclass(frozen=True)
class OfflineCheck:
    """Result of the offline checks. ``ecdsa_signer`` is True when the signature recovers to ``from``;
    when False with ``verdict.ok``, the payer must prove to be a contract wallet on chain (EIP-1271).
    ``window_only`` is True when every check passed but the authorization has expired: such a payment
    cannot be taken anew, but one the ledger already recorded may still be recovered by its header."""

    verdict: Verdict
    signature: bytes = b""
    ecdsa_signer: bool = False
    window_only: bool = False


def check_window(payment: PaymentPayload, requirement: Requirement, now: int) -> Verdict:
    """The authorization's time window (unix seconds): valid now, for at least ``MIN_VALIDITY_MARGIN``
    more seconds, and not beyond ``now + maxTimeoutSeconds + MAX_CLOCK_SKEW`` (the x402 clients sign
    ``validBefore = now + maxTimeoutSeconds``)."""
    auth = payment.authorization
    if auth.valid_before < now + MIN_VALIDITY_MARGIN:
        return reject(VALID_BEFORE, "authorization expires too soon or has expired")
    if auth.valid_after > now:
        return reject(VALID_AFTER, "authorization is not valid yet")
    if auth.valid_before > now + requirement.max_timeout_seconds + MAX_CLOCK_SKEW:
        return reject(VALID_BEFORE, "validBefore is further ahead than maxTimeoutSeconds allows")
    return ACCEPTED


def normalise_signature(signature: bytes) -> bytes:
    """Map v of 0/1 to 27/28 (same signature, the form USDC accepts); leave anything else alone."""
    if len(signature) == 65 and signature[64] in (0, 1):
        return signature[:64] + bytes([signature[64] + 27])
    return signature


def check_authorization(payment: PaymentPayload, requirement: Requirement, now: int) -> OfflineCheck:
    """Recipient, exact value, time window and signature form/recovery, in the reference order.

    The signature is checked even when the window fails, so that ``window_only`` can tell a
    recorded payment's owner (recoverable by its header) from a forger."""
    auth = payment.authorization
    if auth.to != requirement.pay_to.lower():
        return OfflineCheck(reject(RECIPIENT_MISMATCH, "authorization.to is not this resource's payTo"))
    if auth.value != requirement.amount:
        return OfflineCheck(reject(VALUE_MISMATCH, f"value must be exactly {requirement.amount}"))
    window = check_window(payment, requirement, now)
    # only an expired authorization can belong to a payment recorded earlier (one too far ahead, or
    # not valid yet, was never accepted)
    expired = not window and auth.valid_before < now + MIN_VALIDITY_MARGIN
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
            bad = reject(INVALID_SIGNATURE, "signature is not canonical (v, low-s)")
            return OfflineCheck(window if not window else bad)
        return OfflineCheck(window, signature, ecdsa_signer=signer == auth.from_, window_only=expired)
    return OfflineCheck(window, signature, ecdsa_signer=False, window_only=expired)
