"""The Redis keyspace of the ledger (version ``KEYSPACE_VERSION``): every key name, in one place.

Redis Cluster runs a Lua script only on keys of one hash slot, so what must change together shares a
hash tag (the part in braces):

- Payments are spread over ``SHARDS`` hash tags, one per run of ``SLOTS_PER_SHARD`` slots; a
  payment's tag is chosen by the slot of its identity, so payments spread over the masters as
  evenly as the slots do. A payment ``x402:{p<n>}:auth:<chain id>:<asset>:<payer>:0x<nonce>`` and
  the outbox of its ledger events ``x402:{p<n>}:outbox`` share a slot: a transition writes both in
  one atomic step, and no write to another slot can decide a payment's fate. An ``upto`` permit is
  ``x402:{p<n>}:permit2:<chain id>:<asset>:<payer>:<nonce>``, in the same shards.
- A wallet's credit (``app.payments.credit``) ``x402:{p<n>}:credit:<chain id>:<asset>:<payer>``, its
  recent entries ``x402:{p<n>}:credit-log:…``, its used sign-in nonces ``…:credit-nonces:…`` and the
  sources it was credited for ``…:credit-sources:…`` share a shard tag chosen the same way, so a
  change to the credit and its ledger events (in that shard's outbox) are one atomic step.
- A ``batch-settlement`` channel ``x402:{p<n>}:channel:<chain id>:0x<channel id>`` (its charged total,
  the voucher that covers it, the call holding it) and its shard's index of channels
  ``x402:{p<n>}:channels`` share a tag chosen the same way: a voucher's charge, the index and the
  ledger events are one atomic step.
- A payer's unpaid ``upto`` charges and its ``upto`` calls in flight:
  ``x402:{payer:<chain id>:<asset>:<payer>}:debt`` and ``…:exposure``.
- The ledger stream ``x402:{ledger}``, what was moved into it from each outbox
  ``x402:{ledger}:drained``, the keyspace version ``x402:{meta}:keyspace`` (and, in the same slot,
  the claims lock and schedule ``x402:{meta}:claims``), and each relayer's
  account-nonce counter ``x402:{relayer:<chain id>:<address>}:nonce`` each have their own tag.

Addresses and nonces are lower-case hex. The slot of a key is CRC16 of its tag modulo 16384 (the
Redis Cluster specification), computed by redis-py's ``key_slot``.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

KEYSPACE_VERSION = 2
KEYSPACE_KEY = "x402:{meta}:keyspace"
LEDGER_STREAM = "x402:{ledger}"
DRAINED_KEY = "x402:{ledger}:drained"  # hash: outbox key → id of the last entry moved into the stream
SHARDS = 256
SLOTS_PER_SHARD = REDIS_CLUSTER_HASH_SLOTS // SHARDS  # 64
PAYMENT_KEYS = "x402:{p*}:auth:*"  # SCAN pattern of every payment
PERMIT_KEYS = "x402:{p*}:permit2:*"  # SCAN pattern of every upto permit
CREDIT_KEYS = "x402:{p*}:credit:*"  # SCAN pattern of every wallet's credit
CREDIT_KEY_RE = re.compile(r"^x402:\{p[0-9]+\}:credit:([0-9]+):(0x[0-9a-f]{40}):(0x[0-9a-f]{40})$")
CHANNEL_KEY_RE = re.compile(r"^x402:\{p[0-9]+\}:channel:([0-9]+):0x([0-9a-f]{64})$")
SIWX_SECRET_KEY = "x402:{meta}:siwx"  # the secret that tags sign-in nonces (made once, shared)
# The batch-settlement claims of the deployment (``app.payments.claims``), one JSON string: the lock
# (``owner``: the process running a claim/settle cycle, "" none; while held the key lives only the
# lock's time), the schedule (``claim_at``, ``settle_at``: unix ms) and the claim transaction still
# undecided (``pending``: relayer, account nonce, hashes). Changed only by compare-and-swap.
CLAIMS_KEY = "x402:{meta}:claims"
PERMIT_KEY_RE = re.compile(r"^x402:\{p[0-9]+\}:permit2:([0-9]+):(0x[0-9a-f]{40}):(0x[0-9a-f]{40}):([0-9]+)$")
PAYMENT_KEY_RE = re.compile(
    r"^x402:\{p[0-9]+\}:auth:([0-9]+):(0x[0-9a-f]{40}):(0x[0-9a-f]{40}):0x([0-9a-f]{64})$"
)


@functools.cache
def shard_tags() -> tuple[str, ...]:
    """The hash tag of each shard: ``tags[i]`` is the first of ``p0, p1, …`` whose slot lies in
    ``[i * SLOTS_PER_SHARD, (i + 1) * SLOTS_PER_SHARD)`` (a few hundred CRC16s, once per process)."""
    tags: list[str | None] = [None] * SHARDS
    missing, candidate = SHARDS, 0
    while missing:
        tag = f"p{candidate}"
        shard = key_slot(tag.encode()) // SLOTS_PER_SHARD
        if tags[shard] is None:
            tags[shard], missing = tag, missing - 1
        candidate += 1
    return tuple(tag for tag in tags if tag is not None)


def payment_key(chain_id: int, asset: str, payer: str, nonce: bytes) -> str:
    """The Redis key of one EIP-3009 authorization ``(chain, asset, from, nonce)``:
    ``x402:{p<n>}:auth:<chain id>:<asset>:<payer>:0x<nonce>``, lower-case."""
    identity = f"auth:{chain_id}:{asset.lower()}:{payer.lower()}:0x{nonce.hex()}"
    tag = shard_tags()[key_slot(identity.encode()) // SLOTS_PER_SHARD]
    return f"x402:{{{tag}}}:{identity}"


def permit_key(chain_id: int, asset: str, payer: str, nonce: int) -> str:
    """The Redis key of one ``upto`` Permit2 permit ``(chain, asset, owner, Permit2 nonce)``:
    ``x402:{p<n>}:permit2:<chain id>:<asset>:<payer>:<nonce in decimal>``, lower-case, sharded like
    ``payment_key`` (Permit2 nonces are not EIP-3009 nonces: the two never share a key)."""
    identity = f"permit2:{chain_id}:{asset.lower()}:{payer.lower()}:{nonce}"
    tag = shard_tags()[key_slot(identity.encode()) // SLOTS_PER_SHARD]
    return f"x402:{{{tag}}}:{identity}"


class CreditKeys(NamedTuple):
    """A wallet's credit keys, in one shard: its hash ``x402:{p<n>}:credit:<chain id>:<asset>:<payer>``,
    its recent entries ``…:credit-log:…``, the sign-in nonces it used ``…:credit-nonces:…`` and the
    sources it was credited for ``…:credit-sources:…``."""

    wallet: str
    log: str
    nonces: str
    sources: str


def credit_keys(chain_id: int, asset: str, payer: str) -> CreditKeys:
    """The keys of ``payer``'s credit (``CreditKeys``), sharded by its identity like a payment's."""
    identity = f"{chain_id}:{asset.lower()}:{payer.lower()}"
    tag = shard_tags()[key_slot(f"credit:{identity}".encode()) // SLOTS_PER_SHARD]
    names = ("credit", "credit-log", "credit-nonces", "credit-sources")
    return CreditKeys(*(f"x402:{{{tag}}}:{name}:{identity}" for name in names))


def channel_key(chain_id: int, channel: bytes) -> str:
    """The Redis hash of one ``batch-settlement`` channel (its 32-byte id on ``chain_id``):
    ``x402:{p<n>}:channel:<chain id>:0x<id>``, sharded by its identity like a payment's."""
    identity = f"channel:{chain_id}:0x{channel.hex()}"
    tag = shard_tags()[key_slot(identity.encode()) // SLOTS_PER_SHARD]
    return f"x402:{{{tag}}}:{identity}"


def channel_index_key(channel: str) -> str:
    """The sorted set of the channels in ``channel``'s shard (score: when last charged, unix
    seconds), in the same slot: what the claims walk."""
    return channel[: channel.index("}") + 1] + ":channels"


def channel_index_keys() -> tuple[str, ...]:
    """Every shard's index of channels, in shard order."""
    return tuple(f"x402:{{{tag}}}:channels" for tag in shard_tags())


def debt_key(chain_id: int, asset: str, payer: str) -> str:
    """The hash of a payer's unpaid ``upto`` charges, one field per owed permit key:
    ``x402:{payer:<chain id>:<asset>:<payer>}:debt``."""
    return f"x402:{{payer:{chain_id}:{asset.lower()}:{payer.lower()}}}:debt"


def exposure_key(chain_id: int, asset: str, payer: str) -> str:
    """The hash of a payer's ``upto`` calls in flight, one field per held permit key (its maximum
    and until when it is held): ``x402:{payer:<chain id>:<asset>:<payer>}:exposure``."""
    return f"x402:{{payer:{chain_id}:{asset.lower()}:{payer.lower()}}}:exposure"


def outbox_key(payment: str) -> str:
    """The outbox that holds a payment's ledger events until they are in the stream (same slot)."""
    return payment[: payment.index("}") + 1] + ":outbox"


def outbox_keys() -> tuple[str, ...]:
    """Every shard's outbox key, in shard order."""
    return tuple(f"x402:{{{tag}}}:outbox" for tag in shard_tags())


def relayer_nonce_key(chain_id: int, relayer: str) -> str:
    """The Redis key of a relayer's account-nonce counter: ``x402:{relayer:<chain id>:<address>}:nonce``."""
    return f"x402:{{relayer:{chain_id}:{relayer.lower()}}}:nonce"


def used_keys() -> tuple[str, ...]:
    """One key in every slot the proxy writes, except the relayer counters (``/readyz`` checks that
    a master answers for each of them)."""
    return (*outbox_keys(), LEDGER_STREAM, KEYSPACE_KEY)
