"""Payment state in Redis: atomic claims, state transitions, relayer nonces and ledger events.

One hash per authorization ``(chain, asset, from, nonce)`` (key layout: ``app.payments.keys``).
Transitions are Lua scripts, so concurrent copies of one payment on any worker or host see exactly
one winner. The states and their transitions are the table in ``app.payments.states`` (every
transition is checked against it); ``docs/states.md`` says who makes each and why.

A transition writes its ledger events in the same script: into the ledger stream on one Redis node,
into the outbox in the payment's own slot on a Redis Cluster (``app.payments.outbox`` moves them
into the stream), so on a cluster nothing in another slot can fail a payment after it changed.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from string import Template
from typing import Any

from app.backends.store import STORE_ERRORS, Script, Store, as_store
from app.payments.keys import (
    KEYSPACE_KEY,
    KEYSPACE_VERSION,
    LEDGER_STREAM,
    PAYMENT_KEYS,
    outbox_key,
    outbox_keys,
    relayer_nonce_key,
)
from app.payments.outbox import Outbox
from app.payments.states import State
from app.payments.states import allowed as transition_allowed
from app.settings import Settings, SettingsError

log = logging.getLogger(__name__)

LEDGER_MAXLEN = 1_000_000
RETENTION_SECONDS = 7 * 24 * 3600
CLAIM_TIMEOUT = 30  # seconds a payment may stay "claimed" (verification takes milliseconds)
RELEASED_GRACE = 60  # seconds a released payment outlives its authorization
STALE_SETTLED = 900  # seconds: a payment "settled" this long lost its request mid-answer (redeemable)
NEW, RESUME, REDEEM = "new", "resume", "redeem"  # claim modes (see _CLAIM)

# KEYS[1] payment hash. ARGV: 1 ttl, 2 now, 3 payer, 4 amount paid, 5 model, 6 network, 7 claim
# timeout, 8 mode, 9 price of this call, 10 stale-settled age, 11 validBefore.
# A claim still "claimed" after the claim timeout was abandoned before anything was sent (its request
# died with Redis or the worker): it is taken over, like a released one, or a failed one (our
# settlement reverted, so the authorization is still live on chain and may be settled again).
# A payment "settled" for longer than the stale age lost its request mid-answer (a worker killed
# mid-stream): it is redeemable. A redeemable payment buys any call on the same model priced at most
# what was paid. Modes: "new" (may claim), "resume" (the authorization's window has passed: only a
# recorded payment is resumed), "redeem" (the call's price differs from the payment: redeem only).
# Returns {outcome, state, tx, updated}: outcome "claimed", "redeem" (now "settled" for this
# retry), "taken" (someone holds it; state says where it is), "expired" (nothing recorded to
# resume) or "mismatch" (not redeemable for this call).
_CLAIM = Script("""
local state = redis.call('HGET', KEYS[1], 'state')
local seen = redis.call('HMGET', KEYS[1], 'tx', 'updated', 'model', 'amount')
local tx, updated = seen[1] or '', seen[2] or '0'
local now = tonumber(ARGV[2])
local stale = state == 'settled' and now - tonumber(updated) > tonumber(ARGV[10])
if state == 'redeemable' or stale then
  if seen[3] == ARGV[5] and tonumber(seen[4] or '0') >= tonumber(ARGV[9]) then
    redis.call('HSET', KEYS[1], 'state', 'settled', 'updated', ARGV[2])
    return {'redeem', 'settled', tx, ARGV[2]}
  end
  return {'mismatch', state, tx, updated}
end
if ARGV[8] == 'redeem' then return {'mismatch', state or '', tx, updated} end
local abandoned = state == 'claimed' and now - tonumber(updated) > tonumber(ARGV[7])
if state and state ~= 'released' and state ~= 'failed' and not abandoned then
  return {'taken', state, tx, updated}
end
if ARGV[8] ~= 'new' then return {'expired', state or '', tx, updated} end
redis.call('HSET', KEYS[1], 'state', 'claimed', 'payer', ARGV[3], 'amount', ARGV[4], 'model', ARGV[5],
           'network', ARGV[6], 'tx', '', 'created', ARGV[2], 'updated', ARGV[2], 'valid_before', ARGV[11])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {'claimed', 'claimed', '', ARGV[2]}
