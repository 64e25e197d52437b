"""``upto`` payment payloads (x402 v2 only) and the Permit2 digest their signature signs.

Wire shape (``specs/schemes/upto/scheme_upto_evm.md``)::

    {"x402Version": 2, "accepted": {...}, "payload": {"signature": "0x…",
     "permit2Authorization": {"from", "permitted": {"token", "amount"}, "spender", "nonce",
                              "deadline", "witness": {"to", "facilitator", "validAfter"}}},
     "resource"?: {...}, "extensions"?: {"eip2612GasSponsoring"?: {"info": {...}}}}

Amounts, nonces and times are decimal strings of uint256 (atomic units, seconds); parsing is as
strict as for ``exact`` (``app.x402.wire``): unknown keys are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from eth_hash.auto import keccak

from ..eip712 import DOMAIN_TYPEHASH, word
from ..verdict import INVALID_PAYLOAD, Verdict, reject
from ..wire import SIGNATURE_RE, Invalid, V2Payment, address_field, keys, matching, uint, v2_envelope

# Canonical addresses, the same on every chain (CREATE2; PROTOCOL.md, upto).
PERMIT2_ADDRESS = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
UPTO_PROXY_ADDRESS = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
EIP2612_GAS_SPONSORING = "eip2612GasSponsoring"

# Permit2's SignatureTransfer with the upto witness (EIP-712 type strings, Uniswap/permit2).
TOKEN_PERMISSIONS_TYPE = b"TokenPermissions(address token,uint256 amount)"
WITNESS_TYPE = b"Witness(address to,address facilitator,uint256 validAfter)"
PERMIT_WITNESS_TYPEHASH = keccak(
    b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,"
    b"uint256 deadline,Witness witness)" + TOKEN_PERMISSIONS_TYPE + WITNESS_TYPE
)
TOKEN_PERMISSIONS_TYPEHASH = keccak(TOKEN_PERMISSIONS_TYPE)
WITNESS_TYPEHASH = keccak(WITNESS_TYPE)
PERMIT2_NAME_HASH = keccak(b"Permit2")
# Permit2's domain has no version: EIP712Domain(string name,uint256 chainId,address verifyingContract)
PERMIT2_DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,uint256 chainId,address verifyingContract)")
assert PERMIT2_DOMAIN_TYPEHASH != DOMAIN_TYPEHASH


@dataclass(frozen=True)
class Permit2Authorization:
    """A Permit2 ``PermitWitnessTransferFrom`` with the upto witness. Addresses lower-case 0x-hex;
    ``amount`` the most that may be pulled (atomic units); ``nonce`` Permit2's unordered nonce;
    ``deadline`` and ``valid_after`` unix seconds."""

    from_: str
    token: str
    amount: int
    spender: str
    nonce: int
    deadline: int
    to: str
    facilitator: str
    valid_after: int


@dataclass(frozen=True)
class Permit2612:
    """An EIP-2612 ``permit`` of the token for Permit2 (the ``eip2612GasSponsoring`` extension):
    ``owner`` lets ``spender`` move ``value`` (atomic units) until ``deadline`` (unix seconds)."""

    owner: str
    asset: str
    spender: str
    value: int
    nonce: int
    deadline: int
    signature: bytes  # 65 bytes r‖s‖v


@dataclass(frozen=True)
class UptoPayment(V2Payment):
    """A decoded ``upto`` ``PAYMENT-SIGNATURE``: ``accepted`` is the requirement the client says it
    pays (checked against ours, never trusted)."""

    accepted: dict[str, Any]
    authorization: Permit2Authorization
    signature: bytes
    permit2612: Permit2612 | None = None
    resource: dict[str, Any] | None = None

    @property
    def scheme(self) -> str:
        return "upto"


def _authorization(obj: Any) -> Permit2Authorization:
    auth = keys(obj, {"from", "permitted", "spender", "nonce", "deadline", "witness"})
    permitted = keys(auth["permitted"], {"token", "amount"})
    witness = keys(auth["witness"], {"to", "facilitator", "validAfter"})
    return Permit2Authorization(
        from_=address_field(auth, "from"),
        token=address_field(permitted, "token"),
        amount=uint(permitted, "amount"),
        spender=address_field(auth, "spender"),
        nonce=uint(auth, "nonce"),
        deadline=uint(auth, "deadline"),
        to=address_field(witness, "to"),
        facilitator=address_field(witness, "facilitator"),
        valid_after=uint(witness, "validAfter"),
    )


def _permit2612(extensions: dict[str, Any]) -> Permit2612 | None:
    """The signed EIP-2612 permit of the ``eip2612GasSponsoring`` extension, or None when the payload
    carries none (clients echo the 402's declaration, ``info`` without a signature, when the payer
    already approved Permit2). Fields the client adds beside the permit's are ignored."""
    entry = extensions.get(EIP2612_GAS_SPONSORING)
    info = entry.get("info") if isinstance(entry, dict) else None
    if not isinstance(info, dict) or "signature" not in info:
        return None
    for name in ("from", "asset", "spender", "amount", "nonce", "deadline"):
        if name not in info:
            raise Invalid(f"eip2612GasSponsoring.info.{name} is missing")
    signature = bytes.fromhex(matching(info, "signature", SIGNATURE_RE)[2:])
    if len(signature) != 65:
        raise Invalid("eip2612GasSponsoring.info.signature must be 65 bytes")
    return Permit2612(
        owner=address_field(info, "from"),
        asset=address_field(info, "asset"),
        spender=address_field(info, "spender"),
        value=uint(info, "amount"),
        nonce=uint(info, "nonce"),
        deadline=uint(info, "deadline"),
        signature=signature,
    )


