"""HTTP routes: the paid OpenAI-compatible endpoints and the free model list.

A paid view runs the gate first; only a ``Paid`` result reaches the upstream. Settlement happens
before the upstream call, and an upstream failure leaves the payment *redeemable*: the client gets an
error with ``PAYMENT-RESPONSE`` and can retry the same header without a new charge.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from .accesslog import note
from .catalog import Quote, QuoteError, get_catalog
from .errors import ApiError, json_error
from .gate import Gate, Paid, PaymentRequired, get_gate
from .metrics import STREAM_FIRST_BYTE_SECONDS, UPSTREAM_SECONDS, payment_outcome
from .upstream import UpstreamAnswer, UpstreamFailed, get_upstream
from .x402.challenge import EXPOSED_HEADERS
from .x402.codec import MalformedInput, strict_json_loads
from .x402.verdict import PAYMENT_REQUIRED

bp = Blueprint("routes", __name__)
log = logging.getLogger("x402.routes")
BODY_JSON_DEPTH = 64


def _resource_url() -> str:
    public = current_app.config["X402_SETTINGS"].public_url
    return (public or request.host_url.rstrip("/")) + request.path


def _request_body() -> object:
    try:
        return strict_json_loads(request.get_data(cache=False), max_depth=BODY_JSON_DEPTH)
    except MalformedInput as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


def _paid_headers(paid: Paid, answer: UpstreamAnswer) -> dict[str, str]:
    name, value = paid.response_header
    headers = dict(answer.headers)
    headers.update(
        {name: value, "Access-Control-Expose-Headers": EXPOSED_HEADERS, "Cache-Control": "no-store, private"}
    )
    return headers


class StreamCut(RuntimeError):
    """Raised after the error event so the server breaks the transfer: the client must see it."""


STREAM_CUT_EVENT = (
    b'data: {"error": {"code": "upstream_cut", "message": "the model host cut the stream; '
    b'retry the same payment header to be served again"}}\n\n'
)


def _relay_stream(gate: Gate, paid: Paid, answer: UpstreamAnswer, started: float) -> Iterator[bytes]:
    """Pass chunks through as they come; the payment is served once the stream ends cleanly.
    A stream the host cuts leaves the payment redeemable, and the client sees both an error event
    and a broken transfer (no clean end that could pass for a complete answer)."""
    first = True
    try:
        for chunk in answer.chunks():
            if first:
                STREAM_FIRST_BYTE_SECONDS.observe(time.perf_counter() - started)
                first = False
            yield chunk
    except UpstreamFailed:
        _record_after_stream(gate.redeemable, paid)
        yield STREAM_CUT_EVENT
        raise StreamCut("upstream stream cut") from None
    except GeneratorExit:
        _record_after_stream(gate.served, paid)  # the buyer hung up: what was asked for was being delivered
        raise
    _record_after_stream(gate.served, paid)


def _record_after_stream(record: Callable[[Paid], None], paid: Paid) -> None:
    """Once bytes have gone out nothing can be taken back; a ledger that fails now leaves the
    payment "settled", which refuses the header (never a second stream)."""
    try:
        record(paid)
    except ApiError:
        log.error("could not record the end of a paid stream")


UpstreamCall = Callable[[], UpstreamAnswer]
Render = Callable[[bytes, int], bytes]


def _quote(make: Callable[[], Quote]) -> Quote:
    try:
        return make()
    except QuoteError as exc:
        raise ApiError(exc.status, exc.code, str(exc)) from None


def _paid(quote: Quote, call: UpstreamCall, streaming: bool, render: Render | None = None) -> Response:
    """Charge for ``quote`` and answer with what ``call`` gets from the model host."""
    gate = get_gate()
    try:
        return _serve(gate, quote, call, streaming, render)
    except PaymentRequired as refusal:
        reason = refusal.verdict.reason
        if reason != PAYMENT_REQUIRED:
            payment_outcome("refused", reason)
            note(outcome="refused", reason=reason)
        extra = dict([refusal.settle_response]) if refusal.settle_response else {}
        return gate.challenge(quote, _resource_url(), reason, extra)


def _paid_call(route: str) -> Response:
    quote = _quote(lambda: get_catalog().quote(route, _request_body()))
    upstream = get_upstream()
    return _paid(
        quote,
        lambda: upstream.forward(route, quote.body, quote.model.upstream_url),
        quote.body.get("stream") is True,
    )


def _serve(gate: Gate, quote: Quote, call: UpstreamCall, streaming: bool, render: Render | None) -> Response:
    """Settlement and the model call run side by side (unless ``X402_SETTLE_FIRST``); the answer is
    released only once the payment is confirmed. A settlement that fails discards the answer."""
    ticket = gate.begin(quote, request.headers)
    if gate.settings.settle_first:
        ticket.result()
    upstream_started = time.perf_counter()
    try:
        answer = call()
        UPSTREAM_SECONDS.observe(time.perf_counter() - upstream_started)
        note(upstream_ms=round((time.perf_counter() - upstream_started) * 1000, 1))
        streaming = streaming and answer.status < 400  # an error answer is read whole, like JSON
        content = b"" if streaming else answer.read()
    except UpstreamFailed:
        paid = ticket.result()  # a failed settlement raises here: 402, nothing charged, nothing served
        gate.redeemable(paid)
        return _upstream_failed(paid)
    try:
        paid = ticket.result()
    except BaseException:
        answer.close()
        raise
    headers = _paid_headers(paid, answer)
    if streaming:
        try:
            gate.settled(paid)
        except ApiError:
            answer.close()
            raise
        headers["X-Accel-Buffering"] = "no"
        relay = _relay_stream(gate, paid, answer, g.x402_started)
        return Response(relay, status=answer.status, headers=headers)
    if answer.status < 400:
        gate.served(paid)
    else:
        gate.redeemable(paid)  # the host refused the call: the payment can still buy one
    if render is not None:
        content, headers["Content-Type"] = render(content, answer.status), "application/json"
    return Response(content, status=answer.status, headers=headers)


def _upstream_failed(paid: Paid) -> Response:
    name, value = paid.response_header
    return json_error(
        502,
        "upstream_unavailable",
        "the model host failed after your payment settled; retry the same payment header to be served",
        {name: value, "Access-Control-Expose-Headers": EXPOSED_HEADERS, "Retry-After": "1"},
    )


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    return _paid_call("chat")


@bp.post("/v1/completions")
def completions() -> Response:
    return _paid_call("completions")


@bp.get("/v1/models/<name>/ping")
def ping(name: str) -> Response:
    """A paid liveness probe of one model's host, at the model's floor price: agents can check
    that a TEE model is up before sending it real work (and x402 tools get a GET-able resource)."""
    quote = _quote(lambda: get_catalog().quote_ping(name))
    upstream = get_upstream()

    def render(content: bytes, status: int) -> bytes:
        try:
            listed = [m.get("id") for m in json.loads(content).get("data", [])]
        except (ValueError, AttributeError):
            listed = []
        ping = {"model": name, "tee": quote.model.tee, "upstream_status": status, "listed": name in listed}
        return json.dumps(ping).encode()

    return _paid(quote, lambda: upstream.probe(quote.model.upstream_url), False, render)


@bp.get("/v1/models")
def models() -> Response:
    settings = current_app.config["X402_SETTINGS"]
    entries = [m.public() for m in get_catalog().listed()]
    for entry in entries:
        entry["pricing"].update(asset=settings.asset, network=settings.network.caip2)
    return jsonify({"object": "list", "data": entries})


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
