"""A wallet's credit: money the proxy holds for a payer, in atomic units, spent by signing in.

Credit comes in lots, each with its source and its expiry (``X402_CREDIT_SECONDS`` after it came):
the unused part of an ``exact`` payment (``change``), and a payment whose call failed after it
settled (``failed_call``). A failed call's payment stays redeemable by its header as before; the
wallet's hash only points at it (``pay:<payment key>``) until a sign-in needs it, when the payment
moves ``redeemable → credited`` (one winner against a header retry) and the pointer becomes a lot.

A call served from credit holds the body's priced maximum, taken from the lots that expire first,
and is charged its usage price at the end (``catalog.usage.charge``); the rest goes back to the lots
it came from. A hold its request abandoned (the worker died) goes back whole once past its time.
Expired lots are swept by every script that touches the wallet.

One Redis hash per wallet (``keys.credit_keys``): ``lot:<expires>`` = ``<left>:<expires>``,
``pay:<payment key>`` = ``<amount>:<expires>``, ``hold:<id>`` = ``<amount>:<until>:<lot>=<n>;…``.
Credit added within one thirtieth of ``X402_CREDIT_SECONDS`` shares a lot (its expiry rounded up to
that step), so a wallet holds about 31 lots however often it pays; an emptied lot is deleted. Beside
the hash, in the same slot: the sources already credited (a sorted set scored by expiry: each
payment's change or failed call counts once) and the sign-in nonces used (the same shape: a script
reads one member and trims the expired ones, never the whole set), and the recent entries. Every
change is one Lua script
that writes its ledger events (``credit``, ``credit_spent``, ``credit_expired``) in the same step,
into the stream (one node) or the shard's outbox (a cluster), and a line to the wallet's recent
entries. ``app.payments.books`` counts credit as a liability until it is spent or expires.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from app.backends.store import Script
from app.payments.keys import CREDIT_KEY_RE, CREDIT_KEYS, LEDGER_STREAM, CreditKeys, credit_keys, outbox_key
from app.payments.ledger import LEDGER_MAXLEN, RETENTION_SECONDS, Ledger, text_of
from app.settings import Settings

LOG_LENGTH = 50  # recent entries kept per wallet
LOTS_PER_LIFETIME = 30  # credit added within a thirtieth of its life shares a lot
TRIM_BATCH = 64  # expired members of a sorted set removed by one script, at most
# A wallet's keys outlive its last lot by this much, so the books (``sweep_credit``) see what expired.
CREDIT_GRACE_SECONDS = 30 * 86400
HELD, SHORT, NONCE_USED = "held", "short", "nonce_used"

# KEYS[1] the wallet's hash, KEYS[2] its recent entries, KEYS[3] where events go (stream or outbox),
# KEYS[4] its used sign-in nonces and KEYS[5] the sources it was credited for (sorted sets, score:
# expiry).
# ARGV: 1 now, 2 stream maxlen (0: an outbox), 3 payer, 4 network, 5 seconds the hash and the log
# outlive the last expiry; then each script's own. Numbers are whole atomic units (Lua doubles:
# exact to 2**53).
_PRELUDE = """
local now, maxlen, payer, network = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local written = 0
local function int(n) return string.format('%.0f', tonumber(n)) end
local function event(name, amount, model, ref, kind, scheme)
  local command = {'XADD', KEYS[3]}
  if maxlen ~= '0' then command = {'XADD', KEYS[3], 'MAXLEN', '~', maxlen} end
  for _, part in ipairs({'*', 'event', name, 'key', KEYS[1], 'payer', payer, 'amount', int(amount),
                         'model', model, 'network', network, 'tx', ref, 'at', ARGV[1], 'kind', kind,
                         'scheme', scheme}) do
    table.insert(command, part)
  end
  redis.call(unpack(command))
  written = written + 1
end
local function note(kind, amount, ref)
  redis.call('LPUSH', KEYS[2], ARGV[1] .. ' ' .. kind .. ' ' .. int(amount) .. ' ' .. ref)
  redis.call('LTRIM', KEYS[2], 0, LOG_LENGTH - 1)
end
local function keep_until(expires)
  local ttl = math.max(tonumber(expires) - now, 0) + tonumber(ARGV[5])
  for _, key in ipairs({KEYS[1], KEYS[2]}) do
    if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
  end
