"""Serve one paid call: the rule "no byte before settlement" in one place, without Flask.

``serve`` verifies and claims the payment (``Gate.begin``), calls the model host beside the
settlement (unless ``X402_SETTLE_FIRST``), and releases the host's answer only once the settlement
is confirmed; it records what became of the payment (served, redeemable) and returns an ``Answer``
that the web layer sends as it is. A settlement that fails discards the answer (``PaymentRequired``,
402); an upstream failure after settlement leaves the payment redeemable (502 with
``PAYMENT-RESPONSE``). See ``docs/flow.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag

from app.backends.enclave import EVIDENCE_HEADER, MEASUREMENT_HEADER, Admission, AttestationFailed
from app.backends.store import STORE_ERRORS
from app.backends.upstream import BUYER_ERRORS, UpstreamAnswer, UpstreamFailed, host_error_message
from app.catalog import Model, Quote
from app.catalog.usage import StreamUsage, Usage, charge, usage_of_answer
from app.logs import note
from app.metrics import STREAM_FIRST_BYTE_SECONDS, UPSTREAM_SECONDS
from app.payments.answers import Answer, error_answer
from app.payments.batch import BatchGate, ChannelHold, VoucherCharge
from app.payments.errors import ApiError
from app.payments.gate import PAYMENT_IN_PROGRESS, Gate
from app.payments.outcomes import Paid, PaymentRequired
from app.payments.receipts import RECEIPT_HEADER, STREAM_RECEIPT_PREFIX, Receipt, offer_receipt, sha256_hex
from app.payments.replay import CONFLICT, DONE, RUNNING, Replays, seal, unseal
from app.payments.settlement import FAILED, NOT_SENT, PENDING, SETTLED
from app.payments.signin import CreditHold, SignInGate
from app.payments.upto import Charge, Hold, UptoGate
from app.x402.batch_settlement import BatchPayment
from app.x402.batch_settlement import payload_of as batch_payload_of
from app.x402.challenge import (
    CREDIT_ADDED_HEADER,
    CREDIT_BALANCE_HEADER,
    CREDIT_CHARGED_HEADER,
    EXPOSED_HEADERS,
)
from app.x402.codec import MalformedInput, decode_header, encode_header
from app.x402.extensions.payment_identifier import fingerprint, payment_identifier
from app.x402.extensions.sign_in_with_x import HEADER as SIWX_HEADER
from app.x402.upto import UptoPayment, upto_payment_of
from app.x402.upto.checks import DEADLINE_EXPIRED, TRANSACTION_FAILED
from app.x402.verdict import SETTLEMENT_PENDING, UNSUPPORTED_SCHEME, Verdict, reject
from app.x402.wire import V1_HEADER, V2_HEADER

log = logging.getLogger("x402.serve")

STREAM_CUT_EVENT = (
    b'data: {"error": {"code": "upstream_cut", "message": "the model host cut the stream; '
    b'retry the same payment header to be served again"}}\n\n'
)
STREAM_CUT_EVENT_UPTO = (
    b'data: {"error": {"code": "upstream_cut", "message": "the model host cut the stream; nothing '
    b'was charged: send the same payment header again"}}\n\n'
)
CLIENT_CLOSED = 499  # the buyer hung up before the answer was handed over (nobody reads this status)


class StreamCut(RuntimeError):
    """Raised after the error event so the server breaks the transfer: the client must see it."""


@dataclass(frozen=True)
class PaidCall:
    """One paid request as the web layer hands it over.

    ``headers``: the request's headers (the payment header among them); ``call``: the model host
    call with the body to forward (``quote.body``, or for ``upto`` streams that body asking for
    usage); ``streaming``: the body asked for a stream; ``request_sha256``: hex SHA-256 of the body
    (what a receipt binds); ``started``: ``time.perf_counter()`` at the request's start;
    ``still_there``: False once the buyer has hung up; ``render``: turns the host's body and status
    into the answer's body (the paid ping), None to pass the body through; ``resource_url``: the
    URL the buyer called; ``sign_in_origin``: the origin it may sign in at, "" for none.
    """

    quote: Quote
    headers: Mapping[str, str]
    call: Callable[[dict[str, Any]], UpstreamAnswer]
    streaming: bool
    request_sha256: str
    started: float
    still_there: Callable[[], bool]
    render: Callable[[bytes, int], bytes] | None = None
    resource_url: str = ""  # what the buyer called (the offer-receipt's resourceUrl)
    sign_in_origin: str = ""  # where this request may sign in (``SignInGate.offered``), "" nowhere
    tee: Admission | None = None  # an attested model's enclave: admitted first, then pinned to

    def tee_binding(self) -> dict[str, str]:
        """The receipt's ``tee_measurement`` and ``tee_evidence`` ("" for a model not attested)."""
        if self.tee is None or self.tee.evidence is None:
            return {}
        verdict = self.tee.evidence.verdict
        return {"tee_measurement": verdict.measurement, "tee_evidence": verdict.evidence_sha256}


def attestation_failed(model: str, failure: AttestationFailed) -> ApiError:
    """503 ``attestation_failed``: ``model``'s enclave is not verified now (``failure`` says why)."""
    return ApiError(
        503,
        "attestation_failed",
        f"the enclave of {model} is not verified now ({failure.reason}: {failure.detail}); "
        "nothing was charged",
        {"Retry-After": "5"},
    )


