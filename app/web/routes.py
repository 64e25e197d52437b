"""HTTP routes: the paid OpenAI-compatible endpoints and the free model list.

A paid view runs the gate first; only a ``Paid`` result reaches the upstream. Settlement happens
before the upstream call, and an upstream failure leaves the payment *redeemable*: the client gets an
error with ``PAYMENT-RESPONSE`` and can retry the same header without a new charge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from eth_account import Account
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from app.backends.attestation import MEASUREMENT_HEADER, get_attestor
from app.backends.upstream import (
    BUYER_ERRORS,
    UpstreamAnswer,
    UpstreamFailed,
    client_gone,
    get_upstream,
    host_error_message,
)
from app.catalog import Quote, QuoteError, get_catalog
from app.catalog.policy import ROUTE_FIELDS, ROUTE_INPUT_FIELDS, Rule
from app.payments.gate import Gate, Paid, PaymentRequired, get_gate
from app.payments.receipts import RECEIPT_HEADER, STREAM_RECEIPT_PREFIX, Receipt, sha256_hex
from app.web.accesslog import note
from app.web.errors import ApiError, json_error
from app.web.metrics import STREAM_FIRST_BYTE_SECONDS, UPSTREAM_SECONDS, payment_outcome
from app.x402.challenge import ERROR_DETAIL_HEADER, EXPOSED_HEADERS
from app.x402.codec import MalformedInput, strict_json_loads
from app.x402.discovery import bazaar_extension
from app.x402.verdict import PAYMENT_REQUIRED
from app.x402.wire import V1_HEADER, V2_HEADER

bp = Blueprint("routes", __name__)
log = logging.getLogger("x402.routes")
BODY_JSON_DEPTH = 64


def _resource_url() -> str:
    public = current_app.config["X402_SETTINGS"].public_url
    return (public or f"{request.scheme}://{request.host}") + request.path


def _request_body() -> object:
    limit = current_app.config["X402_SETTINGS"].max_body_bytes
    if request.content_length is not None:
        raw = request.get_data(cache=False)  # over the cap: Flask refuses it with 413 up front
    else:  # chunked: no length to check up front; the stream stops at the cap and one more byte tells
        raw = request.stream.read(limit)
        raw += request.stream.read(1)
    if len(raw) > limit:
        raise ApiError(413, "request_entity_too_large", f"the body is larger than {limit} bytes")
    g.x402_request_sha256 = sha256_hex(raw)  # what a receipt binds the payment to
    try:
        return strict_json_loads(raw, max_depth=BODY_JSON_DEPTH)
    except MalformedInput as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


def _unsigned_receipt(paid: Paid) -> Receipt:
    settings = current_app.config["X402_SETTINGS"]
    return Receipt(
        tx=paid.tx_hash,
        payer=paid.payer,
        amount=paid.quote.amount,
        model=paid.quote.model.name,
        network=settings.network.caip2,
        request_sha256=getattr(g, "x402_request_sha256", sha256_hex(b"")),
        response_sha256="",
        time=int(time.time()),
    )


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


def _relay_stream(
    gate: Gate, paid: Paid, answer: UpstreamAnswer, started: float, receipt: tuple[Receipt, str] | None
) -> Iterator[bytes]:
    """Pass chunks through as they come; the payment is served once the stream ends cleanly, and
    the last line is an SSE comment with the signed receipt over everything that was sent.
    A stream the host cuts leaves the payment redeemable, and the client sees both an error event
    and a broken transfer (no clean end that could pass for a complete answer)."""
    first = True
    digest = hashlib.sha256()
    try:
        for chunk in answer.chunks():
            if first:
                STREAM_FIRST_BYTE_SECONDS.observe(time.perf_counter() - started)
                first = False
            digest.update(chunk)
            yield chunk
    except UpstreamFailed:
        _record_after_stream(gate.redeemable, paid)
        yield STREAM_CUT_EVENT
        raise StreamCut("upstream stream cut") from None
    except GeneratorExit:
        _record_after_stream(gate.served, paid)  # the buyer hung up: what was asked for was being delivered
        raise
    _record_after_stream(gate.served, paid)
    if receipt is not None:
        unsigned, key = receipt
        final = replace(unsigned, response_sha256=digest.hexdigest()).signed(key)
        yield STREAM_RECEIPT_PREFIX + final.to_header().encode() + b"\n\n"


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


def _discovery(route: str, model: str) -> dict[str, Any]:
    """The bazaar discovery extension for one paid route, with an example for this model."""
    if route == "ping":
        return bazaar_extension(
            "GET", None, None, {"model": model, "tee": True, "upstream_status": 200, "listed": True}
        )
    field = ROUTE_INPUT_FIELDS[route]
    example: dict[str, Any] = {"model": model, "max_tokens": 64}
    example[field] = [{"role": "user", "content": "Hello"}] if field == "messages" else "Hello"
    # Every field the request policy accepts; any other is refused (unknown_field).
    properties: dict[str, Any] = {
        name: {"description": rule.why}
        for name, rule in ROUTE_FIELDS[route].items()
        if rule.rule is not Rule.REFUSE
    }
    properties.update(
        model={"type": "string"},
        max_tokens={"type": "integer", "minimum": 1},
        stream={"type": "boolean"},
    )
    properties[field] = {"type": "array"} if field == "messages" else {"type": ["string", "array"]}
    schema = {
        "type": "object",
        "properties": properties,
        "required": ["model", field],
        "additionalProperties": False,
    }
    output = {
        "object": "chat.completion" if route == "chat" else "text_completion",
        "choices": [{"index": 0}],
    }
    return bazaar_extension("POST", example, schema, output)


def _paid(
    quote: Quote, call: UpstreamCall, streaming: bool, route: str, render: Render | None = None
) -> Response:
    """Charge for ``quote`` and answer with what ``call`` gets from the model host."""
    gate = get_gate()
    measured = _attested(quote)
    try:
        response = _serve(gate, quote, call, streaming, render)
    except PaymentRequired as refusal:
        reason = refusal.verdict.reason
        if reason != PAYMENT_REQUIRED:
            payment_outcome("refused", reason)
            note(outcome="refused", reason=reason)
        extra = dict([refusal.settle_response]) if refusal.settle_response else {}
        if refusal.verdict.detail and reason != PAYMENT_REQUIRED:  # the reason in words, for people
            extra[ERROR_DETAIL_HEADER] = refusal.verdict.detail.encode("ascii", "replace").decode()
        return gate.challenge(quote, _resource_url(), reason, extra, _discovery(route, quote.model.name))
    if measured:
        response.headers[MEASUREMENT_HEADER] = measured
    return response


def _attested(quote: Quote) -> str:
    """For a model whose host publishes attestation: its checked measurement, or 503 before any
    payment is taken when the report does not match."""
    if not quote.model.attestation_url:
        return ""
    check = get_attestor().check(quote.model)
    if not check.ok:
        raise ApiError(
            503, "attestation_mismatch", f"the host of {quote.model.name} failed attestation: {check.reason}"
        )
    return check.measured


def _paid_call(route: str) -> Response:
    quote = _quote(lambda: get_catalog().quote(route, _request_body()))
    upstream = get_upstream()
    return _paid(
        quote,
        lambda: upstream.forward(route, quote.body, quote.model),
        quote.body.get("stream") is True,
        route,
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
        key = current_app.config["X402_SETTINGS"].receipt_key
        unsigned = _unsigned_receipt(paid)
        if key:
            headers[RECEIPT_HEADER] = unsigned.signed(key).to_header()  # payment + request, sent first
        relay = _relay_stream(gate, paid, answer, g.x402_started, (unsigned, key) if key else None)
        return Response(relay, status=answer.status, headers=headers)
    if answer.status >= 400 and render is None:
        # The host refused the call: the payment can still buy one. Its headers stay here, and its
        # message only after scrubbing: an error page may quote the operator's key or name hosts.
        gate.redeemable(paid)
        return _upstream_refused(paid, answer.status, content)
    if answer.status < 400 and client_gone(request.environ):
        gate.redeemable(paid)  # nothing was handed over: the same header, retried, is served
        note(outcome="client_gone")
        return Response(status=499)
    if answer.status < 400:
        gate.served(paid)
    else:
        gate.redeemable(paid)
    if render is not None:
        content, headers["Content-Type"] = render(content, answer.status), "application/json"
    key = current_app.config["X402_SETTINGS"].receipt_key
    if key:
        receipt = replace(_unsigned_receipt(paid), response_sha256=sha256_hex(content))
        headers[RECEIPT_HEADER] = receipt.signed(key).to_header()
    return Response(content, status=answer.status, headers=headers)


def _upstream_refused(paid: Paid, status: int, content: bytes) -> Response:
    """The host's 4xx, told to the buyer with its scrubbed reason; the payment stays redeemable for
    any body on the same model priced at most what was paid."""
    settings = current_app.config["X402_SETTINGS"]
    model = paid.quote.model
    secrets = [settings.upstream_api_key, *settings.upstream_keys.values()]
    hosts = [settings.upstream_url, model.upstream_url]
    reason = host_error_message(content, secrets, hosts) if status in BUYER_ERRORS else ""
    name, value = paid.response_header
    return json_error(
        status if status in BUYER_ERRORS else 502,
        "upstream_refused",
        f"the model host refused the call ({status}{': ' + reason if reason else ''}); your payment "
        f"is kept: send the same payment header with a body for {model.name} priced at most "
        f"{paid.value} atomic units",
        {name: value, "Access-Control-Expose-Headers": EXPOSED_HEADERS},
    )


def _upstream_failed(paid: Paid) -> Response:
    name, value = paid.response_header
    return json_error(
        502,
        "upstream_unavailable",
        "the model host failed after your payment settled; retry the same payment header to be served",
        {name: value, "Access-Control-Expose-Headers": EXPOSED_HEADERS, "Retry-After": "1"},
    )


@bp.after_request
def no_blind_retries(response: Response) -> Response:
    """An error answer to a request that carried a payment tells the OpenAI SDKs not to retry: they
    would resend the request without its payment header, and their wallet would pay again."""
    if response.status_code >= 400 and (V2_HEADER in request.headers or V1_HEADER in request.headers):
        response.headers["x-should-retry"] = "false"
    return response


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

    return _paid(quote, lambda: upstream.probe(quote.model), False, "ping", render)


@bp.get("/v1/attestation/<name>")
def attestation(name: str) -> Response:
    """What was checked about a model's host, and when (free)."""
    model = _quote(lambda: get_catalog().quote_ping(name)).model
    if not model.attestation_url:
        return jsonify(
            {
                "model": name,
                "tee": model.tee,
                "attested": False,
                "note": "this host publishes no attestation report the proxy can check",
            }
        )
    check = get_attestor().check(model)
    return jsonify({"attested": True, "tee": model.tee, **check.public()})


