"""What the gate hands out: the refusal it raises (``PaymentRequired``, the 402), a confirmed payment
(``Paid``), a payment header checked offline (``Offer``) and a claimed payment whose settlement may
still be running (``Ticket``). Pure data, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from app.catalog import Quote
from app.settings import Settings
from app.x402.checks import OfflineCheck
from app.x402.verdict import Verdict
from app.x402.wire import V1_HEADER, V2_HEADER, PaymentPayload, Requirement


class PaymentRequired(Exception):
    """Answer 402 with the challenge; ``reason`` is the stable code, ``settle_response`` set when a
    settlement was attempted (so the client sees the failed transaction), ``corrective`` what the
    ``batch-settlement`` requirement's ``extra`` gains in a corrective 402 (the channel's state)."""

    def __init__(
        self,
        verdict: Verdict,
        settle_response: tuple[str, str] | None = None,
        corrective: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict
        self.settle_response = settle_response
        self.corrective = corrective


@dataclass(frozen=True)
class Paid:
    """A confirmed payment for one call: what to forward and what to tell the client."""

    quote: Quote
    key: str
    payer: str
    tx_hash: str
    response_header: tuple[str, str]  # (header name, base64 SettleResponse)
    redeemed: bool = False
    paid_amount: int | None = None  # what the authorization paid, when more than this call's price

    @property
    def value(self) -> int:
        """What the payment paid (atomic units): the most a redemption of it may be priced at."""
        return self.quote.amount if self.paid_amount is None else self.paid_amount


@dataclass(frozen=True)
class Offer:
    """A payment header checked offline for one call: the payload, its x402 version, the requirement
    it was checked against, the offline result, the claim mode (``ledger.NEW``, ``RESUME`` or
    ``REDEEM``) and the verdict a plain check against this call gives."""

    payment: PaymentPayload
    version: int
    requirement: Requirement
    offline: OfflineCheck
    mode: str
    refusal: Verdict


class Ticket:
    """A verified, claimed payment whose settlement is under way or done. ``result()`` gives the
    ``Paid`` once the receipt is confirmed, or raises ``PaymentRequired`` / ``ApiError``."""

    def __init__(self, future: Future[Paid] | None = None, paid: Paid | None = None) -> None:
        self._future = future
        self._paid = paid

    def result(self) -> Paid:
        """The ``Paid`` payment, waiting for its settlement when one is running; raises what the settlement
        raised (``PaymentRequired``, ``ApiError``)."""
        if self._paid is None:
            assert self._future is not None
            self._paid = self._future.result()
        return self._paid


def requirement_for(settings: Settings, amount: int) -> Requirement:
    """Our ``exact`` requirement for ``amount`` (atomic units): paid to ``pay_to`` in the configured
    asset, on the configured network, within ``X402_MAX_TIMEOUT_SECONDS``."""
    return Requirement(
        network=settings.network.caip2,
        amount=amount,
        asset=settings.asset,
        pay_to=settings.pay_to,
        max_timeout_seconds=settings.max_timeout_seconds,
        asset_name=settings.asset_name,
        asset_version=settings.asset_version,
    )


def payment_header(headers: Mapping[str, str]) -> tuple[str | None, int]:
    """(header value, x402 version): ``PAYMENT-SIGNATURE`` (2) when sent, else ``X-PAYMENT`` (1), whose
    value is None when it is not sent either."""
    value = headers.get(V2_HEADER)
    if value is not None:
        return value, 2
    return headers.get(V1_HEADER), 1
