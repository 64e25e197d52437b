"""Signed receipts: the proxy's signature tying a settlement to the exact request and answer.

A receipt names the settlement transaction, payer, amount, model, network, the SHA-256 of the
request body and of the response body, and the time; the proxy signs it with EIP-191
(``personal_sign``) using a receipt key that is never the relayer key. A buyer checks it offline
against the saved request and response and the receipt address the proxy publishes at
``/.well-known/x402`` (``x402-proxy verify-receipt``).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_hash.auto import keccak

from app.x402.codec import decode_header, encode_header
from app.x402.verdict import ACCEPTED, Verdict, reject

RECEIPT_HEADER = "X-Receipt"
STREAM_RECEIPT_PREFIX = b": x402-receipt "
FIELDS = ("tx", "payer", "amount", "model", "network", "request_sha256", "response_sha256", "time")
# An upto receipt adds the maximum the payer authorized and the usage the amount was priced from
# ("<prompt tokens>+<completion tokens>", or "unreported": charged the maximum).
UPTO_FIELDS = (*FIELDS, "authorized", "usage")


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data`` as 64 lower-case hex digits (no 0x)."""
    return hashlib.sha256(data).hexdigest()


def derived_receipt_key(relayer_key: str) -> str:
    """A receipt key derived from the relayer key when none is configured: distinct from it, the
    same in every worker, and useless for moving funds."""
    return (
        "0x" + keccak(b"x402-tee-proxy receipt key\x00" + bytes.fromhex(relayer_key.removeprefix("0x"))).hex()
    )


@dataclass(frozen=True)
class Receipt:
    tx: str
    payer: str
    amount: int
    model: str
    network: str
    request_sha256: str
    response_sha256: str  # "" in the header of a stream: the final SSE comment carries the full one
    time: int
    signature: str = ""
    authorized: int = 0  # upto only: the maximum authorized (atomic units)
    usage: str = ""  # upto only: the usage ``amount`` was priced from

    @property
    def fields(self) -> tuple[str, ...]:
        """The signed fields: ``UPTO_FIELDS`` for an upto receipt, else ``FIELDS``."""
        return UPTO_FIELDS if self.usage else FIELDS

    def message(self) -> bytes:
        """The exact text that is signed: one ``name:value`` line per field, in a fixed order (v2 for
        an upto receipt, which binds the charge to the authorized maximum and the usage)."""
        version = "v2" if self.usage else "v1"
        lines = [
            f"x402-tee-proxy receipt {version}",
            *(f"{name}:{getattr(self, name)}" for name in self.fields),
        ]
        return "\n".join(lines).encode("utf-8")

    def signed(self, key: str) -> Receipt:
        """A copy signed with ``key`` (hex private key) by EIP-191 ``personal_sign`` of ``message()``, the
        signature 0x-hex; raises ``ValueError`` for a malformed key."""
        signature = Account.sign_message(encode_defunct(self.message()), key).signature
        return replace(self, signature="0x" + bytes(signature).hex())

    def signer(self) -> str | None:
        """The checksummed address that signed ``message()``, or None when the signature does not recover."""
        try:
            return str(Account.recover_message(encode_defunct(self.message()), signature=self.signature))
        except Exception:
            return None

    def to_header(self) -> str:
        """The ``X-Receipt`` value: base64 of the compact JSON of every signed field and the signature."""
        values = asdict(self)
        return encode_header({name: values[name] for name in (*self.fields, "signature")})

    @classmethod
    def from_header(cls, text: str) -> Receipt:
        """Parse an ``X-Receipt`` value; raises ``ValueError`` (``MalformedInput`` included) unless it is
        strict base64 JSON with exactly the receipt's fields, ``TypeError`` when amount or time is null, a
        list or an object."""
        value: Any = decode_header(text)
        if not isinstance(value, dict) or set(value) not in (
            {*FIELDS, "signature"},
            {*UPTO_FIELDS, "signature"},
        ):
            raise ValueError("not an x402-tee-proxy receipt")
        if "usage" in value and (not isinstance(value["usage"], str) or not value["usage"]):
            raise ValueError("an upto receipt names its usage")
        numbers = {name: int(value[name]) for name in ("amount", "time", "authorized") if name in value}
        return cls(**{**value, **numbers})


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
