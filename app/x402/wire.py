"""Wire objects of x402 v1 and v2 (exact scheme, EVM): requirements, payment payloads, settle responses.

Parsing is strict (``docs/guarantees.md``, strict input): amounts and times are decimal
strings matching ``^[0-9]{1,78}$`` below 2**256, addresses and nonces match exact regexes, the
signature is hex, and unknown keys are refused. A parse returns either a typed object or a
``Verdict`` with reason ``invalid_payload``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address

from .codec import MalformedInput, decode_header, encode_header
from .verdict import INVALID_PAYLOAD, INVALID_VERSION, Verdict, reject

# Always used with fullmatch: "$" would also match before a trailing newline.
UINT_RE = re.compile(r"[0-9]{1,78}")
ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")
NONCE_RE = re.compile(r"0x[0-9a-fA-F]{64}")
SIGNATURE_RE = re.compile(r"0x(?:[0-9a-fA-F]{2}){65,1024}")
UINT256_LIMIT = 2**256

V1_NETWORK_NAMES = {"eip155:8453": "base", "eip155:84532": "base-sepolia"}
V2_HEADER = "PAYMENT-SIGNATURE"
V1_HEADER = "X-PAYMENT"
RESPONSE_HEADERS = {2: "PAYMENT-RESPONSE", 1: "X-PAYMENT-RESPONSE"}


@dataclass(frozen=True)
class Requirement:
    """What one call costs: our own side of the match, never taken from the client."""

    network: str  # CAIP-2, e.g. "eip155:8453"
    amount: int
    asset: str  # checksummed
    pay_to: str  # checksummed
    max_timeout_seconds: int
    asset_name: str
    asset_version: str
    scheme: str = "exact"
    facilitator: str = ""  # upto: the account that will settle (extra.facilitatorAddress), checksummed
    # batch-settlement: the key that signs claims and refunds (checksummed), the withdraw delay
    # (seconds) and the deposit hint (atomic units)
    receiver_authorizer: str = ""
    withdraw_delay: int = 0
    min_deposit: int = 0

    @property
    def chain_id(self) -> int:
        """The chain id of the CAIP-2 ``network`` ("eip155:8453" → 8453); ``IndexError`` / ``ValueError`` when
        ``network`` is not of that form."""
        return int(self.network.split(":", 1)[1])

    @property
    def v1_network(self) -> str:
        """The x402 v1 network name ("base", "base-sepolia"); the CAIP-2 id itself for any other network."""
        return V1_NETWORK_NAMES.get(self.network, self.network)

    def to_v2(self) -> dict[str, Any]:
        """The x402 v2 ``accepts`` entry: ``amount`` as a decimal string of atomic units, and the token's
        EIP-712 domain name and version in ``extra``."""
        return {
            "scheme": self.scheme,
            "network": self.network,
            "amount": str(self.amount),
            "asset": self.asset,
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "extra": self.extra(),
        }

    def extra(self) -> dict[str, Any]:
        """The ``extra`` of an ``accepts`` entry: the token's EIP-712 domain name and version; for
        ``upto`` also ``assetTransferMethod: "permit2"`` and the settling ``facilitatorAddress``; for
        ``batch-settlement`` the ``receiverAuthorizer``, ``withdrawDelay`` (a JSON number, seconds)
        and ``minDeposit`` (decimal string, atomic units)."""
        extra: dict[str, Any] = {"name": self.asset_name, "version": self.asset_version}
        if self.scheme == "upto":
            extra.update(assetTransferMethod="permit2", facilitatorAddress=self.facilitator)
        elif self.scheme == "batch-settlement":
            extra.update(
                receiverAuthorizer=self.receiver_authorizer,
                withdrawDelay=self.withdraw_delay,
                minDeposit=str(self.min_deposit),
            )
        return extra

    def to_v1(self, resource_url: str, description: str, mime_type: str) -> dict[str, Any]:
        """The x402 v1 ``accepts`` entry: ``maxAmountRequired`` in atomic units (decimal string), the v1
        network name, and the resource's URL, description and MIME type."""
        return {
            "scheme": self.scheme,
            "network": self.v1_network,
            "maxAmountRequired": str(self.amount),
            "resource": resource_url,
            "description": description,
            "mimeType": mime_type,
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "asset": self.asset,
            "extra": self.extra(),
        }