@bp.get("/.well-known/x402")
def well_known() -> Response:
    """Discovery: every paid resource, its price rule, where the money goes, who signs receipts."""
    settings = current_app.config["X402_SETTINGS"]
    base = settings.public_url or request.host_url.rstrip("/")
    listed = get_catalog().listed()
    resources: list[dict[str, Any]] = [
        {
            "resource": base + path,
            "method": "POST",
            "mimeType": "application/json",
            "description": description,
            "pricing": "per request body; the 402 for a body names its exact amount",
            "models": [m.public() for m in listed],
        }
        for path, description in (
            ("/v1/chat/completions", "OpenAI-compatible chat completions (stream supported)"),
            ("/v1/completions", "OpenAI-compatible completions"),
        )
    ]
    resources += [
        {
            "resource": f"{base}/v1/models/{m.name}/ping",
            "method": "GET",
            "mimeType": "application/json",
            "description": f"paid liveness probe of {m.name}",
            "amount": str(m.floor),
            "models": [m.public()],
        }
        for m in listed
    ]
    receipt_address = str(Account.from_key(settings.receipt_key).address) if settings.receipt_key else None
    return jsonify(
        {
            "x402Version": 2,
            "scheme": "exact",
            "network": settings.network.caip2,
            "asset": settings.asset,
            "extra": {"name": settings.asset_name, "version": settings.asset_version},
            "payTo": settings.pay_to,
            "maxTimeoutSeconds": settings.max_timeout_seconds,
            "receiptAddress": receipt_address,
            "resources": resources,
        }
    )


@bp.get("/v1/models")
def models() -> Response:
    settings = current_app.config["X402_SETTINGS"]
    entries = [m.public() for m in get_catalog().listed()]
    for entry in entries:
        entry["pricing"].update(asset=settings.asset, network=settings.network.caip2)
    return jsonify({"object": "list", "data": entries})


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