end
-- Add to a lot (made when missing).
local function add_to_lot(field, amount, expires)
  local left = tonumber(string.match(redis.call('HGET', KEYS[1], field) or '0:', '^(%d+):') or '0')
  redis.call('HSET', KEYS[1], field, int(left + amount) .. ':' .. int(expires))
end
-- Add ``member`` to the sorted set ``key`` until ``expires`` once: false when it is there already.
-- Up to TRIM_BATCH expired members are trimmed first (a wallet back after a long pause does not hold
-- Redis up trimming them all at once); only the one asked is looked up.
local function once(key, member, expires)
  local stale = redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. ARGV[1], 'LIMIT', 0, TRIM_BATCH)
  if #stale > 0 then redis.call('ZREM', key, unpack(stale)) end
  if redis.call('ZSCORE', key, member) then return false end
  redis.call('ZADD', key, expires, member)
  local ttl = math.max(tonumber(expires) - now, 1)
  if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
  return true
end
-- Put back what a hold took ("<lot>=<n>;…"), the lot taken last first; what finds its lot expired
-- expires with it.
local function give_back(takes, amount)
  local parts = {}
  for field, n in string.gmatch(takes, '([^=;]+)=(%d+)') do table.insert(parts, {field, tonumber(n)}) end
  for i = #parts, 1, -1 do
    if amount <= 0 then break end
    local back = math.min(amount, parts[i][2])
    amount = amount - back
    local expires = tonumber(string.match(parts[i][1], '^lot:(%d+)$') or '0')
    if expires >= now then  -- an emptied lot was deleted: it comes back
      add_to_lot(parts[i][1], back, expires)
    else
      event('credit_expired', back, '', '', 'expired', 'credit')
      note('expired', back, '')
    end
  end
end
-- Return abandoned holds, drop what expired (writing credit_expired for what was left of a lot);
-- the live lots with something left, those that expire first first, and the number of pointers.
-- The hash is read once, and again only when an abandoned hold was returned.
local function sweep()
  local entries = redis.call('HGETALL', KEYS[1])
  local returned = false
  for i = 1, #entries, 2 do
    if string.sub(entries[i], 1, 5) == 'hold:' then
      local amount, untill, takes = string.match(entries[i + 1], '^(%d+):(%d+):(.*)$')
      if not amount or tonumber(untill) < now then
        redis.call('HDEL', KEYS[1], entries[i])
        returned = true
        if amount then
          note('returned', amount, '')
          give_back(takes, tonumber(amount))
        end
      end
    end
  end
  if returned then entries = redis.call('HGETALL', KEYS[1]) end
  local live, pointers = {}, 0
  for i = 1, #entries, 2 do
    local field, value = entries[i], entries[i + 1]
    local kind = string.match(field, '^(%a+):')
    if kind == 'lot' then
      local left, expires = string.match(value, '^(%d+):(%d+)$')
      if not left or tonumber(expires) < now then
        redis.call('HDEL', KEYS[1], field)
        if left and tonumber(left) > 0 then
          event('credit_expired', left, '', '', 'expired', 'credit')
          note('expired', left, '')
        end
      elseif tonumber(left) > 0 then
        table.insert(live, {field, tonumber(left), tonumber(expires)})
      end
    elseif kind == 'pay' then
      if tonumber(string.match(value, '(%d+)$') or '0') < now then
        redis.call('HDEL', KEYS[1], field)
      else
        pointers = pointers + 1
      end
    end
  end
  table.sort(live, function(a, b) return a[3] < b[3] or (a[3] == b[3] and a[1] < b[1]) end)
  return live, pointers
end
local function balance(live)
  local total = 0
  for _, lot in ipairs(live) do total = total + lot[2] end
  return total
end
""".replace("LOG_LENGTH", str(LOG_LENGTH)).replace("TRIM_BATCH", str(TRIM_BATCH))

# ARGV 6 source (e.g. change:<payment key>), 7 amount, 8 the lot's expiry (a step boundary), 9 kind,
# 10 model, 11 ref (a tx hash), 12 scheme. Credits a source once: one already credited (or a lot
# that would expire at once) adds nothing. Returns {1 added | 0, events written}.
_ADD = Script(
    _PRELUDE
    + """