@dataclass(frozen=True)
class Authorization:
    """An EIP-3009 TransferWithAuthorization, values as integers, addresses lower-case."""

    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes

    def to_wire(self) -> dict[str, str]:
        """Addresses in EIP-55 checksum form, as wallets send them (and some facilitators require)."""
        return {
            "from": to_checksum_address(self.from_),
            "to": to_checksum_address(self.to),
            "value": str(self.value),
            "validAfter": str(self.valid_after),
            "validBefore": str(self.valid_before),
            "nonce": "0x" + self.nonce.hex(),
        }


@dataclass(frozen=True)
class PaymentPayload:
    """A decoded ``PAYMENT-SIGNATURE`` (v2) or ``X-PAYMENT`` (v1) header."""

    version: int
    scheme: str
    network: str  # as sent: CAIP-2 for v2, a v1 name for v1
    authorization: Authorization
    signature: bytes
    accepted: dict[str, Any] | None = None  # v2 only: the requirement the client says it pays
    resource: dict[str, Any] | None = None
    extensions: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        """The payload as x402 JSON: v1 ``{x402Version, scheme, network, payload}``; v2 with ``accepted`` (and
        ``resource`` / ``extensions`` when set). The signature is 0x-hex, the addresses EIP-55 checksummed."""
        payload = {"signature": "0x" + self.signature.hex(), "authorization": self.authorization.to_wire()}
        if self.version == 1:
            return {"x402Version": 1, "scheme": self.scheme, "network": self.network, "payload": payload}
        wire: dict[str, Any] = {"x402Version": 2}
        if self.resource is not None:
            wire["resource"] = self.resource
        wire["accepted"] = self.accepted
        wire["payload"] = payload
        if self.extensions is not None:
            wire["extensions"] = self.extensions
        return wire


class Invalid(Exception):
    """A payload that deviates from the wire shape; its message says where."""

    pass


def field(obj: dict[str, Any], key: str, kind: type) -> Any:
    """``obj[key]`` when it is a ``kind``; raises ``Invalid``."""
    value = obj.get(key)
    if not isinstance(value, kind):
        raise Invalid(f"{key} must be a {kind.__name__}")
    return value


def uint(obj: dict[str, Any], key: str) -> int:
    """``obj[key]`` as a uint256 given as a decimal string; raises ``Invalid``."""
    text = field(obj, key, str)
    if not UINT_RE.fullmatch(text) or int(text) >= UINT256_LIMIT:
        raise Invalid(f"{key} must be a decimal uint256 string")
    return int(text)


