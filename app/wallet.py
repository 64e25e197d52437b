"""A small wallet client (``x402-proxy pay``): read the 402, sign, retry, report the settlement.

It pays only what the server asked for this exact request, and never more than ``max_amount``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import requests

from .x402.codec import MalformedInput, decode_header, encode_header
from .x402.payer import header_name, offered_requirements, requirement_amount, sign_payment
from .x402.wire import RESPONSE_HEADERS

SUPPORTED_NETWORKS = ("eip155:8453", "eip155:84532", "base", "base-sepolia")


class PaymentRefused(RuntimeError):
    """The wallet will not pay (too expensive, nothing it can sign, or the server misbehaved)."""


@dataclass
class PayResult:
    status: int
    body: bytes
    headers: dict[str, str]
    amount: int
    settlement: dict[str, Any] | None


def choose_requirement(version: int, accepts: list[dict[str, Any]]) -> dict[str, Any]:
    for requirement in accepts:
        if (
            isinstance(requirement, dict)
            and requirement.get("scheme") == "exact"
            and (requirement.get("network") in SUPPORTED_NETWORKS)
        ):
            return requirement
    raise PaymentRefused("the server offers no exact-scheme payment on a network this wallet knows")


def pay(
    url: str,
    private_key: bytes,
    body: dict[str, Any],
    max_amount: int,
    session: requests.Session | None = None,
    timeout: float = 120.0,
) -> PayResult:
    """POST ``body`` to ``url``, paying the 402 if one comes back."""
    session = session or requests.Session()
    first = session.post(url, json=body, timeout=timeout)
    if first.status_code != 402:
        return PayResult(first.status_code, first.content, dict(first.headers), 0, None)
    try:
        offered_body = first.json()
    except ValueError:
        offered_body = None
    version, resource, accepts = offered_requirements(dict(first.headers), offered_body)
    requirement = choose_requirement(version, accepts)
    amount = requirement_amount(requirement, version)
    if amount > max_amount:
        raise PaymentRefused(f"the server asks {amount} atomic units, above the limit of {max_amount}")
    payment = sign_payment(requirement, version, private_key, int(time.time()), os.urandom(32), resource)
    second = session.post(
        url, json=body, headers={header_name(version): encode_header(payment.to_wire())}, timeout=timeout
    )
    settlement = None
    raw = second.headers.get(RESPONSE_HEADERS[version])
    if raw:
        try:
            settlement = decode_header(raw)
        except MalformedInput:
            settlement = None
    return PayResult(second.status_code, second.content, dict(second.headers), amount, settlement)
