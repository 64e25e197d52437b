"""A small wallet client (``x402-proxy pay``): read the 402, sign, retry, report the settlement.

It pays only what the server asked for this exact request, only in the asset it was told to pay in
(the network's USDC unless named), and never more than ``max_amount`` atomic units of that asset.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import requests

from app.settings import NETWORKS, Network
from app.x402.codec import MalformedInput, decode_header, encode_header
from app.x402.payer import header_name, offered_requirements, requirement_amount, sign_payment
from app.x402.wire import RESPONSE_HEADERS

# The networks this wallet pays on, by both names a 402 may use: CAIP-2 (v2) and the v1 name.
NETWORKS_BY_NAME: dict[str, Network] = {
    name: network for network in NETWORKS.values() for name in (network.caip2, network.v1_name)
}


class PaymentRefused(RuntimeError):
    """The wallet will not pay (too expensive, nothing it can sign, or the server misbehaved)."""


@dataclass
class PayResult:
    """What came back: the last answer's ``status``, ``body`` and ``headers``; the ``amount`` paid
    (atomic units, 0 when nothing was signed); the decoded payment response; the exact ``request``
    bytes sent; the payment header sent as (name, value), ("", "") for none."""

    status: int
    body: bytes
    headers: dict[str, str]
    amount: int
    settlement: dict[str, Any] | None
    request: bytes = b""
    payment: tuple[str, str] = ("", "")


def choose_requirement(accepts: list[dict[str, Any]], asset: str | None = None) -> dict[str, Any]:
    """The first exact-scheme offer on a known network in ``asset`` (default: that network's USDC).

    An offer in any other token is refused, so ``max_amount`` is always compared with atomic units
    of the asset the caller meant.
    """
    other_assets: list[str] = []
    for requirement in accepts:
        if not isinstance(requirement, dict) or requirement.get("scheme") != "exact":
            continue
        name = requirement.get("network")
        network = NETWORKS_BY_NAME.get(name) if isinstance(name, str) else None
        if network is None:
            continue
        offered = requirement.get("asset")
        if isinstance(offered, str) and offered.lower() == (asset or network.usdc).lower():
            return requirement
        other_assets.append(f"{str(offered)[:42]!r} on {name}")
    if not other_assets:
        raise PaymentRefused("the server offers no exact-scheme payment on a network this wallet knows")
    wanted = f"the asset named ({asset})" if asset else "the network's USDC"
    raise PaymentRefused(
        f"the server asks to be paid in {', '.join(other_assets)}, not {wanted}; "
        "refusing (name the token with --asset to pay in it)"
    )


def pay(
    url: str,
    private_key: bytes,
    body: dict[str, Any],
    max_amount: int,
    asset: str | None = None,
    session: requests.Session | None = None,
    timeout: float = 120.0,
    payment: tuple[str, str] | None = None,
) -> PayResult:
    """POST ``body`` to ``url``, paying the 402 if one comes back: at most ``max_amount`` atomic units
    of ``asset`` (default: the USDC of the network offered; 6 decimals). ``timeout`` is in seconds.
    With ``payment`` (a payment header's name and value, saved from an earlier call) that header is
    sent again instead: a call that failed after its payment settled is served by it."""
    session = session or requests.Session()
    request = json.dumps(body, separators=(",", ":")).encode()  # the bytes a receipt binds
    sent = {"Content-Type": "application/json"}
    if payment is not None:
        again = session.post(url, data=request, headers={**sent, payment[0]: payment[1]}, timeout=timeout)
        return _result(again, 0, request, payment)
    first = session.post(url, data=request, headers=sent, timeout=timeout)
    if first.status_code != 402:
        return PayResult(first.status_code, first.content, dict(first.headers), 0, None, request)
    try:
        offered_body = first.json()
    except ValueError:
        offered_body = None
    version, resource, accepts = offered_requirements(dict(first.headers), offered_body)
    requirement = choose_requirement(accepts, asset)
    amount = requirement_amount(requirement, version)
    if amount > max_amount:
        raise PaymentRefused(f"the server asks {amount} atomic units, above the limit of {max_amount}")
    signed = sign_payment(requirement, version, private_key, int(time.time()), os.urandom(32), resource)
    header = (header_name(version), encode_header(signed.to_wire()))
    second = session.post(url, data=request, headers={**sent, header[0]: header[1]}, timeout=timeout)
    return _result(second, amount, request, header)


def _result(answer: requests.Response, amount: int, request: bytes, header: tuple[str, str]) -> PayResult:
    settlement = None
    raw = answer.headers.get(RESPONSE_HEADERS[2]) or answer.headers.get(RESPONSE_HEADERS[1])
    if raw:
        try:
            settlement = decode_header(raw)
        except MalformedInput:
            settlement = None
    return PayResult(
        answer.status_code, answer.content, dict(answer.headers), amount, settlement, request, header
    )