def matching(obj: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    """``obj[key]`` when it is a string that ``pattern`` matches whole; raises ``Invalid``."""
    text = field(obj, key, str)
    if not pattern.fullmatch(text):
        raise Invalid(f"{key} is malformed")
    return text


def address_field(obj: dict[str, Any], key: str) -> str:
    """``obj[key]`` as a lower-case 0x address; raises ``Invalid`` when it is not one."""
    return matching(obj, key, ADDRESS_RE).lower()


class V2Payment:
    """What a v2 payment of a scheme of ours (``upto``, ``batch-settlement``) tells of itself: its
    version, and the network of the requirement it ``accepted``."""

    accepted: dict[str, Any]

    @property
    def version(self) -> int:
        return 2

    @property
    def network(self) -> str:
        return str(self.accepted.get("network", ""))


def keys(obj: Any, required: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``obj`` when it is an object with every ``required`` key and no key outside ``optional``;
    raises ``Invalid``."""
    if not isinstance(obj, dict):
        raise Invalid("expected a JSON object")
    missing = required - obj.keys()
    extra = obj.keys() - required - optional
    if missing or extra:
        raise Invalid(f"missing {sorted(missing)}" if missing else f"unknown keys {sorted(extra)}")
    return obj


def v2_envelope(wire: Any) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """(``accepted``, ``resource``, ``extensions``) of a decoded v2 payment of a scheme of ours:
    ``x402Version``, ``accepted`` (an object) and ``payload`` required, ``resource`` and
    ``extensions`` objects when present, no other key. Raises ``Invalid``."""
    top = keys(wire, {"x402Version", "accepted", "payload"}, frozenset({"resource", "extensions"}))
    accepted = field(top, "accepted", dict)
    resource, extensions = top.get("resource"), top.get("extensions")
    if resource is not None and not isinstance(resource, dict):
        raise Invalid("resource must be an object")
    if extensions is not None and not isinstance(extensions, dict):
        raise Invalid("extensions must be an object")
    return accepted, resource, extensions


def _authorization(obj: Any) -> Authorization:
    auth = keys(obj, {"from", "to", "value", "validAfter", "validBefore", "nonce"})
    return Authorization(
        from_=matching(auth, "from", ADDRESS_RE).lower(),
        to=matching(auth, "to", ADDRESS_RE).lower(),
        value=uint(auth, "value"),
        valid_after=uint(auth, "validAfter"),
        valid_before=uint(auth, "validBefore"),
        nonce=bytes.fromhex(matching(auth, "nonce", NONCE_RE)[2:]),
    )


def payment_from_wire(wire: Any, header_version: int) -> PaymentPayload:
    """Build a PaymentPayload from decoded JSON; raises ``Invalid`` on any deviation."""
    version = wire.get("x402Version") if isinstance(wire, dict) else None
    if type(version) is not int or version != header_version:
        raise Invalid(f"x402Version must be {header_version} in this header")
    if version == 2:
        top = keys(wire, {"x402Version", "accepted", "payload"}, frozenset({"resource", "extensions"}))
        accepted = field(top, "accepted", dict)
        scheme, network = field(accepted, "scheme", str), field(accepted, "network", str)
        resource = top.get("resource")
        extensions = top.get("extensions")
        if resource is not None and not isinstance(resource, dict):
            raise Invalid("resource must be an object")
        if extensions is not None and not isinstance(extensions, dict):
            raise Invalid("extensions must be an object")
    else:
        top = keys(wire, {"x402Version", "scheme", "network", "payload"})
        scheme, network = field(top, "scheme", str), field(top, "network", str)
        accepted = resource = extensions = None
    body = keys(top["payload"], {"signature", "authorization"})
    return PaymentPayload(
        version=version,
        scheme=scheme,
        network=network,
        authorization=_authorization(body["authorization"]),
        signature=bytes.fromhex(matching(body, "signature", SIGNATURE_RE)[2:]),
        accepted=accepted,
        resource=resource,
        extensions=extensions,
    )


def parse_payment_header(text: str, header_version: int) -> PaymentPayload | Verdict:
    """Decode a payment header of the given version; a ``Verdict`` says why it was refused."""
    try:
        wire = decode_header(text)
    except MalformedInput as exc:
        return reject(INVALID_PAYLOAD, str(exc))
    try:
        return payment_from_wire(wire, header_version)
    except Invalid as exc:
        reason = INVALID_VERSION if "x402Version" in str(exc) else INVALID_PAYLOAD
        return reject(reason, str(exc))


@dataclass(frozen=True)
class SettleResponse:
    """The content of ``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE``."""

    success: bool
    transaction: str
    network: str
    payer: str
    error_reason: str = ""
    amount: int | None = None  # upto: what was charged (atomic units)
    extra: dict[str, Any] | None = None  # batch-settlement: chargedAmount and channelState

    def to_header(self) -> str:
        """The header value: base64 of compact JSON ``{success, transaction, network, payer}``, with
        ``errorReason`` when there is one, ``amount`` (decimal string of atomic units) and ``extra``
        when set."""
        wire: dict[str, Any] = {
            "success": self.success,
            "transaction": self.transaction,
            "network": self.network,
            "payer": self.payer,
        }
        if self.error_reason:
            wire["errorReason"] = self.error_reason
        if self.amount is not None:
            wire["amount"] = str(self.amount)
        if self.extra is not None:
            wire["extra"] = self.extra
        return encode_header(wire)