def _admitted(call: PaidCall) -> None:
    """An attested model is sold only while its enclave verifies: 503 before any 402, hold or
    payment otherwise (``app.backends.enclave``)."""
    if call.tee is not None:
        try:
            call.tee.admit()
        except AttestationFailed as failure:
            raise attestation_failed(call.quote.model.name, failure) from None


def _named_evidence(call: PaidCall, answer: Answer) -> Answer:
    """A served answer from an attested enclave names the evidence its connection was pinned to
    (``X-TEE-Measurement``, ``X-TEE-Evidence``), which its receipt binds; kept with the answer for
    a payment id's retries."""
    if call.tee is not None and call.tee.evidence is not None and answer.status < 400:
        verdict = call.tee.evidence.verdict
        answer.headers[MEASUREMENT_HEADER] = verdict.measurement
        answer.headers[EVIDENCE_HEADER] = verdict.evidence_sha256
    return answer


def serve(gate: Gate, call: PaidCall) -> Answer:
    """Charge for ``call.quote`` and answer with what the model host gives. Raises
    ``PaymentRequired`` (answer the 402) or ``ApiError`` (503 and friends; 409 when a payment id
    was used by another payment). A payment that carries an id (``payment-identifier``) and was
    answered before gets that answer again, with no second charge (``app.payments.replay``). A
    request that signs in (``SIGN-IN-WITH-X``) and carries no payment is paid from the wallet's
    credit (``app.payments.signin``)."""
    header = call.headers.get(V2_HEADER)
    sign_in = call.headers.get(SIWX_HEADER)
    if header is None and sign_in is not None and V1_HEADER not in call.headers:
        _admitted(call)
        hold = gate.signin.begin(call.quote, sign_in, call.sign_in_origin)
        return _named_evidence(call, _serve_credit(gate, call, hold))
    wire = _decoded(header)  # once: the id and the scheme are read from it
    payment_id = payment_identifier(wire)
    if isinstance(payment_id, Verdict):
        raise PaymentRequired(payment_id)
    if header is None or payment_id is None:
        return _serve(gate, call, wire)
    return _served_once(gate, call, header, payment_id, wire)


def _decoded(header: str | None) -> Any:
    """The v2 payment header decoded, None when absent or not decodable (the parser of its scheme
    then says why)."""
    if header is None:
        return None
    try:
        return decode_header(header)
    except MalformedInput:
        return None


def _served_once(gate: Gate, call: PaidCall, header: str, payment_id: str, wire: Any) -> Answer:
    """The payment path under a payment id: a kept answer is replayed; otherwise the call is served
    and its answer (a stream too, whole, once it ended) kept, encrypted, for the id's retries."""
    fp = fingerprint(header, call.request_sha256)
    replays = gate.replays
    try:
        seen = replays.begin(payment_id, fp)
    except STORE_ERRORS as exc:
        raise ApiError(503, "ledger_unavailable", "payment ledger unavailable; nothing was charged") from exc
    if seen.outcome == CONFLICT:
        raise ApiError(
            409,
            "payment_identifier_conflict",
            "this payment id was used by another payment or body; nothing was charged",
        )
    if seen.outcome == RUNNING:
        raise ApiError(
            503,
            PAYMENT_IN_PROGRESS,
            "this payment id is being served by another request; retry shortly",
            {"Retry-After": "1"},
        )
    if seen.outcome == DONE:
        note(outcome="replayed")
        try:
            return unseal(seen.blob, header, fp, payment_id)
        except InvalidTag:  # not sealed for this header: changed at rest
            raise ApiError(
                409, "payment_identifier_conflict", "the answer kept for this payment id is not yours"
            ) from None
    try:
        answer = _serve(gate, call, wire)
    except BaseException:
        _forget(replays, payment_id, fp)
        raise
    if answer.status >= 400:
        _forget(replays, payment_id, fp)  # not an answer to keep: a retry takes the payment path again
        return answer
    if isinstance(answer.body, bytes):
        _keep(replays, answer, answer.body, header, fp, payment_id)
        return answer
    return Answer(answer.status, answer.headers, _kept_stream(replays, answer, header, fp, payment_id))


def _kept_stream(replays: Replays, answer: Answer, header: str, fp: str, payment_id: str) -> Iterator[bytes]:
    """Pass the stream on and keep it whole once it ended cleanly, holding the id while it flows.
    A buyer who hangs up mid-stream paid for it: the rest is read from the host all the same, so
    the retry under the id gets the whole stream."""
    sent = bytearray()
    assert not isinstance(answer.body, bytes)
    body = iter(answer.body)
    touched = time.monotonic()

    def take(chunk: bytes) -> None:
        nonlocal touched
        sent.extend(chunk)
        if time.monotonic() - touched > TOUCH_EVERY:
            touched = time.monotonic()
            with contextlib.suppress(*STORE_ERRORS):
                replays.touch(payment_id, fp)

    try:
        for chunk in body:
            take(chunk)
            yield chunk
    except GeneratorExit:
        try:
            for chunk in body:
                take(chunk)
        except BaseException:
            _forget(replays, payment_id, fp)
            raise
        _keep(replays, answer, bytes(sent), header, fp, payment_id)
        raise
    except BaseException:
        _forget(replays, payment_id, fp)
        raise
    _keep(replays, answer, bytes(sent), header, fp, payment_id)


