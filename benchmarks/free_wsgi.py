"""``wsgi:app`` with a benchmark-only *free* path, for ``benchmarks.credit``:
``python -m gunicorn -c gunicorn.conf.py benchmarks.free_wsgi:app``. Never serve it outside a
benchmark: it answers paid routes for nothing.

In this process only, ``app.web.routes.serve`` (what ``_paid`` calls with the gate and the
``PaidCall``) is replaced by ``serve_or_free``: a request that carries ``X-Bench-Free`` goes to
``serve_free``, every other request to the real ``app.payments.serve.serve``, unchanged.

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
"""

from __future__ import annotations

import time
from typing import Any, cast

from app.catalog.usage import Usage
from app.payments import serve as serve_module
from app.payments.answers import Answer
from app.payments.gate import Gate
from app.payments.serve import PaidCall
from app.payments.signin import CreditHold
from app.web import routes

FREE_HEADER = "X-Bench-Free"
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


def serve_or_free(gate: Gate, call: PaidCall) -> Answer:
    if FREE_HEADER in call.headers:
        return serve_free(gate, call)
    return _real_serve(gate, call)


routes.serve = serve_or_free  # routes looks ``serve`` up at call time

from wsgi import app  # noqa: E402  (built after the patch, for clarity; routes reads it per call)

__all__ = ["app"]
