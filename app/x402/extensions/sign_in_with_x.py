"""The ``sign-in-with-x`` extension (``specs/extensions/sign-in-with-x.md`` of the x402 repository):
a wallet proves it is itself by signing an EIP-4361 (Sign-In with Ethereum) message, so it can spend
what the proxy holds for it (its credit) without a new payment. Pure: the 402's declaration, the
nonces the proxy issues, reading the ``SIGN-IN-WITH-X`` header, rebuilding the EIP-4361 text and
checking its fields and EOA signature (EIP-191). Whether a nonce was used before and EIP-1271
wallets are the caller's (they need Redis and the chain).

Nonces are stateless to issue and cannot be forged: ``<issued, 8 hex><random, 16 hex><tag, 16 hex>``,
the tag an HMAC-SHA256 (truncated to 8 bytes) of the rest under a secret every worker shares, so a
402 writes nothing and any worker or host recognises a nonce it issued.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from eth_utils import keccak

from ..codec import MalformedInput, decode_header
from ..eip712 import recover_signer
from ..verdict import Verdict, reject

SIGN_IN_WITH_X = "sign-in-with-x"
HEADER = "SIGN-IN-WITH-X"
MAX_AGE = 300  # seconds an issuedAt may be old: the extension's default (validate_siwx_message)
FUTURE_SKEW = 30  # seconds an issuedAt may be ahead of this host's clock (another host issued it)
NONCE_RE = re.compile(r"[0-9a-f]{40}")
ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")
SIGNATURE_RE = re.compile(r"0x(?:[0-9a-fA-F]{2})+")
# EIP-4361's ABNF: every field printable ASCII (no line break of any kind), the statement of URI
# characters and spaces, times RFC 3339. A wallet shows its sign-in warning (another site's domain)
# only for a message it can parse as EIP-4361.
PRINTABLE_RE = re.compile(r"[\x20-\x7e]*")
STATEMENT_RE = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;= ]*")
RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})"
)
MAX_SIGNATURE_BYTES = 2048  # an EIP-1271 wallet may sign with more than 65 bytes (a multisig's owners)

# Reason codes: the extension's own (x402.extensions.sign_in_with_x.types), and one for a header
# that cannot be read at all.
INVALID_HEADER = "invalid_siwx_header"
DOMAIN_MISMATCH = "invalid_siwx_domain_mismatch"
URI_MISMATCH = "invalid_siwx_uri_mismatch"
ISSUED_AT = "invalid_siwx_issued_at"
TOO_OLD = "invalid_siwx_issued_at_too_old"
IN_FUTURE = "invalid_siwx_issued_at_in_future"
EXPIRATION_TIME = "invalid_siwx_expiration_time"
EXPIRED = "invalid_siwx_expired"
NOT_BEFORE = "invalid_siwx_not_before"
NOT_YET_VALID = "invalid_siwx_not_yet_valid"
NONCE = "invalid_siwx_nonce"
SIGNATURE = "invalid_siwx_signature"
CHAIN_ID = "invalid_siwx_chain_id"
MALFORMED_SIGNATURE = "invalid_siwx_malformed_signature"

_TEXT_FIELDS = ("domain", "address", "uri", "version", "chainId", "type", "nonce", "issuedAt", "signature")
_OPTIONAL_TEXT = ("statement", "expirationTime", "notBefore", "requestId", "signatureScheme")


@dataclass(frozen=True)
class SignIn:
    """A ``SIGN-IN-WITH-X`` payload: the EIP-4361 fields as sent (``chain_id`` CAIP-2, e.g.
    ``eip155:8453``; times ISO 8601 text) and the signature's bytes."""

    domain: str
    address: str
    uri: str
    version: str
    chain_id: str
    type: str
    nonce: str
    issued_at: str
    signature: bytes
    statement: str | None = None
    expiration_time: str | None = None
    not_before: str | None = None
    request_id: str | None = None
    resources: tuple[str, ...] | None = None
    signature_scheme: str | None = None