sweep()
if tonumber(ARGV[8]) <= now or not once(KEYS[5], ARGV[6], ARGV[8]) then return {0, written} end
add_to_lot('lot:' .. ARGV[8], ARGV[7], ARGV[8])
event('credit', ARGV[7], ARGV[10], ARGV[11], ARGV[9], ARGV[12])
note(ARGV[9], ARGV[7], ARGV[11])
keep_until(ARGV[8])
return {1, written}
"""
)

# ARGV 6 pointer field (pay:<payment key>), 7 amount, 8 expires. Returns {1 | 0, events written}.
_POINT = Script(
    _PRELUDE
    + """
if tonumber(ARGV[8]) <= now or redis.call('HSETNX', KEYS[1], ARGV[6], ARGV[7] .. ':' .. ARGV[8]) == 0 then
  return {0, written}
end
keep_until(ARGV[8])
return {1, written}
"""
)

# ARGV 6 pointer field, 7 source (failed_call:<payment key>), 8 model, 9 ref, 10 keep: 1 credits
# the pointer (its payment is now "credited"), 0 drops it (the payment was redeemed by its header),
# 11 the lot step (seconds). Returns {amount credited, events written}.
_CONVERT = Script(
    _PRELUDE
    + """
local value = redis.call('HGET', KEYS[1], ARGV[6])
if not value then return {0, written} end
redis.call('HDEL', KEYS[1], ARGV[6])
local amount, expires = string.match(value, '^(%d+):(%d+)$')
if ARGV[10] ~= '1' or not amount or tonumber(expires) <= now then return {0, written} end
local step = tonumber(ARGV[11])
local lot_expires = math.ceil(tonumber(expires) / step) * step
if not once(KEYS[5], ARGV[7], lot_expires) then return {0, written} end
add_to_lot('lot:' .. int(lot_expires), amount, lot_expires)
event('credit', amount, ARGV[8], ARGV[9], 'failed_call', 'exact')
note('failed_call', amount, ARGV[9])
keep_until(lot_expires)
return {tonumber(amount), written}
"""
)

# ARGV 6 hold id, 7 amount, 8 held until, 9 sign-in nonce ('' for none), 10 its expiry. Marks the
# nonce used (once: a used one refuses), then holds the amount if the live lots cover it.
# Returns {1 held | 0 short | -1 nonce used, available before, pointers, events written}.
_HOLD = Script(
    _PRELUDE
    + """
if ARGV[9] ~= '' and not once(KEYS[4], ARGV[9], ARGV[10]) then return {-1, 0, 0, written} end
local live, pointers = sweep()
local available, need = balance(live), tonumber(ARGV[7])
if available < need then return {0, int(available), pointers, written} end
local takes = {}
for _, lot in ipairs(live) do
  if need <= 0 then break end
  local take = math.min(need, lot[2])
  need = need - take
  if lot[2] == take then
    redis.call('HDEL', KEYS[1], lot[1])  -- emptied: gone (what is given back recreates it)
  else
    redis.call('HSET', KEYS[1], lot[1], int(lot[2] - take) .. ':' .. int(lot[3]))
  end
  table.insert(takes, lot[1] .. '=' .. int(take))
end
redis.call('HSET', KEYS[1], 'hold:' .. ARGV[6], ARGV[7] .. ':' .. ARGV[8] .. ':' .. table.concat(takes, ';'))
keep_until(ARGV[8])
return {1, int(available), pointers, written}
"""
)

# ARGV 6 hold id, 7 charge, 8 model. Charges at most the hold and gives the rest back.
# Returns {charged (-1: no such hold, it was returned as abandoned), balance after, events written}.
_SETTLE = Script(
    _PRELUDE
    + """
local value = redis.call('HGET', KEYS[1], 'hold:' .. ARGV[6])
if not value then return {-1, '0', written} end
redis.call('HDEL', KEYS[1], 'hold:' .. ARGV[6])
local amount, _, takes = string.match(value, '^(%d+):(%d+):(.*)$')
local charged = math.min(tonumber(ARGV[7]), tonumber(amount))
give_back(takes, tonumber(amount) - charged)
if charged > 0 then
  event('credit_spent', charged, ARGV[8], '', 'spent', 'credit')
  note('spent', charged, '')
