"""ABI of the ``upto`` contracts: Permit2's reads and the ``x402UptoPermit2Proxy`` settle calls
(``contracts/Permit2.sol``, ``contracts/x402UptoPermit2Proxy.sol``; the published interfaces).

``settle(((token, amount), nonce, deadline), amount, owner, (to, facilitator, validAfter), signature)``
pulls ``amount`` (atomic units, at most the permitted amount) from ``owner`` to ``witness.to``;
``settleWithPermit`` first submits the payer's EIP-2612 ``permit`` of the token for Permit2.
"""

from __future__ import annotations

from typing import Protocol

from eth_abi import encode

from app.backends.token import selector
from app.x402.upto import PERMIT2_ADDRESS, Permit2Authorization, Permit2612

PERMIT_TUPLE = "((address,uint256),uint256,uint256)"
WITNESS_TUPLE = "(address,address,uint256)"
PERMIT2612_TUPLE = "(uint256,uint256,bytes32,bytes32,uint8)"
SETTLE_TYPES = [PERMIT_TUPLE, "uint256", "address", WITNESS_TUPLE, "bytes"]
SEL_SETTLE = selector(f"settle({','.join(SETTLE_TYPES)})")
SEL_SETTLE_WITH_PERMIT = selector(f"settleWithPermit({PERMIT2612_TUPLE},{','.join(SETTLE_TYPES)})")
SEL_ALLOWANCE = selector("allowance(address,address)")
SEL_NONCE_BITMAP = selector("nonceBitmap(address,uint256)")


def settle_calldata(
    auth: Permit2Authorization, amount: int, signature: bytes, permit2612: Permit2612 | None = None
) -> bytes:
    """The proxy call that pulls ``amount`` (atomic units) under ``auth``; through
    ``settleWithPermit`` when the payer sent an EIP-2612 permit for Permit2."""
    args = [
        ((auth.token, auth.amount), auth.nonce, auth.deadline),
        amount,
        auth.from_,
        (auth.to, auth.facilitator, auth.valid_after),
        signature,
    ]
    if permit2612 is None:
        return SEL_SETTLE + encode(SETTLE_TYPES, args)
    sig = permit2612.signature
    permit = (
        permit2612.value,
        permit2612.deadline,
        sig[:32],
        sig[32:64],
        sig[64] if sig[64] >= 27 else sig[64] + 27,
    )
    return SEL_SETTLE_WITH_PERMIT + encode([PERMIT2612_TUPLE, *SETTLE_TYPES], [permit, *args])


def allowance_calldata(owner: str) -> bytes:
    """``token.allowance(owner, Permit2)``."""
    return SEL_ALLOWANCE + encode(["address", "address"], [owner, PERMIT2_ADDRESS])


class Permit(Protocol):
    """A Permit2 signature transfer's owner and unordered nonce (an ``upto`` permit, a
    ``batch-settlement`` deposit)."""

    @property
    def from_(self) -> str: ...

    @property
    def nonce(self) -> int: ...


def nonce_bitmap_calldata(auth: Permit) -> bytes:
    """``Permit2.nonceBitmap(owner, nonce >> 8)``: bit ``nonce & 0xff`` of the word is set once used."""
    return SEL_NONCE_BITMAP + encode(["address", "uint256"], [auth.from_, auth.nonce >> 8])


def nonce_used(auth: Permit, bitmap: int) -> bool:
    """Whether ``auth``'s Permit2 nonce is marked used in its ``nonceBitmap`` word."""
    return bool(bitmap >> (auth.nonce & 0xFF) & 1)