""")

# KEYS[1] payment hash, KEYS[2] where its events go: the ledger stream (one Redis node) or the
# payment's outbox (Redis Cluster: same slot). ARGV: allowed from-states (space separated), to-state,
# now, stream maxlen (0: none, for an outbox, whose events must all reach the stream), field, value...
# Moves the payment and writes its ledger events: "settled" when the money is confirmed (also when a
# settling payment goes straight to served/redeemable), and each of served/redeemable/failed.
# A released payment (refused before any transaction) is kept only until its authorization expires,
# plus RELEASED_GRACE seconds. Returns {outcome, number of events written}.
_TRANSITION = Script(
    """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or not string.find(' ' .. ARGV[1] .. ' ', ' ' .. state .. ' ', 1, true) then
  return {'refused', 0}
end
local to = ARGV[2]
redis.call('HSET', KEYS[1], 'state', to, 'updated', ARGV[3])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if to == 'released' then
  local left = tonumber(redis.call('HGET', KEYS[1], 'valid_before') or '0') - tonumber(ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.max(left, 0) + RELEASED_GRACE)
end
local events = {}
if (to == 'served' or to == 'redeemable') and state ~= 'settled' then table.insert(events, 'settled') end
if state ~= to and (to == 'settled' or to == 'served' or to == 'redeemable' or to == 'failed'
                    or to == 'owed') then
  table.insert(events, to)
end
local r = redis.call('HMGET', KEYS[1], 'payer', 'amount', 'model', 'network', 'tx', 'scheme', 'authorized')
for i = 1, 7 do r[i] = r[i] or '' end
for _, event in ipairs(events) do
  local command = {'XADD', KEYS[2]}
  if ARGV[4] ~= '0' then command = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[4]} end
  for _, part in ipairs({'*', 'event', event, 'key', KEYS[1], 'payer', r[1], 'amount', r[2],
                         'model', r[3], 'network', r[4], 'tx', r[5], 'at', ARGV[3]}) do
    table.insert(command, part)
  end
  if r[6] ~= '' then
    for _, part in ipairs({'scheme', r[6], 'authorized', r[7]}) do table.insert(command, part) end
  end
  redis.call(unpack(command))
