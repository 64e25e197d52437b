"""The one amount formatter: atomic units as exact decimal text, as the landing page, the CLI and the
revenue report print them."""

from __future__ import annotations

from decimal import Decimal, localcontext

from hypothesis import given
from hypothesis import strategies as st

from app.amounts import amount_text


def test_the_shapes_each_caller_prints() -> None:
    assert amount_text(100_000) == "0.100000"  # CLI and CSV: all six places
    assert amount_text(1_234_567_890, grouped=True) == "1,234.567890"  # revenue report
    assert amount_text(2_500, min_places=2) == "0.0025"  # landing page: trailing zeros dropped...
    assert amount_text(200_000, min_places=2) == "0.20"  # ... down to two places
    assert amount_text(3_000_000, min_places=2) == "3.00"
    assert amount_text(1000, 0) == "1000"  # a token without decimals
    assert amount_text(-1) == "-0.000001"


@given(st.integers(min_value=-(2**256), max_value=2**256), st.integers(min_value=0, max_value=77))
def test_exact_to_the_last_digit(atomic: int, decimals: int) -> None:
    with localcontext() as context:
        context.prec = 200
        expected = f"{Decimal(atomic).scaleb(-decimals):f}"
    assert amount_text(atomic, decimals) == expected
    assert Decimal(amount_text(atomic, decimals, grouped=True).replace(",", "")) == Decimal(expected)
