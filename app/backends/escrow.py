"""ABI of the ``batch-settlement`` escrow ``x402BatchSettlement`` and its deposit collectors
(``contracts/x402BatchSettlement.sol``; the published interface the PyPI ``x402`` 2.25 client calls):
the calldata the proxy sends (``deposit``, ``claimWithSignature``, ``settle``), the views it reads
(``channels``, ``pendingWithdrawals``, ``refundNonce``, ``receivers``) and what a deposit's receipt
must show.

Pure: builds and reads JSON-RPC values; ``app.backends.chain`` and the callers do the asking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import decode, encode

from app.backends.permit2 import nonce_bitmap_calldata, nonce_used
from app.backends.rpc import Call, RpcError
from app.backends.token import (
    SEL_AUTHORIZATION_STATE,
    TRANSFER_TOPIC,
    ReceiptContradiction,
    eth_call,
    selector,
)
from app.x402.batch_settlement import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    BatchPayment,
    ChannelConfig,
    Erc3009Deposit,
)
from app.x402.batch_settlement.payload import erc3009_deposit_nonce
from app.x402.upto import PERMIT2_ADDRESS

CONFIG_TUPLE = "(address,address,address,address,address,uint40,bytes32)"
CLAIM_TUPLE = f"(({CONFIG_TUPLE},uint128),bytes,uint128)"
SEL_DEPOSIT = selector(f"deposit({CONFIG_TUPLE},uint128,address,bytes)")
SEL_CLAIM_WITH_SIGNATURE = selector(f"claimWithSignature({CLAIM_TUPLE}[],bytes)")
SEL_SETTLE = selector("settle(address,address)")
SEL_REFUND_WITH_SIGNATURE = selector(f"refundWithSignature({CONFIG_TUPLE},uint128,uint256,bytes)")
SEL_MULTICALL = selector("multicall(bytes[])")
SEL_CHANNELS = selector("channels(bytes32)")
SEL_PENDING_WITHDRAWALS = selector("pendingWithdrawals(bytes32)")
SEL_REFUND_NONCE = selector("refundNonce(bytes32)")
SEL_RECEIVERS = selector("receivers(address,address)")


def config_tuple(config: ChannelConfig) -> tuple[Any, ...]:
    """A ``ChannelConfig`` as the ABI tuple ``(payer, payerAuthorizer, receiver, receiverAuthorizer,
    token, withdrawDelay, salt)``."""
    return (
        config.payer,
        config.payer_authorizer,
        config.receiver,
        config.receiver_authorizer,
        config.token,
        config.withdraw_delay,
        config.salt,
    )


def deposit_calldata(payment: BatchPayment) -> bytes:
    """``deposit(config, amount, collector, collectorData)`` for a deposit payload: through the
    ERC-3009 collector (``collectorData = abi.encode(validAfter, validBefore, salt, signature)``) or
    the Permit2 collector (``abi.encode(nonce, deadline, signature, "")``). ``ValueError`` for a
    payload without a deposit."""
    deposit = payment.deposit
    if deposit is None:
        raise ValueError("not a deposit")
    auth = deposit.authorization
    if isinstance(auth, Erc3009Deposit):
        collector = ERC3009_DEPOSIT_COLLECTOR_ADDRESS
        data = encode(
            ["uint256", "uint256", "uint256", "bytes"],
            [auth.valid_after, auth.valid_before, int.from_bytes(auth.salt, "big"), auth.signature],
        )
    else:
        collector = PERMIT2_DEPOSIT_COLLECTOR_ADDRESS
        data = encode(
            ["uint256", "uint256", "bytes", "bytes"], [auth.nonce, auth.deadline, auth.signature, b""]
        )
    args = [config_tuple(payment.config), deposit.amount, collector, data]
    return SEL_DEPOSIT + encode([CONFIG_TUPLE, "uint128", "address", "bytes"], args)


@dataclass(frozen=True)
class VoucherClaim:
    """One channel's entry of a claim batch: its config, the voucher (``signed`` cumulative, its
    ``signature``) and the claimed total it sets (``total``, atomic units, ≤ ``signed``)."""

    config: ChannelConfig
    signed: int
    signature: bytes
    total: int


def claim_calldata(claims: Sequence[VoucherClaim], authorizer_signature: bytes) -> bytes:
    """``claimWithSignature(voucherClaims, authorizerSignature)``: the receiver authorizer's
    ``ClaimBatch`` signature over every entry."""
    entries = [((config_tuple(c.config), c.signed), c.signature, c.total) for c in claims]
    return SEL_CLAIM_WITH_SIGNATURE + encode([f"{CLAIM_TUPLE}[]", "bytes"], [entries, authorizer_signature])


def refund_calldata(config: ChannelConfig, amount: int, nonce: int, authorizer_signature: bytes) -> bytes:
    """``refundWithSignature(config, amount, nonce, signature)``: returns ``amount`` (atomic units)
    of the channel's unclaimed balance to its payer, under the receiver authorizer's ``Refund``
    signature for the channel's current ``refundNonce``."""
    args = [config_tuple(config), amount, nonce, authorizer_signature]
    return SEL_REFUND_WITH_SIGNATURE + encode([CONFIG_TUPLE, "uint128", "uint256", "bytes"], args)


