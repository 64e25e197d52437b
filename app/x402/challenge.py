"""The 402 answer: one response that serves both x402 generations.

v2 clients read the ``PAYMENT-REQUIRED`` header; v1 clients read the JSON body. Both carry the same
requirement, so whichever a client reads, it signs the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .codec import encode_header
from .wire import Requirement

# A refusal's reason in words (the 402's ``error`` is its stable code), beside the challenge.
ERROR_DETAIL_HEADER = "X-Payment-Error"
# Credit (sign-in-with-x): the change an exact call added to the wallet's credit; what a call paid
# from credit was charged and what is left (atomic units).
CREDIT_ADDED_HEADER = "X-Credit-Added"
CREDIT_CHARGED_HEADER = "X-Credit-Charged"
CREDIT_BALANCE_HEADER = "X-Credit-Balance"
EXPOSED_HEADERS = (
    "PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE, X-Receipt, X-Payment-Error, "
    f"{CREDIT_ADDED_HEADER}, {CREDIT_CHARGED_HEADER}, {CREDIT_BALANCE_HEADER}"
)


@dataclass(frozen=True)
class Resource:
    url: str
    description: str
    mime_type: str = "application/json"


@dataclass(frozen=True)
class Challenge:
    body: dict[str, Any]  # the v1 PaymentRequired body
    header: str  # the v2 PAYMENT-REQUIRED header value
    v2: dict[str, Any]  # what the header encodes (a 402 may add per-request extensions to it)

    def headers(self) -> dict[str, str]:
        """The 402's headers: ``PAYMENT-REQUIRED`` (v2, base64 JSON), ``Cache-Control: no-store`` and
        ``Access-Control-Expose-Headers``."""
        return {
            "PAYMENT-REQUIRED": self.header,
            "Cache-Control": "no-store",
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
        }


def build_challenge(
    requirements: Sequence[Requirement],
    resource: Resource,
    error: str,
    extensions: dict[str, Any] | None = None,
) -> Challenge:
    """Build the v1 body and the v2 header for the requirements a call may be paid with, in order
    (``exact`` first, for clients that take the first entry). ``error`` is a reason code;
    ``extensions`` (e.g. bazaar discovery) go into the v2 header only. x402 v1 has no ``upto``: the
    v1 body lists the ``exact`` requirements only."""
    v2 = {
        "x402Version": 2,
        "error": error,
        "resource": {
            "url": resource.url,
            "description": resource.description,
            "mimeType": resource.mime_type,
        },
        "accepts": [requirement.to_v2() for requirement in requirements],
    }
    if extensions:
        v2["extensions"] = extensions
    v1 = {
        "x402Version": 1,
        "error": error,
        "accepts": [
            requirement.to_v1(resource.url, resource.description, resource.mime_type)
            for requirement in requirements
            if requirement.scheme == "exact"
        ],
    }
    return Challenge(body=v1, header=encode_header(v2), v2=v2)
