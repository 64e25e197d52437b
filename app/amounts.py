"""Token amounts for people: atomic units (the integers of x402 and of the chain) as exact decimal text.

The one formatter of the app (the landing page, the CLI, the revenue report): integer arithmetic,
never a float, so 2**256 - 1 atomic units print to the last digit.
"""

from __future__ import annotations

USDC_DECIMALS = 6
USDC_UNIT = 10**USDC_DECIMALS  # atomic units in one USDC


def amount_text(
    atomic: int, decimals: int = USDC_DECIMALS, *, grouped: bool = False, min_places: int | None = None
) -> str:
    """``atomic`` units of a token with ``decimals`` decimals as a decimal number: "0.100000" for
    100000 of USDC. ``grouped`` puts commas between thousands ("1,234.500000"); with ``min_places``
    trailing zeros are dropped down to that many places ("0.10", "0.0025")."""
    whole, fraction = divmod(abs(atomic), 10**decimals)
    places = f"{fraction:0{decimals}d}" if decimals else ""
    if min_places is not None:
        places = places.rstrip("0").ljust(min_places, "0")
    text = f"{whole:,}" if grouped else str(whole)
    return ("-" if atomic < 0 else "") + (f"{text}.{places}" if places else text)