TOUCH_EVERY = 30.0  # seconds between refreshes of a streaming id's hold


def _keep(replays: Replays, answer: Answer, body: bytes, header: str, fp: str, payment_id: str) -> None:
    try:
        replays.finish(payment_id, fp, seal(answer, body, header, fp, payment_id))
    except STORE_ERRORS:
        log.error("could not keep an answer for its payment id")


def _forget(replays: Replays, payment_id: str, fp: str) -> None:
    try:
        replays.abandon(payment_id, fp)
    except STORE_ERRORS:  # it expires
        log.warning("could not release a payment id")


def _serve(gate: Gate, call: PaidCall, wire: Any) -> Answer:
    """The payment path for the decoded v2 header ``wire`` (None: no payment, the 402), once an
    attested model's enclave is admitted."""
    _admitted(call)
    return _named_evidence(call, _serve_scheme(gate, call, wire))


def _serve_scheme(gate: Gate, call: PaidCall, wire: Any) -> Answer:
    """``upto``, ``batch-settlement`` or ``exact``, then the model host."""
    upto_payment = _upto_payment(wire)
    if upto_payment is not None:
        if gate.upto is None:
            raise PaymentRequired(reject(UNSUPPORTED_SCHEME, "scheme 'upto' is not offered (X402_SCHEMES)"))
        return _serve_upto(gate, gate.upto, call, upto_payment)
    batch_payment = batch_payload_of(wire)
    if isinstance(batch_payment, Verdict):
        raise PaymentRequired(batch_payment)
    if batch_payment is not None:
        if gate.batch is None:
            raise PaymentRequired(
                reject(UNSUPPORTED_SCHEME, "scheme 'batch-settlement' is not offered (X402_SCHEMES)")
            )
        return _serve_batch(gate, gate.batch, call, batch_payment)
    ticket = gate.begin(call.quote, call.headers)
    if gate.settings.settle_first:
        ticket.result()
    # the change of an exact call is its usage price's remainder: a stream must report its usage,
    # unless usage cannot change the price (a model priced per call, or change kept)
    metered = gate.settings.exact_change and call.quote.model.pricing == "per_token"
    body, asked_usage = _metered_body(call) if metered else (call.quote.body, True)
    upstream_started = time.perf_counter()
    try:
        answer = call.call(body)
        UPSTREAM_SECONDS.observe(time.perf_counter() - upstream_started)
        note(upstream_ms=round((time.perf_counter() - upstream_started) * 1000, 1))
        streaming = call.streaming and answer.status < 400  # an error answer is read whole, like JSON
        content = b"" if streaming else answer.read()
    except UpstreamFailed as failure:
        paid = ticket.result()  # a failed settlement raises here: 402, nothing charged, nothing served
        gate.redeemable(paid)
        return _upstream_failed(paid, failure)
    try:
        paid = ticket.result()
    except BaseException:
        answer.close()
        raise
    if streaming:
        return _stream(gate, call, paid, answer, asked_usage)
    return _whole(gate, call, paid, answer, content)


def _whole(gate: Gate, call: PaidCall, paid: Paid, answer: UpstreamAnswer, content: bytes) -> Answer:
    """A non-streamed answer: recorded served (or redeemable) before it is handed over; the unused
    part of the payment becomes the wallet's credit (``X-Credit-Added``)."""
    if answer.status >= 400 and call.render is None:
        # The host refused the call: the payment can still buy one. Its headers stay here, and its
        # message only after scrubbing: an error page may quote the operator's key or name hosts.
        gate.redeemable(paid)
        return _upstream_refused(gate, paid, answer.status, content)
    if answer.status < 400 and not call.still_there():
        gate.redeemable(paid)  # nothing was handed over: the same header, retried, is served
        note(outcome="client_gone")
        return Answer(CLIENT_CLOSED, {}, b"")
    credited = 0
    if answer.status < 400:
        credited = gate.served(paid, _change(gate, paid, usage_of_answer(content)))
    else:
        gate.redeemable(paid)
    headers = _paid_headers(gate, call, paid, answer)
    if credited:
        headers[CREDIT_ADDED_HEADER] = str(credited)
    if call.render is not None:
        content, headers["Content-Type"] = call.render(content, answer.status), "application/json"
    key = gate.settings.receipt_key
    if key:
        receipt = replace(_unsigned_receipt(gate, call, paid), response_sha256=sha256_hex(content))
        headers[RECEIPT_HEADER] = receipt.signed(key).to_header()
    return Answer(answer.status, headers, content)


def _change(gate: Gate, paid: Paid, usage: Usage | None) -> int:
    """What an exact payment paid beyond its call's usage price (atomic units; the ``upto`` rule:
    unknown usage costs the maximum), 0 with ``X402_EXACT_CHANGE=keep``."""
    if not gate.settings.exact_change:
        return 0
    return paid.value - charge(paid.quote.model, usage, paid.quote.amount)