end
local live = sweep()
return {int(charged), int(balance(live)), written}
"""
)

# Sweeps the wallet (see sweep()). Returns {events written}.
_SWEEP = Script(_PRELUDE + "\nsweep()\nreturn {written}\n")

# ARGV 6 nonce, 7 its expiry. Returns {1 first use | 0 used before, events written}.
_USE_NONCE = Script(
    _PRELUDE
    + """
if not once(KEYS[4], ARGV[6], ARGV[7]) then return {0, written} end
return {1, written}
"""
)


def _run(
    ledger: Ledger, script: Script, keys: CreditKeys, payer: str, network: str, args: list[Any]
) -> list[Any]:
    """Run one of the wallet's scripts (``keys``, ``network`` its CAIP-2 id); a cluster's events
    are then moved from the shard's outbox into the stream soon."""
    single = ledger.single_node
    sink = LEDGER_STREAM if single else outbox_key(keys.wallet)
    common = [int(time.time()), LEDGER_MAXLEN if single else 0, payer.lower(), network, CREDIT_GRACE_SECONDS]
    script_keys = [keys.wallet, keys.log, sink, keys.nonces, keys.sources]
    result = list(script(ledger.redis, script_keys, [*common, *args], ledger.store.deadline_ms()))
    if int(result[-1]) and not single:
        ledger.outbox.written(sink)
    return result


def source_id(source: str) -> str:
    """What the sources set keeps of a source (``change:<payment key>``, ``failed_call:<key>``): the
    first 16 bytes of its SHA-256, hex (a payment key is ~150 characters; a wallet may keep tens of
    thousands)."""
    return hashlib.sha256(source.encode()).hexdigest()[:32]


def sweep_credit(ledger: Ledger, skipped: list[str] | None = None) -> int:
    """Sweep every wallet's credit on every master: what expired is written ``credit_expired`` (a
    wallet that never comes back is swept nowhere else) and abandoned holds go back. Run by
    ``revenue`` and ``reconcile``; a wallet's keys outlive its last lot ``CREDIT_GRACE_SECONDS``.
    Returns how many wallets were swept. Raises ``redis.RedisError``, unless ``skipped`` is given
    (a cluster): a master that does not answer is then appended there (``Store.scan``)."""
    swept = 0
    for key in ledger.store.scan(CREDIT_KEYS, skipped=skipped):
        match = CREDIT_KEY_RE.match(key)
        if match is None:
            continue
        chain_id, asset, payer = match.groups()
        _run(ledger, _SWEEP, credit_keys(int(chain_id), asset, payer), payer, f"eip155:{chain_id}", [])
        swept += 1
    return swept


@dataclass(frozen=True)
class Lot:
    """Credit that expires at one time (unix seconds), and what is left of it (atomic units)."""

    left: int
    expires: int


@dataclass(frozen=True)
class Entry:
    """One line of a wallet's recent entries: when (unix seconds), what (``change``,
    ``failed_call``, ``spent``, ``returned``, ``expired``), how much, and the transaction if any."""

    at: int
    kind: str
    amount: int
    tx: str


@dataclass(frozen=True)
class Statement:
    """A wallet's credit: ``balance`` spendable now, ``held`` by calls in flight, the lots, the
    failed calls' payments it may still claim (payment key → amount) and the recent entries."""

    balance: int
    held: int
    lots: tuple[Lot, ...]
    redeemable: dict[str, int]
    recent: tuple[Entry, ...]


@dataclass(frozen=True)
class HoldResult:
    outcome: str  # HELD, SHORT or NONCE_USED
    available: int  # the balance before the hold
    pointers: int  # failed calls' payments the wallet may still claim


