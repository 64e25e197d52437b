"""``wsgi:app`` with a benchmark-only *free* path, for ``benchmarks.credit`` and ``benchmarks.batch``:
``python -m gunicorn -c gunicorn.conf.py benchmarks.free_wsgi:app``. Never serve it outside a
benchmark: it answers paid routes for nothing.

In this process only, ``app.web.routes.serve`` (what ``_paid`` calls with the gate and the
``PaidCall``) is replaced by ``serve_or_free``: a request that carries ``X-Bench-Free: batch`` goes
to ``serve_free_batch``, one that carries ``X-Bench-Free`` with any other value to ``serve_free``,
every other request to the real ``app.payments.serve.serve``, unchanged.

**Credit** (``X-Bench-Free: 1``).

``serve_free`` runs ``app.payments.serve._serve_credit`` itself (the path of a call paid from
credit: the metered body, the model host call, reading the answer, ``still_there``, the usage read
from the answer, the answer's headers) with a ``CreditHold`` made up here instead of
``SignInGate.begin``'s, and a gate whose ``signin`` charges nothing (``settle`` returns (0, 0),
``release`` does nothing) instead of ``SignInGate.settle``. So a free call and a credit call take the
same Flask route, quote, upstream call and answer code; the free one skips exactly the payment: the
``SIGN-IN-WITH-X`` parse and checks, the nonce's HMAC, the ECDSA recovery, the Redis hold script
(nonce used once + hold) and the Redis settle script (charge + give back), and the usage price
computed for the charge. Its answer carries ``X-Credit-Charged: 0``, ``X-Credit-Balance: 0`` (written
by the same code) and ``X-Bench-Free: served``, so the benchmark can tell it was served this way.

**Batch-settlement** (``X-Bench-Free: batch``). ``serve_free_batch`` runs
``app.payments.serve._serve_batch`` itself (the path of a call paid by a voucher: the metered body,
the model host call, reading the answer, ``still_there``, the usage read from the answer, the
``PAYMENT-RESPONSE`` passed through ``_with_offer_receipt``, ``_charged_answer``'s headers and the
signed ``X-Receipt``) with a payment and a ``BatchGate`` made up here (``_FreeBatch``): ``begin``
returns a ``ChannelHold`` built from constants, ``commit`` a ``VoucherCharge`` of 0 with the usage
and a constant channel state, ``release`` does nothing, and ``response_header`` returns a
``PAYMENT-RESPONSE`` value encoded once at import. So the free call skips exactly the payment:
what ``serve`` does with a ``PAYMENT-SIGNATURE`` before ``_serve_batch`` (its base64 and JSON
decoding, the ``payment-identifier`` lookup, the ``upto`` check, ``parse_batch_payment``);
``BatchGate.begin`` (the claim loop's ``ensure_running``, our requirement built and matched, the
voucher's ECDSA recovery and config checks, the Redis hold script, the resync test);
``BatchGate.commit`` (the usage price, the Redis commit script, the revenue metric and log note);
and ``BatchGate.response_header`` (the channel state and the ``SettleResponse`` encoded). Its answer
carries the constant ``PAYMENT-RESPONSE`` (``extra.chargedAmount`` "0") and ``X-Bench-Free: served``.
"""

from __future__ import annotations

import time
from typing import Any, cast

from app.catalog import Quote
from app.catalog.usage import Usage
from app.payments import serve as serve_module
from app.payments.answers import Answer
from app.payments.batch import BatchGate, ChannelHold, VoucherCharge
from app.payments.channels import ChannelState
from app.payments.gate import Gate
from app.payments.serve import PaidCall
from app.payments.signin import CreditHold
from app.web import routes
from app.x402.batch_settlement import BatchPayment, ChannelConfig, Voucher
from app.x402.wire import RESPONSE_HEADERS, SettleResponse

FREE_HEADER = "X-Bench-Free"
FREE_BATCH = "batch"  # the header's value that asks for the batch-settlement path
SERVED_FREE = "served"
_real_serve = serve_module.serve


class _NoCredit:
    """Stands in for ``SignInGate`` after the hold: nothing is charged, nothing given back."""

    def settle(self, hold: CreditHold, usage: Usage | None) -> tuple[int, int]:
        return 0, 0

    def release(self, hold: CreditHold) -> None:
        return None


class _FreeGate:
    """The worker's ``Gate`` with ``signin`` replaced by ``_NoCredit`` (everything else delegated)."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self.signin = _NoCredit()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gate, name)


def serve_free(gate: Gate, call: PaidCall) -> Answer:
    """``_serve_credit`` without the credit payment (the module docstring)."""
    hold = CreditHold("0x" + "00" * 20, "free", call.quote, int(time.time()) + 3600)
    answer = serve_module._serve_credit(cast(Gate, _FreeGate(gate)), call, hold)
    answer.headers[FREE_HEADER] = SERVED_FREE
    return answer


_ZERO = "0x" + "00" * 20
_FREE_PAYMENT = BatchPayment(
    kind="voucher",
    accepted={},
    config=ChannelConfig(_ZERO, _ZERO, _ZERO, _ZERO, _ZERO, 0, bytes(32)),
    voucher=Voucher(bytes(32), 0, b""),
)
_FREE_STATE = ChannelState("committed")
_FREE_RESPONSE = SettleResponse(
    True, "", "eip155:8453", _ZERO, amount=0, extra={"chargedAmount": "0", "channelState": {}}
).to_header()


class _FreeBatch:
    """Stands in for ``BatchGate``: a hold made of constants, nothing held, charged or encoded."""

    def begin(self, quote: Quote, payment: BatchPayment) -> ChannelHold:
        return ChannelHold(quote, payment, "free", _FREE_STATE, time.time() + 3600)

    def release(self, hold: ChannelHold) -> None:
        return None

    def commit(self, hold: ChannelHold, usage: Usage | None) -> VoucherCharge:
        return VoucherCharge(0, usage, _FREE_STATE)

    def response_header(self, hold: ChannelHold, charged: VoucherCharge) -> tuple[str, str]:
        return RESPONSE_HEADERS[2], _FREE_RESPONSE


def serve_free_batch(gate: Gate, call: PaidCall) -> Answer:
    """``_serve_batch`` without the voucher payment (the module docstring)."""
    answer = serve_module._serve_batch(gate, cast(BatchGate, _FreeBatch()), call, _FREE_PAYMENT)
    answer.headers[FREE_HEADER] = SERVED_FREE
    return answer


def serve_or_free(gate: Gate, call: PaidCall) -> Answer:
    free = call.headers.get(FREE_HEADER)
    if free == FREE_BATCH:
        return serve_free_batch(gate, call)
    if free is not None:
        return serve_free(gate, call)
    return _real_serve(gate, call)


routes.serve = serve_or_free  # routes looks ``serve`` up at call time


def __getattr__(name: str) -> Any:
    """``app``: ``wsgi:app``, built from the ``X402_*`` environment on first use (what gunicorn
    loads). Importing this module alone only patches ``routes.serve``, which answers as before any
    request without ``X-Bench-Free``: ``benchmarks.batch`` serves its own app in-process with it."""
    if name == "app":
        from wsgi import app

        return app
    raise AttributeError(name)