end
return {'ok', #events}
""".replace("RELEASED_GRACE", str(RELEASED_GRACE))
)

# Reserve the relayer account nonce for the next settlement: hand out max(counter, chain) and move
# the counter past it, so no two workers share a nonce. The counter runs ahead of the chain's pending
# nonce while reserved transactions are on their way, and the chain's nonce keeps moving. A counter
# ahead of a chain nonce that has not moved for the gap time means a nonce was reserved but never
# reached the node (a crash or a stalled Redis between reserving and sending): every later
# transaction would wait behind that gap, however busy the relayer, so the counter restarts from the
# chain and the clock restarts with it. (A Lua fragment: $nonce is the counter key, $mark the hash of
# the chain nonce last seen and since when; $chain, $now and $gap the argument positions.)
_RESERVE_FRAGMENT = Template("""
local chain = tonumber(ARGV[$chain])
local now = tonumber(ARGV[$now])
local current = tonumber(redis.call('GET', $nonce) or '-1')
local seen = redis.call('HMGET', $mark, 'chain', 'since')
local since = tonumber(seen[2] or '0')
if tonumber(seen[1] or '-1') ~= chain then
  since = now
  redis.call('HSET', $mark, 'chain', chain, 'since', now)
end
if current < chain then current = chain end
if current > chain and now - since > tonumber(ARGV[$gap]) then
  current = chain
  redis.call('HSET', $mark, 'since', now)
end
redis.call('SET', $nonce, current + 1)
""")

# KEYS[1] counter, KEYS[2] the chain nonce last seen. ARGV: chain pending nonce, now, gap_after.
_RESERVE_NONCE = Script(
    _RESERVE_FRAGMENT.substitute(nonce="KEYS[1]", mark="KEYS[2]", chain=1, now=2, gap=3) + "return current\n"
)

# KEYS[1] payment hash; KEYS[2], KEYS[3] the relayer's counter keys (single-node Redis and a local
# relayer only). ARGV: now, chain pending nonce, gap_after. Moves claimed → settling and, in the
# same round trip, reserves the relayer nonce. Returns the nonce, -1 (no nonce asked), -2 (the
# payment was not claimed).
_START = Script(
    """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'claimed' then return -2 end
redis.call('HSET', KEYS[1], 'state', 'settling', 'updated', ARGV[1])
if #KEYS < 3 then return -1 end
"""
    + _RESERVE_FRAGMENT.substitute(nonce="KEYS[2]", mark="KEYS[3]", chain=2, now=1, gap=3)
    + "redis.call('HSET', KEYS[1], 'relayer_nonce', current)\nreturn current\n"
)
NONCE_GAP_AFTER = 30  # seconds: far longer than reserving-to-sending takes

# KEYS[1] a payer's exposure hash (field: permit key, value "<maximum>:<held until>:<cap>", cap the
# value of the EIP-2612 permit the call carries, 0 for none). ARGV: now, permit key, its maximum, held
# until (unix seconds), what the payer can pay (balance and allowance), this call's cap. Drops entries
# past their time, then holds this permit's maximum unless the payer's calls in flight would then
# exceed what it can pay; an EIP-2612 permit *sets* the allowance when its call settles, so while one
# is in flight no call may count on more than its value. The hash lives as long as its longest hold.
# Returns {1 held | 0 refused, total of the others in flight}.
_HOLD = Script("""
local now, total, limit = tonumber(ARGV[1]), 0, tonumber(ARGV[5])
if tonumber(ARGV[6]) > 0 then limit = math.min(limit, tonumber(ARGV[6])) end
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local amount, expires, cap = string.match(entries[i + 1], '^(%d+):(%d+):(%d+)$')
  if not amount or tonumber(expires) < now then
    redis.call('HDEL', KEYS[1], entries[i])
  elseif entries[i] ~= ARGV[2] then
    total = total + tonumber(amount)
    if tonumber(cap) > 0 then limit = math.min(limit, tonumber(cap)) end
  end
end
if total + tonumber(ARGV[3]) > limit then return {0, tostring(total)} end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3] .. ':' .. ARGV[4] .. ':' .. ARGV[6])
local ttl = math.max(tonumber(ARGV[4]) - now, 1) + 60
if redis.call('TTL', KEYS[1]) < ttl then redis.call('EXPIRE', KEYS[1], ttl) end
return {1, tostring(total)}
""")
# Lua numbers are doubles: what a payer can pay is passed capped here (2**53 atomic units is far more
# than any balance), so the sum stays exact.
SPENDABLE_CAP = 2**53


@dataclass(frozen=True)
class Claim:
    outcome: str  # "claimed", "redeem", "taken", "expired" or "mismatch"
    state: str
    tx: str
    updated: float = 0.0  # when the payment last changed state (unix time)


@dataclass(frozen=True)
class Debt:
    """An unpaid ``upto`` charge: the permit's key, the amount (atomic units), the relayer the
    permit names and the settle calldata that collects it while the permit lives."""

    key: str
    amount: int
    relayer: str
    deadline: int  # the permit's (unix seconds): past it, the debt cannot be collected
    calldata: bytes


class Ledger:
    """All Redis I/O of the payment path. ``store`` is a ``Store`` (one node or a cluster), or a
    ready client (tests: fakeredis)."""

    def __init__(self, store: Store | Any) -> None:
        self.store = as_store(store)
        self.outbox = Outbox(lambda: self.redis, LEDGER_MAXLEN)

    @property
    def redis(self) -> Any:
        """The connected client (``redis.Redis`` or ``RedisCluster``); connects on first use."""
        return self.store.client

    @property
    def single_node(self) -> bool:
        """Whether Redis is one node (events go straight into the stream) rather than a cluster."""
        return not self.store.cluster

    def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run a fenced script: it changes nothing once this client may have stopped waiting."""
        return script(self.redis, keys, args, self.store.deadline_ms())

    def claim(
        self,
        key: str,
        valid_before: int,
        payer: str,
        amount: int,
        model: str,
        network: str,
        mode: str = NEW,
        price: int | None = None,
    ) -> Claim:
        """Take the payment for this request, atomically across every worker and host.

        ``amount`` is what the authorization pays, ``price`` what this call costs (both atomic
        units; ``price`` defaults to ``amount``); ``mode`` is NEW, RESUME or REDEEM (see ``_CLAIM``).
        A payment is kept ``validBefore`` + ``RETENTION_SECONDS`` (7 days) from its claim. Raises
        ``redis.RedisError`` when the payment's master does not answer.
        """
        now = int(time.time())
        ttl = max(valid_before - now, 0) + RETENTION_SECONDS
        args = [ttl, now, payer, amount, model, network, CLAIM_TIMEOUT, mode]
        args += [amount if price is None else price, STALE_SETTLED, valid_before]
        outcome, state, tx, updated = self._run(_CLAIM, [key], args)
        if not self.single_node:
            self.outbox.ensure_running()  # sweeps what dead processes left in the outboxes
        return Claim(text_of(outcome), text_of(state), text_of(tx), float(text_of(updated) or 0))

    def transition(self, key: str, allowed: tuple[str, ...], to_state: str, **fields: str) -> bool:
        """Move the payment from one of ``allowed`` to ``to_state`` and write its ledger events, in
        one atomic step in the payment's slot; False if the payment was elsewhere. Raises
        ``ValueError`` for a transition missing from ``app.payments.states``, ``redis.RedisError``
        when the payment's master does not answer (then nothing changed)."""
        for from_state in allowed:
            if not transition_allowed(from_state, to_state):
                raise ValueError(f"no transition {from_state} → {to_state} in app.payments.states")
        single = self.single_node
        sink = LEDGER_STREAM if single else outbox_key(key)
        args: list[Any] = [" ".join(allowed), to_state, int(time.time()), LEDGER_MAXLEN if single else 0]
        for name, value in fields.items():
            args += [name, value]
        outcome, written = self._run(_TRANSITION, [key, sink], args)
        if text_of(outcome) != "ok":
            return False
        if written and not single:
            self.outbox.written(sink)
        return True

    def start_settlement(self, key: str, relayer_nonce_of: tuple[int, str, int] | None) -> int | None:
        """Move claimed → settling; with ``(chain_id, relayer, chain_pending_nonce)`` also reserve
        the relayer's next account nonce (same script on one Redis node). Returns the nonce, or -1
        when none was asked; None when the payment was not in ``claimed``. On a cluster the counter
        lives in another slot: when it cannot be reserved the payment goes back to ``released``
        (nothing was sent, the same header may be retried) and the ``redis.RedisError`` is raised."""
        now = int(time.time())
        if relayer_nonce_of is not None and self.single_node:
            chain_id, relayer, chain_pending = relayer_nonce_of
            counter = relayer_nonce_key(chain_id, relayer)
            keys = [key, counter, counter + ":chain"]
            nonce = int(self._run(_START, keys, [now, chain_pending, NONCE_GAP_AFTER]))
            return None if nonce == -2 else nonce
        if int(self._run(_START, [key], [now, 0, NONCE_GAP_AFTER])) == -2:
            return None
        if relayer_nonce_of is None:
            return -1
        try:
            return self.reserve_relayer_nonce(*relayer_nonce_of)
        except STORE_ERRORS:
            try:
                self.transition(key, (State.SETTLING,), State.RELEASED)
            except STORE_ERRORS as exc:  # the payment's master too: the claim times out instead
                log.error("payment left settling, nothing sent: %s: %s", type(exc).__name__, exc)
            raise

    def hold_exposure(
        self, exposure: str, key: str, maximum: int, until: int, spendable: int, cap: int = 0
    ) -> tuple[bool, int]:
        """Hold ``maximum`` (atomic units) for permit ``key`` in the payer's exposure hash until
        ``until`` (unix seconds), unless the payer's ``upto`` calls in flight would then exceed
        ``spendable`` (its balance and Permit2 allowance), or the value of an EIP-2612 permit in
        flight (``cap``: this call's, 0 for none). Returns (held, the others in flight). Raises
        ``redis.RedisError``."""
        args = [int(time.time()), key, maximum, until]
        args += [min(spendable, SPENDABLE_CAP), min(cap, SPENDABLE_CAP)]
        held, others = self._run(_HOLD, [exposure], args)
        return bool(held), int(text_of(others))

    def release_exposure(self, exposure: str, key: str) -> None:
        """The call of permit ``key`` is over: it no longer counts against the payer."""
        self.redis.hdel(exposure, key)

    def record_debt(
        self, debt: str, key: str, amount: int, relayer: str, deadline: int, calldata: bytes
    ) -> None:
        """Record that the permit ``key`` owes ``amount`` (atomic units) in the payer's debt hash
        ``debt`` (``keys.debt_key``), with the settle ``calldata`` that collects it, the ``relayer``
        it names and the permit's ``deadline`` (unix seconds). Kept for ``RETENTION_SECONDS`` after
        the last debt. Raises ``redis.RedisError``."""
        pipeline = self.redis.pipeline(transaction=False)
        pipeline.hset(debt, key, f"{amount}:{relayer}:{deadline}:{calldata.hex()}")
        pipeline.expire(debt, RETENTION_SECONDS)
        pipeline.execute()

    def debts(self, debt: str) -> list[Debt]:
        """The unpaid charges in the payer's debt hash ``debt``. Raises ``redis.RedisError``."""
        owed = []
        for key, value in self.redis.hgetall(debt).items():
            amount, relayer, deadline, calldata = text_of(value).split(":")
            owed.append(Debt(text_of(key), int(amount), relayer, int(deadline), bytes.fromhex(calldata)))
        return owed

    def clear_debt(self, debt: str, key: str) -> None:
        """The charge of permit ``key`` was collected: drop it from the payer's debt hash."""
        self.redis.hdel(debt, key)

    def count_open(self, limit: int = 20_000) -> dict[str, int]:
        """How many payments are pending or redeemable (scans at most ``limit`` payment keys on
        every master, their states read a thousand per round trip)."""
        counts = {"pending": 0, "redeemable": 0, "scanned": 0}
        keys = list(itertools.islice(self.store.scan(PAYMENT_KEYS), limit))
        for start in range(0, len(keys), 1000):
            pipeline = self.redis.pipeline(transaction=False)
            for key in keys[start : start + 1000]:
                pipeline.hget(key, "state")
            for state in pipeline.execute():
                name = text_of(state or b"")
                if name in ("pending", "redeemable"):
                    counts[name] += 1
        counts["scanned"] = len(keys)
        return counts

    def states(self, keys: list[str]) -> dict[str, str]:
        """Each payment's state ("" when it is gone), read in one round trip per slot."""
        pipeline = self.redis.pipeline(transaction=False)
        for key in keys:
            pipeline.hget(key, "state")
        return {key: text_of(state or b"") for key, state in zip(keys, pipeline.execute(), strict=True)}

    def get(self, key: str) -> dict[str, str]:
        """A payment's record (its Redis hash) as text fields; empty when the key does not exist."""
        return {text_of(k): text_of(v) for k, v in self.redis.hgetall(key).items()}

    def reserve_relayer_nonce(
        self, chain_id: int, relayer: str, chain_pending: int, now: float | None = None
    ) -> int:
        """The account nonce for the next settlement transaction of this relayer."""
        key = relayer_nonce_key(chain_id, relayer)
        args = [chain_pending, int(time.time() if now is None else now), NONCE_GAP_AFTER]
        return int(self._run(_RESERVE_NONCE, [key, key + ":chain"], args))

    def resync_relayer_nonce(self, chain_id: int, relayer: str, chain_pending: int) -> None:
        """After a send the node refused, restart the counter from the chain's view."""
        self.redis.set(relayer_nonce_key(chain_id, relayer), chain_pending)

    def events(self, count: int = 100) -> list[dict[str, str]]:
        """The newest ``count`` entries of the ledger stream, newest first, as text fields (on a
        cluster, events still in an outbox are not there yet: ``flush_events`` moves them)."""
        return [
            {text_of(k): text_of(v) for k, v in fields.items()}
            for _id, fields in self.redis.xrevrange(LEDGER_STREAM, count=count)
        ]

    def flush_events(self) -> set[str]:
        """Move every event still in an outbox into the stream now (a cluster; nothing to do on one
        node). Returns the outboxes that could not be drained (their master, or the stream's, is down)."""
        if self.single_node:
            return set()
        return self.outbox.drain(outbox_keys())


