"""``batch-settlement`` payment payloads (x402 v2 only), the channel id and the EIP-712 digests.

Wire shape (``specs/schemes/batch-settlement/scheme_batch_settlement_evm.md``, and what the PyPI
``x402`` 2.25 client sends)::

    {"x402Version": 2, "accepted": {...}, "resource"?: {...}, "extensions"?: {...},
     "payload": {"type": "voucher" | "deposit" | "refund",
                 "channelConfig": {"payer", "payerAuthorizer", "receiver", "receiverAuthorizer",
                                   "token", "withdrawDelay": <JSON integer>, "salt": "0x<32 bytes>"},
                 "voucher": {"channelId": "0x<32 bytes>", "maxClaimableAmount", "signature"},
                 "deposit": {"amount", "authorization": {"erc3009Authorization": {...}}        (deposit)
                                                      | {"permit2Authorization": {...}}},
                 "amount"?: "<partial refund>"}}                                           (refund)

Amounts and times are decimal strings (atomic units, seconds), except ``withdrawDelay``, a JSON
number. Parsing is as strict as for ``exact`` and ``upto``: unknown keys are refused. Addresses are
kept lower-case; byte strings (channel id, salts, signatures) as ``bytes``. ``claim`` and
``settle`` payloads travel from a server to its facilitator, never from a buyer, and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from ..eip712 import domain_separator, word
from ..upto.payload import TOKEN_PERMISSIONS_TYPE, TOKEN_PERMISSIONS_TYPEHASH, permit2_domain_separator
from ..verdict import INVALID_PAYLOAD, Verdict, reject
from ..wire import (
    NONCE_RE,
    SIGNATURE_RE,
    Invalid,
    V2Payment,
    address_field,
    field,
    keys,
    matching,
    uint,
    v2_envelope,
)

SCHEME = "batch-settlement"

# Canonical deployments, the same address on every chain (CREATE2). Source: PyPI x402 2.25,
# x402/mechanisms/evm/batch_settlement/constants.py, and the scheme's spec.
BATCH_SETTLEMENT_ADDRESS = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"
ERC3009_DEPOSIT_COLLECTOR_ADDRESS = "0x4020806089470a89826cB9fB1f4059150b550004"
PERMIT2_DEPOSIT_COLLECTOR_ADDRESS = "0x4020425FAf3B746C082C2f942b4E5159887B0005"
ZERO_ADDRESS = "0x" + "00" * 20

# ChannelConfig.withdrawDelay bounds in seconds (15 minutes to 30 days; same source).
MIN_WITHDRAW_DELAY = 900
MAX_WITHDRAW_DELAY = 2_592_000

# Solidity widths of the contract's fields (x402BatchSettlement ABI): amounts are uint128 and the
# withdraw delay uint40; values at or beyond these limits cannot be on chain.
UINT128_LIMIT = 2**128
UINT40_LIMIT = 2**40

# The EIP-712 domain every batch-settlement signature is made in, with chainId and
# verifyingContract = BATCH_SETTLEMENT_ADDRESS.
DOMAIN_NAME = "x402 Batch Settlement"
DOMAIN_VERSION = "1"

CHANNEL_CONFIG_TYPEHASH = keccak(
    b"ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
    b"address token,uint40 withdrawDelay,bytes32 salt)"
)
VOUCHER_TYPEHASH = keccak(b"Voucher(bytes32 channelId,uint128 maxClaimableAmount)")
# The receiver authorizer's signatures: a batch of claims, and a cooperative refund.
CLAIM_ENTRY_TYPE = b"ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
CLAIM_ENTRY_TYPEHASH = keccak(CLAIM_ENTRY_TYPE)
CLAIM_BATCH_TYPEHASH = keccak(b"ClaimBatch(ClaimEntry[] claims)" + CLAIM_ENTRY_TYPE)
REFUND_TYPEHASH = keccak(b"Refund(bytes32 channelId,uint256 nonce,uint128 amount)")
# ERC-3009 deposits: the payer authorizes the ERC-3009 collector to receive the deposit.
RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak(
    b"ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)
# Permit2 deposits: a PermitWitnessTransferFrom whose witness binds the channel (referenced types
# are appended in alphabetical order, as EIP-712 requires).
DEPOSIT_WITNESS_TYPE = b"DepositWitness(bytes32 channelId)"
DEPOSIT_WITNESS_TYPEHASH = keccak(DEPOSIT_WITNESS_TYPE)
PERMIT_DEPOSIT_TYPEHASH = keccak(
    b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,"
    b"uint256 deadline,DepositWitness witness)" + DEPOSIT_WITNESS_TYPE + TOKEN_PERMISSIONS_TYPE
)

PayloadKind = Literal["deposit", "voucher", "refund"]

# Reason codes of malformed payloads, spelled as the scheme spells them (x402 errors.py).
PAYLOAD_TYPE_INVALID = "invalid_batch_settlement_evm_payload_type"
VOUCHER_PAYLOAD_INVALID = "invalid_batch_settlement_evm_voucher_payload"
DEPOSIT_PAYLOAD_INVALID = "invalid_batch_settlement_evm_deposit_payload"
REFUND_PAYLOAD_INVALID = "invalid_batch_settlement_evm_refund_payload"
CHANNEL_ID_INVALID = "invalid_batch_settlement_evm_channel_id_invalid"
_MALFORMED = {
    "voucher": VOUCHER_PAYLOAD_INVALID,
    "deposit": DEPOSIT_PAYLOAD_INVALID,
    "refund": REFUND_PAYLOAD_INVALID,
}


@dataclass(frozen=True)
class ChannelConfig:
    """The immutable identity of a channel (Solidity ``ChannelConfig``). Addresses lower-case 0x-hex;
    ``payer_authorizer`` is the EOA that signs vouchers, or the zero address when the payer itself
    signs (checked with EIP-1271 / SignatureChecker on chain); ``withdraw_delay`` in seconds;
    ``salt`` 32 bytes chosen by the payer."""

    payer: str
    payer_authorizer: str
    receiver: str
    receiver_authorizer: str
    token: str
    withdraw_delay: int
    salt: bytes

    def to_wire(self) -> dict[str, Any]:
        """The ``channelConfig`` object as the official clients send it: checksummed addresses,
        ``withdrawDelay`` a JSON number, ``salt`` 0x-hex."""
        return {
            "payer": to_checksum_address(self.payer),
            "payerAuthorizer": to_checksum_address(self.payer_authorizer),
            "receiver": to_checksum_address(self.receiver),
            "receiverAuthorizer": to_checksum_address(self.receiver_authorizer),
            "token": to_checksum_address(self.token),
            "withdrawDelay": self.withdraw_delay,
            "salt": "0x" + self.salt.hex(),
        }


@dataclass(frozen=True)
class Voucher:
    """A signed cumulative voucher: the receiver may claim up to ``max_claimable`` (atomic units, in
    total over the channel's life) from channel ``channel_id`` (32 bytes)."""

    channel_id: bytes
    max_claimable: int
    signature: bytes


@dataclass(frozen=True)
class Erc3009Deposit:
    """The ERC-3009 ``ReceiveWithAuthorization`` of a deposit, as sent: only the fields that cannot
    be rebuilt. ``from`` is the channel's payer, ``to`` the ERC-3009 deposit collector, ``value`` the
    deposit's amount and the nonce ``erc3009_deposit_nonce(channel_id, salt)``."""

    valid_after: int
    valid_before: int
    salt: bytes
    signature: bytes


@dataclass(frozen=True)
class Permit2Deposit:
    """A Permit2 ``PermitWitnessTransferFrom`` of a deposit: ``from_`` lets ``spender`` (the Permit2
    deposit collector) pull ``amount`` of ``token`` once (``nonce``) until ``deadline`` (unix
    seconds), for channel ``channel_id`` (the witness)."""

    from_: str
    token: str
    amount: int
    spender: str
    nonce: int
    deadline: int
    channel_id: bytes
    signature: bytes


@dataclass(frozen=True)
class Deposit:
    """``amount`` (atomic units) to add to the channel, through exactly one authorization."""

    amount: int
    authorization: Erc3009Deposit | Permit2Deposit


@dataclass(frozen=True)
class BatchPayment(V2Payment):
    """A decoded ``batch-settlement`` ``PAYMENT-SIGNATURE``. ``kind`` is the payload's ``type``:
    a ``voucher`` pays a call from an open channel; a ``deposit`` opens or tops up the channel and
    pays the call with its voucher; a ``refund`` asks for the unused balance back with a zero-charge
    voucher (``refund_amount`` None for all of it). ``accepted`` is the requirement the client says
    it pays (checked against ours, never trusted)."""

    kind: PayloadKind
    accepted: dict[str, Any]
    config: ChannelConfig
    voucher: Voucher
    deposit: Deposit | None = None
    refund_amount: int | None = None
    resource: dict[str, Any] | None = None
    extensions: dict[str, Any] | None = None

    @property
    def scheme(self) -> str:
        return SCHEME


def _bytes32(obj: dict[str, Any], key: str) -> bytes:
    return bytes.fromhex(matching(obj, key, NONCE_RE)[2:])


def _signature(obj: dict[str, Any], key: str) -> bytes:
    return bytes.fromhex(matching(obj, key, SIGNATURE_RE)[2:])


def _uint128(obj: dict[str, Any], key: str) -> int:
    value = uint(obj, key)
    if value >= UINT128_LIMIT:
        raise Invalid(f"{key} must be below 2**128")
    return value


def _config(obj: Any) -> ChannelConfig:
    cfg = keys(
        obj, {"payer", "payerAuthorizer", "receiver", "receiverAuthorizer", "token", "withdrawDelay", "salt"}
    )
    delay = cfg["withdrawDelay"]
    if type(delay) is not int or not 0 <= delay < UINT40_LIMIT:
        raise Invalid("withdrawDelay must be a JSON integer of uint40")
    return ChannelConfig(
        payer=address_field(cfg, "payer"),
        payer_authorizer=address_field(cfg, "payerAuthorizer"),
        receiver=address_field(cfg, "receiver"),
        receiver_authorizer=address_field(cfg, "receiverAuthorizer"),
        token=address_field(cfg, "token"),
        withdraw_delay=delay,
        salt=_bytes32(cfg, "salt"),
    )


class _BadChannelId(Invalid):
    pass


def _voucher(obj: Any) -> Voucher:
    body = keys(obj, {"channelId", "maxClaimableAmount", "signature"})
    if not isinstance(body["channelId"], str) or not NONCE_RE.fullmatch(body["channelId"]):
        raise _BadChannelId("voucher.channelId must be 0x and 64 hex digits")
    return Voucher(
        channel_id=_bytes32(body, "channelId"),
        max_claimable=_uint128(body, "maxClaimableAmount"),
        signature=_signature(body, "signature"),
    )


def _deposit(obj: Any) -> Deposit:
    body = keys(obj, {"amount", "authorization"})
    auth = field(body, "authorization", dict)
    if len(auth) != 1:
        raise Invalid("deposit.authorization must hold exactly one authorization")
    authorization: Erc3009Deposit | Permit2Deposit
    if "erc3009Authorization" in auth:
        erc = keys(auth["erc3009Authorization"], {"validAfter", "validBefore", "salt", "signature"})
        authorization = Erc3009Deposit(
            valid_after=uint(erc, "validAfter"),
            valid_before=uint(erc, "validBefore"),
            salt=_bytes32(erc, "salt"),
            signature=_signature(erc, "signature"),
        )
    elif "permit2Authorization" in auth:
        permit = keys(
            auth["permit2Authorization"],
            {"from", "permitted", "spender", "nonce", "deadline", "witness", "signature"},
        )
        permitted = keys(permit["permitted"], {"token", "amount"})
        witness = keys(permit["witness"], {"channelId"})
        authorization = Permit2Deposit(
            from_=address_field(permit, "from"),
            token=address_field(permitted, "token"),
            amount=uint(permitted, "amount"),
            spender=address_field(permit, "spender"),
            nonce=uint(permit, "nonce"),
            deadline=uint(permit, "deadline"),
            channel_id=_bytes32(witness, "channelId"),
            signature=_signature(permit, "signature"),
        )
    else:
        raise Invalid("deposit.authorization must be erc3009Authorization or permit2Authorization")
    return Deposit(amount=_uint128(body, "amount"), authorization=authorization)


class _BadKind(Invalid):
    pass


def _kind(payload: Any) -> PayloadKind:
    kind = payload.get("type") if isinstance(payload, dict) else None
    if kind == "voucher" or kind == "deposit" or kind == "refund":
        return kind
    raise _BadKind("payload.type must be deposit, voucher or refund")


def parse_batch_payment(wire: Any) -> BatchPayment:
    """Build a ``BatchPayment`` from a decoded v2 header whose ``accepted.scheme`` is
    "batch-settlement"; raises ``Invalid`` (``app.x402.wire``) on any deviation. ``payload_of``
    also names the reason."""
    accepted, resource, extensions = v2_envelope(wire)
    kind = _kind(wire["payload"])
    required = {"type", "channelConfig", "voucher"} | ({"deposit"} if kind == "deposit" else set())
    body = keys(wire["payload"], required, frozenset({"amount"}) if kind == "refund" else frozenset())
    refund_amount = None
    if "amount" in body:
        refund_amount = _uint128(body, "amount")
        if refund_amount == 0:
            raise Invalid("a refund's amount must be positive (omit it to refund everything)")
    return BatchPayment(
        kind=kind,
        accepted=accepted,
        config=_config(body["channelConfig"]),
        voucher=_voucher(body["voucher"]),
        deposit=_deposit(body["deposit"]) if kind == "deposit" else None,
        refund_amount=refund_amount,
        resource=resource,
        extensions=extensions,
    )


def payload_of(wire: Any) -> BatchPayment | Verdict | None:
    """A decoded v2 ``PAYMENT-SIGNATURE``: the ``BatchPayment`` when its ``accepted.scheme`` is
    "batch-settlement"; a ``Verdict`` when such a header is malformed; None for any other header
    (left to the ``exact`` parser, which gives the reason). The reasons: ``invalid_payload`` for
    the envelope (keys beside ``payload``), ``invalid_batch_settlement_evm_payload_type`` for a
    ``type`` other than deposit, voucher or refund, ``..._channel_id_invalid`` for a
    ``voucher.channelId`` that is not 0x and 64 hex digits, else ``..._voucher_payload``,
    ``..._deposit_payload`` or ``..._refund_payload`` by type."""
    accepted = wire.get("accepted") if isinstance(wire, dict) else None
    if not isinstance(accepted, dict) or accepted.get("scheme") != SCHEME or wire.get("x402Version") != 2:
        return None
    try:
        v2_envelope(wire)
    except Invalid as exc:
        return reject(INVALID_PAYLOAD, str(exc))
    try:
        kind = _kind(wire["payload"])
    except _BadKind as exc:
        return reject(PAYLOAD_TYPE_INVALID, str(exc))
    try:
        return parse_batch_payment(wire)
    except _BadChannelId as exc:
        return reject(CHANNEL_ID_INVALID, str(exc))
    except Invalid as exc:
        return reject(_MALFORMED[kind], str(exc))


@lru_cache(maxsize=8)
def batch_domain_separator(chain_id: int) -> bytes:
    """The scheme's EIP-712 domain separator: ``{name: "x402 Batch Settlement", version: "1",
    chainId, verifyingContract: x402BatchSettlement}``."""
    return domain_separator(DOMAIN_NAME, DOMAIN_VERSION, chain_id, BATCH_SETTLEMENT_ADDRESS)


def channel_id(config: ChannelConfig, chain_id: int) -> bytes:
    """The 32-byte id of the channel ``config`` describes on chain ``chain_id``: the EIP-712 digest
    (``0x1901 ‖ domain ‖ structHash``) of the ``ChannelConfig`` struct in the scheme's domain, so
    the same config has another id on another chain or deployment."""
    struct = keccak(
        CHANNEL_CONFIG_TYPEHASH
        + word(config.payer)
        + word(config.payer_authorizer)
        + word(config.receiver)
        + word(config.receiver_authorizer)
        + word(config.token)
        + word(config.withdraw_delay)
        + config.salt
    )
    return keccak(b"\x19\x01" + batch_domain_separator(chain_id) + struct)


def voucher_digest(channel: bytes, max_claimable: int, chain_id: int) -> bytes:
    """The 32-byte EIP-712 digest a voucher's signature signs: ``Voucher{channelId,
    maxClaimableAmount}`` in the scheme's domain."""
    struct = keccak(VOUCHER_TYPEHASH + channel + word(max_claimable))
    return keccak(b"\x19\x01" + batch_domain_separator(chain_id) + struct)


def erc3009_deposit_nonce(channel: bytes, salt: bytes) -> bytes:
    """The ERC-3009 nonce of a deposit's authorization: ``keccak256(abi.encode(bytes32 channelId,
    uint256 salt))``, which ties the transfer to the channel."""
    return keccak(channel + salt)


def receive_authorization_digest(
    payment: BatchPayment, chain_id: int, token_name: str, token_version: str
) -> bytes:
    """The EIP-712 digest an ERC-3009 deposit's signature signs: the token's
    ``ReceiveWithAuthorization`` from the payer to the ERC-3009 deposit collector, of the deposit's
    amount, nonce from the channel id and salt. ``payment`` must be a deposit through ERC-3009."""
    deposit = payment.deposit
    if deposit is None or not isinstance(deposit.authorization, Erc3009Deposit):
        raise ValueError("not an ERC-3009 deposit")
    auth = deposit.authorization
    struct = keccak(
        RECEIVE_WITH_AUTHORIZATION_TYPEHASH
        + word(payment.config.payer)
        + word(ERC3009_DEPOSIT_COLLECTOR_ADDRESS)
        + word(deposit.amount)
        + word(auth.valid_after)
        + word(auth.valid_before)
        + erc3009_deposit_nonce(payment.voucher.channel_id, auth.salt)
    )
    separator = domain_separator(token_name, token_version, chain_id, payment.config.token)
    return keccak(b"\x19\x01" + separator + struct)


def permit2_deposit_digest(permit: Permit2Deposit, chain_id: int) -> bytes:
    """The EIP-712 digest a Permit2 deposit's signature signs (Permit2's domain; witness
    ``DepositWitness{channelId}``)."""
    permitted = keccak(TOKEN_PERMISSIONS_TYPEHASH + word(permit.token) + word(permit.amount))
    witness = keccak(DEPOSIT_WITNESS_TYPEHASH + permit.channel_id)
    struct = keccak(
        PERMIT_DEPOSIT_TYPEHASH
        + permitted
        + word(permit.spender)
        + word(permit.nonce)
        + word(permit.deadline)
        + witness
    )
    return keccak(b"\x19\x01" + permit2_domain_separator(chain_id) + struct)


def claim_batch_digest(entries: list[tuple[bytes, int, int]], chain_id: int) -> bytes:
    """The 32-byte EIP-712 digest the receiver authorizer signs for ``claimWithSignature``:
    ``ClaimBatch{claims: ClaimEntry[]}`` in the scheme's domain, each entry ``(channelId,
    maxClaimableAmount, totalClaimed)`` (an array of structs hashes the concatenation of the
    entries' struct hashes, EIP-712)."""
    hashed = b"".join(
        keccak(CLAIM_ENTRY_TYPEHASH + channel + word(signed) + word(total))
        for channel, signed, total in entries
    )
    struct = keccak(CLAIM_BATCH_TYPEHASH + keccak(hashed))
    return keccak(b"\x19\x01" + batch_domain_separator(chain_id) + struct)


def refund_digest(channel: bytes, nonce: int, amount: int, chain_id: int) -> bytes:
    """The 32-byte EIP-712 digest the receiver authorizer signs for ``refundWithSignature``:
    ``Refund{channelId, nonce, amount}`` in the scheme's domain (``nonce`` is the channel's
    ``refundNonce``; ``amount`` atomic units)."""
    struct = keccak(REFUND_TYPEHASH + channel + word(nonce) + word(amount))
    return keccak(b"\x19\x01" + batch_domain_separator(chain_id) + struct)