def _stream(gate: Gate, call: PaidCall, paid: Paid, answer: UpstreamAnswer, asked_usage: bool) -> Answer:
    """A stream: the payment is recorded settled, then chunks pass through as they come."""
    try:
        gate.settled(paid)
    except ApiError:
        answer.close()
        raise
    headers = _paid_headers(gate, call, paid, answer, delivered=False)
    headers["X-Accel-Buffering"] = "no"
    key = gate.settings.receipt_key
    unsigned = _unsigned_receipt(gate, call, paid)
    if key:
        headers[RECEIPT_HEADER] = unsigned.signed(key).to_header()  # payment + request, sent first
    meter = _ExactMeter(gate, paid, unsigned)
    relay = _relay_metered(call, answer, asked_usage, meter, key)
    return Answer(answer.status, headers, relay)


@dataclass
class _ExactMeter:
    """An exact stream's end: served, its change credited (an SSE comment says how much); a cut
    leaves the payment redeemable. Its receipt is the one sent first, with the response's hash."""

    gate: Gate
    paid: Paid
    unsigned: Receipt
    until: float = math.inf
    cut_event: bytes = STREAM_CUT_EVENT

    def release(self) -> None:
        _record_after_stream(lambda: self.gate.redeemable(self.paid))

    def charge(self, usage: Usage | None) -> bytes:
        gate, paid = self.gate, self.paid
        credited = _record_after_stream(lambda: gate.served(paid, _change(gate, paid, usage)))
        return CREDIT_ADDED_PREFIX + str(credited).encode() + b"\n\n" if credited else b""

    def receipt(self, response_sha256: str) -> Receipt:
        return replace(self.unsigned, response_sha256=response_sha256)


def _record_after_stream(record: Callable[[], int | None]) -> int:
    """Once bytes have gone out nothing can be taken back; a ledger that fails now leaves the
    payment "settled", which becomes redeemable once stale (``ledger.STALE_SETTLED``). Returns
    what ``record`` returns (the change credited), 0 when it failed."""
    try:
        return record() or 0
    except ApiError:
        log.error("could not record the end of a paid stream")
        return 0


def _unsigned_receipt(gate: Gate, call: PaidCall, paid: Paid) -> Receipt:
    return Receipt(
        tx=paid.tx_hash,
        payer=paid.payer,
        amount=paid.quote.amount,
        model=paid.quote.model.name,
        network=gate.settings.network.caip2,
        request_sha256=call.request_sha256,
        response_sha256="",
        time=int(time.time()),
        **call.tee_binding(),
    )


def _with_offer_receipt(gate: Gate, call: PaidCall, value: str) -> str:
    """A successful ``PAYMENT-RESPONSE`` value with the ``offer-receipt`` extension's receipt in its
    ``extensions``, once the answer is delivered: when receipts are signed (``X402_RECEIPT_KEY``) and
    the resource's URL is the operator's (``X402_PUBLIC_URL``), never one a client's Host header
    names."""
    key = gate.settings.receipt_key
    if not key or not gate.settings.public_url:  # no receipt: nothing to decode
        return value
    settled = decode_header(value)
    if not isinstance(settled, dict) or settled.get("success") is not True:
        return value
    network = gate.settings.network.caip2
    extension = offer_receipt(
        network, call.resource_url, str(settled["payer"]), str(settled["transaction"]), int(time.time()), key
    )
    return encode_header({**settled, "extensions": extension})


def _paid_headers(
    gate: Gate, call: PaidCall, paid: Paid, answer: UpstreamAnswer, delivered: bool = True
) -> dict[str, str]:
    """The paid answer's headers; ``delivered`` False for a stream's (it has not been yet: no
    ``offer-receipt``, which the extension returns only once service was delivered)."""
    name, value = paid.response_header
    value = _with_offer_receipt(gate, call, value) if delivered else value
    headers = dict(answer.headers)
    headers.update(
        {name: value, "Access-Control-Expose-Headers": EXPOSED_HEADERS, "Cache-Control": "no-store, private"}
    )
    return headers


def _refusal_text(gate: Gate, model: Model, status: int, content: bytes) -> str:
    """The host's refusal in words for the buyer: its status, and for 400/404/413/422 its own message
    scrubbed of every key and configured host (``upstream.host_error_message``)."""
    settings = gate.settings
    secrets = [settings.upstream_api_key, *settings.upstream_keys.values()]
    hosts = [settings.upstream_url, model.upstream_url]
    reason = host_error_message(content, secrets, hosts) if status in BUYER_ERRORS else ""
    return f"the model host refused the call ({status}{': ' + reason if reason else ''})"


def _upstream_refused(gate: Gate, paid: Paid, status: int, content: bytes) -> Answer:
    """The host's 4xx, told to the buyer with its scrubbed reason; the payment stays redeemable for
    any body on the same model priced at most what was paid."""
    model = paid.quote.model
    name, value = paid.response_header
    return error_answer(
        status if status in BUYER_ERRORS else 502,
        "upstream_refused",
        f"{_refusal_text(gate, model, status, content)}; your payment "
        f"is kept: send the same payment header with a body for {model.name} priced at most "
        f"{paid.value} atomic units",
        {name: value, "Access-Control-Expose-Headers": EXPOSED_HEADERS},
    )


def _upstream_failed(paid: Paid, failure: UpstreamFailed) -> Answer:
    name, value = paid.response_header
    return error_answer(
        failure.status,
        failure.code,
        f"{failure.told()} after your payment settled; retry the same payment header to be served",
        {
            name: value,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Retry-After": str(failure.retry_after),
        },
    )


