"""Calls paid from a wallet's credit, by signing in (the ``sign-in-with-x`` extension).

``SignInGate.extension`` puts a fresh challenge (a nonce only this proxy could have issued) in each
402. A request that carries ``SIGN-IN-WITH-X`` instead of a payment is checked — fields, origin,
our nonce, its age, the signature (EIP-191, or EIP-1271 for a contract wallet, asked of the chain) —
and the nonce is used once, in the same Redis step that holds the body's priced maximum of the
wallet's credit (``app.payments.credit``). The call is then charged its usage price
(``catalog.usage.charge``, the rule of ``upto``) and the rest of the hold goes back. When the credit
does not cover the maximum, the wallet's failed calls' payments are claimed into it first; if it
still falls short the answer is the usual 402 (``insufficient_credit``). No transaction is sent.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.backends.chain import Chain
from app.backends.rpc import ChainUnavailable, RpcFailure
from app.backends.store import STORE_ERRORS
from app.backends.upstream import abandoned_after
from app.catalog import Quote
from app.catalog.usage import Usage, charge
from app.logs import note
from app.payments.credit import HELD, NONCE_USED, Credit, Statement
from app.payments.errors import ApiError
from app.payments.keys import SIWX_SECRET_KEY
from app.payments.ledger import Ledger
from app.payments.outcomes import PaymentRequired
from app.payments.states import State
from app.settings import Settings
from app.x402.extensions import sign_in_with_x as siwx
from app.x402.verdict import Verdict, reject

log = logging.getLogger("x402.signin")

INSUFFICIENT_CREDIT = "insufficient_credit"


@dataclass(frozen=True)
class CreditHold:
    """Credit held for one call: the wallet (lower-case), the hold's id, the call's quote (its
    ``amount`` is what is held, atomic units) and until when the hold stands (unix seconds)."""

    payer: str
    hold_id: str
    quote: Quote
    until: int


class SignInGate:
    """Sign-in checks and the credit they spend, for one proxy (every worker and host shares the
    nonce secret through Redis)."""

    def __init__(self, settings: Settings, ledger: Ledger, chain: Chain, credit: Credit) -> None:
        self.settings = settings
        self.ledger = ledger
        self.chain = chain
        self.credit = credit
        self._secret: bytes | None = None
        self._lock = threading.Lock()
        # a hold stands as long as a call may legitimately run (then it is returned as abandoned)
        self.hold_seconds = math.ceil(abandoned_after(settings) + settings.upstream_timeout)

    def secret(self) -> bytes:
        """The secret that tags our nonces: made once in Redis (``SET NX``) and shared by every
        worker and host; read once per process. Raises ``redis.RedisError``."""
        with self._lock:
            if self._secret is None:
                client = self.ledger.redis
                client.set(SIWX_SECRET_KEY, secrets.token_hex(32), nx=True)
                value = client.get(SIWX_SECRET_KEY)
                self._secret = bytes.fromhex(value.decode() if isinstance(value, bytes) else value)
            return self._secret

    def extension(self, resource_url: str, origin: str) -> dict[str, Any] | None:
        """``extensions["sign-in-with-x"]`` for a 402 on ``resource_url``, with a fresh nonce; None
        when sign-in is not ``offered`` at ``origin`` (the request's, "" for none), or Redis cannot
        give the secret now (the 402 then offers payment only)."""
        if not self.offered(origin):
            return None
        try:
            secret = self.secret()
        except STORE_ERRORS:
            return None
        issued = int(time.time())
        nonce = siwx.new_nonce(secret, issued, os.urandom(8))
        return siwx.declaration(resource_url, nonce, issued, self.settings.network.caip2, self.purpose)

    @property
    def purpose(self) -> str:
        """The sign-in message's statement: what signing in does, and how long credit lives."""
        seconds = self.settings.credit_seconds
        life = f"{seconds // 86400} days" if seconds % 86400 == 0 else f"{seconds} seconds"
        return f"Pay from this wallet's credit. Credit expires {life} after it is added."

    def wallet(self, header: str, origin: str) -> tuple[str, str]:
        """The wallet a ``SIGN-IN-WITH-X`` header signs in (lower-case) and its nonce, still to be
        used ("" when it was used already: a contract wallet's). Raises ``PaymentRequired`` with the
        reason code (``invalid_siwx_*``), ``ApiError`` 503 when Redis or the chain cannot answer."""
        if not self.offered(origin):
            raise PaymentRequired(reject(siwx.DOMAIN_MISMATCH, SIGN_IN_ELSEWHERE))
        sign_in = siwx.parse(header)
        if isinstance(sign_in, Verdict):
            raise PaymentRequired(sign_in)
        now = time.time()
        verdict = siwx.check(sign_in, origin, self.settings.network.caip2, now)
        if not verdict:
            raise PaymentRequired(verdict)
        try:
            issued = siwx.nonce_issued(self.secret(), sign_in.nonce)
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc
        if issued is None:
            raise PaymentRequired(reject(siwx.NONCE, "the nonce was not issued by this proxy"))
        if now - issued > siwx.MAX_AGE + siwx.FUTURE_SKEW:
            raise PaymentRequired(reject(siwx.TOO_OLD, "the nonce is too old: take a fresh 402's"))
        payer = sign_in.address.lower()
        note(payer=payer)
        if siwx.signer(sign_in) == payer:
            return payer, sign_in.nonce
        # Not the address's own key: only a contract wallet (EIP-1271) may still accept it. The
        # nonce is used first, so one nonce costs the chain at most one eth_call.
        if not self._use_nonce(payer, sign_in.nonce):
            raise PaymentRequired(reject(siwx.NONCE, "this sign-in was used before: sign a fresh 402's"))
        if not self._contract_accepts(sign_in):
            raise PaymentRequired(reject(siwx.SIGNATURE, "the signature is not the address's"))
        return payer, ""

    def offered(self, origin: str) -> bool:
        """Whether sign-in is offered at ``origin`` (``scheme://host[:port]``, "" for none): that of
        ``X402_PUBLIC_URL`` when it is set, else a loopback host only (the web layer passes "" for
        a request that did not come over loopback). A Host header names any domain its sender
        likes: were sign-in offered under it, a site could have a wallet sign in to that site (no
        phishing warning) and spend the wallet's credit here."""
        if self.settings.public_url:
            return origin == siwx.origin_of(self.settings.public_url)
        return (urlsplit(origin).hostname or "") in LOOPBACK_HOSTS if origin else False

    def _use_nonce(self, payer: str, nonce: str) -> bool:
        """Mark ``nonce`` used by ``payer``; False when it was used before. Raises ``ApiError`` 503."""
        try:
            return self.credit.use_nonce(payer, nonce, _nonce_kept_until())
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc

    def _contract_accepts(self, sign_in: siwx.SignIn) -> bool:
        """EIP-1271: a contract wallet's own word on the signature (one ``eth_call``)."""
        try:
            return self.chain.accepts_signature(
                sign_in.address, siwx.signed_digest(sign_in), sign_in.signature
            )
        except (ChainUnavailable, RpcFailure) as exc:
            raise ApiError(
                503, "rpc_unavailable", "no RPC endpoint answers; nothing was charged", {"Retry-After": "5"}
            ) from exc

    def begin(self, quote: Quote, header: str, origin: str) -> CreditHold:
        """Sign the wallet in and hold ``quote.amount`` of its credit for this call. Raises
        ``PaymentRequired`` (a check failed, the nonce was used, or ``insufficient_credit``) or
        ``ApiError`` (503: Redis or the chain)."""
        payer, nonce = self.wallet(header, origin)
        now = int(time.time())
        hold = CreditHold(payer, secrets.token_hex(12), quote, now + self.hold_seconds)
        try:
            result = self.credit.hold(
                payer, hold.hold_id, quote.amount, hold.until, nonce, _nonce_kept_until()
            )
            if result.outcome == NONCE_USED:
                raise PaymentRequired(reject(siwx.NONCE, "this sign-in was used before: sign a fresh 402's"))
            if result.outcome != HELD and result.pointers and self._claim_failed_calls(payer):
                result = self.credit.hold(payer, hold.hold_id, quote.amount, hold.until, "", 0)
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc
        if result.outcome != HELD:
            raise PaymentRequired(
                reject(
                    INSUFFICIENT_CREDIT,
                    f"this wallet's credit ({result.available} atomic units) is below this call's price "
                    f"({quote.amount}): pay it",
                )
            )
        note(model=quote.model.name, amount=quote.amount, scheme="credit")
        return hold

    def _claim_failed_calls(self, payer: str) -> bool:
        """Move the wallet's redeemable payments into its credit (``redeemable → credited``, one
        winner against a retry of the payment's header); a pointer whose payment went elsewhere is
        dropped. Returns whether anything was credited. Raises ``redis.RedisError``."""
        credited = 0
        for key in self.credit.statement(payer).redeemable:
            moved = self.ledger.transition(key, (State.REDEEMABLE,), State.CREDITED)
            record = self.ledger.get(key)  # read after: another sign-in may have moved it meanwhile,
            keep = record.get("state") == State.CREDITED  # or a crash came between the two steps
            if moved:
                note(outcome=State.CREDITED)
            credited += self.credit.convert(payer, key, record.get("model", ""), record.get("tx", ""), keep)
        return credited > 0

    def settle(self, hold: CreditHold, usage: Usage | None) -> tuple[int, int] | None:
        """Charge the call its usage price (``charge``: the maximum when usage is unknown) and give
        back the rest. Returns (charged, balance after), None when the hold was returned as
        abandoned (the call outlasted it). Raises ``redis.RedisError``."""
        price = charge(hold.quote.model, usage, hold.quote.amount)
        return self.credit.settle(hold.payer, hold.hold_id, price, hold.quote.model.name)

    def release(self, hold: CreditHold) -> None:
        """The call failed before an answer went out: the whole hold goes back."""
        try:
            self.credit.settle(hold.payer, hold.hold_id, 0, hold.quote.model.name)
        except STORE_ERRORS:  # it is returned once past its time
            log.warning("could not return a credit hold; it returns once abandoned")
        note(outcome="released")

    def statement(self, header: str, origin: str) -> tuple[str, Statement]:
        """The signed-in wallet and its credit (``GET /v1/credit``); the nonce is used once. Raises
        ``PaymentRequired`` for a refused sign-in, ``ApiError`` 503 when Redis or the chain fails."""
        payer, nonce = self.wallet(header, origin)
        if nonce and not self._use_nonce(payer, nonce):
            raise PaymentRequired(reject(siwx.NONCE, "this sign-in was used before: sign a fresh one"))
        try:
            return payer, self.credit.statement(payer)
        except STORE_ERRORS as exc:
            raise _ledger_down() from exc


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
SIGN_IN_ELSEWHERE = "this proxy offers sign-in at its X402_PUBLIC_URL only (or on a loopback host)"
# A used nonce is remembered this much longer than it can be used: a host whose clock runs ahead
# trims it no earlier than this margin allows.
NONCE_CLOCK_MARGIN = 300


def _nonce_kept_until() -> int:
    """Until when a nonce used now is remembered (unix seconds)."""
    return int(time.time()) + siwx.MAX_AGE + siwx.FUTURE_SKEW + NONCE_CLOCK_MARGIN


def _ledger_down() -> ApiError:
    return ApiError(
        503, "ledger_unavailable", "credit ledger unavailable; nothing was charged", {"Retry-After": "5"}
    )
