"""``batch-settlement`` channels in Redis: what each channel was charged, the voucher that covers it,
and the one call that may hold it (``specs/schemes/batch-settlement/scheme_batch_settlement_evm.md``,
server state; ``docs/states.md``).

One hash per channel (``keys.channel_key``), in a payment shard: ``config`` (the channel's
``channelConfig``, JSON), ``payer``, ``charged`` (what our vouchers were charged so far, atomic
units), ``signed`` and ``signature`` (the latest voucher: its ``maxClaimableAmount`` ≥ ``charged``,
enough to claim all of it), ``balance`` and ``claimed`` (the chain's ``channels(id)`` as last read),
``withdraw_at`` (when the payer started a withdrawal, 0 none), ``refund_nonce``, ``updated``
(unix seconds of the last charge), and, while a call runs, ``hold`` (its id), ``hold_until``,
``hold_max``, ``hold_signed`` and ``hold_sig`` (the voucher it brought); ``made_by`` names the
hold that rebuilt the channel until the chain shows it funded or a charge lands (released, that
hold takes the record with it); ``closed`` says why no call is taken on it any more (its vouchers
could not be claimed).

Every change is one Lua script on the channel's slot: ``hold`` takes the channel for one call iff no
live call holds it and the voucher is exactly ``charged + maximum`` within the balance; ``commit``
adds the call's usage price to ``charged`` and keeps its voucher, writes the ``voucher`` ledger event
and indexes the channel for claims (``keys.channel_index_key``), in the same step; ``release``
gives the channel back uncharged. A hold whose request died expires at ``hold_until``: the next call
takes the channel, and the dead call was never charged. Redis is the fast lock, the chain and the
vouchers the record: a channel missing here is rebuilt from ``channels(id)`` and the payer's voucher.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from app.backends.escrow import ChainView
from app.backends.store import STORE_ERRORS, Script
from app.payments.keys import (
    CHANNEL_KEY_RE,
    LEDGER_STREAM,
    channel_index_key,
    channel_index_keys,
    channel_key,
    outbox_key,
)
from app.payments.ledger import LEDGER_MAXLEN, Ledger, text_of
from app.x402.batch_settlement import ChannelConfig

# Channels are kept this long after their last charge (seconds): longer than the longest withdraw
# delay (30 days), so a channel is never forgotten while its payer could still leave with a charge.
CHANNEL_RETENTION_SECONDS = 45 * 86400
HELD, BUSY, REFUSED, MISSING, CLOSED = "held", "busy", "refused", "missing", "closed"

# KEYS[1] the channel, KEYS[2] its shard's index, KEYS[3] where events go (stream, or the shard's outbox).
# ARGV[1] now, ARGV[2] stream maxlen (0: an outbox), ARGV[3] retention seconds, then the script's own.
# Amounts are whole atomic units: Lua doubles are exact to 2**53, and a channel's uint128 amounts are
# kept as strings and compared here only below that (USDC's supply is ~2**56 atomic units: the
# proxy refuses a voucher or deposit of 2**53 or more before any script runs).
_PRELUDE = """
local now, maxlen, keep = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local function int(n) return string.format('%.0f', tonumber(n)) end
local function num(field) return tonumber(redis.call('HGET', KEYS[1], field) or '0') end
-- The channel as one space-separated reply (one RESP element to parse, not eleven): status charged
-- signed signature balance claimed withdraw_at refund_nonce hold hold_until synced; "" as "-".
local function state(status)
  local f = redis.call('HMGET', KEYS[1], 'charged', 'signed', 'signature', 'balance', 'claimed',
                       'withdraw_at', 'refund_nonce', 'hold', 'hold_until', 'synced')
  local function text(v, default) if not v or v == '' then return default end return v end
  return table.concat({status, text(f[1], '0'), text(f[2], '0'), text(f[3], '-'), text(f[4], '0'),
                       text(f[5], '0'), text(f[6], '0'), text(f[7], '0'), text(f[8], '-'),
                       text(f[9], '0'), text(f[10], '0')}, ' ')