def parse_upto_payment(wire: dict[str, Any]) -> UptoPayment:
    """Build an ``UptoPayment`` from a decoded v2 header whose ``accepted.scheme`` is "upto"; raises
    ``Invalid`` (``app.x402.wire``) on any deviation."""
    accepted, resource, extensions = v2_envelope(wire)
    body = keys(wire["payload"], {"signature", "permit2Authorization"})
    return UptoPayment(
        accepted=accepted,
        authorization=_authorization(body["permit2Authorization"]),
        signature=bytes.fromhex(matching(body, "signature", SIGNATURE_RE)[2:]),
        permit2612=_permit2612(extensions or {}),
        resource=resource,
    )


@lru_cache(maxsize=8)
def permit2_domain_separator(chain_id: int) -> bytes:
    """Permit2's EIP-712 domain separator: ``{name: "Permit2", chainId, verifyingContract: Permit2}``."""
    return keccak(PERMIT2_DOMAIN_TYPEHASH + PERMIT2_NAME_HASH + word(chain_id) + word(PERMIT2_ADDRESS))


def permit_digest(chain_id: int, auth: Permit2Authorization) -> bytes:
    """The 32-byte EIP-712 digest the payer signs for ``auth`` (Permit2 ``PermitWitnessTransferFrom``
    with witness ``Witness{to, facilitator, validAfter}``, spender = ``auth.spender``)."""
    permitted = keccak(TOKEN_PERMISSIONS_TYPEHASH + word(auth.token) + word(auth.amount))
    witness = keccak(WITNESS_TYPEHASH + word(auth.to) + word(auth.facilitator) + word(auth.valid_after))
    struct = keccak(
        PERMIT_WITNESS_TYPEHASH
        + permitted
        + word(auth.spender)
        + word(auth.nonce)
        + word(auth.deadline)
        + witness
    )
    return keccak(b"\x19\x01" + permit2_domain_separator(chain_id) + struct)


def upto_payment_of(wire: Any) -> UptoPayment | Verdict | None:
    """A decoded v2 ``PAYMENT-SIGNATURE``: the ``UptoPayment`` when its ``accepted.scheme`` is "upto",
    a ``Verdict`` (``invalid_payload``) when such a payload is malformed, None for any other (left to
    the ``exact`` parser, which gives the reason)."""
    accepted = wire.get("accepted") if isinstance(wire, dict) else None
    if not isinstance(accepted, dict) or accepted.get("scheme") != "upto" or wire.get("x402Version") != 2:
        return None
    try:
        return parse_upto_payment(wire)
    except Invalid as exc:
        return reject(INVALID_PAYLOAD, str(exc))


def eip2612_declaration() -> dict[str, Any]:
    """The 402's ``extensions.eip2612GasSponsoring``: the proxy submits a payer's EIP-2612 permit for
    Permit2 before settling, so a payer without a Permit2 allowance pays without gas. ``schema`` is
    the JSON Schema of the ``info`` the client fills in."""
    address = {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"}
    uint_text = {"type": "string", "pattern": "^[0-9]+$"}
    return {
        "info": {
            "description": "Send an EIP-2612 permit of the token for Permit2; the proxy pays its gas.",
            "version": "1",
        },
        "schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "from": address,
                "asset": address,
                "spender": address,
                "amount": uint_text,
                "nonce": uint_text,
                "deadline": uint_text,
                "signature": {"type": "string", "pattern": "^0x[0-9a-fA-F]{130}$"},
                "version": {"type": "string"},
            },
            "required": ["from", "asset", "spender", "amount", "nonce", "deadline", "signature"],
        },
    }
