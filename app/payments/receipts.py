"""Signed receipts: the proxy's signature tying a settlement to the exact request and answer.

A receipt names the settlement transaction, payer, amount charged, model, network, the SHA-256 of
the request body and of the response body, the time, and for ``upto`` the maximum authorized and
the usage the amount was priced from. It is EIP-712 typed data that carries its own ``domain``,
``types`` and ``primaryType`` beside the ``message`` and the ``signature``, so any EIP-712 library
recovers the signer without this project's code (README, "Trust"). The key is a receipt key, never
the relayer key; buyers check it offline against the saved bodies and the receipt address published
at ``/.well-known/x402`` (``x402-proxy verify-receipt``).

The x402 ``offer-receipt`` extension's receipt (``specs/extensions/extension-offer-and-receipt.md``:
a fixed, smaller type that is not transmitted) is signed too and travels in ``PAYMENT-RESPONSE``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak

from app.x402.codec import decode_header, encode_header
from app.x402.verdict import ACCEPTED, Verdict, reject

RECEIPT_HEADER = "X-Receipt"
NETWORK_RE = re.compile(r"eip155:[0-9]{1,20}")
STREAM_RECEIPT_PREFIX = b": x402-receipt "
DOMAIN = {"name": "x402-tee-proxy receipt", "version": "4"}  # chainId: the payment's network
DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
]
RECEIPT_TYPE = [
    {"name": "tx", "type": "string"},
    {"name": "payer", "type": "address"},
    {"name": "amount", "type": "uint256"},
    {"name": "model", "type": "string"},
    {"name": "network", "type": "string"},
    {"name": "requestSha256", "type": "string"},
    {"name": "responseSha256", "type": "string"},
    {"name": "time", "type": "uint256"},
    {"name": "authorized", "type": "uint256"},
    {"name": "usage", "type": "string"},
    {"name": "teeMeasurement", "type": "string"},
    {"name": "teeEvidence", "type": "string"},
]
TYPES = {"EIP712Domain": DOMAIN_TYPE, "Receipt": RECEIPT_TYPE}
MESSAGE_NAMES = {
    "request_sha256": "requestSha256",
    "response_sha256": "responseSha256",
    "tee_measurement": "teeMeasurement",
    "tee_evidence": "teeEvidence",
}
OFFER_RECEIPT = "offer-receipt"
OFFER_RECEIPT_TYPES = {
    "EIP712Domain": DOMAIN_TYPE,
    "Receipt": [
        {"name": "network", "type": "string"},
        {"name": "resourceUrl", "type": "string"},
        {"name": "payer", "type": "string"},
        {"name": "issuedAt", "type": "uint256"},
        {"name": "transaction", "type": "string"},
    ],
}


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data`` as 64 lower-case hex digits (no 0x)."""
    return hashlib.sha256(data).hexdigest()


def derived_key(relayer_key: str, purpose: str) -> str:
    """A key derived from the relayer key for one ``purpose`` ("receipt", "receiver authorizer")
    when none is configured: distinct from it and from every other purpose's, the same in every
    worker, and useless for moving funds. 0x-hex, 32 bytes: ``keccak256("x402-tee-proxy <purpose>
    key" ‖ 0x00 ‖ relayer key)``."""
    label = f"x402-tee-proxy {purpose} key".encode() + b"\x00"
    return "0x" + keccak(label + bytes.fromhex(relayer_key.removeprefix("0x"))).hex()


def derived_receipt_key(relayer_key: str) -> str:
    """The receipt key derived from the relayer key when none is configured (``derived_key``)."""
    return derived_key(relayer_key, "receipt")


def _chain_id(network: str) -> int:
    return int(network.split(":", 1)[1])