end
"""

# hold: ARGV[4] hold id, [5] held until (unix s), [6] this call's maximum, [7] the voucher's
# maxClaimableAmount, [8] its signature (hex), [9] a deposit's amount on its way (0 none); to make a
# missing channel (absent: answer "missing"): [10] its config (JSON), [11] payer, [12] the chain's
# balance, [13] the chain's totalClaimed, [14] withdrawal started at (0 none).
_HOLD = Script(
    _PRELUDE
    + """
local id, untill, maximum, signed = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local incoming = tonumber(ARGV[9])
if redis.call('EXISTS', KEYS[1]) == 0 then
  if not ARGV[10] then return 'missing' end
  -- rebuilt from the chain and the payer's voucher: its base (what it says was charged) is taken
  -- when at least what was claimed on chain, else what was claimed is (and the voucher is stale).
  -- Written only when this call holds it, and marked made by this hold until the chain shows a
  -- balance or a charge lands: a refused voucher or a failed deposit leaves nothing behind.
  local claimed, balance = tonumber(ARGV[13]), tonumber(ARGV[12])
  local base = math.max(signed - maximum, claimed)
  if base + maximum ~= signed or signed > balance + incoming then
    return table.concat({'refused', int(base), '0', '-', ARGV[12], ARGV[13], ARGV[14], '0', '-', '0',
                         ARGV[1]}, ' ')
  end
  redis.call('HSET', KEYS[1], 'config', ARGV[10], 'payer', ARGV[11], 'charged', int(base),
             'signed', '0', 'signature', '', 'balance', ARGV[12], 'claimed', ARGV[13],
             'withdraw_at', ARGV[14], 'refund_nonce', '0', 'updated', ARGV[1], 'synced', ARGV[1],
             'made_by', id)
  redis.call('EXPIRE', KEYS[1], keep)
end
if redis.call('HEXISTS', KEYS[1], 'closed') == 1 then return state('closed') end
local hold, held_until = redis.call('HGET', KEYS[1], 'hold'), num('hold_until')
if hold and hold ~= '' and held_until >= now then return state('busy') end
local charged, balance, claimed = num('charged'), num('balance'), num('claimed')
if charged + maximum ~= signed or signed > balance + incoming or signed < claimed + maximum then
  return state('refused')
end
redis.call('HSET', KEYS[1], 'hold', id, 'hold_until', ARGV[5], 'hold_max', ARGV[6],
           'hold_signed', ARGV[7], 'hold_sig', ARGV[8])
return state('held')
"""
)

# commit: ARGV[4] hold id, [5] the call's charge, [6] model, [7] network, [8] payer, [9] channel id
# (0x-hex), [10] what the call was authorized (its maximum).
_COMMIT = Script(
    _PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'hold') ~= ARGV[4] then return 'lapsed' end
local amount = tonumber(ARGV[5])
if amount > num('hold_max') then return 'lapsed' end
local charged = num('charged') + amount
redis.call('HSET', KEYS[1], 'charged', int(charged), 'signed', redis.call('HGET', KEYS[1], 'hold_signed'),
           'signature', redis.call('HGET', KEYS[1], 'hold_sig'), 'updated', ARGV[1])
redis.call('HDEL', KEYS[1], 'hold', 'hold_until', 'hold_max', 'hold_signed', 'hold_sig', 'made_by')
redis.call('EXPIRE', KEYS[1], keep)
redis.call('ZADD', KEYS[2], now, KEYS[1])
local command = {'XADD', KEYS[3]}
if maxlen ~= '0' then command = {'XADD', KEYS[3], 'MAXLEN', '~', maxlen} end
for _, part in ipairs({'*', 'event', 'voucher', 'key', KEYS[1], 'payer', ARGV[8], 'amount', int(amount),
                       'model', ARGV[6], 'network', ARGV[7], 'tx', '', 'at', ARGV[1],
                       'scheme', 'batch-settlement', 'authorized', ARGV[10], 'channel', ARGV[9],
                       'charged', int(charged)}) do
  table.insert(command, part)
end
redis.call(unpack(command))
return state('committed')
"""
)

# release: ARGV[4] hold id.
_RELEASE = Script(
    _PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'hold') ~= ARGV[4] then return {0} end
if redis.call('HGET', KEYS[1], 'made_by') == ARGV[4] then
  redis.call('DEL', KEYS[1])  -- made for this call, never funded nor charged: gone with it
  return {1}