def parse(header: str) -> SignIn | Verdict:
    """The payload of a ``SIGN-IN-WITH-X`` header (canonical base64 of strict JSON, as
    ``app.x402.codec`` reads payment headers), or a ``Verdict`` (``invalid_siwx_header``) saying
    what is wrong with it."""
    try:
        raw = decode_header(header)
    except MalformedInput as exc:
        return reject(INVALID_HEADER, f"SIGN-IN-WITH-X: {exc}")
    if not isinstance(raw, dict):
        return reject(INVALID_HEADER, "SIGN-IN-WITH-X must be a JSON object")
    for name in _TEXT_FIELDS:
        if not isinstance(raw.get(name), str) or not raw[name]:
            return reject(INVALID_HEADER, f"SIGN-IN-WITH-X: {name} must be a non-empty string")
    for name in _OPTIONAL_TEXT:
        if raw.get(name) is not None and not isinstance(raw[name], str):
            return reject(INVALID_HEADER, f"SIGN-IN-WITH-X: {name} must be a string")
    resources = raw.get("resources")
    if resources is not None and not (
        isinstance(resources, list)
        and resources
        and all(isinstance(r, str) and "\n" not in r for r in resources)
    ):
        return reject(INVALID_HEADER, "SIGN-IN-WITH-X: resources must be a non-empty list of URIs")
    if raw.get("statement") == "":  # EIP-4361 libraries leave an empty statement out or refuse it
        return reject(INVALID_HEADER, "SIGN-IN-WITH-X: statement must not be empty")
    texts = [raw[name] for name in (*_TEXT_FIELDS, *_OPTIONAL_TEXT) if isinstance(raw.get(name), str)]
    if not all(PRINTABLE_RE.fullmatch(text) for text in [*texts, *(resources or [])]):
        return reject(INVALID_HEADER, "SIGN-IN-WITH-X: fields must be printable ASCII (EIP-4361)")
    if raw.get("statement") is not None and not STATEMENT_RE.fullmatch(raw["statement"]):
        return reject(INVALID_HEADER, "SIGN-IN-WITH-X: the statement holds a character EIP-4361 forbids")
    if not ADDRESS_RE.fullmatch(raw["address"]):
        return reject(INVALID_HEADER, "SIGN-IN-WITH-X: address must be a 0x address")
    signature = raw["signature"]
    if not SIGNATURE_RE.fullmatch(signature) or len(signature) > 2 + 2 * MAX_SIGNATURE_BYTES:
        return reject(MALFORMED_SIGNATURE, "SIGN-IN-WITH-X: signature must be 0x-prefixed hex bytes")
    return SignIn(
        domain=raw["domain"],
        address=raw["address"],
        uri=raw["uri"],
        version=raw["version"],
        chain_id=raw["chainId"],
        type=raw["type"],
        nonce=raw["nonce"],
        issued_at=raw["issuedAt"],
        signature=bytes.fromhex(signature[2:]),
        statement=raw.get("statement"),
        expiration_time=raw.get("expirationTime"),
        not_before=raw.get("notBefore"),
        request_id=raw.get("requestId"),
        resources=None if resources is None else tuple(resources),
        signature_scheme=raw.get("signatureScheme"),
    )


def message_text(sign_in: SignIn) -> str:
    """The EIP-4361 message the wallet signed, rebuilt from the payload's fields in the EIP's order:
    the preamble and address, the statement (when sent) between blank lines, then ``URI``,
    ``Version``, ``Chain ID`` (the number of the CAIP-2 id), ``Nonce``, ``Issued At`` and the
    optional ``Expiration Time``, ``Not Before``, ``Request ID`` and ``Resources`` lines."""
    head = f"{sign_in.domain} wants you to sign in with your Ethereum account:\n{sign_in.address}\n"
    # a statement sits between blank lines; without one, EIP-4361's ABNF still leaves two
    head += "\n" if sign_in.statement is None else f"\n{sign_in.statement}\n"
    lines = [
        f"URI: {sign_in.uri}",
        f"Version: {sign_in.version}",
        f"Chain ID: {sign_in.chain_id.removeprefix('eip155:')}",
        f"Nonce: {sign_in.nonce}",
        f"Issued At: {sign_in.issued_at}",
    ]
    if sign_in.expiration_time:
        lines.append(f"Expiration Time: {sign_in.expiration_time}")
    if sign_in.not_before:
        lines.append(f"Not Before: {sign_in.not_before}")
    if sign_in.request_id is not None:
        lines.append(f"Request ID: {sign_in.request_id}")
    if sign_in.resources is not None:
        lines.append("\n".join(["Resources:", *(f"- {r}" for r in sign_in.resources)]))
    return head + "\n" + "\n".join(lines)


def signed_digest(sign_in: SignIn) -> bytes:
    """The EIP-191 (version 0x45, ``personal_sign``) hash of the message: what an EOA signed and
    what an EIP-1271 wallet's ``isValidSignature`` is asked about."""
    message = message_text(sign_in).encode()
    return keccak(b"\x19Ethereum Signed Message:\n" + str(len(message)).encode() + message)


def signer(sign_in: SignIn) -> str | None:
    """The lower-case address whose key made the 65-byte signature (``v`` 27/28 or 0/1), None when
    it is not a canonical ECDSA signature (an EIP-1271 wallet's, or garbage)."""
    signature = sign_in.signature
    if len(signature) == 65 and signature[64] in (0, 1):
        signature = signature[:64] + bytes([signature[64] + 27])
    return recover_signer(signed_digest(sign_in), signature)