class Credit:
    """The credit of wallets on our network and asset (``settings``), in ``ledger``'s Redis.
    Every method raises ``redis.RedisError`` when the wallet's master does not answer."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.lifetime = settings.credit_seconds

    def _run(self, script: Script, payer: str, args: list[Any]) -> list[Any]:
        keys = credit_keys(self.settings.network.chain_id, self.settings.asset, payer)
        return _run(self.ledger, script, keys, payer, self.settings.network.caip2, args)

    @property
    def step(self) -> int:
        """Seconds a lot's expiry is rounded up to: a thirtieth of the credit's life, rounded up (so
        a wallet keeps at most ``LOTS_PER_LIFETIME + 1`` live lots)."""
        return -(-self.lifetime // LOTS_PER_LIFETIME)

    def add(self, payer: str, source: str, amount: int, kind: str, model: str, tx: str, at: int) -> bool:
        """Credit ``amount`` to ``payer`` once per ``source`` (e.g. ``change:<payment key>``); it
        expires ``X402_CREDIT_SECONDS`` after ``at`` (unix seconds), rounded up to ``step``. False
        when that source was credited before, or its lot would already have expired."""
        if amount <= 0:
            return False
        expires = -(-(at + self.lifetime) // self.step) * self.step
        result = self._run(_ADD, payer, [source_id(source), amount, expires, kind, model, tx, "exact"])
        return bool(int(result[0]))

    def point(self, payer: str, payment_key: str, amount: int, at: int) -> bool:
        """Note that ``payer``'s payment ``payment_key`` (``amount`` atomic units) is redeemable: a
        sign-in may turn it into credit while the payment is kept (``RETENTION_SECONDS``)."""
        expires = at + min(self.lifetime, RETENTION_SECONDS)
        return bool(int(self._run(_POINT, payer, [f"pay:{payment_key}", amount, expires])[0]))

    def convert(self, payer: str, payment_key: str, model: str, tx: str, keep: bool) -> int:
        """Turn the pointer to ``payment_key`` into a lot (``keep``: its payment is now
        ``credited``) or drop it (its payment was redeemed by its header). Returns what was credited."""
        args = [
            f"pay:{payment_key}",
            source_id(f"failed_call:{payment_key}"),
            model,
            tx,
            "1" if keep else "0",
            self.step,
        ]
        return int(self._run(_CONVERT, payer, args)[0])

    def hold(
        self, payer: str, hold_id: str, amount: int, until: int, nonce: str, nonce_expires: int
    ) -> HoldResult:
        """Use ``nonce`` (``""``: none) and hold ``amount`` of ``payer``'s credit until ``until``
        (unix seconds) for the call ``hold_id``, unless its live lots do not cover it."""
        held, available, pointers, _ = self._run(_HOLD, payer, [hold_id, amount, until, nonce, nonce_expires])
        outcome = {1: HELD, 0: SHORT, -1: NONCE_USED}[int(held)]
        return HoldResult(outcome, int(text_of(available)), int(pointers))

    def settle(self, payer: str, hold_id: str, charge: int, model: str) -> tuple[int, int] | None:
        """Charge the call ``hold_id`` ``charge`` (at most what it held) and give the rest back.
        Returns (charged, balance after), or None when the hold is gone (returned as abandoned)."""
        charged, after, _ = self._run(_SETTLE, payer, [hold_id, charge, model])
        if int(text_of(charged)) < 0:
            return None
        return int(text_of(charged)), int(text_of(after))

    def use_nonce(self, payer: str, nonce: str, expires: int) -> bool:
        """Mark a sign-in nonce used by ``payer``; False when it was used before."""
        return bool(int(self._run(_USE_NONCE, payer, [nonce, expires])[0]))

    def statement(self, payer: str) -> Statement:
        """What ``payer``'s credit holds now and its recent entries (read only, no sweep)."""
        now = int(time.time())
        wallet, log_key, *_sets = credit_keys(self.settings.network.chain_id, self.settings.asset, payer)
        pipeline = self.ledger.redis.pipeline(transaction=False)
        pipeline.hgetall(wallet)
        pipeline.lrange(log_key, 0, LOG_LENGTH - 1)
        fields, lines = pipeline.execute()
        lots, redeemable, held = [], {}, 0
        for raw_field, raw_value in fields.items():
            field, value = text_of(raw_field), text_of(raw_value)
            kind, _, name = field.partition(":")
            parts = value.split(":")
            if kind == "lot" and int(parts[1]) >= now:
                lots.append(Lot(int(parts[0]), int(parts[1])))
            elif kind == "pay" and int(parts[1]) >= now:
                redeemable[name] = int(parts[0])
            elif kind == "hold" and int(parts[1]) >= now:
                held += int(parts[0])
        recent = []
        for line in lines:
            at, kind, amount, tx = [*text_of(line).split(" "), ""][:4]
            recent.append(Entry(int(at), kind, int(amount), tx))
        lots.sort(key=lambda lot: lot.expires)
        balance = sum(lot.left for lot in lots)
        return Statement(balance, held, tuple(lots), redeemable, tuple(recent))
