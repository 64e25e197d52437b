"""Replacement transactions must raise both EIP-1559 fees by at least 12.5% (nodes refuse less)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from app.payments.settlement import bumped_fees


@given(priority=st.integers(0, 10**12), base=st.integers(0, 10**13))
def test_both_fees_rise_by_at_least_an_eighth_and_nothing_else_changes(priority: int, base: int) -> None:
    transaction = {
        "nonce": 7,
        "data": b"\x01",
        "gas": 90_000,
        "maxPriorityFeePerGas": priority,
        "maxFeePerGas": base + priority,
    }
    replacement = bumped_fees(transaction)
    for field in ("maxPriorityFeePerGas", "maxFeePerGas"):
        assert replacement[field] * 8 >= transaction[field] * 9
        assert replacement[field] > transaction[field]
    assert {k: v for k, v in replacement.items() if not k.startswith("max")} == {
        k: v for k, v in transaction.items() if not k.startswith("max")
    }
    assert replacement["maxFeePerGas"] >= replacement["maxPriorityFeePerGas"]
