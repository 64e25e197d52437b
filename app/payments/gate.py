"""The payment gate: quote → decode → check offline → claim → check on chain → settle.

``Gate.begin`` verifies and claims a payment and starts its settlement; its ``Ticket`` gives ``Paid``
only for a payment confirmed on chain (or a redeemable one that was), and otherwise raises
``PaymentRequired`` (402, the challenge with a reason) or ``ApiError`` (503 and friends). After the
model call ``app.payments.serve`` records the result with ``served`` or ``redeemable``, so a settled
payment is never forgotten. See ``docs/flow.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from app import metrics
from app.backends.chain import UNPAYABLE, Chain, Preflight
from app.backends.rpc import ChainUnavailable, RpcFailure
from app.backends.store import STORE_ERRORS
from app.backends.token import ReceiptContradiction, transfer_logged
from app.backends.upstream import abandoned_after
from app.catalog import Catalog, Quote
from app.logs import note
from app.payments.answers import Answer
from app.payments.batch import BatchGate
from app.payments.channels import Channels
from app.payments.credit import Credit
from app.payments.errors import ApiError
from app.payments.keys import payment_key
from app.payments.ledger import NEW, REDEEM, RESUME, Claim, Ledger
from app.payments.outcomes import Offer, Paid, PaymentRequired, Ticket, payment_header, requirement_for
from app.payments.replay import Replays
from app.payments.settlement import (
    FAILED,
    NOT_SENT,
    PENDING,
    SETTLED,
    LocalSettler,
    SettlementJob,
    Settler,
)
from app.payments.signin import SignInGate
from app.payments.states import State
from app.payments.upto import UptoGate
from app.settings import Settings
from app.x402.batch_settlement import SCHEME
from app.x402.challenge import Challenge, Resource, build_challenge
from app.x402.checks import check_authorization, match_requirement
from app.x402.codec import encode_header
from app.x402.extensions.payment_identifier import PAYMENT_IDENTIFIER
from app.x402.extensions.payment_identifier import declaration as payment_identifier_declaration
from app.x402.extensions.sign_in_with_x import SIGN_IN_WITH_X
from app.x402.upto import EIP2612_GAS_SPONSORING, eip2612_declaration
from app.x402.verdict import (
    NONCE_USED,
    PAYMENT_REQUIRED,
    SETTLEMENT_PENDING,
    TRANSACTION_FAILED,
    UNSUPPORTED_SCHEME,
    VALUE_MISMATCH,
    Verdict,
    reject,
)
from app.x402.wire import (
    RESPONSE_HEADERS,
    Authorization,
    PaymentPayload,
    Requirement,
    SettleResponse,
    parse_payment_header,
)

log = logging.getLogger("x402.gate")

RETRY_AFTER_PENDING = "5"
PAYMENT_IN_PROGRESS = "payment_in_progress"
SETTLEMENT_THREADS = 32
# Settlements queued beyond the pool's threads; past this a payment is refused (503) before its
# claim, so a flood of funded payments cannot grow the queue (and its memory) without bound.
SETTLEMENT_QUEUE_LIMIT = 4 * SETTLEMENT_THREADS
CHALLENGE_CACHE_SIZE = 4096
# A reverted settlement of ours leaves the EIP-3009 authorization unused, so it can still move money
# until its validBefore: the buyer is told, and the same header may be sent again (it is then
# settled anew, or served if someone else settled it meanwhile).
REVERTED = (
    "the settlement reverted; nothing was charged. The authorization stays valid on chain until its "
    "validBefore: send the same header again once the cause is fixed, or let it expire"
)


class Gate:
    def __init__(
        self, settings: Settings, catalog: Catalog, ledger: Ledger, chain: Chain, settler: Settler
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.ledger = ledger
        self.chain = chain
        self.settler = settler
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()
        self._inflight = 0  # settlements submitted and not finished, in this process
        self._challenges: dict[tuple[str, int, str, str, str], tuple[bytes, Challenge]] = {}
        # the upto scheme needs our own relayer: it is the settling account the permit names
        self.upto = (
            UptoGate(settings, ledger, chain, settler)
            if "upto" in settings.schemes and isinstance(settler, LocalSettler)
            else None
        )
        # batch-settlement too: its deposits are sent by our relayers, its claims signed by our key
        self.batch = (
            BatchGate(
                settings, Channels(ledger, settings.network.chain_id, settings.network.caip2), chain, settler
            )
            if "batch-settlement" in settings.schemes and isinstance(settler, LocalSettler)
            else None
        )
        # the longest a request can legitimately keep a payment "settling" (receipt + model call)
        self._settling_limit = abandoned_after(settings)
        # answers kept for payment ids; a first request holds its id as long as an upto call may run
        running = math.ceil(self._settling_limit + settings.upstream_timeout)
        self.replays = Replays(ledger.store, settings.replay_seconds, running)
        self.credit = Credit(settings, ledger)
        self.signin = SignInGate(settings, ledger, chain, self.credit)

    def _executor(self) -> ThreadPoolExecutor:
        """One settlement pool per process (gunicorn may fork workers after the app is built)."""
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(SETTLEMENT_THREADS, thread_name_prefix="x402-settle")
                self._pool_pid = os.getpid()
            return self._pool

    def requirement(self, quote: Quote) -> Requirement:
        """Our x402 ``exact`` requirement for this quote: its price (atomic units) paid to ``pay_to`` in the
        configured asset, on the configured network."""
        return requirement_for(self.settings, quote.amount)

    def requirements(self, quote: Quote, facilitator: str) -> list[Requirement]:
        """What this call may be paid with, in the 402's order: ``exact`` first (clients that take the
        first entry), then ``upto`` settled by ``facilitator``, then ``batch-settlement``
        (``X402_SCHEMES``)."""
        offered = [self.requirement(quote)] if "exact" in self.settings.schemes else []
        if self.upto is not None:
            offered.append(self.upto.requirement(quote, facilitator))
        if self.batch is not None:
            offered.append(self.batch.requirement(quote))
        return offered

    def challenge(
        self,
        quote: Quote,
        resource_url: str,
        reason: str,
        extra_headers: Mapping[str, str] = (),
        extensions: dict[str, Any] | None = None,
        sign_in_origin: str = "",
        corrective: dict[str, Any] | None = None,
    ) -> Answer:
        """The 402: v1 body + v2 ``PAYMENT-REQUIRED`` header for this body's price, with a fresh
        ``sign-in-with-x`` challenge (spend the wallet's credit) in the v2 header when sign-in is
        offered at ``sign_in_origin``; ``corrective`` is added to the ``batch-settlement``
        requirement's ``extra`` (a stale voucher's channel state)."""
        # each 402 names the next relayer: upto permits bind the account that settles them
        facilitator = self.upto.settler.pick() if self.upto is not None else ""
        key = (quote.model.name, quote.amount, resource_url, reason, facilitator)
        built = self._challenges.get(key)
        if built is None:  # the same body, URL and reason always give the same 402
            extensions = {**(extensions or {}), PAYMENT_IDENTIFIER: payment_identifier_declaration()}
            if self.upto is not None:
                extensions[EIP2612_GAS_SPONSORING] = eip2612_declaration()
            description = f"{quote.model.name} call: {quote.model.trust}"
            challenge = build_challenge(
                self.requirements(quote, facilitator), Resource(resource_url, description), reason, extensions
            )
            built = (json.dumps(challenge.body, separators=(",", ":")).encode(), challenge)
            if len(self._challenges) >= CHALLENGE_CACHE_SIZE:
                self._challenges.clear()
            self._challenges[key] = built
        metrics.CHALLENGES.labels(reason).inc()
        body, challenge = built
        headers = challenge.headers()
        sign_in = self.signin.extension(resource_url, sign_in_origin)  # a nonce per 402: encoded anew
        if sign_in is not None or corrective:
            v2 = dict(challenge.v2)
            if sign_in is not None:
                v2["extensions"] = {**challenge.v2.get("extensions", {}), SIGN_IN_WITH_X: sign_in}
            if corrective:
                v2["accepts"] = [
                    {**offer, "extra": {**offer["extra"], **corrective}}
                    if offer["scheme"] == SCHEME
                    else offer
                    for offer in challenge.v2["accepts"]
                ]
            headers["PAYMENT-REQUIRED"] = encode_header(v2)
        return Answer(402, {"Content-Type": "application/json", **headers, **dict(extra_headers)}, body)

    def settle_header(
        self, version: int, success: bool, tx_hash: str, payer: str, reason: str = ""
    ) -> tuple[str, str]:
        """(header name, base64 value) of the settlement response: ``PAYMENT-RESPONSE`` with the CAIP-2
        network for v2, ``X-PAYMENT-RESPONSE`` with the v1 network name for v1; ``KeyError`` otherwise."""
        network = self.settings.network.caip2 if version == 2 else self.settings.network.v1_name
        return RESPONSE_HEADERS[version], SettleResponse(success, tx_hash, network, payer, reason).to_header()

    def begin(self, quote: Quote, headers: Mapping[str, str]) -> Ticket:
        """Verify and claim the payment for one quoted call, then start settling it in the
        background; raise ``PaymentRequired`` / ``ApiError`` when it is refused up front.

        A payment the ledger already recorded is recovered by its header for its whole retention,
        whatever its time window (signature and payer are still checked), and a redeemable one buys
        any call on the same model priced at most what it paid."""
        offer = self._verify(quote, headers)
        auth, version = offer.payment.authorization, offer.version
        note(model=quote.model.name, amount=quote.amount, payer=auth.from_, x402_version=version)
        key = payment_key(offer.requirement.chain_id, offer.requirement.asset, auth.from_, auth.nonce)
        claim = self._claim(quote, offer, key)
        if claim.outcome == "redeem":
            header = self.settle_header(version, True, claim.tx, auth.from_)
            return Ticket(paid=Paid(quote, key, auth.from_, claim.tx, header, True, auth.value))
        if claim.outcome == "expired":
            raise PaymentRequired(offer.offline.verdict)
        if claim.outcome == "mismatch":
            refusal = offer.refusal
            raise PaymentRequired(
                reject(
                    refusal.reason or VALUE_MISMATCH,
                    f"this payment is not for this call ({refusal.detail or 'another model'}); a redeemable "
                    "payment buys calls on the model it paid for, priced at most what it paid",
                )
            )
        if claim.outcome == "taken":
            return Ticket(paid=self._already_claimed(quote, offer.payment, key, claim, version))
        relayer = self.settler.pick()
        preflight = self._preflight(auth, offer.offline.signature, offer.offline.ecdsa_signer, key, relayer)
        if preflight is None:  # already used on chain, and it paid us: settled under our claim
            self._confirmed(quote)
            tx = self.ledger.get(key).get("tx", "")
            return Ticket(
                paid=Paid(quote, key, auth.from_, tx, self.settle_header(version, True, tx, auth.from_))
            )
        future = self._executor().submit(
            self._settle, quote, offer.payment, offer.requirement, preflight, key, version, relayer
        )
        with self._pool_lock:
            self._inflight += 1
        future.add_done_callback(self._settled_one)
        return Ticket(future)

    def _verify(self, quote: Quote, headers: Mapping[str, str]) -> Offer:
        """Decode the payment header and check it offline against this call's requirement (or, for a
        payment of a dearer call, against what it paid: it may only redeem). Raises
        ``PaymentRequired`` with the reason a plain check gives."""
        header, version = payment_header(headers)
        if header is None:
            raise PaymentRequired(reject(PAYMENT_REQUIRED, "send PAYMENT-SIGNATURE (v2) or X-PAYMENT (v1)"))
        parsed = parse_payment_header(header, version)
        if isinstance(parsed, Verdict):
            raise PaymentRequired(parsed)
        if "exact" not in self.settings.schemes:
            raise PaymentRequired(reject(UNSUPPORTED_SCHEME, "scheme 'exact' is not offered (X402_SCHEMES)"))
        auth, now = parsed.authorization, int(time.time())
        requirement = self.requirement(quote)
        mode, refusal = NEW, match_requirement(parsed, requirement)
        offline = check_authorization(parsed, requirement, now) if refusal else None
        if auth.value > quote.amount:  # paid for a dearer call: only a redeemable payment may buy this one
            refusal = refusal if not refusal or offline is None else offline.verdict
            requirement, mode = replace(requirement, amount=auth.value), REDEEM
            if not match_requirement(parsed, requirement):
                raise PaymentRequired(refusal)
            offline = check_authorization(parsed, requirement, now)
        elif not refusal or offline is None:
            raise PaymentRequired(refusal)
        if not offline.verdict:
            if not (offline.window_only and offline.ecdsa_signer):
                raise PaymentRequired(offline.verdict)
            mode = REDEEM if mode == REDEEM else RESUME  # past its window: only what was recorded
        return Offer(parsed, version, requirement, offline, mode, refusal)

    def _claim(self, quote: Quote, offer: Offer, key: str) -> Claim:
        """Claim the payment in the ledger (503 when the settlement queue is full, or Redis fails)."""
        if offer.mode == NEW and self._inflight >= SETTLEMENT_QUEUE_LIMIT:
            raise ApiError(
                503,
                "settlement_busy",
                "too many settlements in flight; nothing was charged",
                {"Retry-After": "1"},
            )
        auth = offer.payment.authorization
        try:
            return self.ledger.claim(
                key,
                auth.valid_before,
                auth.from_,
                auth.value,
                quote.model.name,
                offer.requirement.network,
                offer.mode,
                quote.amount,
            )
        except Exception as exc:
            log.warning("ledger unavailable at claim: %s: %s", type(exc).__name__, exc)
            raise _nothing_charged_ledger_down() from exc

    def _settled_one(self, _future: Future[Paid]) -> None:
        with self._pool_lock:
            self._inflight -= 1

    def _preflight(
        self, auth: Authorization, signature: bytes, ecdsa_signer: bool, key: str, relayer: str
    ) -> Preflight | None:
        """Chain checks under our claim. Returns None when the authorization was already submitted by
        someone else and moved the money to us (the claim is then marked settled with their tx)."""
        try:
            preflight = self.chain.preflight(auth, signature, ecdsa_signer, relayer)
            used_by = self.chain.find_settlement(auth) if preflight.verdict.reason == NONCE_USED else None
        except (ChainUnavailable, RpcFailure) as exc:
            self._forget_or_keep(key, sent=False)
            raise ApiError(
                503, "rpc_unavailable", "no RPC endpoint answers; nothing was charged", {"Retry-After": "5"}
            ) from exc
        if used_by is not None and self.ledger.transition(key, (State.CLAIMED,), State.SETTLED, tx=used_by):
            return None
        if not preflight.verdict:
            self.ledger.transition(key, (State.CLAIMED,), State.RELEASED)
            if preflight.verdict.reason in UNPAYABLE:
                raise ApiError(503, preflight.verdict.reason, preflight.verdict.detail, {"Retry-After": "60"})
            raise PaymentRequired(preflight.verdict)
        return preflight

    def _settle(
        self,
        quote: Quote,
        payment: PaymentPayload,
        requirement: Requirement,
        preflight: Preflight,
        key: str,
        version: int,
        relayer: str,
    ) -> Paid:
        """Send and confirm the settlement from ``relayer`` (runs in the settlement pool, beside the
        model call)."""
        auth = payment.authorization
        sent = False

        def start(relayer_nonce_of: tuple[int, str, int] | None) -> int:
            """Right before anything is submitted: claimed → settling (+ the relayer nonce)."""
            nonlocal sent
            nonce = self.ledger.start_settlement(key, relayer_nonce_of)
            if nonce is None:
                raise ApiError(503, "ledger_conflict", "the payment changed state during settlement")
            sent = True
            return nonce

        def replaced(tx_hash: str) -> None:
            self.ledger.transition(key, (State.SETTLING,), State.SETTLING, tx=tx_hash)

        started = time.perf_counter()
        try:
            job = SettlementJob(payment, requirement, preflight, start, replaced, relayer)
            settlement = self.settler.settle(job)
        except ApiError:
            raise
        except ChainUnavailable as exc:
            self._forget_or_keep(key, sent)
            raise ApiError(
                503, "rpc_unavailable", "no RPC endpoint answers; nothing was charged", {"Retry-After": "5"}
            ) from exc
        except STORE_ERRORS as exc:
            self._forget_or_keep(key, sent)
            log.warning("ledger unavailable at settlement: %s: %s", type(exc).__name__, exc)
            if sent:
                raise self._pending_error(version, "", auth.from_) from exc
            raise _nothing_charged_ledger_down() from exc
        except Exception as exc:
            self._forget_or_keep(key, sent)
            log.error("settlement error: %s", type(exc).__name__)
            raise ApiError(503, "unexpected_settle_error", "settlement failed unexpectedly") from exc

        tx, payer = settlement.tx_hash, auth.from_
        if settlement.outcome == SETTLED:
            # recorded with what happens next (served, redeemable, or settled before a stream), in
            # the same round trip; until then the payment is "settling" and resolved from chain
            metrics.SETTLEMENT_SECONDS.observe(time.perf_counter() - started)
            self._confirmed(quote)
            return Paid(quote, key, payer, tx, self.settle_header(version, True, tx, payer))
        if settlement.outcome == FAILED:
            self.ledger.transition(key, (State.SETTLING,), State.FAILED, tx=tx)
            raise PaymentRequired(
                reject(settlement.reason, REVERTED),
                self.settle_header(version, False, tx, payer, settlement.reason),
            )
        if settlement.outcome == NOT_SENT:
            self.ledger.transition(key, (State.SETTLING,), State.RELEASED, tx="")
            raise ApiError(503, "unexpected_settle_error", settlement.reason)
        assert settlement.outcome == PENDING
        self.ledger.transition(key, (State.SETTLING,), State.PENDING, tx=tx)
        raise self._pending_error(version, tx, payer)

    def _forget_or_keep(self, key: str, sent: bool) -> None:
        """Before a transaction was signed, the claim can go; after, it must stay (pending)."""
        try:
            if sent:
                self.ledger.transition(key, (State.SETTLING,), State.PENDING)
            else:
                self.ledger.transition(key, (State.CLAIMED,), State.RELEASED)
        except Exception:
            log.error("could not record the payment state after a settlement error")

    def _already_claimed(
        self, quote: Quote, payment: PaymentPayload, key: str, claim: Claim, version: int
    ) -> Paid:
        """Someone holds this authorization. One whose outcome is open — pending, or settling for
        longer than any request can take (its worker died) — is resolved from the chain once."""
        payer, auth, tx = payment.authorization.from_, payment.authorization, claim.tx
        abandoned = claim.state == State.SETTLING and time.time() - claim.updated > self._settling_limit
        if claim.state in (State.CLAIMED, State.SETTLING) and not abandoned:
            raise ApiError(
                503,
                PAYMENT_IN_PROGRESS,
                "this payment is being settled by another request; retry the same header shortly",
                {"Retry-After": RETRY_AFTER_PENDING},
            )
        if claim.state == State.CREDITED:
            raise PaymentRequired(
                reject(
                    NONCE_USED,
                    "this payment became your wallet's credit: sign in (SIGN-IN-WITH-X) to spend it",
                )
            )
        if claim.state != State.PENDING and not abandoned:
            raise PaymentRequired(
                reject(NONCE_USED, f"this authorization was already presented ({claim.state})")
            )
        try:
            receipt = self.chain.receipt(tx) if tx else None
            try:
                logged = receipt is not None and transfer_logged(receipt, self.chain.asset, auth)
            except ReceiptContradiction:  # one endpoint's receipt lies: the token's logs decide
                receipt, logged = None, False
            if logged:
                settled_by: str | None = tx
            else:  # an earlier version of our transaction, or someone else's, may have paid
                settled_by = self.chain.find_settlement(auth)
        except (ChainUnavailable, RpcFailure):
            raise self._pending_error(version, tx, payer) from None
        if settled_by is not None:
            if self.ledger.transition(key, (claim.state,), State.SETTLED, tx=settled_by):
                self._confirmed(quote)
                return Paid(
                    quote, key, payer, settled_by, self.settle_header(version, True, settled_by, payer)
                )
        elif receipt is not None:
            self.ledger.transition(key, (claim.state,), State.FAILED)
            raise PaymentRequired(reject(TRANSACTION_FAILED, REVERTED))
        raise self._pending_error(version, tx, payer)

    def _pending_error(self, version: int, tx: str, payer: str) -> ApiError:
        name, value = self.settle_header(version, False, tx, payer, SETTLEMENT_PENDING)
        return ApiError(
            503,
            SETTLEMENT_PENDING,
            "the settlement was sent but is not confirmed yet; retry the same payment header later",
            {name: value, "Retry-After": RETRY_AFTER_PENDING, "Access-Control-Expose-Headers": name},
        )

    @staticmethod
    def _confirmed(quote: Quote) -> None:
        """The chain shows this payment: count it as revenue (once per payment)."""
        metrics.REVENUE.labels(quote.model.name).inc(quote.amount)

    def _record(self, paid: Paid, to_state: str, **fields: str) -> None:
        """Record what became of a settled payment (with its tx hash and ledger events, one round
        trip). Content is released only after this succeeds: if Redis is down the client gets 503
        with ``PAYMENT-RESPONSE`` and the retried header is resolved from the chain later."""
        try:
            self.ledger.transition(
                paid.key, (State.SETTLING, State.SETTLED), to_state, tx=paid.tx_hash, **fields
            )
        except Exception as exc:
            log.warning("ledger unavailable after settlement: %s: %s", type(exc).__name__, exc)
            name, value = paid.response_header
            raise ApiError(
                503,
                "ledger_unavailable",
                "your payment settled but could not be recorded; retry the same payment header shortly",
                {name: value, "Retry-After": RETRY_AFTER_PENDING, "Access-Control-Expose-Headers": name},
            ) from exc
        metrics.payment_outcome(to_state)
        note(outcome=to_state, tx=paid.tx_hash)

    def settled(self, paid: Paid) -> None:
        """Before a stream starts: the payment is confirmed, the answer is on its way."""
        self._record(paid, State.SETTLED)

    def served(self, paid: Paid, change: int = 0) -> int:
        """Before a whole answer below HTTP 400 is handed over (or once a stream ended): record the
        payment served, and credit ``change`` (atomic units: what it paid beyond the call's usage
        price) to the payer's wallet once. Returns what was credited. Raises ``ApiError`` (503)
        when Redis fails to record the payment; a credit that fails is logged, and its amount stays
        in the payment's record (``change``) for ``reconcile``."""
        self._record(paid, State.SERVED, **({"change": str(change)} if change > 0 else {}))
        if change <= 0:
            return 0
        try:
            added = self.credit.add(
                paid.payer,
                f"change:{paid.key}",
                change,
                "change",
                paid.quote.model.name,
                paid.tx_hash,
                int(time.time()),
            )
        except STORE_ERRORS as exc:
            log.error("could not credit an exact call's change: %s", type(exc).__name__)
            return 0
        return change if added else 0

    def redeemable(self, paid: Paid) -> None:
        """The upstream failed after settlement: the same header, retried, is served without a new
        charge, and the payer's sign-in may claim the payment into its credit instead."""
        self._record(paid, State.REDEEMABLE)
        try:
            self.credit.point(paid.payer, paid.key, paid.value, int(time.time()))
        except STORE_ERRORS:  # the header still redeems it
            log.warning("could not note a redeemable payment in its payer's credit")


def _nothing_charged_ledger_down() -> ApiError:
    """503 ``ledger_unavailable`` before anything was sent: the same header may be retried."""
    return ApiError(
        503,
        "ledger_unavailable",
        "payment ledger unavailable; nothing was charged",
        {"Retry-After": RETRY_AFTER_PENDING},
    )