def text_of(value: Any) -> str:
    """A Redis reply as text: bytes decoded as UTF-8, anything else through ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def keyspace_version(client: Any) -> int | None:
    """The keyspace version stamped in Redis (``KEYSPACE_KEY``), or None when there is none; ``ValueError``
    when it is not an integer."""
    value = client.get(KEYSPACE_KEY)
    return None if value is None else int(value)


def has_payment_keys(store_or_client: Store | Any) -> bool:
    """Whether any master holds an ``x402:*`` key (each scan stops at the first one)."""
    return next(iter(as_store(store_or_client).scan("x402:*")), None) is not None


def check_keyspace(store_or_client: Store | Any) -> None:
    """Refuse a keyspace older than this code; stamp a fresh one with the current version. Raises
    ``SettingsError`` (REDIS_URL), or ``redis.RedisError`` when a master does not answer."""
    store = as_store(store_or_client)
    version = keyspace_version(store.client)
    if version is None and not has_payment_keys(store):
        store.client.set(KEYSPACE_KEY, KEYSPACE_VERSION, nx=True)
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


def connect(settings: Settings) -> Store:
    """The store for ``settings``: ``settings.redis_client`` when set (e.g. the devnet's fake Redis),
    else ``redis_url`` in ``redis_cluster`` mode (auto, yes, no); connects on first use."""
    if settings.redis_client is not None:
        return Store(client=settings.redis_client)
    return Store(settings.redis_url, settings.redis_cluster)
