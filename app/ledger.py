"""Payment state in Redis: atomic claims, state transitions, relayer nonces and the ledger stream.

One hash per authorization ``(chain, asset, from, nonce)``; the hash tag keeps each key in one
Cluster slot. Transitions are Lua scripts, so concurrent copies of one payment on any worker or host
see exactly one winner. States (ARCHITECTURE.md):

    claimed ─▶ settling ─▶ settled ─▶ served
       │           │          └─▶ redeemable ─▶ (settled again for the retry) ─▶ served
       │           └─▶ pending ─▶ settled | failed
       └─▶ released   (refused before any transaction was sent: the header may be retried)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, current_app

from .settings import Settings, SettingsError

KEYSPACE_VERSION = 1
KEYSPACE_KEY = "x402:{meta}:keyspace"
LEDGER_STREAM = "x402:{ledger}"
LEDGER_MAXLEN = 1_000_000
RETENTION_SECONDS = 7 * 24 * 3600
TERMINAL_EVENTS = frozenset({"settled", "served", "redeemable", "failed"})

# KEYS[1] payment hash. ARGV: ttl, now, payer, amount, model, network.
# Returns {outcome, state, tx}: outcome "claimed" (new claim), "redeem" (a redeemable payment taken
# back for this retry, now "settled"), or "taken" (someone holds it; state says where it is).
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'redeemable' then
  redis.call('HSET', KEYS[1], 'state', 'settled', 'updated', ARGV[2])
  return {'redeem', 'settled', redis.call('HGET', KEYS[1], 'tx') or ''}
end
if state and state ~= 'released' then
  return {'taken', state, redis.call('HGET', KEYS[1], 'tx') or ''}
end
redis.call('HSET', KEYS[1], 'state', 'claimed', 'payer', ARGV[3], 'amount', ARGV[4], 'model', ARGV[5],
           'network', ARGV[6], 'tx', '', 'created', ARGV[2], 'updated', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {'claimed', 'claimed', ''}
"""

