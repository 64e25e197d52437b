"""The keyspace layout: every payment shares its slot with its outbox, and the shards spread over the
slots evenly (the Redis Cluster rule: a script touches keys of one slot only)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from app.payments.keys import (
    DRAINED_KEY,
    KEYSPACE_KEY,
    LEDGER_STREAM,
    PAYMENT_KEY_RE,
    SHARDS,
    SLOTS_PER_SHARD,
    outbox_key,
    outbox_keys,
    payment_key,
    shard_tags,
)

addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())


def slot(key: str) -> int:
    return key_slot(key.encode())


def test_each_shard_owns_one_run_of_slots() -> None:
    tags = shard_tags()
    assert len(tags) == len(set(tags)) == SHARDS
    assert SHARDS * SLOTS_PER_SHARD == REDIS_CLUSTER_HASH_SLOTS
    for index, tag in enumerate(tags):
        assert index * SLOTS_PER_SHARD <= slot(tag) < (index + 1) * SLOTS_PER_SHARD
    assert [slot(key) // SLOTS_PER_SHARD for key in outbox_keys()] == list(range(SHARDS))


@given(st.integers(1, 2**63), addresses, addresses, st.binary(min_size=32, max_size=32))
def test_a_payment_and_its_outbox_share_a_slot(chain_id: int, asset: str, payer: str, nonce: bytes) -> None:
    key = payment_key(chain_id, asset, payer, nonce)
    assert slot(key) == slot(outbox_key(key))
    assert outbox_key(key) in outbox_keys()
    assert PAYMENT_KEY_RE.match(key)
    identity = f"auth:{chain_id}:{asset}:{payer}:0x{nonce.hex()}"
    assert slot(key) // SLOTS_PER_SHARD == slot(identity) // SLOTS_PER_SHARD


def test_payments_spread_over_shards() -> None:
    shards = {
        slot(payment_key(8453, "0x" + "11" * 20, "0x" + "22" * 20, n.to_bytes(32, "big"))) // 64
        for n in range(4096)
    }
    assert len(shards) > SHARDS * 0.95  # 4096 payments reach nearly every shard


def test_the_stream_and_its_marks_share_a_slot_apart_from_the_meta_key() -> None:
    assert slot(LEDGER_STREAM) == slot(DRAINED_KEY)
    assert "{meta}" in KEYSPACE_KEY