# --- upto: the answer first, then the charge by the host's reported usage --------------------------


def _upto_payment(wire: Any) -> UptoPayment | None:
    """The ``upto`` payment of a decoded v2 header, None for any other; 402 for a malformed one."""
    parsed = upto_payment_of(wire)
    if isinstance(parsed, Verdict):
        raise PaymentRequired(parsed)
    return parsed


def _serve_upto(gate: Gate, upto: UptoGate, call: PaidCall, payment: UptoPayment) -> Answer:
    """Hold the permit, call the host, charge its reported usage. A whole answer is handed over
    only once its charge settled; a stream goes out as it comes and is charged at its end. A host
    that fails, refuses or is cut off costs nothing: the permit is released and may be sent again."""
    hold = upto.begin(call.quote, payment)
    called = _called(
        gate, call, lambda: upto.release(hold), _upto_host_failed, lambda: _UptoMeter(gate, upto, call, hold)
    )
    if isinstance(called, Answer):
        return called
    answer, content = called
    usage = usage_of_answer(content) if answer.status < 400 else None
    result = upto.settle(hold, usage)
    if result.outcome in (FAILED, NOT_SENT):  # nothing moved: the answer is withheld, nothing owed
        upto.record(hold, result, answered=False)
        header = upto.response_header(result, hold.payer, TRANSACTION_FAILED)
        if result.outcome == FAILED:
            raise PaymentRequired(reject(TRANSACTION_FAILED, UPTO_REVERTED), header)
        if result.reason == DEADLINE_EXPIRED:
            raise PaymentRequired(reject(DEADLINE_EXPIRED, UPTO_OUTLASTED))
        raise ApiError(
            503, "unexpected_settle_error", "the settlement could not be sent; nothing was charged"
        )
    upto.record(hold, result, answered=True)
    reason = "" if result.outcome == SETTLED else SETTLEMENT_PENDING
    name, value = upto.response_header(result, hold.payer, reason)
    return _charged_answer(
        gate,
        call,
        answer,
        content,
        {name: _with_offer_receipt(gate, call, value)},
        lambda sha: _upto_receipt(gate, call, hold, result, sha),
    )


def _charged_answer(
    gate: Gate,
    call: PaidCall,
    answer: UpstreamAnswer,
    content: bytes,
    added: dict[str, str],
    receipt: Callable[[str], Receipt],
) -> Answer:
    """A whole answer of a call charged by its usage, once charged: the host's headers with
    ``added`` (what the charge tells the buyer), rendered when the route renders, with the signed
    receipt ``receipt(response_sha256)`` when receipts are on."""
    headers = dict(answer.headers)
    headers.update(
        {**added, "Access-Control-Expose-Headers": EXPOSED_HEADERS, "Cache-Control": "no-store, private"}
    )
    if call.render is not None:
        content, headers["Content-Type"] = call.render(content, answer.status), "application/json"
    key = gate.settings.receipt_key
    if key:
        headers[RECEIPT_HEADER] = receipt(sha256_hex(content)).signed(key).to_header()
    return Answer(answer.status, headers, content)


UPTO_OUTLASTED = (
    "the call outlasted the permit's deadline less the time to settle; nothing was charged and the "
    "answer was withheld: sign a permit that lives maxTimeoutSeconds"
)
UPTO_REVERTED = (
    "the settlement of this call's charge reverted (balance, allowance or permit changed during the "
    "call); nothing was charged and the answer was withheld"
)


def _metered_call(
    gate: Gate, call: PaidCall, release: Callable[[], None], failed: Callable[[int, str, str], Answer]
) -> Answer | tuple[UpstreamAnswer, bytes, bool | None]:
    """Call the host for a call charged by its usage (``upto``, credit), its payment held. A host
    that fails or refuses, or a buyer gone before a whole answer, ends here: ``release`` the hold
    and the ``failed`` answer (status, code, message), or 499. Otherwise (the host's answer, its
    body (``b""`` for a stream), whether the buyer asked for the usage event, None for a whole
    answer)."""
    body, asked_usage = _metered_body(call)
    upstream_started = time.perf_counter()
    try:
        answer = call.call(body)
        UPSTREAM_SECONDS.observe(time.perf_counter() - upstream_started)
        if call.streaming and answer.status < 400:
            return answer, b"", asked_usage
        content = answer.read()
    except UpstreamFailed as failure:
        release()
        return failed(failure.status, failure.code, failure.told())
    except BaseException:
        release()
        raise
    if answer.status >= 400 and call.render is None:
        release()  # the host's reason, scrubbed (a model's own host too)
        text = _refusal_text(gate, call.quote.model, answer.status, content)
        return failed(answer.status if answer.status in BUYER_ERRORS else 502, "upstream_refused", text)
    if not call.still_there():
        release()
        note(outcome="client_gone")
        return Answer(CLIENT_CLOSED, {}, b"")
    return answer, content, None


def _called(
    gate: Gate,
    call: PaidCall,
    release: Callable[[], None],
    failed: Callable[[int, str, str], Answer],
    meter: Callable[[], Meter],
) -> Answer | tuple[UpstreamAnswer, bytes]:
    """``_metered_call``, with a stream handed to its ``meter`` (made only then) as the answer to
    send: an ``Answer`` ready to go, or the host's whole answer and its body, to be charged."""
    called = _metered_call(gate, call, release, failed)
    if isinstance(called, Answer):
        return called
    answer, content, asked_usage = called
    if asked_usage is None:
        return answer, content
    relay = _relay_metered(call, answer, asked_usage, meter(), gate.settings.receipt_key)
    return Answer(answer.status, _stream_headers(answer), relay)


