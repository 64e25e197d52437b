"""Answers kept for a payment's idempotent retries (the ``payment-identifier`` extension).

A paid answer whose payment carried an id is kept for ``X402_REPLAY_SECONDS`` under that id, bound to
the payment's fingerprint (header and body, ``x402.extensions.payment_identifier.fingerprint``): the
same id with the same payment gets the same answer again, the same id with another payment a
conflict. What is kept is encrypted (AES-256-GCM) with a key derived (HKDF-SHA256) from the payment
header itself, signature included, which the proxy keeps nowhere: neither the operator nor a Redis
dump can read a kept completion, only whoever holds that header again.

Key: ``x402:{replay:<SHA-256 of the id>}`` (the id itself is kept nowhere: with it, a dump and the
public chain would rebuild the header), a hash of ``fp`` (the fingerprint), ``state`` (``running``
while the first request is served, then ``done``) and ``blob`` (nonce ‖ ciphertext).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.backends.store import Script, Store
from app.payments.answers import Answer

NEW, CONFLICT, RUNNING, DONE = "new", "conflict", "running", "done"
# Headers of a kept answer that are its own (the rest are per response: dates, connection).
KEPT_HEADERS = frozenset(
    {
        "content-type",
        "payment-response",
        "x-payment-response",
        "x-receipt",
        "x-tee-measurement",
        "x-tee-evidence",
        "access-control-expose-headers",
        "cache-control",
        "x-accel-buffering",
    }
)

# KEYS[1] the id's hash. ARGV: fingerprint, seconds a running entry is held (its request may die).
# Returns {outcome, blob}: new (now running, ours), conflict (another payment), running, done.
_BEGIN = Script("""
local fp = redis.call('HGET', KEYS[1], 'fp')
if not fp then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'running')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'new', ''}
end
if fp ~= ARGV[1] then return {'conflict', ''} end
if redis.call('HGET', KEYS[1], 'state') == 'done' then
  return {'done', redis.call('HGET', KEYS[1], 'blob')}
end
return {'running', ''}
""")

# KEYS[1] the id's hash. ARGV: fingerprint, blob, seconds to keep it. Only the running entry of this
# fingerprint is completed. Returns 1 when kept.
_FINISH = Script("""
if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'done', 'blob', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
""")

# KEYS[1] the id's hash. ARGV: fingerprint, seconds. A running entry of this fingerprint is held that
# much longer (a stream still flowing). Returns 1 when it was.
_TOUCH = Script("""
if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 0
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
""")

# KEYS[1] the id's hash. ARGV: fingerprint. A running entry of this fingerprint is dropped.
_ABANDON = Script("""
if redis.call('HGET', KEYS[1], 'fp') == ARGV[1] and redis.call('HGET', KEYS[1], 'state') == 'running' then
  redis.call('DEL', KEYS[1])
end
return 0
""")


def replay_key(payment_id: str) -> str:
    """The Redis key of a payment id's kept answer: ``x402:{replay:<SHA-256 of the id, hex>}``."""
    return f"x402:{{replay:{hashlib.sha256(payment_id.encode()).hexdigest()}}}"


def _cipher(header: str, fingerprint: str) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=bytes.fromhex(fingerprint),
        info=b"x402-tee-proxy replay v1",
    ).derive(header.encode())
    return AESGCM(key)


def seal(answer: Answer, body: bytes, header: str, fingerprint: str, payment_id: str) -> bytes:
    """The answer (status, its own headers, the whole body) encrypted for this payment header:
    a 12-byte nonce, then AES-256-GCM of the JSON head and the body (the id is authenticated too)."""
    head = {
        "status": answer.status,
        "headers": {k: v for k, v in answer.headers.items() if k.lower() in KEPT_HEADERS},
    }
    plain = json.dumps(head).encode() + b"\n" + body
    nonce = os.urandom(12)
    return nonce + _cipher(header, fingerprint).encrypt(nonce, plain, payment_id.encode())


def unseal(blob: bytes, header: str, fingerprint: str, payment_id: str) -> Answer:
    """The kept answer; raises ``cryptography.exceptions.InvalidTag`` for another header or a blob
    that was changed."""
    plain = _cipher(header, fingerprint).decrypt(blob[:12], blob[12:], payment_id.encode())
    head_text, _, body = plain.partition(b"\n")
    head: dict[str, Any] = json.loads(head_text)
    return Answer(int(head["status"]), dict(head["headers"]), body)


@dataclass(frozen=True)
class Seen:
    """What the store knows of a payment id: ``outcome`` new | conflict | running | done, and the
    kept blob when done."""

    outcome: str
    blob: bytes = b""


class Replays:
    """The kept answers, in Redis (``store``); ``keep_seconds`` is ``X402_REPLAY_SECONDS`` and
    ``running_seconds`` how long a first request may hold its id before a retry may take it over."""

    def __init__(self, store: Store, keep_seconds: int, running_seconds: int) -> None:
        self.store = store
        self.keep_seconds = keep_seconds
        self.running_seconds = running_seconds

    def begin(self, payment_id: str, fingerprint: str) -> Seen:
        """Take the id for this payment, or say what holds it. Raises ``redis.RedisError``."""
        outcome, blob = _BEGIN(
            self.store.client,
            [replay_key(payment_id)],
            [fingerprint, self.running_seconds],
            self.store.deadline_ms(),
        )
        text = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        return Seen(text, blob if isinstance(blob, bytes) else str(blob).encode())

    def finish(self, payment_id: str, fingerprint: str, blob: bytes) -> None:
        """Keep the sealed answer for ``keep_seconds``. Raises ``redis.RedisError``."""
        _FINISH(
            self.store.client,
            [replay_key(payment_id)],
            [fingerprint, blob, self.keep_seconds],
            self.store.deadline_ms(),
        )

    def touch(self, payment_id: str, fingerprint: str) -> None:
        """The first request is still streaming: hold its id ``running_seconds`` more. Raises
        ``redis.RedisError``."""
        args = [fingerprint, self.running_seconds]
        _TOUCH(self.store.client, [replay_key(payment_id)], args, self.store.deadline_ms())

    def abandon(self, payment_id: str, fingerprint: str) -> None:
        """Nothing to keep (the call was refused or failed): a retry goes through the payment path
        again. Raises ``redis.RedisError``."""
        _ABANDON(self.store.client, [replay_key(payment_id)], [fingerprint], self.store.deadline_ms())