@dataclass(frozen=True)
class Receipt:
    """What the proxy signs about one paid answer. ``amount`` and ``authorized`` in atomic units
    (``authorized`` 0 for ``exact``), ``time`` unix seconds, the SHA-256s as 64 hex digits
    (``response_sha256`` "" in the header of a stream: its closing comment carries the full one),
    ``usage`` "<prompt tokens>+<completion tokens>" or "unreported" (``upto``), "" (``exact``);
    for an attested model, ``tee_measurement`` the enclave's launch measurement (96 hex digits) and
    ``tee_evidence`` the ``evidence_sha256`` of the bundle its connection was pinned to ("" both
    otherwise)."""

    tx: str
    payer: str
    amount: int
    model: str
    network: str
    request_sha256: str
    response_sha256: str
    time: int
    signature: str = ""
    authorized: int = 0
    usage: str = ""
    tee_measurement: str = ""
    tee_evidence: str = ""

    def typed_data(self) -> dict[str, Any]:
        """The EIP-712 typed data that is signed: ``{domain, types, primaryType, message}``."""
        fields = {k: v for k, v in asdict(self).items() if k != "signature"}
        message = {MESSAGE_NAMES.get(k, k): v for k, v in fields.items()}
        return {
            "domain": {**DOMAIN, "chainId": _chain_id(self.network)},
            "types": TYPES,
            "primaryType": "Receipt",
            "message": message,
        }

    def signed(self, key: str) -> Receipt:
        """A copy signed with ``key`` (hex private key) over ``typed_data()`` (EIP-712), the signature
        0x-hex; raises ``ValueError`` for a malformed key."""
        signature = Account.sign_message(encode_typed_data(full_message=self.typed_data()), key).signature
        return replace(self, signature="0x" + bytes(signature).hex())

    def signer(self) -> str | None:
        """The checksummed address that signed ``typed_data()``, or None when the signature does not
        recover."""
        try:
            message = encode_typed_data(full_message=self.typed_data())
            return str(Account.recover_message(message, signature=self.signature))
        except Exception:
            return None

    def to_header(self) -> str:
        """The ``X-Receipt`` value: base64 of the compact JSON of ``typed_data()`` and ``signature``."""
        return encode_header({**self.typed_data(), "signature": self.signature})

    @classmethod
    def from_header(cls, text: str) -> Receipt:
        """Parse an ``X-Receipt`` value; raises ``ValueError`` (``MalformedInput`` included) unless it is
        strict base64 JSON of this project's typed data (its domain and types exactly, numbers as
        JSON integers, the rest strings) and a signature."""
        value: Any = decode_header(text)
        if not isinstance(value, dict) or set(value) != {
            "domain",
            "types",
            "primaryType",
            "message",
            "signature",
        }:
            raise ValueError("not an x402-tee-proxy receipt")
        message = value["message"]
        names = {MESSAGE_NAMES.get(f, f): f for f in cls.__dataclass_fields__ if f != "signature"}
        if not isinstance(message, dict) or set(message) != set(names):
            raise ValueError("not an x402-tee-proxy receipt")
        fields = {names[k]: v for k, v in message.items()}
        numbers_ok = all(type(fields[name]) is int for name in ("amount", "time", "authorized"))
        texts_ok = all(
            isinstance(fields[name], str) for name in fields if name not in ("amount", "time", "authorized")
        )
        if not numbers_ok or not texts_ok or not NETWORK_RE.fullmatch(fields["network"]):
            raise ValueError("a receipt field of the wrong type")
        receipt = cls(**{**fields, "signature": value["signature"]})
        if {k: value[k] for k in ("domain", "types", "primaryType")} != {
            k: v for k, v in receipt.typed_data().items() if k != "message"
        }:
            raise ValueError("a receipt of another domain or schema")
        return receipt


def offer_receipt(
    network: str, resource_url: str, payer: str, tx: str, issued_at: int, key: str
) -> dict[str, Any]:
    """``extensions["offer-receipt"]`` of a successful ``PAYMENT-RESPONSE``: the extension's own
    EIP-712 receipt (domain ``{name: "x402 receipt", version: "1", chainId}``, its fixed ``Receipt``
    type, which is not sent), signed with the receipt key."""
    payload = {
        "network": network,
        "resourceUrl": resource_url,
        "payer": payer,
        "issuedAt": issued_at,
        "transaction": tx,
    }
    typed = {
        "domain": {"name": "x402 receipt", "version": "1", "chainId": _chain_id(network)},
        "types": OFFER_RECEIPT_TYPES,
        "primaryType": "Receipt",
        "message": payload,
    }
    signature = Account.sign_message(encode_typed_data(full_message=typed), key).signature
    receipt = {"format": "eip712", "payload": payload, "signature": "0x" + bytes(signature).hex()}
    return {OFFER_RECEIPT: {"info": {"version": 1, "receipt": receipt}}}


def verify_receipt(
    receipt: Receipt, request_body: bytes, response_body: bytes | None, address: str
) -> Verdict:
    """Check a receipt offline: signed by ``address``, and about exactly these bodies."""
    signer = receipt.signer()
    if signer is None or signer.lower() != address.lower():
        return reject("receipt_signature", f"signed by {signer}, not the proxy's receipt address {address}")
    if receipt.request_sha256 != sha256_hex(request_body):
        return reject("receipt_request_mismatch", "the request body is not the one this receipt covers")
    if response_body is not None and receipt.response_sha256 != sha256_hex(response_body):
        return reject("receipt_response_mismatch", "the response body is not the one this receipt covers")
    return ACCEPTED
