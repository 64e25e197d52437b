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

One Redis hash per wallet (``keys.credit_keys``): ``lot:<source>`` = ``<left>:<expires>``,
``pay:<payment key>`` = ``<amount>:<expires>``, ``hold:<id>`` = ``<amount>:<until>:<lot>=<n>;…``;
beside it, in the same slot, the sign-in nonces it used (a sorted set scored by expiry: a script
reads one nonce and trims the expired ones, never the whole set, however often the wallet signs
in) and its recent entries. Every change is one Lua script
that writes its ledger events (``credit``, ``credit_spent``, ``credit_expired``) in the same step,
into the stream (one node) or the shard's outbox (a cluster), and a line to the wallet's recent
entries. ``app.payments.books`` counts credit as a liability until it is spent or expires.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from app.backends.store import Script
from app.payments.keys import LEDGER_STREAM, credit_keys, outbox_key
from app.payments.ledger import LEDGER_MAXLEN, RETENTION_SECONDS, Ledger, text_of
from app.settings import Settings

LOG_LENGTH = 50  # recent entries kept per wallet
HELD, SHORT, NONCE_USED = "held", "short", "nonce_used"

# KEYS[1] the wallet's hash, KEYS[2] its recent entries, KEYS[3] where events go (stream or outbox),
# KEYS[4] its used sign-in nonces (sorted set, score: expiry).
# ARGV: 1 now, 2 stream maxlen (0: an outbox), 3 payer, 4 network, 5 seconds both keys outlive the
# last expiry; then each script's own. Numbers are whole atomic units (Lua doubles: exact to 2**53).
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
-- Put back what a hold took ("<lot>=<n>;…"), the lot taken last first; what finds its lot expired
-- expires with it.
local function give_back(takes, amount)
  local parts = {}
  for field, n in string.gmatch(takes, '([^=;]+)=(%d+)') do table.insert(parts, {field, tonumber(n)}) end
  for i = #parts, 1, -1 do
    if amount <= 0 then break end
    local back = math.min(amount, parts[i][2])
    amount = amount - back
    local value = redis.call('HGET', KEYS[1], parts[i][1])
    local left, expires
    if value then left, expires = string.match(value, '^(%d+):(%d+)$') end
    if left and tonumber(expires) >= now then
      redis.call('HSET', KEYS[1], parts[i][1], int(tonumber(left) + back) .. ':' .. expires)
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
-- Use a sign-in nonce: false when it was used before (and is not expired); trims expired ones.
local function use_nonce(nonce, expires)
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[1])
  if redis.call('ZSCORE', KEYS[4], nonce) then return false end
  redis.call('ZADD', KEYS[4], expires, nonce)
  local ttl = math.max(tonumber(expires) - now, 1)
  if redis.call('TTL', KEYS[4]) < ttl then redis.call('EXPIRE', KEYS[4], ttl) end
  return true
end
local function balance(live)
  local total = 0
  for _, lot in ipairs(live) do total = total + lot[2] end
  return total
end
""".replace("LOG_LENGTH", str(LOG_LENGTH))

# ARGV 6 lot field, 7 amount, 8 expires, 9 kind, 10 model, 11 ref (a tx hash), 12 scheme. Adds the
# lot once: a source already credited (or one that would expire at once) adds nothing.
# Returns {1 added | 0, events written}.
_ADD = Script(
    _PRELUDE
    + """
sweep()
if redis.call('HEXISTS', KEYS[1], ARGV[6]) == 1 or tonumber(ARGV[8]) <= now then return {0, written} end
redis.call('HSET', KEYS[1], ARGV[6], ARGV[7] .. ':' .. ARGV[8])
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

# ARGV 6 pointer field, 7 lot field, 8 model, 9 ref, 10 keep: 1 makes the pointer a lot (its payment
# is now "credited"), 0 drops it (the payment was redeemed by its header meanwhile).
# Returns {amount credited, events written}.
_CONVERT = Script(
    _PRELUDE
    + """
local value = redis.call('HGET', KEYS[1], ARGV[6])
if not value then return {0, written} end
redis.call('HDEL', KEYS[1], ARGV[6])
local amount, expires = string.match(value, '^(%d+):(%d+)$')
if ARGV[10] ~= '1' or not amount or tonumber(expires) <= now
   or redis.call('HEXISTS', KEYS[1], ARGV[7]) == 1 then
  return {0, written}
end
redis.call('HSET', KEYS[1], ARGV[7], amount .. ':' .. expires)
event('credit', amount, ARGV[8], ARGV[9], 'failed_call', 'exact')
note('failed_call', amount, ARGV[9])
keep_until(expires)
return {tonumber(amount), written}
"""
)