def _metered_body(call: PaidCall) -> tuple[dict[str, Any], bool]:
    """The body to forward when the charge depends on usage, and whether the buyer asked for the
    usage event: a stream is asked for its usage (``stream_options.include_usage``) either way."""
    body = call.quote.body
    options = body.get("stream_options")
    asked = isinstance(options, dict) and options.get("include_usage") is True
    if call.streaming and not asked:
        body = {**body, "stream_options": {**body.get("stream_options", {}), "include_usage": True}}
    return body, asked


def _stream_headers(answer: UpstreamAnswer) -> dict[str, str]:
    headers = dict(answer.headers)
    headers.update(
        {
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Cache-Control": "no-store, private",
            "X-Accel-Buffering": "no",
        }
    )
    return headers


class Meter(Protocol):
    """How a stream whose charge is known only at its end is charged: ``exact`` (its change),
    ``upto`` (its permit) or credit (its hold)."""

    until: float  # unix time after which no more of the stream is passed on (it must be charged)
    cut_event: bytes  # the SSE error event a buyer gets when the host cuts the stream

    def release(self) -> None:
        """The host cut the stream: nothing is charged."""

    def charge(self, usage: Usage | None) -> bytes:
        """Charge what the stream used (``None``: unknown); the SSE comments that close it."""

    def receipt(self, response_sha256: str) -> Receipt:
        """The unsigned receipt over everything sent (``response_sha256``)."""


def _relay_metered(
    call: PaidCall, answer: UpstreamAnswer, asked_usage: bool, meter: Meter, key: str
) -> Iterator[bytes]:
    """Pass the stream through (dropping the usage event the buyer did not ask for), then charge
    its usage and end with the meter's SSE comments and, with a receipt key, the signed receipt.
    A stream the host cuts is released; a buyer who hangs up is charged what the host reported, or
    the maximum. Nothing is passed on after ``meter.until``: the stream ends there with a
    ``payment_window_closing`` event and is charged in time."""
    watcher = StreamUsage(keep_usage_event=asked_usage)
    digest = hashlib.sha256()
    last = b"\n\n"  # the end of what went out: our comments must start an event of their own
    first, closing = True, False
    try:
        for chunk in answer.chunks():
            if first:
                STREAM_FIRST_BYTE_SECONDS.observe(time.perf_counter() - call.started)
                first = False
            if time.time() >= meter.until:  # this chunk came too late to be paid for in time
                answer.close()
                closing = True
                break
            out = watcher.feed(chunk)
            if out:
                digest.update(out)
                last = (last + out)[-4:]
                yield out
        tail = watcher.end()
    except UpstreamFailed:
        meter.release()
        yield meter.cut_event
        raise StreamCut("upstream stream cut") from None
    except GeneratorExit:
        meter.charge(watcher.usage)
        raise
    if not (last + tail).endswith((b"\n\n", b"\r\n\r\n")):
        tail += b"\n\n"  # a host that ended without a blank line: close its last event
    tail += PAYMENT_WINDOW_EVENT if closing else b""
    if tail:
        digest.update(tail)
        yield tail
    closing_comments = meter.charge(watcher.usage)
    if closing_comments:
        digest.update(closing_comments)  # the receipt covers every byte before it
        yield closing_comments
    if key:
        receipt = meter.receipt(digest.hexdigest()).signed(key)
        yield STREAM_RECEIPT_PREFIX + receipt.to_header().encode() + b"\n\n"


@dataclass
class _UptoMeter:
    """An upto stream's end: its usage price pulled with the held permit, then the
    ``PAYMENT-RESPONSE`` value as an SSE comment."""

    gate: Gate
    upto: UptoGate
    call: PaidCall
    hold: Hold
    result: Charge | None = None
    cut_event: bytes = STREAM_CUT_EVENT_UPTO

    @property
    def until(self) -> float:
        return self.upto.stream_until(self.hold)

    def release(self) -> None:
        self.upto.release(self.hold)

    def charge(self, usage: Usage | None) -> bytes:
        upto, hold = self.upto, self.hold
        result = self.result = upto.settle(hold, usage)
        upto.record(hold, result, answered=True)
        reason = (
            ""
            if result.outcome == SETTLED
            else (SETTLEMENT_PENDING if result.outcome == PENDING else result.reason or TRANSACTION_FAILED)
        )
        _name, value = upto.response_header(result, hold.payer, reason)
        return PAYMENT_RESPONSE_PREFIX + _with_offer_receipt(self.gate, self.call, value).encode() + b"\n\n"

    def receipt(self, response_sha256: str) -> Receipt:
        assert self.result is not None
        return _upto_receipt(self.gate, self.call, self.hold, self.result, response_sha256)


