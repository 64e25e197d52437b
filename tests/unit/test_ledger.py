"""Payment states in Redis (Lua scripts run by fakeredis + lupa), relayer nonces, keyspace and migrations."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import fakeredis
import pytest
import redis

from app.backends.store import Store
from app.payments import ledger as ledger_module
from app.payments import migrate as migrate_module
from app.payments.keys import (
    KEYSPACE_KEY,
    KEYSPACE_VERSION,
    LEDGER_STREAM,
    PAYMENT_KEY_RE,
    payment_key,
    relayer_nonce_key,
)
from app.payments.ledger import RETENTION_SECONDS, Claim, Ledger, check_keyspace, keyspace_version
from app.payments.replay import Replays, replay_key
from app.payments.states import EVENTS
from app.settings import SettingsError

PAYER = "0x" + "ab" * 20
ASSET = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
RELAYER = "0x" + "CD" * 20
NONCE = bytes(range(32))
KEY = payment_key(8453, ASSET, PAYER, NONCE)
PROMPT = "the launch codes are 0000"


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def ledger(client: fakeredis.FakeRedis) -> Ledger:
    return Ledger(client)


def claim(ledger: Ledger, key: str = KEY, valid_before: int | None = None) -> Claim:
    """Claim, check that the claim reports when the payment last changed, and drop that time so
    the tests can compare the rest exactly."""
    valid_before = int(time.time()) + 120 if valid_before is None else valid_before
    result = ledger.claim(key, valid_before, PAYER, 10_000, "hermes-3-8b-tee", "eip155:8453")
    assert abs(result.updated - time.time()) < 60
    return dataclasses.replace(result, updated=0.0)


# -- keys ----------------------------------------------------------------------------------------


def test_payment_key_is_normalised_and_hash_tagged() -> None:
    upper = payment_key(8453, ASSET.upper().replace("0X", "0x"), PAYER.upper().replace("0X", "0x"), NONCE)
    assert upper == KEY
    assert KEY.endswith(f"}}:auth:8453:{ASSET.lower()}:{PAYER}:0x{NONCE.hex()}")
    assert PAYMENT_KEY_RE.match(KEY)
    assert payment_key(84532, ASSET, PAYER, NONCE) != KEY
    assert payment_key(8453, ASSET, PAYER, bytes(32)) != KEY
    assert relayer_nonce_key(8453, RELAYER) == relayer_nonce_key(8453, RELAYER.lower())
    assert relayer_nonce_key(8453, RELAYER) != relayer_nonce_key(84532, RELAYER)


# -- claims and transitions ------------------------------------------------------------------------


def test_claim_is_granted_once(ledger: Ledger) -> None:
    assert claim(ledger) == Claim("claimed", "claimed", "")
    assert claim(ledger) == Claim("taken", "claimed", "")
    record = ledger.get(KEY)
    assert record["state"] == "claimed"
    assert (record["payer"], record["amount"], record["model"], record["network"]) == (
        PAYER,
        "10000",
        "hermes-3-8b-tee",
        "eip155:8453",
    )
    assert record["tx"] == ""
    assert int(record["created"]) == int(record["updated"]) > 0


def test_claims_of_distinct_payments_are_independent(ledger: Ledger) -> None:
    other = payment_key(8453, ASSET, PAYER, bytes(32))
    assert claim(ledger).outcome == "claimed"
    assert claim(ledger, other).outcome == "claimed"


def test_taken_reports_state_and_tx(ledger: Ledger) -> None:
    claim(ledger)
    assert ledger.transition(KEY, ("claimed",), "settling", tx="0xfeed")
    assert claim(ledger) == Claim("taken", "settling", "0xfeed")
    assert ledger.transition(KEY, ("settling",), "pending")
    assert claim(ledger) == Claim("taken", "pending", "0xfeed")


def test_released_payment_can_be_claimed_again(ledger: Ledger) -> None:
    claim(ledger)
    assert ledger.transition(KEY, ("claimed",), "released")
    assert ledger.get(KEY)["state"] == "released"
    assert claim(ledger) == Claim("claimed", "claimed", "")
    assert claim(ledger).outcome == "taken"


def test_transition_only_from_allowed_states(ledger: Ledger) -> None:
    claim(ledger)
    assert not ledger.transition(KEY, ("settled",), "served")
    assert not ledger.transition(KEY, ("settling", "pending"), "settled", tx="0x1")
    record = ledger.get(KEY)
    assert record["state"] == "claimed"
    assert record["tx"] == ""  # fields are not written on a refused transition
    assert ledger.transition(KEY, ("settling", "claimed"), "settling")
    assert ledger.get(KEY)["state"] == "settling"


def test_transition_does_not_match_state_substrings(ledger: Ledger) -> None:
    claim(ledger)
    with pytest.raises(ValueError):  # not states of the table: refused before Redis is asked
        ledger.transition(KEY, ("claim", "laimed"), "settling")
    # and the script itself matches whole state names only
    outcome, _ = ledger._run(
        ledger_module._TRANSITION, [KEY, LEDGER_STREAM], ["claim laimed", "settling", 0, 10]
    )
    assert outcome == b"refused"
    outcome, _ = ledger._run(
        ledger_module._TRANSITION, [KEY, LEDGER_STREAM], ["unclaimed", "settling", 0, 10]
    )
    assert outcome == b"refused"
    assert ledger.get(KEY)["state"] == "claimed"


def test_a_script_that_starts_after_its_deadline_changes_nothing(ledger: Ledger) -> None:
    """A command whose caller stopped waiting (a stalled Redis that resumes) must not take effect:
    the gate has already answered as if it failed."""
    claim(ledger)
    late = int(time.time() * 1000) - 1
    with pytest.raises(redis.ResponseError, match=r"^LATE"):
        ledger_module._TRANSITION(ledger.redis, [KEY, LEDGER_STREAM], ["claimed", "settling", 0, 10], late)
    assert ledger.get(KEY)["state"] == "claimed" and ledger.events() == []
    with pytest.raises(redis.ResponseError, match=r"^LATE"):
        ledger_module._CLAIM(
            ledger.redis, [KEY + "x"], [60, 0, PAYER, 1, "m", "n", 30, "new", 1, 900, 0], late
        )
    assert ledger.get(KEY + "x") == {}


def test_transition_of_unknown_payment_creates_nothing(ledger: Ledger, client: fakeredis.FakeRedis) -> None:
    assert not ledger.transition(KEY, ("claimed",), "settling")
    assert not client.exists(KEY)
    assert ledger.events() == []


def test_transition_writes_fields(ledger: Ledger) -> None:
    claim(ledger)
    assert ledger.transition(KEY, ("claimed",), "settling", tx="0x" + "aa" * 32, reason="x")
    record = ledger.get(KEY)
    assert (record["state"], record["tx"], record["reason"]) == ("settling", "0x" + "aa" * 32, "x")


LEDGER_FIELDS = {"event", "key", "payer", "amount", "model", "network", "tx", "at"}


def test_terminal_transitions_append_to_the_ledger(ledger: Ledger) -> None:
    assert frozenset({"settled", "served", "redeemable", "failed", "owed"}) == EVENTS
    claim(ledger)
    assert ledger.transition(KEY, ("claimed",), "settling", tx="0xabc")
    assert ledger.events() == []  # settling is not terminal
    assert ledger.transition(KEY, ("settling",), "settled")
    assert ledger.transition(KEY, ("settled",), "redeemable")
    events = ledger.events()
    assert [e["event"] for e in events] == ["redeemable", "settled"]  # newest first
    for entry in events:
        assert set(entry) == LEDGER_FIELDS
        assert entry == {
            "event": entry["event"],
            "key": KEY,
            "payer": PAYER,
            "amount": "10000",
            "model": "hermes-3-8b-tee",
            "network": "eip155:8453",
            "tx": "0xabc",
            "at": entry["at"],
        }
        assert abs(int(entry["at"]) - time.time()) < 5  # when it happened (unix seconds)


def test_upto_events_carry_the_charge_and_the_authorized_maximum(ledger: Ledger) -> None:
    """An upto payment's events: ``amount`` is what was charged, ``authorized`` the maximum; an
    answered call whose charge did not settle is ``owed``, and served once collected."""
    claim(ledger)
    assert ledger.transition(KEY, ("claimed",), "settling", scheme="upto", authorized="10000")
    assert ledger.transition(KEY, ("settling",), "owed", tx="0xdef", amount="1234")
    assert [e["event"] for e in ledger.events()] == ["owed"]
    assert ledger.transition(KEY, ("owed",), "served", tx="0xabc")
    events = ledger.events()
    assert [e["event"] for e in events] == ["served", "settled", "owed"]
    for entry in events:
        assert set(entry) == LEDGER_FIELDS | {"scheme", "authorized"}
        assert (entry["scheme"], entry["authorized"], entry["amount"]) == ("upto", "10000", "1234")


@pytest.mark.parametrize("state", ["released", "settling", "pending"])
def test_non_terminal_transitions_do_not_append(ledger: Ledger, state: str) -> None:
    claim(ledger)
    assert ledger.transition(KEY, ("claimed",), "settling")
    assert ledger.transition(KEY, ("settling",), state)
    assert ledger.events() == []


def test_failed_and_served_are_recorded(ledger: Ledger, client: fakeredis.FakeRedis) -> None:
    other = payment_key(8453, ASSET, PAYER, bytes(32))
    claim(ledger)
    claim(ledger, other)
    assert ledger.transition(KEY, ("claimed",), "settling")
    assert ledger.transition(KEY, ("settling",), "failed", reason="transaction_failed")
    assert ledger.transition(other, ("claimed",), "settled", tx="0x1")
    assert ledger.transition(other, ("settled",), "served")
    assert [e["event"] for e in ledger.events()] == ["served", "settled", "failed"]
    assert client.xlen(LEDGER_STREAM) == 3


def test_nothing_stored_holds_the_prompt(ledger: Ledger, client: fakeredis.FakeRedis) -> None:
    """The ledger API takes no prompt; nothing written anywhere in Redis carries request content."""
    claim(ledger)
    ledger.transition(KEY, ("claimed",), "settled", tx="0x1")
    ledger.transition(KEY, ("settled",), "served")
    assert set(ledger.get(KEY)) <= {
        "state",
        "payer",
        "amount",
        "model",
        "network",
        "tx",
        "created",
        "updated",
        "valid_before",
    }
    dump = b"".join(
        b"".join(k + v for k, v in client.hgetall(key).items()) if client.type(key) == b"hash" else key
        for key in client.keys("*")
    )
    stream = b"".join(k + v for _id, fields in client.xrange(LEDGER_STREAM) for k, v in fields.items())
    assert PROMPT.encode() not in dump + stream
    assert b"messages" not in dump + stream


def test_redeemable_payment_is_redeemed_once(ledger: Ledger) -> None:
    claim(ledger)
    ledger.transition(KEY, ("claimed",), "settling", tx="0xabc")
    ledger.transition(KEY, ("settling",), "settled")
    ledger.transition(KEY, ("settled",), "redeemable")
    assert claim(ledger) == Claim("redeem", "settled", "0xabc")
    assert ledger.get(KEY)["state"] == "settled"
    assert claim(ledger) == Claim("taken", "settled", "0xabc")
    # the retry is served: redeemable again only if it fails again
    assert ledger.transition(KEY, ("settled",), "served")
    assert claim(ledger) == Claim("taken", "served", "0xabc")


def test_claim_ttl_covers_validity_and_retention(ledger: Ledger, client: fakeredis.FakeRedis) -> None:
    now = int(time.time())
    claim(ledger, valid_before=now + 3600)
    ttl = client.ttl(KEY)
    assert 3600 + RETENTION_SECONDS - 5 <= ttl <= 3600 + RETENTION_SECONDS
    assert ttl >= 3600  # at least validBefore - now


def test_claim_ttl_for_expired_authorization_is_retention(
    ledger: Ledger, client: fakeredis.FakeRedis
) -> None:
    claim(ledger, valid_before=0)
    assert RETENTION_SECONDS - 5 <= client.ttl(KEY) <= RETENTION_SECONDS


def test_taken_claim_does_not_reset_ttl(ledger: Ledger, client: fakeredis.FakeRedis) -> None:
    claim(ledger, valid_before=int(time.time()) + 100)
    client.expire(KEY, 50)
    claim(ledger, valid_before=int(time.time()) + 10_000)
    assert client.ttl(KEY) <= 50


# -- relayer nonces ----------------------------------------------------------------------------------


def test_relayer_nonces_are_consecutive_and_distinct(ledger: Ledger) -> None:
    handed = [ledger.reserve_relayer_nonce(8453, RELAYER, 5) for _ in range(5)]
    assert handed == [5, 6, 7, 8, 9]


def test_relayer_nonce_jumps_to_a_higher_chain_nonce(ledger: Ledger) -> None:
    assert ledger.reserve_relayer_nonce(8453, RELAYER, 0) == 0
    assert ledger.reserve_relayer_nonce(8453, RELAYER, 0) == 1
    assert ledger.reserve_relayer_nonce(8453, RELAYER, 40) == 40
    assert ledger.reserve_relayer_nonce(8453, RELAYER, 3) == 41  # a lagging node never rewinds it


def test_relayer_nonces_are_per_chain_and_relayer(ledger: Ledger) -> None:
    assert ledger.reserve_relayer_nonce(8453, RELAYER, 7) == 7
    assert ledger.reserve_relayer_nonce(84532, RELAYER, 0) == 0
    assert ledger.reserve_relayer_nonce(8453, "0x" + "ef" * 20, 2) == 2
    assert ledger.reserve_relayer_nonce(8453, RELAYER.lower(), 0) == 8


def test_resync_restarts_from_the_chain(ledger: Ledger) -> None:
    for _ in range(3):
        ledger.reserve_relayer_nonce(8453, RELAYER, 10)
    ledger.resync_relayer_nonce(8453, RELAYER, 11)
    assert ledger.reserve_relayer_nonce(8453, RELAYER, 0) == 11


# -- keyspace version ----------------------------------------------------------------------------------


def test_check_keyspace_stamps_an_empty_keyspace(client: fakeredis.FakeRedis) -> None:
    assert keyspace_version(client) is None
    check_keyspace(client)
    assert keyspace_version(client) == KEYSPACE_VERSION
    check_keyspace(client)  # and accepts it afterwards


def test_check_keyspace_ignores_foreign_keys(client: fakeredis.FakeRedis) -> None:
    client.set("someone-else:key", 1)
    check_keyspace(client)
    assert keyspace_version(client) == KEYSPACE_VERSION


def test_check_keyspace_refuses_unversioned_payment_keys(client: fakeredis.FakeRedis, ledger: Ledger) -> None:
    claim(ledger)
    with pytest.raises(SettingsError) as info:
        check_keyspace(client)
    assert info.value.variable == "REDIS_URL"
    assert "x402-proxy migrate" in str(info.value)
    assert keyspace_version(client) is None  # not stamped over old data


def test_check_keyspace_refuses_an_older_version(client: fakeredis.FakeRedis) -> None:
    client.set(KEYSPACE_KEY, KEYSPACE_VERSION - 1)
    with pytest.raises(SettingsError, match="x402-proxy migrate"):
        check_keyspace(client)


def test_check_keyspace_refuses_a_newer_version(client: fakeredis.FakeRedis) -> None:
    client.set(KEYSPACE_KEY, KEYSPACE_VERSION + 1)
    with pytest.raises(SettingsError, match="newer") as info:
        check_keyspace(client)
    assert info.value.variable == "REDIS_URL"
    assert keyspace_version(client) == KEYSPACE_VERSION + 1


# -- migrations ----------------------------------------------------------------------------------------


def test_discover_finds_the_initial_migration() -> None:
    found = migrate_module.discover()
    assert found[0].number == 1
    assert found[0].name == "initial"
    assert found[0].path.name == "0001_initial.py"
    assert [m.number for m in found] == sorted({m.number for m in found})


def test_latest_migration_is_the_keyspace_version() -> None:
    assert max(m.number for m in migrate_module.discover()) == ledger_module.KEYSPACE_VERSION


def test_every_migration_has_up() -> None:
    for migration in migrate_module.discover():
        assert callable(migration.load().up)


V1_KEY = f"x402:{{auth:8453:{ASSET.lower()}:{PAYER}:0x{NONCE.hex()}}}"  # where version 1 kept KEY


def test_migrate_moves_version_1_payments_with_their_ttl(client: fakeredis.FakeRedis, ledger: Ledger) -> None:
    claim(ledger)
    client.rename(KEY, V1_KEY)  # the payment as version 1 kept it
    client.set(KEYSPACE_KEY, 1)
    before, ttl = client.hgetall(V1_KEY), client.ttl(V1_KEY)
    client.hset("x402:{auth:not-a-payment}", "state", "served")  # not ours: left alone
    applied = migrate_module.migrate(client)
    assert [m.number for m in applied] == [2]
    assert keyspace_version(client) == KEYSPACE_VERSION
    assert client.hgetall(KEY) == before and not client.exists(V1_KEY)
    assert ttl - 2 <= client.ttl(KEY) <= ttl
    assert client.exists("x402:{auth:not-a-payment}")
    check_keyspace(client)  # the proxy now starts
    assert claim(ledger).outcome == "taken"  # and finds the payment where it is now


def test_migration_0002_resumes_after_a_copy_without_delete(
    client: fakeredis.FakeRedis, ledger: Ledger
) -> None:
    claim(ledger)
    client.copy(KEY, V1_KEY)  # cut short after the copy: both names exist
    assert ledger.transition(KEY, ("claimed",), "released")  # the new one moved on meanwhile
    client.set(KEYSPACE_KEY, 1)
    migrate_module.migrate(client)
    assert ledger.get(KEY)["state"] == "released"  # not overwritten by the old copy
    assert not client.exists(V1_KEY)


def test_migrate_dry_run_changes_nothing(client: fakeredis.FakeRedis, ledger: Ledger) -> None:
    claim(ledger)
    client.rename(KEY, V1_KEY)
    listed = migrate_module.migrate(client, dry_run=True)
    assert [m.number for m in listed] == [1, 2]
    assert keyspace_version(client) is None
    assert client.exists(V1_KEY) and not client.exists(KEY)
    with pytest.raises(SettingsError):
        check_keyspace(client)


def test_second_migrate_applies_nothing(client: fakeredis.FakeRedis) -> None:
    assert [m.number for m in migrate_module.migrate(client)] == [1, 2]
    assert migrate_module.migrate(client) == []
    assert migrate_module.pending(client) == []
    assert keyspace_version(client) == KEYSPACE_VERSION


def test_migrate_on_current_keyspace_is_a_no_op(client: fakeredis.FakeRedis) -> None:
    check_keyspace(client)
    assert migrate_module.migrate(client) == []


def test_interrupted_migration_resumes(client: fakeredis.FakeRedis, tmp_path: Path) -> None:
    (tmp_path / "0001_first.py").write_text("def up(store):\n    store.client.set('m1', 1)\n")
    (tmp_path / "0002_breaks.py").write_text("def up(store):\n    raise RuntimeError('boom')\n")
    (tmp_path / "0003_later.py").write_text("def up(store):\n    store.client.set('m3', 1)\n")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "4_bad_name.py").write_text("ignored")
    assert [m.number for m in migrate_module.discover(tmp_path)] == [1, 2, 3]
    with pytest.raises(RuntimeError, match="boom"):
        migrate_module.migrate(client, directory=tmp_path)
    assert keyspace_version(client) == 1  # recorded after 0001 only
    assert client.get("m3") is None
    (tmp_path / "0002_breaks.py").write_text("def up(store):\n    store.client.set('m2', 1)\n")
    assert [m.number for m in migrate_module.migrate(client, directory=tmp_path)] == [2, 3]
    assert keyspace_version(client) == 3
    assert client.get("m2") == b"1" and client.get("m3") == b"1"


def test_nonces_reserved_but_never_sent_are_reused_once_the_gap_is_old(client: fakeredis.FakeRedis) -> None:
    """A worker that crashed between reserving nonce 5 and sending it leaves a gap: the chain's
    pending nonce stays 5 while the counter is at 6. Within the gap window the counter is trusted
    (another worker may be about to send); past it, the counter restarts from the chain."""
    ledger = Ledger(client)
    start = 1_000_000.0
    assert ledger.reserve_relayer_nonce(8453, RELAYER, 5, now=start) == 5  # reserved, never sent
    assert ledger.reserve_relayer_nonce(8453, RELAYER, 5, now=start + 1) == 6  # in flight: trusted
    gap_seen = start + 1 + ledger_module.NONCE_GAP_AFTER + 1
    assert ledger.reserve_relayer_nonce(8453, RELAYER, 5, now=gap_seen) == 5  # healed from the chain
    assert ledger.reserve_relayer_nonce(8453, RELAYER, 5, now=gap_seen + 1) == 6


def test_a_gap_heals_under_steady_traffic_and_a_moving_chain_is_never_reset(
    client: fakeredis.FakeRedis,
) -> None:
    """Reservations every second keep coming while nonce 5 was reserved and lost: the chain's nonce
    stays 5, so the gap heals after NONCE_GAP_AFTER however busy the relayer. While the chain's nonce
    moves, a counter ahead of it (transactions on their way) is always trusted."""
    ledger = Ledger(client)
    start, gap = 1_000_000.0, ledger_module.NONCE_GAP_AFTER
    handed = [ledger.reserve_relayer_nonce(8453, RELAYER, 5, now=start + second) for second in range(gap + 3)]
    assert handed[:3] == [5, 6, 7] and 5 in handed[gap:]  # reused once the chain stood still for the gap
    busy = Ledger(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    seen = [
        busy.reserve_relayer_nonce(8453, RELAYER, second // 2, now=start + second)
        for second in range(3 * gap)
    ]
    assert len(set(seen)) == len(seen)  # the chain trails the counter but moves: no nonce handed out twice


# -- recovery and redemption (claim modes) ------------------------------------------------------------


def redeemable(ledger: Ledger) -> None:
    claim(ledger)
    assert ledger.transition(KEY, ("claimed",), "settling")
    assert ledger.transition(KEY, ("settling",), "redeemable", tx="0x1")


def test_a_redeemable_payment_buys_a_cheaper_call_on_its_own_model_only(ledger: Ledger) -> None:
    redeemable(ledger)
    args = (KEY, int(time.time()) + 120, PAYER, 10_000)
    assert (
        ledger.claim(*args, "other-model", "eip155:8453", ledger_module.REDEEM, 5_000).outcome == "mismatch"
    )
    assert (
        ledger.claim(*args, "hermes-3-8b-tee", "eip155:8453", ledger_module.REDEEM, 10_001).outcome
        == "mismatch"
    )
    assert ledger.claim(*args, "other-model", "eip155:8453").outcome == "mismatch"  # same price, other model
    assert (
        ledger.claim(*args, "hermes-3-8b-tee", "eip155:8453", ledger_module.REDEEM, 5_000).outcome == "redeem"
    )


def test_redeem_and_resume_modes_never_create_a_claim(ledger: Ledger) -> None:
    for mode in (ledger_module.REDEEM, ledger_module.RESUME):
        result = ledger.claim(
            KEY, int(time.time()) - 10, PAYER, 10_000, "hermes-3-8b-tee", "eip155:8453", mode
        )
        assert result.outcome in ("mismatch", "expired")
        assert ledger.get(KEY) == {}


def test_resume_finds_what_was_recorded_and_a_failed_payment_may_be_claimed_again(ledger: Ledger) -> None:
    redeemable(ledger)
    resumed = ledger.claim(KEY, 0, PAYER, 10_000, "hermes-3-8b-tee", "eip155:8453", ledger_module.RESUME)
    assert resumed.outcome == "redeem"
    other = payment_key(8453, ASSET, PAYER, bytes(32))
    claim(ledger, other)
    assert ledger.transition(other, ("claimed",), "settling")
    assert ledger.transition(other, ("settling",), "failed", tx="0x2")
    assert claim(ledger, other).outcome == "claimed"  # a reverted settlement left it live on chain
    assert ledger.transition(other, ("claimed",), "settling")
    assert ledger.transition(other, ("settling",), "failed", tx="0x3")
    expired = ledger.claim(other, 0, PAYER, 10_000, "hermes-3-8b-tee", "eip155:8453", ledger_module.RESUME)
    assert expired.outcome == "expired"


def test_a_payment_settled_long_ago_lost_its_request_and_is_redeemable(
    ledger: Ledger, client: fakeredis.FakeRedis
) -> None:
    claim(ledger)
    assert ledger.transition(KEY, ("claimed",), "settled", tx="0x1")
    assert claim(ledger).outcome == "taken"  # a stream may still be running
    client.hset(KEY, "updated", int(time.time()) - ledger_module.STALE_SETTLED - 1)
    assert claim(ledger).outcome == "redeem"


def test_a_released_payment_expires_with_its_authorization(
    ledger: Ledger, client: fakeredis.FakeRedis
) -> None:
    claim(ledger, valid_before=int(time.time()) + 100)
    assert client.ttl(KEY) > RETENTION_SECONDS
    assert ledger.transition(KEY, ("claimed",), "released")
    assert 100 < client.ttl(KEY) <= 100 + ledger_module.RELEASED_GRACE


def test_a_redeemed_payment_settled_again_for_its_stream_is_one_settled_event(ledger: Ledger) -> None:
    """Revenue sums settled events: a redemption must not add a second one."""
    redeemable(ledger)
    assert claim(ledger).outcome == "redeem"  # now settled again, for the retry
    assert ledger.transition(KEY, ("settling", "settled"), "settled")  # the stream starts
    assert ledger.transition(KEY, ("settled",), "served")
    assert [e["event"] for e in ledger.events()] == ["served", "redeemable", "settled"]


EXPOSURE = "x402:{payer:8453:0xa:0xb}:exposure"


def test_calls_in_flight_never_hold_more_than_the_payer_can_pay(ledger: Ledger) -> None:
    now = int(time.time())
    assert ledger.hold_exposure(EXPOSURE, "a", 60, now + 300, 100) == (True, 0)
    assert ledger.hold_exposure(EXPOSURE, "b", 50, now + 300, 100) == (False, 60)
    assert ledger.hold_exposure(EXPOSURE, "b", 40, now + 300, 100) == (True, 60)
    assert ledger.hold_exposure(EXPOSURE, "a", 60, now + 300, 100) == (True, 40)  # the same permit again
    ledger.release_exposure(EXPOSURE, "a")
    assert ledger.hold_exposure(EXPOSURE, "c", 60, now + 300, 100) == (True, 40)


def test_a_short_hold_never_shortens_the_life_of_a_long_one(
    ledger: Ledger, client: fakeredis.FakeRedis
) -> None:
    now = int(time.time())
    assert ledger.hold_exposure(EXPOSURE, "long", 60, now + 300, 100)[0]
    long_ttl = client.ttl(EXPOSURE)
    assert ledger.hold_exposure(EXPOSURE, "short", 10, now + 8, 100)[0]
    assert client.ttl(EXPOSURE) >= long_ttl - 1  # the hash outlives its longest hold
    assert ledger.hold_exposure(EXPOSURE, "late", 40, now + 300, 100) == (False, 70)


def test_a_hold_past_its_time_no_longer_counts(ledger: Ledger) -> None:
    now = int(time.time())
    assert ledger.hold_exposure(EXPOSURE, "old", 90, now - 1, 100)[0]
    assert ledger.hold_exposure(EXPOSURE, "new", 90, now + 300, 100) == (True, 0)


def test_an_eip2612_permit_in_flight_caps_every_other_call(ledger: Ledger) -> None:
    """An EIP-2612 permit *sets* the allowance to its value when its call settles: while it is in
    flight no call may count on more (here the chain showed 1000 of allowance)."""
    now = int(time.time())
    assert ledger.hold_exposure(EXPOSURE, "with-permit", 60, now + 300, 1000, cap=100) == (True, 0)
    assert ledger.hold_exposure(EXPOSURE, "other", 50, now + 300, 1000) == (False, 60)
    assert ledger.hold_exposure(EXPOSURE, "other", 40, now + 300, 1000) == (True, 60)
    ledger.release_exposure(EXPOSURE, "with-permit")
    ledger.release_exposure(EXPOSURE, "other")
    assert ledger.hold_exposure(EXPOSURE, "first", 80, now + 300, 1000) == (True, 0)
    assert ledger.hold_exposure(EXPOSURE, "capped", 60, now + 300, 1000, cap=100) == (False, 80)


def test_a_streaming_payment_id_is_held_while_it_flows(client: fakeredis.FakeRedis) -> None:
    replays = Replays(Store(client=client), keep_seconds=600, running_seconds=40)
    key = replay_key("stream-hold-0001-abcdef")
    assert replays.begin("stream-hold-0001-abcdef", "ab" * 32).outcome == "new"
    client.expire(key, 5)  # most of its hold used up
    replays.touch("stream-hold-0001-abcdef", "cd" * 32)  # another payment's fingerprint: no effect
    assert client.ttl(key) <= 5
    replays.touch("stream-hold-0001-abcdef", "ab" * 32)
    assert client.ttl(key) > 30
