"""The ``payment-identifier`` extension (``specs/extensions/payment-identifier.md``): an idempotency
key the client puts in its payment payload, at ``extensions["payment-identifier"].info.id``, outside
the signed authorization. Pure: the declaration for the 402, and reading the id from a header.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from ..verdict import Verdict, reject

PAYMENT_IDENTIFIER = "payment-identifier"
ID_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
INVALID_IDENTIFIER = "invalid_payment_identifier"


def declaration() -> dict[str, Any]:
    """``extensions["payment-identifier"]`` of the 402: optional (``required`` a real boolean, which
    the official clients check), and the JSON Schema of the ``info`` a client fills in."""
    return {
        "info": {"required": False},
        "schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "required": {"type": "boolean"},
                "id": {"type": "string", "minLength": 16, "maxLength": 128, "pattern": "^[a-zA-Z0-9_-]+$"},
            },
            "required": ["required"],
        },
    }


def payment_identifier(wire: Any) -> str | Verdict | None:
    """The id in a decoded v2 ``PAYMENT-SIGNATURE``: None when the payload carries none, a
    ``Verdict`` (``invalid_payment_identifier``) when one is sent that is not 16–128 characters of
    ``[A-Za-z0-9_-]``."""
    extensions = wire.get("extensions") if isinstance(wire, dict) else None
    entry = extensions.get(PAYMENT_IDENTIFIER) if isinstance(extensions, dict) else None
    info = entry.get("info") if isinstance(entry, dict) else None
    if not isinstance(info, dict) or "id" not in info:
        return None
    value = info["id"]
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        return reject(
            INVALID_IDENTIFIER, "extensions.payment-identifier.info.id must be 16-128 of [A-Za-z0-9_-]"
        )
    return value


def fingerprint(header: str, request_sha256: str) -> str:
    """What a kept answer is bound to (the id travels outside the signature): SHA-256 (hex) of the
    payment header and of the request body's SHA-256."""
    return hashlib.sha256(header.encode() + b"\n" + request_sha256.encode()).hexdigest()
