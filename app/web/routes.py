"""HTTP routes: the paid OpenAI-compatible endpoints and the free model list.

Thin views: a paid view prices the body (``app.catalog``), checks the host's attestation, and hands
the call to ``app.payments.serve``, which releases the model's answer only once the payment is
confirmed; the answer it returns is sent as it is.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from eth_account import Account
from eth_utils import to_checksum_address
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from app.backends.enclave import Admission, AttestationFailed
from app.backends.store import STORE_ERRORS
from app.backends.upstream import (
    UpstreamAnswer,
)
from app.catalog import Quote, QuoteError
from app.catalog.policy import ROUTE_FIELDS, ROUTE_INPUT_FIELDS, Rule
from app.logs import note
from app.metrics import payment_outcome
from app.payments.answers import Answer
from app.payments.batch import BatchGate
from app.payments.errors import ApiError
from app.payments.outcomes import PaymentRequired
from app.payments.receipts import sha256_hex
from app.payments.serve import PaidCall, attestation_failed, serve
from app.payments.signin import SIGN_IN_ELSEWHERE
from app.payments.upto import UptoGate
from app.web import services
from app.web.edge import client_gone
from app.x402.batch_settlement import BATCH_SETTLEMENT_ADDRESS
from app.x402.challenge import ERROR_DETAIL_HEADER
from app.x402.codec import MalformedInput, strict_json_loads
from app.x402.discovery import bazaar_extension
from app.x402.extensions.sign_in_with_x import HEADER as SIWX_HEADER
from app.x402.extensions.sign_in_with_x import SIGN_IN_WITH_X, origin_of
from app.x402.verdict import PAYMENT_REQUIRED
from app.x402.wire import V1_HEADER, V2_HEADER

bp = Blueprint("routes", __name__)


def sent(answer: Answer) -> Response:
    """The money path's answer as a Flask response (a stream's chunks are passed on as they come)."""
    return Response(answer.body, status=answer.status, headers=answer.headers)


log = logging.getLogger("x402.routes")
PING_TEMPLATE = "/v1/models/:model/ping"  # the bazaar's routeTemplate syntax
INSTRUCTIONS = (
    "OpenAI-compatible calls to models in confidential VMs, paid per call in USDC on Base with x402 "
    "(exact; upto, charged the model's reported usage; or batch-settlement: one deposit into an escrow "
    "channel, a voucher per call charged its usage, the rest refunded on request at the paid ping). "
    "POST a chat or completions body; the 402 "
    "names its price. What an exact payment paid beyond the call's usage becomes the wallet's credit: "
    "sign in with the 402's sign-in-with-x challenge (SIGN-IN-WITH-X) to be served from it, and GET "
    "/v1/credit signed in to see it. GET /v1/models lists the models and their prices; the paid ping "
    "checks a model's host is up."
)
BODY_JSON_DEPTH = 64


def _resource_url() -> str:
    public = current_app.config["X402_SETTINGS"].public_url
    return (public or f"{request.scheme}://{request.host}") + request.path


def _sign_in_origin() -> str:
    """Where this request may sign in (``SignInGate.offered`` decides): the origin it called, and
    without ``X402_PUBLIC_URL`` only when it came over a loopback connection (its Host is its
    sender's word); "" otherwise."""
    public = current_app.config["X402_SETTINGS"].public_url
    if not public and not _loopback(request.remote_addr):
        return ""
    return origin_of(_resource_url())


def _loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False


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
        reason = str(exc).removeprefix("not JSON: ")
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {reason}") from None


# the body to forward, and the attested enclave's admission (None: not attested) → the host's answer
UpstreamCall = Callable[[dict[str, Any], Admission | None], UpstreamAnswer]
Render = Callable[[bytes, int], bytes]


def _quote(make: Callable[[], Quote]) -> Quote:
    try:
        return make()
    except QuoteError as exc:
        raise ApiError(exc.status, exc.code, str(exc)) from None


def _discovery(route: str, model: str) -> dict[str, Any]:
    """The bazaar discovery extension for one paid route, with an example for this model."""
    if route == "ping":
        output = {"model": model, "tee": True, "upstream_status": 200, "listed": True}
        return bazaar_extension("GET", None, None, output, (PING_TEMPLATE, {"model": model}))
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
    """Charge for ``quote`` and answer with what ``call`` gets from the model host (``serve``)."""
    gate = services().gate
    admission = Admission(services().attestor, quote.model) if quote.model.attested else None
    paid_call = PaidCall(
        quote,
        request.headers,
        lambda body: call(body, admission),
        streaming,
        getattr(g, "x402_request_sha256", sha256_hex(b"")),
        g.x402_started,
        lambda: not client_gone(request.environ),
        render,
        _resource_url(),
        _sign_in_origin(),
        admission,
    )
    try:
        response = sent(serve(gate, paid_call))
    except PaymentRequired as refusal:
        reason = refusal.verdict.reason
        if reason != PAYMENT_REQUIRED:
            payment_outcome("refused", reason)
            note(outcome="refused", reason=reason)
        extra = dict([refusal.settle_response]) if refusal.settle_response else {}
        if refusal.verdict.detail and reason != PAYMENT_REQUIRED:  # the reason in words, for people
            extra[ERROR_DETAIL_HEADER] = refusal.verdict.detail.encode("ascii", "replace").decode()
        return sent(
            gate.challenge(
                quote,
                _resource_url(),
                reason,
                extra,
                _discovery(route, quote.model.name),
                _sign_in_origin(),
                refusal.corrective,
            )
        )
    return response


def _paid_call(route: str) -> Response:
    quote = _quote(lambda: services().catalog.quote(route, _request_body()))
    upstream = services().upstream
    return _paid(
        quote,
        lambda body, admission: upstream.forward(route, body, quote.model, admission),
        quote.body.get("stream") is True,
        route,
    )


@bp.after_request
def no_blind_retries(response: Response) -> Response:
    """An error answer to a request that carried a payment (or a sign-in, whose nonce is now used)
    tells the OpenAI SDKs not to retry: they would resend the request without its payment header,
    and their wallet would pay again."""
    if response.status_code >= 400 and any(h in request.headers for h in (V2_HEADER, V1_HEADER, SIWX_HEADER)):
        response.headers["x-should-retry"] = "false"
    return response


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    """``POST /v1/chat/completions``, paid: prices the body; the model's answer (streamed with
    ``"stream": true``) once the payment is confirmed, else the 402 challenge or a JSON error."""
    return _paid_call("chat")


@bp.post("/v1/completions")
def completions() -> Response:
    """``POST /v1/completions``, paid: prices the body; the model's answer (streamed with
    ``"stream": true``) once the payment is confirmed, else the 402 challenge or a JSON error."""
    return _paid_call("completions")


@bp.get("/v1/models/<name>/ping")
def ping(name: str) -> Response:
    """A paid liveness probe of one model's host, at the model's floor price: agents can check
    that a TEE model is up before sending it real work (and x402 tools get a GET-able resource)."""
    quote = _quote(lambda: services().catalog.quote_ping(name))
    upstream = services().upstream

    def render(content: bytes, status: int) -> bytes:
        try:
            listed = [m.get("id") for m in json.loads(content).get("data", [])]
        except (ValueError, AttributeError):
            listed = []
        ping = {"model": name, "tee": quote.model.tee, "upstream_status": status, "listed": name in listed}
        return json.dumps(ping).encode()

    return _paid(
        quote, lambda _body, admission: upstream.probe(quote.model, admission), False, "ping", render
    )


@bp.get("/v1/attestation/<name>")
def attestation(name: str) -> Response:
    """The evidence a model's enclave verified with (free): the RA-TLS bundle a buyer can verify
    again (``Evidence.public``); for a model sold on its operator's word, that it is only that; 503
    ``attestation_failed`` while the enclave does not verify."""
    model = _quote(lambda: services().catalog.quote_ping(name)).model
    if not model.attested:
        return jsonify({"model": name, "tee": model.tee, "attested": False, "trust": model.trust})
    try:
        evidence = services().attestor.evidence(model)
    except AttestationFailed as failure:
        raise attestation_failed(name, failure) from None
    return jsonify({**evidence.public(), "attested": True, "tee": True, "trust": model.trust})


@bp.get("/.well-known/x402")
def well_known() -> Response:
    """Discovery: every paid resource, its price rule, where the money goes, who signs receipts."""
    settings = current_app.config["X402_SETTINGS"]
    base = settings.public_url or request.host_url.rstrip("/")
    listed = services().catalog.listed()
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
    upto, batch = services().gate.upto, services().gate.batch
    paths = ["POST /v1/chat/completions", "POST /v1/completions"]
    paths += [f"GET /v1/models/{m.name}/ping" for m in listed]
    return jsonify(
        {
            # the shape origin crawlers read (x402scan): method and path of each paid resource
            "version": 1,
            "resources": paths,
            "instructions": INSTRUCTIONS,
            "x402Version": 2,
            "scheme": "exact" if "exact" in settings.schemes else "upto",
            "schemes": list(settings.schemes),
            "network": settings.network.caip2,
            "asset": settings.asset,
            "extra": {"name": settings.asset_name, "version": settings.asset_version},
            "payTo": settings.pay_to,
            "maxTimeoutSeconds": settings.max_timeout_seconds,
            "receiptAddress": receipt_address,
            "listing": resources,  # each paid resource: URL, price rule, models
            **({"upto": _upto_terms(upto)} if upto is not None else {}),
            **({"batch-settlement": _batch_terms(batch)} if batch is not None else {}),
            "credit": {
                "signIn": SIGN_IN_WITH_X,
                "balance": "GET /v1/credit",
                "exactChange": settings.exact_change,
                "creditSeconds": settings.credit_seconds,
            },
        }
    )


def _batch_terms(batch: BatchGate) -> dict[str, Any]:
    """How ``batch-settlement`` channels are opened here: the escrow, our receiver authorizer (who
    signs claims and refunds), the withdraw delay (seconds) and how long a call may hold its channel."""
    return {
        "escrow": BATCH_SETTLEMENT_ADDRESS,
        "receiverAuthorizer": batch.authorizer,
        "withdrawDelay": batch.settings.withdraw_delay,
        "maxTimeoutSeconds": batch.max_timeout_seconds,
    }


def _upto_terms(upto: UptoGate) -> dict[str, Any]:
    """How ``upto`` differs from the top level's ``exact`` terms: the permit's life, and the relayers
    a permit may name as facilitator (each 402 names one, in turn)."""
    return {
        "maxTimeoutSeconds": upto.max_timeout_seconds,
        "assetTransferMethod": "permit2",
        "facilitatorAddresses": list(upto.settler.addresses),
    }


@bp.get("/v1/credit")
def credit() -> Response:
    """``GET /v1/credit``, signed in (``SIGN-IN-WITH-X``, a nonce from a 402 or from this route's
    401): the wallet's credit in atomic units — spendable ``balance``, ``held`` by calls in flight,
    its lots (source, what is left, expiry), failed calls' payments it may claim, and recent
    entries. Unsigned or refused: 401 with a fresh sign-in challenge."""
    gate = services().gate
    url = _resource_url()
    header = request.headers.get(SIWX_HEADER)
    if header is None:
        return _sign_in_required(
            url, "sign_in_required", "sign in with SIGN-IN-WITH-X to see this wallet's credit"
        )
    try:
        payer, statement = gate.signin.statement(header, _sign_in_origin())
        states = gate.ledger.states(list(statement.redeemable))
    except PaymentRequired as refusal:
        return _sign_in_required(url, refusal.verdict.reason, refusal.verdict.detail)
    except STORE_ERRORS as exc:
        raise ApiError(503, "ledger_unavailable", "credit ledger unavailable") from exc
    settings = current_app.config["X402_SETTINGS"]
    response = jsonify(
        {
            "address": to_checksum_address(payer),
            "network": settings.network.caip2,
            "asset": settings.asset,
            "balance": statement.balance,
            "held": statement.held,
            "lots": [{"left": lot.left, "expires": lot.expires} for lot in statement.lots],
            "redeemable": sum(
                amount for key, amount in statement.redeemable.items() if states.get(key) == "redeemable"
            ),
            "recent": [asdict(entry) for entry in statement.recent],
            "creditSeconds": settings.credit_seconds,
        }
    )
    response.headers["Cache-Control"] = "no-store, private"  # one wallet's money: never cached
    return response


def _sign_in_required(url: str, code: str, message: str) -> Response:
    """401 with a sign-in challenge (``extensions["sign-in-with-x"]``, as in a 402) in the body."""
    signin = services().gate.signin
    origin = _sign_in_origin()
    if not signin.offered(origin):
        raise ApiError(404, "sign_in_unavailable", SIGN_IN_ELSEWHERE)
    challenge = signin.extension(url, origin)
    if challenge is None:
        raise ApiError(503, "ledger_unavailable", "credit ledger unavailable; sign-in cannot be offered now")
    body = {
        "error": {"code": code, "message": message},
        "x402Version": 2,
        "extensions": {SIGN_IN_WITH_X: challenge},
    }
    response = jsonify(body)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = f'SIWX realm="{origin_of(url)}"'
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/v1/models")
def models() -> Response:
    """``GET /v1/models``, free: ``{"object": "list", "data"}``, one entry per listed model, its pricing
    naming our asset and network."""
    settings = current_app.config["X402_SETTINGS"]
    listed = services().catalog.listed()
    entries = [m.public() for m in listed]
    for model, entry in zip(listed, entries, strict=True):
        entry["pricing"].update(asset=settings.asset, network=settings.network.caip2)
        if model.attested:  # what this worker last found (a 402 is answered only while "verified")
            entry["attestation_state"] = services().attestor.state(model)
    return jsonify({"object": "list", "data": entries})


def init_app(app: Flask) -> None:
    """Register the routes blueprint: paid ``/v1/chat/completions``, ``/v1/completions`` and
    ``/v1/models/<name>/ping``; free ``/v1/models``, ``/v1/attestation/<name>`` and ``/.well-known/x402``."""
    app.register_blueprint(bp)
