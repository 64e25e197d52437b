"""What several commands share: the demo body, and amounts read and written in whole tokens."""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation
from typing import Any

from app.amounts import USDC_DECIMALS, amount_text

MAX_DECIMALS = 77  # a uint256 has 78 digits
EXIT_BAD_INPUT, EXIT_UNREACHABLE = 2, 3
DEMO_BODY: dict[str, Any] = {
    "model": "hermes-3-8b-tee",
    "messages": [{"role": "user", "content": "Say hello from inside the enclave."}],
    "max_tokens": 64,
}


def usdc(amount: int) -> str:
    """Atomic units of USDC (6 decimals) as text: 100000 → "0.100000 USDC"."""
    return f"{amount_text(amount)} USDC"


def parse_amount(text: str) -> Decimal:
    """A non-negative decimal number of whole tokens, e.g. '0.10' (exact decimal, no float)."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r}") from None
    if not value.is_finite() or not 0 <= value < 2**256:
        raise argparse.ArgumentTypeError(f"not a non-negative uint256 amount: {text!r}")
    return value


def atomic_units(value: Decimal, decimals: int) -> int:
    """Whole tokens → atomic units of a token with ``decimals`` decimals (0.10, 6 → 100000)."""
    atomic = value.scaleb(decimals)
    if atomic != atomic.to_integral_value():
        raise ValueError(f"amount {value:f} has more than the token's {decimals} decimals")
    if atomic >= 2**256:
        raise ValueError(f"amount {value:f} is above any uint256")
    return int(atomic)


def parse_usdc(text: str) -> int:
    """'0.10' → 100000 atomic units (exact decimal, no float)."""
    try:
        return atomic_units(parse_amount(text), USDC_DECIMALS)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