end
redis.call('HDEL', KEYS[1], 'hold', 'hold_until', 'hold_max', 'hold_signed', 'hold_sig')
return {1}
"""
)

# stale: the next hold must read the chain first (a refund or a claim is on its way).
_STALE = Script(
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'synced', '0') end
return {1}
"""
)

# closed: the channel's vouchers could not be claimed on chain (its payer's wallet refused them):
# no more calls on it. ARGV[4] why.
_CLOSE = Script(
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'closed', ARGV[4]) end
return {1}
"""
)

# sync: the chain's view of the channel. ARGV[4] balance, [5] totalClaimed, [6] withdrawal started at,
# [7] refund nonce. The claimed total only grows here; what was charged is never below it.
_SYNC = Script(
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local claimed = math.max(num('claimed'), tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], 'balance', ARGV[4], 'claimed', int(claimed), 'withdraw_at', ARGV[6],
           'refund_nonce', ARGV[7], 'synced', ARGV[1])
if num('charged') < claimed then redis.call('HSET', KEYS[1], 'charged', int(claimed)) end
if tonumber(ARGV[4]) > 0 then redis.call('HDEL', KEYS[1], 'made_by') end  -- funded: a real channel
return {1}
"""
)


@dataclass(frozen=True)
class ChannelState:
    """A channel as Redis holds it (``status`` is what the script did: ``held``, ``busy``,
    ``refused``, ``committed``, ``missing``, ``lapsed``). Amounts in atomic units; ``signature``
    0x-hex of the latest voucher ("" none); ``withdraw_at`` unix seconds (0 none); ``hold`` the
    id of the call holding it ("" none) until ``hold_until``; ``synced`` when the chain's view was
    last recorded."""

    status: str
    charged: int = 0
    signed: int = 0
    signature: str = ""
    balance: int = 0
    claimed: int = 0
    withdraw_at: int = 0
    refund_nonce: int = 0
    hold: str = ""
    hold_until: int = 0
    synced: int = 0  # unix seconds the chain's view was last recorded (0 never)

    @classmethod
    def of(cls, reply: Any) -> ChannelState:
        """From a script's reply: the status alone, or the status and the ten fields ``state()``
        joins with spaces (an empty text as ``-``)."""
        values = [value if value != "-" else "" for value in text_of(reply).split(" ")]
        if len(values) == 1:
            return cls(values[0])
        status, charged, signed, signature, balance, claimed, withdraw_at, nonce, hold, until, synced = values
        return cls(
            status,
            int(charged),
            int(signed),
            signature,
            int(balance),
            int(claimed),
            int(withdraw_at),
            int(nonce),
            hold,
            int(until),
            int(synced),
        )


@dataclass(frozen=True)
class StoredChannel:
    """A channel as the claims read it: its key, config, payer and the state."""

    key: str
    chain_id: int
    channel_id: bytes
    config: dict[str, Any]
    payer: str
    charged: int
    signed: int
    signature: str
    balance: int
    claimed: int
    withdraw_at: int
    updated: int
    closed: str = ""  # why the channel takes no more calls ("" open)

    @property
    def unclaimed(self) -> int:
        """What was charged on this channel and not yet claimed on chain (atomic units)."""
        return max(self.charged - self.claimed, 0)