def multicall_calldata(calls: Sequence[bytes]) -> bytes:
    """``multicall(data)``: the escrow runs each call on itself, in order, in one transaction (all
    or nothing)."""
    return SEL_MULTICALL + encode(["bytes[]"], [list(calls)])


def settle_calldata(receiver: str, token: str) -> bytes:
    """``settle(receiver, token)``: sweeps what was claimed for ``receiver`` to it."""
    return SEL_SETTLE + encode(["address", "address"], [receiver, token])


def channel_reads(channel: bytes) -> list[Call]:
    """The views of one channel, in one batch: ``channels(id)``, ``pendingWithdrawals(id)``,
    ``refundNonce(id)``."""
    return [
        eth_call(BATCH_SETTLEMENT_ADDRESS, selector_call + channel)
        for selector_call in (SEL_CHANNELS, SEL_PENDING_WITHDRAWALS, SEL_REFUND_NONCE)
    ]


@dataclass(frozen=True)
class ChainView:
    """``channels(id)`` and ``pendingWithdrawals(id)`` as the chain answered: ``balance`` and
    ``claimed`` (atomic units), ``withdraw_at`` (unix seconds a withdrawal started, 0 none),
    ``refund_nonce``."""

    balance: int
    claimed: int
    withdraw_at: int = 0
    refund_nonce: int = 0


def channel_view(answers: Sequence[Any]) -> ChainView | None:
    """The answers of ``channel_reads`` as a ``ChainView``; None when one is not a real ABI answer
    (a refusal, or ``0x`` from an address without code)."""
    balances, pending, nonce = words(answers[0], 2), words(answers[1], 2), words(answers[2], 1)
    if balances is None or pending is None or nonce is None:
        return None
    return ChainView(balances[0], balances[1], pending[1] if pending[0] else 0, nonce[0])


def receivers_read(receiver: str, token: str) -> Call:
    """``receivers(receiver, token)``: (totalClaimed, totalSettled)."""
    data = SEL_RECEIVERS + encode(["address", "address"], [receiver, token])
    return eth_call(BATCH_SETTLEMENT_ADDRESS, data)


def words(answer: Any, count: int) -> tuple[int, ...] | None:
    """``count`` ABI words of an ``eth_call`` answer as integers; None for a refusal or a short answer
    (an account without code answers ``0x``)."""
    if isinstance(answer, RpcError) or not isinstance(answer, str) or len(answer) < 2 + 64 * count:
        return None
    return tuple(decode(["uint256"] * count, bytes.fromhex(answer[2 : 2 + 64 * count])))


def deposit_authorization_read(payment: BatchPayment) -> Call:
    """Whether a deposit's authorization was used (the deposit landed, or was spent elsewhere): the
    token's ``authorizationState(payer, nonce)`` for ERC-3009, Permit2's ``nonceBitmap`` word for
    Permit2 (``deposit_authorization_used`` reads the answer). ``ValueError`` for no deposit."""
    deposit = payment.deposit
    if deposit is None:
        raise ValueError("not a deposit")
    auth = deposit.authorization
    if isinstance(auth, Erc3009Deposit):
        nonce = erc3009_deposit_nonce(payment.voucher.channel_id, auth.salt)
        data = SEL_AUTHORIZATION_STATE + encode(["address", "bytes32"], [payment.config.payer, nonce])
        return eth_call(payment.config.token, data)
    return eth_call(PERMIT2_ADDRESS, nonce_bitmap_calldata(auth))


def deposit_authorization_used(payment: BatchPayment, answer: Any) -> bool | None:
    """The answer of ``deposit_authorization_read``: True when used, None when not an ABI word."""
    word = words(answer, 1)
    if word is None or payment.deposit is None:
        return None
    auth = payment.deposit.authorization
    return word[0] == 1 if isinstance(auth, Erc3009Deposit) else nonce_used(auth, word[0])


def deposit_logged(receipt: dict[str, Any], token: str, amount: int) -> bool:
    """For the receipt of our ``deposit``: True when it holds ``token``'s ``Transfer(…, escrow,
    amount)``; False when it reverted. Status 1 without it is an RPC fault (``ReceiptContradiction``):
    the escrow takes exactly the amount or reverts."""
    return escrow_moved(receipt, token, amount, to=BATCH_SETTLEMENT_ADDRESS)


def escrow_moved(
    receipt: dict[str, Any], token: str, amount: int, *, to: str | None = None, from_: str | None = None
) -> bool:
    """For the receipt of an escrow transaction of ours: True when it holds ``token``'s ``Transfer``
    of ``amount`` (atomic units) to ``to`` and from ``from_`` (either None: any); False when it
    reverted (status 0). Status 1 without that transfer is an RPC fault (``ReceiptContradiction``):
    each of our calls moves exactly its amount or reverts."""
    if receipt.get("status") == "0x0":
        return False
    wanted = [None if side is None else "0x" + bytes(12).hex() + side[2:].lower() for side in (from_, to)]
    for log in receipt.get("logs", []):
        topics = [str(topic).lower() for topic in log.get("topics", [])]
        if (
            str(log.get("address", "")).lower() == token.lower()
            and len(topics) == 3
            and topics[0] == "0x" + TRANSFER_TOPIC.hex()
            and all(want is None or want == topic for want, topic in zip(wanted, topics[1:], strict=True))
            and words(log.get("data"), 1) == (amount,)
        ):
            return True
    raise ReceiptContradiction(f"{receipt.get('transactionHash')} does not show the escrow's transfer")