PAYMENT_RESPONSE_PREFIX = b": x402-payment-response "
CREDIT_ADDED_PREFIX = b": x402-credit-added "  # then the change credited to the wallet (atomic units)
CREDIT_PREFIX = b": x402-credit "  # then {"charged", "balance"} (atomic units) of a call paid from credit
PAYMENT_WINDOW_EVENT = (
    b'data: {"error": {"code": "payment_window_closing", "message": "the stream outlasted the time '
    b"its payment is held for (for upto, the permit's deadline less the time to settle); it ends here "
    b'and is charged the usage reported, else the maximum"}}\n\n'
)


def _upto_receipt(gate: Gate, call: PaidCall, hold: Hold, result: Charge, response_sha256: str) -> Receipt:
    return _metered_receipt(
        gate, call, hold.payer, hold.quote, result.tx, result.amount, result.usage, response_sha256
    )


def _metered_receipt(
    gate: Gate,
    call: PaidCall,
    payer: str,
    quote: Quote,
    tx: str,
    charged: int,
    usage: Usage | None,
    response_sha256: str,
) -> Receipt:
    """The receipt of a call charged by its usage (``upto``, credit): the amount charged, the
    maximum authorized or held, the usage the host reported."""
    return Receipt(
        tx=tx,
        payer=payer,
        amount=charged,
        model=quote.model.name,
        network=gate.settings.network.caip2,
        request_sha256=call.request_sha256,
        response_sha256=response_sha256,
        time=int(time.time()),
        authorized=quote.amount,
        usage="unreported" if usage is None else f"{usage.prompt_tokens}+{usage.completion_tokens}",
        **call.tee_binding(),
    )


def _upto_host_failed(status: int, code: str, message: str) -> Answer:
    return _host_failed(status, code, message, "the same payment header may be sent again")


def _host_failed(status: int, code: str, message: str, then: str) -> Answer:
    """The host failed or refused a call charged by its usage: nothing was charged, and ``then``."""
    return error_answer(
        status,
        code,
        f"{message}; nothing was charged: {then}",
        {"Access-Control-Expose-Headers": EXPOSED_HEADERS},
    )


# --- credit: a signed-in wallet pays from what the proxy holds for it ------------------------------


def _serve_credit(gate: Gate, call: PaidCall, hold: CreditHold) -> Answer:
    """Serve a call from the wallet's credit: the maximum is held, the host called, the usage
    price charged (``X-Credit-Charged``, ``X-Credit-Balance``; for a stream, an SSE comment at its
    end) and the rest given back. A host that fails, refuses or is cut off costs nothing."""
    signin = gate.signin
    called = _called(
        gate, call, lambda: signin.release(hold), _credit_host_failed, lambda: _CreditMeter(gate, call, hold)
    )
    if isinstance(called, Answer):
        return called
    answer, content = called
    usage = usage_of_answer(content) if answer.status < 400 else None
    charged = _charge_credit(signin, hold, usage)
    if isinstance(charged, str):  # nothing was charged, and the answer is withheld
        raise ApiError(503, charged, f"{charged}: the call could not be charged to your credit; nothing was")
    return _charged_answer(
        gate,
        call,
        answer,
        content,
        {CREDIT_CHARGED_HEADER: str(charged[0]), CREDIT_BALANCE_HEADER: str(charged[1])},
        lambda sha: _credit_receipt(gate, call, hold, charged[0], usage, sha),
    )


CREDIT_HOLD_LAPSED = "credit_hold_lapsed"


def _charge_credit(signin: SignInGate, hold: CreditHold, usage: Usage | None) -> tuple[int, int] | str:
    """(charged, balance after), or why nothing was charged: ``credit_hold_lapsed`` (the hold was
    returned, the call outlasted it) or ``ledger_unavailable`` (its hold returns once past its time)."""
    try:
        charged = signin.settle(hold, usage)
    except STORE_ERRORS:
        log.error("could not charge a call from credit; its hold returns once past its time")
        return "ledger_unavailable"
    if charged is None:
        return CREDIT_HOLD_LAPSED
    note(outcome="served", amount_charged=charged[0])
    return charged


CREDIT_CHARGE_SECONDS = 5


def _charged_before(gate: Gate, hold_until: float) -> float:
    """Unix time after which no more of a stream held until ``hold_until`` is passed on: the last
    chunk read may take ``X402_UPSTREAM_TIMEOUT``, and charging it a few seconds more."""
    return hold_until - gate.settings.upstream_timeout - CREDIT_CHARGE_SECONDS


STREAM_CUT_EVENT_CREDIT = (
    b'data: {"error": {"code": "upstream_cut", "message": "the model host cut the stream; nothing '
    b'was charged to your credit"}}\n\n'
)


@dataclass
class _CreditMeter:
    """A stream paid from credit: its usage price is charged from the hold at its end."""

    gate: Gate
    call: PaidCall
    hold: CreditHold
    charged: int = 0
    usage: Usage | None = None
    cut_event: bytes = STREAM_CUT_EVENT_CREDIT

    @property
    def until(self) -> float:
        return _charged_before(self.gate, self.hold.until)

    def release(self) -> None:
        self.gate.signin.release(self.hold)

    def charge(self, usage: Usage | None) -> bytes:
        self.usage = usage
        charged = _charge_credit(self.gate.signin, self.hold, usage)
        if isinstance(charged, str):  # nothing was charged (the answer went out already)
            return CREDIT_PREFIX + json.dumps({"error": charged}).encode() + b"\n\n"
        self.charged = charged[0]
        return CREDIT_PREFIX + json.dumps({"charged": charged[0], "balance": charged[1]}).encode() + b"\n\n"

    def receipt(self, response_sha256: str) -> Receipt:
        return _credit_receipt(self.gate, self.call, self.hold, self.charged, self.usage, response_sha256)