class Channels:
    """The channels of one proxy (``ledger``'s Redis, one node or a cluster), on ``chain_id``."""

    def __init__(self, ledger: Ledger, chain_id: int, network: str) -> None:
        self.ledger = ledger
        self.chain_id = chain_id
        self.network = network

    def key(self, channel: bytes) -> str:
        return channel_key(self.chain_id, channel)

    def _run(self, script: Script, channel: bytes, args: list[Any]) -> Any:
        key = self.key(channel)
        single = self.ledger.single_node
        sink = LEDGER_STREAM if single else outbox_key(key)
        common = [int(time.time()), LEDGER_MAXLEN if single else 0, CHANNEL_RETENTION_SECONDS]
        return self.ledger._run(script, [key, channel_index_key(key), sink], [*common, *args])

    def hold(
        self,
        channel: bytes,
        hold_id: str,
        until: int,
        maximum: int,
        signed: int,
        signature: bytes,
        incoming: int = 0,
        rebuild: tuple[ChannelConfig, ChainView] | None = None,
    ) -> ChannelState:
        """Take the channel for one call whose voucher is ``signed`` (cumulative) for a call of
        ``maximum`` (atomic units), until ``until`` (unix seconds); ``incoming`` is a deposit on its
        way (counted in the balance). A channel Redis does not know is ``missing``, unless
        ``rebuild`` gives its config and the chain's view. Raises ``redis.RedisError``."""
        args: list[Any] = [hold_id, until, maximum, signed, "0x" + signature.hex(), incoming]
        if rebuild is not None:
            config, view = rebuild
            args += [json.dumps(config.to_wire()), config.payer, view.balance, view.claimed, view.withdraw_at]
        return ChannelState.of(self._run(_HOLD, channel, args))

    def commit(
        self, channel: bytes, hold_id: str, amount: int, maximum: int, model: str, payer: str
    ) -> ChannelState:
        """Charge the held call ``amount`` (atomic units, at most its maximum) and keep its voucher;
        ``lapsed`` when the hold was lost (it outlived ``hold_until`` and another call took the
        channel): nothing was charged. Raises ``redis.RedisError``."""
        args = [hold_id, amount, model, self.network, payer.lower(), "0x" + channel.hex(), maximum]
        state = ChannelState.of(self._run(_COMMIT, channel, args))
        if state.status == "committed" and not self.ledger.single_node:
            self.ledger.outbox.written(outbox_key(self.key(channel)))
        return state

    def release(self, channel: bytes, hold_id: str) -> bool:
        """Give the channel back with nothing charged; False when the hold was gone already."""
        return bool(int(self._run(_RELEASE, channel, [hold_id])[0]))

    def mark_stale(self, channel: bytes) -> None:
        """Make the next call on the channel read the chain first (``synced`` = 0)."""
        self._run(_STALE, channel, [])

    def close(self, channel: bytes, why: str) -> None:
        """Refuse every further call on the channel (``closed``: why), for good: its vouchers are
        not claimable. Raises ``redis.RedisError``."""
        self._run(_CLOSE, channel, [why])

    def sync(self, channel: bytes, view: ChainView) -> None:
        """Record the chain's view of a channel Redis knows (the claimed total only grows)."""
        args = [view.balance, view.claimed, view.withdraw_at, view.refund_nonce]
        self._run(_SYNC, channel, args)

    def stored(self, key: str) -> StoredChannel | None:
        """The channel under ``key`` (None when gone or not a channel key)."""
        match = CHANNEL_KEY_RE.match(key)
        if match is None:
            return None
        raw = {text_of(k): text_of(v) for k, v in self.ledger.redis.hgetall(key).items()}
        if "config" not in raw:
            return None
        return StoredChannel(
            key=key,
            chain_id=int(match.group(1)),
            channel_id=bytes.fromhex(match.group(2)),
            config=json.loads(raw["config"]),
            payer=raw.get("payer", ""),
            charged=int(raw.get("charged", "0")),
            signed=int(raw.get("signed", "0")),
            signature=raw.get("signature", ""),
            balance=int(raw.get("balance", "0")),
            claimed=int(raw.get("claimed", "0")),
            withdraw_at=int(raw.get("withdraw_at", "0")),
            updated=int(raw.get("updated", "0")),
            closed=raw.get("closed", ""),
        )

    def every(self, skipped: list[str] | None = None) -> list[StoredChannel]:
        """Every channel in the shards' indexes (what was ever charged, while kept), dropping index
        entries whose channel expired. Raises ``redis.RedisError`` — unless ``skipped`` is given
        and Redis is a cluster: a master that does not answer is then appended there (its
        ``host:port``, once) and the others are still read."""
        found: list[StoredChannel] = []
        store = self.ledger.store
        for index in channel_index_keys():
            try:
                members = self.ledger.redis.zrange(index, 0, -1)
                for member in members:
                    key = text_of(member)
                    channel = self.stored(key)
                    if channel is None:
                        self.ledger.redis.zrem(index, key)
                    elif channel.chain_id == self.chain_id:
                        found.append(channel)
            except STORE_ERRORS:
                if skipped is None or not store.cluster:
                    raise
                master = store.master_of(index)
                if master not in skipped:
                    skipped.append(master)
        return found


__all__ = ["ChainView", "ChannelState", "Channels", "StoredChannel"]
