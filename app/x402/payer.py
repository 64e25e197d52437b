"""The buyer's side, pure: pick a requirement from a 402 and sign an EIP-3009 payment for it.

Used by ``x402-proxy pay`` and by the tests, which sign real payments (and deliberately wrong ones).
"""

from __future__ import annotations

from typing import Any

from .codec import MalformedInput, decode_header
from .eip712 import address_of_key, authorization_digest, domain_separator, sign_digest
from .wire import V1_HEADER, V1_NETWORK_NAMES, V2_HEADER, Authorization, PaymentPayload

CAIP2_BY_V1_NAME = {name: caip2 for caip2, name in V1_NETWORK_NAMES.items()}
V1_VALID_AFTER_SKEW = 600  # v1 clients back-date validAfter by ten minutes


def offered_requirements(
    headers: dict[str, str], body: Any
) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]]]:
    """(version, resource, accepts) from a 402: the v2 header first, else the v1 body."""
    header = headers.get("PAYMENT-REQUIRED") or headers.get("payment-required")
    if header:
        try:
            required = decode_header(header)
        except MalformedInput:
            required = None
        if isinstance(required, dict) and isinstance(required.get("accepts"), list):
            return 2, required.get("resource"), required["accepts"]
    if isinstance(body, dict) and isinstance(body.get("accepts"), list):
        return 1, None, body["accepts"]
    return 0, None, []


def requirement_amount(requirement: dict[str, Any], version: int) -> int:
    """The amount a requirement asks, in atomic units: ``amount`` (v2) or ``maxAmountRequired`` (v1);
    raises ``KeyError`` when it is missing, ``ValueError`` when it is not an integer."""
    return int(requirement["amount"] if version == 2 else requirement["maxAmountRequired"])


def sign_payment(
    requirement: dict[str, Any],
    version: int,
    private_key: bytes,
    now: int,
    nonce: bytes,
    resource: dict[str, Any] | None = None,
) -> PaymentPayload:
    """A payment for exactly ``requirement`` (as the server sent it), valid for its maxTimeoutSeconds."""
    network = requirement["network"]
    caip2 = network if version == 2 else CAIP2_BY_V1_NAME[network]
    auth = Authorization(
        from_=address_of_key(private_key),
        to=str(requirement["payTo"]).lower(),
        value=requirement_amount(requirement, version),
        valid_after=0 if version == 2 else now - V1_VALID_AFTER_SKEW,
        valid_before=now + int(requirement["maxTimeoutSeconds"]),
        nonce=nonce,
    )
    extra = requirement.get("extra") or {}
    separator = domain_separator(
        extra["name"], extra["version"], int(caip2.split(":")[1]), requirement["asset"]
    )
    digest = authorization_digest(
        separator, auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce
    )
    return PaymentPayload(
        version=version,
        scheme=requirement["scheme"],
        network=network,
        authorization=auth,
        signature=sign_digest(private_key, digest),
        accepted=requirement if version == 2 else None,
        resource=resource if version == 2 else None,
    )


def header_name(version: int) -> str:
    """The payment header to send: ``PAYMENT-SIGNATURE`` for v2, ``X-PAYMENT`` for any other version."""
    return V2_HEADER if version == 2 else V1_HEADER