def _instant(text: str) -> float | None:
    """Unix seconds of an RFC 3339 time (``Z`` or an offset); None when it is not one."""
    if not RFC3339_RE.fullmatch(text):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return None if moment.tzinfo is None else moment.timestamp()


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def check(sign_in: SignIn, origin: str, network: str, now: float) -> Verdict:
    """The checks that need no state: ``domain`` is the host[:port] of ``origin`` (the
    ``scheme://host[:port]`` the buyer called), ``uri`` on that origin, ``version`` 1, ``chainId``
    our ``network`` (CAIP-2) signed the EIP-191 way, ``issuedAt`` within ``MAX_AGE`` seconds (and no
    more than ``FUTURE_SKEW`` ahead), not expired, past ``notBefore``. Rules: EIP-4361, and the
    extension's ``validate_siwx_message``."""
    if sign_in.domain != urlsplit(origin).netloc:
        return reject(DOMAIN_MISMATCH, f"domain must be {urlsplit(origin).netloc}")
    if origin_of(sign_in.uri) != origin:
        return reject(URI_MISMATCH, f"uri must be on {origin}")
    if sign_in.version != "1":
        return reject(INVALID_HEADER, "version must be 1")
    if sign_in.chain_id != network or sign_in.type != "eip191":
        return reject(CHAIN_ID, f"sign in on {network} with an eip191 signature")
    issued = _instant(sign_in.issued_at)
    if issued is None:
        return reject(ISSUED_AT, "issuedAt is not an ISO 8601 time with a zone")
    if now - issued > MAX_AGE:
        return reject(TOO_OLD, f"issuedAt is more than {MAX_AGE} s old: take a fresh 402's nonce")
    if issued - now > FUTURE_SKEW:
        return reject(IN_FUTURE, "issuedAt is in the future")
    if sign_in.expiration_time:
        expires = _instant(sign_in.expiration_time)
        if expires is None:
            return reject(EXPIRATION_TIME, "expirationTime is not an ISO 8601 time with a zone")
        if expires < now:
            return reject(EXPIRED, "the sign-in message expired")
    if sign_in.not_before:
        start = _instant(sign_in.not_before)
        if start is None:
            return reject(NOT_BEFORE, "notBefore is not an ISO 8601 time with a zone")
        if now < start:
            return reject(NOT_YET_VALID, "the sign-in message is not valid yet (notBefore)")
    return Verdict(True)


def _tag(secret: bytes, body: str) -> str:
    return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()[:16]


def new_nonce(secret: bytes, issued: int, random: bytes) -> str:
    """A nonce this proxy issues at ``issued`` (unix seconds): 40 lower-case hex characters
    (EIP-4361 asks at least 8 alphanumerics), ``random`` 8 bytes from the caller."""
    body = f"{issued:08x}{random.hex()}"
    return body + _tag(secret, body)


def nonce_issued(secret: bytes, nonce: str) -> int | None:
    """When a nonce of ours was issued (unix seconds), None when ``secret`` did not tag it."""
    if not NONCE_RE.fullmatch(nonce):
        return None
    body, tag = nonce[:24], nonce[24:]
    if not hmac.compare_digest(_tag(secret, body), tag):
        return None
    return int(body[:8], 16)


def iso(moment: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds and ``Z`` (how EIP-4361 examples write times)."""
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def declaration(resource_url: str, nonce: str, issued: int, network: str, statement: str) -> dict[str, Any]:
    """``extensions["sign-in-with-x"]`` of a 402 for ``resource_url``: ``info`` (domain = its
    host[:port], uri = the URL, the ``statement`` (one line), version 1, this 402's ``nonce``,
    ``issuedAt`` and an ``expirationTime`` ``MAX_AGE`` seconds later), ``supportedChains``
    (``network``, eip191) and the JSON Schema of the payload a client sends back (kept small: a
    client echoes the declaration in its payment header)."""
    info = {
        "domain": urlsplit(resource_url).netloc,
        "uri": resource_url,
        "statement": statement,
        "version": "1",
        "nonce": nonce,
        "issuedAt": iso(issued),
        "expirationTime": iso(issued + MAX_AGE),
        "resources": [resource_url],
    }
    return {"info": info, "supportedChains": [{"chainId": network, "type": "eip191"}], "schema": SCHEMA}


# The payload's JSON Schema, kept to its required fields: the official client echoes every declared
# extension into its payment header, which must stay under the 8 KiB header limit of common servers.
SCHEMA: dict[str, Any] = {"type": "object", "required": list(_TEXT_FIELDS)}
