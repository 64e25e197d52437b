"""Checks return a ``Verdict`` with a stable reason code instead of raising."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """Outcome of one check. ``reason`` is a stable code clients may match on; ``detail`` is prose."""

    ok: bool
    reason: str = ""
    detail: str = ""

    def __bool__(self) -> bool:
        return self.ok


ACCEPTED = Verdict(True)


def reject(reason: str, detail: str = "") -> Verdict:
    """A refusing ``Verdict``: ``reason`` the stable code, ``detail`` in words."""
    return Verdict(False, reason, detail)


# Reason codes, spelled as the reference x402 implementations spell them where one fits.
UNSUPPORTED_SCHEME = "unsupported_scheme"
NETWORK_MISMATCH = "network_mismatch"
INVALID_VERSION = "invalid_x402_version"
INVALID_PAYLOAD = "invalid_payload"
REQUIREMENTS_MISMATCH = "invalid_payment_requirements"
RECIPIENT_MISMATCH = "invalid_exact_evm_payload_recipient_mismatch"
VALUE_MISMATCH = "invalid_exact_evm_payload_authorization_value_mismatch"
VALID_BEFORE = "invalid_exact_evm_payload_authorization_valid_before"
VALID_AFTER = "invalid_exact_evm_payload_authorization_valid_after"
INVALID_SIGNATURE = "invalid_exact_evm_payload_signature"
NONCE_USED = "invalid_exact_evm_nonce_already_used"
INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
SIMULATION_FAILED = "invalid_exact_evm_transaction_simulation_failed"
TRANSACTION_FAILED = "transaction_failed"
SETTLEMENT_PENDING = "settlement_pending"
PAYMENT_REQUIRED = "payment_required"