def _credit_receipt(
    gate: Gate, call: PaidCall, hold: CreditHold, charged: int, usage: Usage | None, response_sha256: str
) -> Receipt:
    """The receipt of a call paid from credit: no transaction, the amount charged, the maximum held."""
    return _metered_receipt(gate, call, hold.payer, hold.quote, "", charged, usage, response_sha256)


def _credit_host_failed(status: int, code: str, message: str) -> Answer:
    return _host_failed(status, code, message, "your credit is as it was")


# --- batch-settlement: a voucher on an escrow channel, charged its usage ---------------------------


def _serve_batch(gate: Gate, batch: BatchGate, call: PaidCall, payment: BatchPayment) -> Answer:
    """Hold the channel (sending a deposit the payload carries), call the host, charge the usage
    price on the channel: no transaction per call. A whole answer is handed over once charged; a
    stream goes out as it comes and is charged at its end, its ``PAYMENT-RESPONSE`` an SSE comment
    there (the official clients then resynchronise with the next call's corrective 402). A host
    that fails, refuses or is cut off costs nothing: the channel is released."""
    if payment.kind == "refund":
        return _refund(batch, call, payment)
    hold = batch.begin(call.quote, payment)
    called = _called(
        gate,
        call,
        lambda: batch.release(hold),
        _batch_host_failed,
        lambda: _BatchMeter(gate, batch, call, hold),
    )
    if isinstance(called, Answer):
        return called
    answer, content = called
    usage = usage_of_answer(content) if answer.status < 400 else None
    charged = batch.commit(hold, usage)
    if charged.state is None:  # nothing was charged, and the answer is withheld
        raise ApiError(
            503,
            CHANNEL_HOLD_LAPSED,
            "the call outlasted its hold on the channel (or the ledger failed); nothing was charged: "
            "send the same voucher again",
        )
    name, value = batch.response_header(hold, charged)
    return _charged_answer(
        gate,
        call,
        answer,
        content,
        {name: _with_offer_receipt(gate, call, value)},
        lambda sha: _batch_receipt(gate, call, hold, charged, sha),
    )


def _refund(batch: BatchGate, call: PaidCall, payment: BatchPayment) -> Answer:
    """A cooperative refund sent to any paid resource: no model is called; the answer says what was
    returned (``PAYMENT-RESPONSE``: its transaction, ``amount``, ``extra.channelState``)."""
    refunded = batch.refund(call.quote, payment)
    name, value = batch.refund_header(payment, refunded)
    body = {
        "message": "refunded",
        "channelId": "0x" + payment.voucher.channel_id.hex(),
        "amount": str(refunded.amount),
        "transaction": refunded.tx,
    }
    headers = {
        name: value,
        "Content-Type": "application/json",
        "Access-Control-Expose-Headers": EXPOSED_HEADERS,
        "Cache-Control": "no-store, private",
    }
    return Answer(200, headers, json.dumps(body).encode())


CHANNEL_HOLD_LAPSED = "channel_hold_lapsed"
STREAM_CUT_EVENT_BATCH = (
    b'data: {"error": {"code": "upstream_cut", "message": "the model host cut the stream; nothing '
    b'was charged to your channel: send the same voucher again"}}\n\n'
)


@dataclass
class _BatchMeter:
    """A stream paid by a voucher: its usage price is charged on the channel at its end."""

    gate: Gate
    batch: BatchGate
    call: PaidCall
    hold: ChannelHold
    charged: VoucherCharge | None = None
    cut_event: bytes = STREAM_CUT_EVENT_BATCH

    @property
    def until(self) -> float:
        return _charged_before(self.gate, self.hold.until)

    def release(self) -> None:
        self.batch.release(self.hold)

    def charge(self, usage: Usage | None) -> bytes:
        charged = self.charged = self.batch.commit(self.hold, usage)
        if charged.state is None:  # nothing was charged (the answer went out already)
            return PAYMENT_RESPONSE_PREFIX + json.dumps({"error": CHANNEL_HOLD_LAPSED}).encode() + b"\n\n"
        _name, value = self.batch.response_header(self.hold, charged)
        return PAYMENT_RESPONSE_PREFIX + _with_offer_receipt(self.gate, self.call, value).encode() + b"\n\n"

    def receipt(self, response_sha256: str) -> Receipt:
        assert self.charged is not None
        return _batch_receipt(self.gate, self.call, self.hold, self.charged, response_sha256)


def _batch_receipt(
    gate: Gate, call: PaidCall, hold: ChannelHold, charged: VoucherCharge, response_sha256: str
) -> Receipt:
    """The receipt of a call paid by a voucher: the deposit's transaction when it made one, the
    amount charged (0 when nothing could be), the maximum the voucher authorized."""
    amount = charged.amount if charged.state is not None else 0
    quote = hold.quote
    return _metered_receipt(
        gate, call, hold.payer, quote, hold.deposit_tx, amount, charged.usage, response_sha256
    )


def _batch_host_failed(status: int, code: str, message: str) -> Answer:
    return _host_failed(status, code, message, "send the same voucher again")