# KEYS[1] payment hash. ARGV: allowed from-states (space separated), to-state, now, field, value, ...
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or not string.find(' ' .. ARGV[1] .. ' ', ' ' .. state .. ' ', 1, true) then
  return state or ''
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated', ARGV[3])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 'ok'
"""

# KEYS[1] relayer nonce counter, KEYS[2] time of the last reservation (same hash slot).
# ARGV: the chain's pending nonce for the relayer (mempool included), now, gap_after seconds.
# Hands out max(counter, chain) and moves the counter past it, so no two workers share a nonce.
# A counter ahead of the chain's pending nonce long after the last reservation means nonces were
# reserved but never reached the node (a crash between reserving and sending): every later
# transaction would wait behind that gap, so the counter restarts from the chain.
_RESERVE_NONCE = """
local chain = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if current < chain or (current > chain and now - last > tonumber(ARGV[3])) then current = chain end
redis.call('SET', KEYS[1], current + 1)
redis.call('SET', KEYS[2], now)
return current
"""
NONCE_GAP_AFTER = 30  # seconds: far longer than reserving-to-sending takes


@dataclass(frozen=True)
class Claim:
    outcome: str  # "claimed", "redeem" or "taken"
    state: str
    tx: str


def payment_key(chain_id: int, asset: str, payer: str, nonce: bytes) -> str:
    return f"x402:{{auth:{chain_id}:{asset.lower()}:{payer.lower()}:0x{nonce.hex()}}}"


class Ledger:
    """All Redis I/O of the payment path."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim = client.register_script(_CLAIM)
        self._transition = client.register_script(_TRANSITION)
        self._reserve_nonce = client.register_script(_RESERVE_NONCE)

    def claim(self, key: str, valid_before: int, payer: str, amount: int, model: str, network: str) -> Claim:
        """Take the payment for this request, atomically across every worker and host."""
        now = int(time.time())
        ttl = max(valid_before - now, 0) + RETENTION_SECONDS
        outcome, state, tx = self._claim(keys=[key], args=[ttl, now, payer, amount, model, network])
        return Claim(_text(outcome), _text(state), _text(tx))

    def transition(self, key: str, allowed: tuple[str, ...], to_state: str, **fields: str) -> bool:
        """Move the payment from one of ``allowed`` to ``to_state``; False if it was elsewhere."""
        args: list[Any] = [" ".join(allowed), to_state, int(time.time())]
        for name, value in fields.items():
            args += [name, value]
        moved = _text(self._transition(keys=[key], args=args)) == "ok"
        if moved and to_state in TERMINAL_EVENTS:
            self.append_event(key, to_state)
        return moved

    def append_event(self, key: str, event: str) -> None:
        """Add a settled/served/redeemable/failed record to the ledger stream (for reconciliation)."""
        record = {_text(k): _text(v) for k, v in self.redis.hgetall(key).items()}
        entry = {"event": event, "key": key}
        entry.update({k: record.get(k, "") for k in ("payer", "amount", "model", "network", "tx")})
        self.redis.xadd(LEDGER_STREAM, entry, maxlen=LEDGER_MAXLEN, approximate=True)

    def get(self, key: str) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self.redis.hgetall(key).items()}

    def reserve_relayer_nonce(
        self, chain_id: int, relayer: str, chain_pending: int, now: float | None = None
    ) -> int:
        """The account nonce for the next settlement transaction of this relayer."""
        key = relayer_nonce_key(chain_id, relayer)
        args = [chain_pending, int(time.time() if now is None else now), NONCE_GAP_AFTER]
        return int(self._reserve_nonce(keys=[key, key + ":reserved_at"], args=args))

    def resync_relayer_nonce(self, chain_id: int, relayer: str, chain_pending: int) -> None:
        """After a send the node refused, restart the counter from the chain's view."""
        self.redis.set(relayer_nonce_key(chain_id, relayer), chain_pending)

    def events(self, count: int = 100) -> list[dict[str, str]]:
        return [
            {_text(k): _text(v) for k, v in fields.items()}
            for _id, fields in self.redis.xrevrange(LEDGER_STREAM, count=count)
        ]


def relayer_nonce_key(chain_id: int, relayer: str) -> str:
    return f"x402:{{relayer:{chain_id}:{relayer.lower()}}}:nonce"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def keyspace_version(client: redis.Redis) -> int | None:
    value = client.get(KEYSPACE_KEY)
    return None if value is None else int(value)


def has_payment_keys(client: redis.Redis) -> bool:
    return next(iter(client.scan_iter(match="x402:*", count=1000)), None) is not None


def check_keyspace(client: redis.Redis) -> None:
    """Refuse a keyspace older than this code; stamp a fresh one with the current version."""
    version = keyspace_version(client)
    if version is None and not has_payment_keys(client):
        client.set(KEYSPACE_KEY, KEYSPACE_VERSION, nx=True)
        return
    if version is None or version < KEYSPACE_VERSION:
        raise SettingsError(
            "REDIS_URL",
            f"keyspace version {version or 0} is older than {KEYSPACE_VERSION}: run `x402-proxy migrate`",
        )
    if version > KEYSPACE_VERSION:
        raise SettingsError(
            "REDIS_URL", f"keyspace version {version} is newer than this proxy ({KEYSPACE_VERSION})"
        )


def connect(settings: Settings) -> redis.Redis:
    if settings.redis_client is not None:
        return settings.redis_client  # type: ignore[return-value]
    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=3, health_check_interval=30
    )


def init_app(app: Flask) -> None:
    settings: Settings = app.config["X402_SETTINGS"]
    client = connect(settings)
    try:
        client.ping()
        check_keyspace(client)
    except redis.RedisError as exc:
        raise SettingsError("REDIS_URL", f"Redis does not answer at {settings.redis_url}: {exc}") from None
    app.extensions["x402.ledger"] = Ledger(client)


def get_ledger() -> Ledger:
    ledger: Ledger = current_app.extensions["x402.ledger"]
    return ledger