# ARGV 6 hold id, 7 amount, 8 held until, 9 sign-in nonce ('' for none), 10 its expiry. Marks the
# nonce used (once: a used one refuses), then holds the amount if the live lots cover it.
# Returns {1 held | 0 short | -1 nonce used, available before, pointers, events written}.
_HOLD = Script(
    _PRELUDE
    + """
if ARGV[9] ~= '' and not use_nonce(ARGV[9], ARGV[10]) then return {-1, 0, 0, written} end
local live, pointers = sweep()
local available, need = balance(live), tonumber(ARGV[7])
if available < need then return {0, int(available), pointers, written} end
local takes = {}
for _, lot in ipairs(live) do
  if need <= 0 then break end
  local take = math.min(need, lot[2])
  need = need - take
  redis.call('HSET', KEYS[1], lot[1], int(lot[2] - take) .. ':' .. int(lot[3]))
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

# ARGV 6 nonce, 7 its expiry. Returns {1 first use | 0 used before, events written}.
_USE_NONCE = Script(
    _PRELUDE
    + """
if not use_nonce(ARGV[6], ARGV[7]) then return {0, written} end
return {1, written}
"""
)


@dataclass(frozen=True)
class Lot:
    """Credit from one source: what is left of it and when it expires (unix seconds)."""

    source: str  # "change:<payment key>" or "failed_call:<payment key>"
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
        wallet, log_key, nonces = credit_keys(self.settings.network.chain_id, self.settings.asset, payer)
        single = self.ledger.single_node
        sink = LEDGER_STREAM if single else outbox_key(wallet)
        common = [
            int(time.time()),
            LEDGER_MAXLEN if single else 0,
            payer.lower(),
            self.settings.network.caip2,
        ]
        keys = [wallet, log_key, sink, nonces]
        result = list(
            script(
                self.ledger.redis, keys, [*common, RETENTION_SECONDS, *args], self.ledger.store.deadline_ms()
            )
        )
        if int(result[-1]) and not single:
            self.ledger.outbox.written(sink)
        return result

    def add(self, payer: str, source: str, amount: int, kind: str, model: str, tx: str, at: int) -> bool:
        """Credit ``amount`` to ``payer`` once per ``source`` (e.g. ``change:<payment key>``), as a lot
        that expires ``X402_CREDIT_SECONDS`` after ``at`` (unix seconds). False when that source was
        credited before, or its lot would already have expired."""
        if amount <= 0:
            return False
        expires = at + self.lifetime
        result = self._run(_ADD, payer, [f"lot:{source}", amount, expires, kind, model, tx, "exact"])
        return bool(int(result[0]))

    def point(self, payer: str, payment_key: str, amount: int, at: int) -> bool:
        """Note that ``payer``'s payment ``payment_key`` (``amount`` atomic units) is redeemable: a
        sign-in may turn it into credit while the payment is kept (``RETENTION_SECONDS``)."""
        expires = at + min(self.lifetime, RETENTION_SECONDS)
        return bool(int(self._run(_POINT, payer, [f"pay:{payment_key}", amount, expires])[0]))

    def convert(self, payer: str, payment_key: str, model: str, tx: str, keep: bool) -> int:
        """Turn the pointer to ``payment_key`` into a lot (``keep``: its payment is now
        ``credited``) or drop it (its payment was redeemed by its header). Returns what was credited."""
        args = [f"pay:{payment_key}", f"lot:failed_call:{payment_key}", model, tx, "1" if keep else "0"]
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
        wallet, log_key, _nonces = credit_keys(self.settings.network.chain_id, self.settings.asset, payer)
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
                lots.append(Lot(name, int(parts[0]), int(parts[1])))
            elif kind == "pay" and int(parts[1]) >= now:
                redeemable[name] = int(parts[0])
            elif kind == "hold" and int(parts[1]) >= now:
                held += int(parts[0])
        recent = []
        for line in lines:
            at, kind, amount, tx = [*text_of(line).split(" "), ""][:4]
            recent.append(Entry(int(at), kind, int(amount), tx))
        lots.sort(key=lambda lot: (lot.expires, lot.source))
        balance = sum(lot.left for lot in lots)
        return Statement(balance, held, tuple(lots), redeemable, tuple(recent))
