"""Measurements a publisher signed on Aleph, checked without I/O (``app.tee.aleph``), the catalog's
``aleph_*`` fields, and the per-model cache of ``app.backends.aleph.Measurements``.

The genuine vector is a V-PROGRAM message LibertAI's publisher signed (``tests/data/aleph``, its
README names the source); every other message here is signed by these tests with throwaway keys
(``sign``), which ``tests/integration/test_aleph_measurements.py`` uses too."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from hypothesis import given, settings
from hypothesis import strategies as st

from app.backends.aleph import Measurements
from app.catalog import CatalogError, Model, load_catalog
from app.tee.aleph import (
    DEFAULT_API,
    AlephError,
    Published,
    active_deployments,
    combine,
    measurements_of,
    newest_manifest,
    recover_signer,
    signed_text,
    terms_of,
    verify_message,
)
from app.tee.sev_snp import EvidenceError, Tcb

DATA = Path(__file__).resolve().parents[1] / "data" / "aleph"
LIBERTAI = "0x238224C744F4b90b4494516e074D2676ECfC6803"  # LibertAI's publisher (its manifest's signer)
GENUINE_LAUNCHES = [
    "6fe0972f96cb52367938c2bceccd245f838818920d3cf9cec540e7f06633e237a814f8a261648a7140a0cfe6c3b9e34f",
    "0510f32003971548ee9526f4064ada1be55f2260212fba97c41c67a40b6cb747a4be4ab3b566c1a6b668e6129a9be0de",
]
GENUINE_POLICY = 196608  # 0x30000: SMT allowed, bit 17 (reserved, 1), no debug

# Throwaway keys: the publisher the tests trust, and someone else.
PUBLISHER: LocalAccount = Account.from_key("0x" + "a1" * 32)
STRANGER: LocalAccount = Account.from_key("0x" + "b2" * 32)
LAUNCH_A, LAUNCH_B = "ab" * 48, "cd" * 48
HASH_A, HASH_B = "1" * 64, "2" * 64


def genuine() -> dict[str, Any]:
    message: dict[str, Any] = json.loads((DATA / "vprogram-message.json").read_text())
    return message


def sign(
    content: Any,
    key: LocalAccount = PUBLISHER,
    kind: str = "AGGREGATE",
    sender: str | None = None,
    chain: str = "ETH",
    v_offset: int = 27,
) -> dict[str, Any]:
    """An inline Aleph message of type ``kind`` carrying ``content`` (JSON, or a ``str`` taken as
    the ``item_content`` text itself), signed by ``key`` (its sender ``sender``, default the key's
    own address), as the API lists it (``content`` repeated beside ``item_content``, as nodes do).
    ``v_offset`` 0 writes v as 0/1 instead of 27/28."""
    item_content = content if isinstance(content, str) else json.dumps(content, separators=(",", ":"))
    message: dict[str, Any] = {
        "chain": chain,
        "sender": sender or key.address,
        "type": kind,
        "item_type": "inline",
        "item_content": item_content,
        "item_hash": hashlib.sha256(item_content.encode()).hexdigest(),
        "content": content,
        "channel": "TEST",
        "time": content.get("time", 0) if isinstance(content, dict) else 0,
    }
    signature = bytearray(Account.sign_message(encode_defunct(text=signed_text(message)), key.key).signature)
    signature[64] = signature[64] - 27 + v_offset
    message["signature"] = "0x" + signature.hex()
    return message


def manifest(models: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """A manifest naming, per model, its deployments as (item hash, status)."""
    return {
        "models": {
            name: {"deployments": [{"item_hash": h, "source_commit": "abc1234", "status": s} for h, s in d]}
            for name, d in models.items()
        }
    }


def aggregate(
    content: dict[str, Any], time: float, key: LocalAccount = PUBLISHER, name: str = "confidential-inference"
) -> dict[str, Any]:
    """A signed AGGREGATE message publishing ``content`` (a manifest) under ``name`` at ``time``."""
    return sign({"address": key.address, "key": name, "content": content, "time": time}, key)


def program(
    launches: list[str], policy: int | None = 0x30000, key: LocalAccount = PUBLISHER, **more: Any
) -> dict[str, Any]:
    """A signed V-PROGRAM message publishing ``launches`` (hex) and ``policy``."""
    verification: dict[str, Any] = {
        "backend": "sev_snp",
        "measurements": [
            {"platform": "sev_snp", "registers": {"launch": launch}, "vcpu_type": "EPYC-Genoa"}
            for launch in launches
        ],
    }
    if policy is not None:
        verification["policy"] = policy
    content = {"address": key.address, "time": 1.0, "verification": verification, **more}
    return sign(content, key, kind="V-PROGRAM")


def reason(call: Any, *args: Any) -> str:
    with pytest.raises(AlephError) as refused:
        call(*args)
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, EvidenceError)
    return refused.value.reason


# -- the genuine vector -------------------------------------------------------------------------------


def test_the_genuine_program_is_libertai_s_and_publishes_two_launch_measurements() -> None:
    message = genuine()
    assert recover_signer(message) == LIBERTAI
    content = verify_message(message, LIBERTAI.lower(), "V-PROGRAM")
    assert content == json.loads(message["item_content"])
    assert measurements_of(content) == (GENUINE_LAUNCHES, GENUINE_POLICY)
    # the publisher of another key is refused, however genuine the message
    assert reason(verify_message, message, STRANGER.address) == "aleph_sender"


HEX = "0123456789abcdef"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_one_changed_character_of_the_genuine_content_is_refused(data: st.DataObject) -> None:
    message = genuine()
    text = message["item_content"]
    at = data.draw(st.integers(0, len(text) - 1), label="position")
    other = data.draw(st.characters(codec="utf-8").filter(lambda c: c != text[at]), label="character")
    changed = {**message, "item_content": text[:at] + other + text[at + 1 :]}
    assert reason(verify_message, changed, LIBERTAI) == "aleph_hash_mismatch"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_one_changed_character_of_the_genuine_signature_is_refused(data: st.DataObject) -> None:
    message = genuine()
    digits = message["signature"].removeprefix("0x")
    at = data.draw(st.integers(0, len(digits) - 1), label="position")
    other = data.draw(st.sampled_from([d for d in HEX if d != digits[at].lower()]), label="digit")
    changed = {**message, "signature": "0x" + digits[:at] + other + digits[at + 1 :]}
    assert reason(verify_message, changed, LIBERTAI) == "aleph_signature"


def test_the_genuine_content_rehashed_is_still_refused_by_its_signature() -> None:
    message = genuine()
    text = message["item_content"].replace('"policy":196608', '"policy":196609')
    forged = {**message, "item_content": text, "item_hash": hashlib.sha256(text.encode()).hexdigest()}
    assert reason(verify_message, forged, LIBERTAI) == "aleph_signature"


def test_the_node_s_content_field_is_never_read() -> None:
    message = genuine()
    message["content"]["verification"]["measurements"][0]["registers"]["launch"] = LAUNCH_A
    content = verify_message(message, LIBERTAI)
    assert measurements_of(content)[0] == GENUINE_LAUNCHES


# -- messages signed here ------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=40, deadline=None)
@given(content=st.dictionaries(st.text(max_size=10), JSON, max_size=5), v_offset=st.sampled_from([0, 27]))
def test_any_signed_content_is_read_back_as_signed(content: dict[str, Any], v_offset: int) -> None:
    message = sign(content, v_offset=v_offset)
    assert verify_message(message, PUBLISHER.address.lower()) == content
    assert verify_message(message, PUBLISHER.address.upper().replace("0X", "0x")) == content


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: {**m, "item_type": "storage"}, "aleph_not_inline"),
        (lambda m: {**m, "item_type": "ipfs"}, "aleph_not_inline"),
        (lambda m: {k: v for k, v in m.items() if k != "item_content"}, "aleph_malformed"),
        (lambda m: {**m, "signature": None}, "aleph_malformed"),
        (lambda m: {**m, "item_hash": m["item_hash"][:-1] + "0"}, "aleph_hash_mismatch"),
        (lambda m: {**m, "signature": m["signature"][:-2] + "1d"}, "aleph_signature"),  # v = 29
        (lambda m: {**m, "signature": m["signature"][:-2]}, "aleph_signature"),  # 64 bytes
        (lambda m: {**m, "signature": "0x" + "zz" * 65}, "aleph_signature"),
        (lambda m: {**m, "signature": "0x" + "ff" * 65}, "aleph_signature"),  # r, s out of range
        (lambda m: {**m, "chain": "SOL"}, "aleph_signature"),  # the signed text changes
        (lambda m: {**m, "type": "POST"}, "aleph_signature"),
        (lambda m: {**m, "sender": STRANGER.address}, "aleph_signature"),
        (lambda m: "not a message", "aleph_malformed"),
    ],
    ids=[
        "storage",
        "ipfs",
        "no content",
        "no signature",
        "another hash",
        "v 29",
        "64 bytes",
        "not hex",
        "out of range",
        "another chain",
        "another type",
        "another sender",
        "not an object",
    ],
)
def test_a_message_that_is_not_what_its_sender_signed_is_refused(change: Any, expected: str) -> None:
    assert reason(verify_message, change(sign({"a": 1})), PUBLISHER.address) == expected


def test_the_publisher_the_type_and_the_content_s_shape_are_checked() -> None:
    assert reason(verify_message, sign({"a": 1}, STRANGER), PUBLISHER.address) == "aleph_sender"
    assert reason(verify_message, sign({"a": 1}, kind="POST"), PUBLISHER.address, "AGGREGATE") == (
        "aleph_wrong_message"
    )
    for text in ('{"a": 1, "a": 2}', "[1, 2]", "{not json", ""):
        assert reason(verify_message, sign(text), PUBLISHER.address) == "aleph_malformed", text


# -- the manifest ----------------------------------------------------------------------------------------

OLD = manifest({"m": [(HASH_A, "active")]})
NEW = manifest({"m": [(HASH_B, "active"), (HASH_A, "deprecated")]})


@settings(max_examples=30, deadline=None)
@given(st.permutations(range(5)))
def test_the_newest_verified_manifest_wins_whatever_the_order(order: list[int]) -> None:
    tampered = aggregate(manifest({"m": [("3" * 64, "active")]}), time=500)
    tampered["item_content"] = tampered["item_content"].replace("3", "4")
    messages = [
        aggregate(OLD, time=100),
        aggregate(NEW, time=200),
        aggregate(manifest({"m": [("5" * 64, "active")]}), time=900, key=STRANGER),  # not the publisher's
        aggregate(manifest({"m": [("6" * 64, "active")]}), time=950, name="another-key"),
        tampered,  # newer, but not what was signed
    ]
    assert newest_manifest([messages[i] for i in order], PUBLISHER.address) == NEW


def test_equal_times_are_decided_by_the_item_hash_not_the_order() -> None:
    first, second = aggregate(OLD, time=100), aggregate(NEW, time=100)
    winner = max((first, second), key=lambda m: m["item_hash"])["content"]["content"]
    assert newest_manifest([first, second], PUBLISHER.address) == winner
    assert newest_manifest([second, first], PUBLISHER.address) == winner


def test_without_a_verified_manifest_the_reason_is_given() -> None:
    assert reason(newest_manifest, [], PUBLISHER.address) == "aleph_no_manifest"
    assert (
        reason(newest_manifest, [aggregate(OLD, 1, name="other")], PUBLISHER.address) == "aleph_no_manifest"
    )
    assert reason(newest_manifest, [aggregate(OLD, 1, key=STRANGER)], PUBLISHER.address) == "aleph_sender"
    tampered = aggregate(OLD, 1)
    tampered["item_content"] = tampered["item_content"].replace("active", "actiVe")
    assert reason(newest_manifest, [tampered], PUBLISHER.address) == "aleph_hash_mismatch"
    untimed = sign({"key": "confidential-inference", "content": OLD})
    assert reason(newest_manifest, [untimed], PUBLISHER.address) == "aleph_malformed"
    assert reason(
        newest_manifest, [sign({"key": "confidential-inference"}, kind="POST")], PUBLISHER.address
    ) == ("aleph_wrong_message")


def test_active_deployments_are_listed_once_in_order() -> None:
    listed = manifest(
        {"m": [(HASH_B.upper(), "active"), (HASH_A, "deprecated"), (HASH_A, "active"), (HASH_B, "active")]}
    )
    assert active_deployments(listed, "m") == [HASH_B, HASH_A]
    assert reason(active_deployments, listed, "other") == "aleph_model_unknown"
    assert reason(active_deployments, manifest({"m": [(HASH_A, "deprecated")]}), "m") == "aleph_no_deployment"
    assert reason(active_deployments, manifest({"m": [("12", "active")]}), "m") == "aleph_malformed"
    assert reason(active_deployments, {"models": {"m": {}}}, "m") == "aleph_malformed"
    assert reason(active_deployments, {}, "m") == "aleph_malformed"


# -- programs and terms ------------------------------------------------------------------------------


def test_a_program_s_sev_snp_launch_measurements_and_policy() -> None:
    content = verify_message(program([LAUNCH_A.upper(), LAUNCH_B, LAUNCH_A]), PUBLISHER.address)
    assert measurements_of(content) == ([LAUNCH_A, LAUNCH_B], 0x30000)
    content["verification"]["measurements"].append({"platform": "tdx", "registers": {"mrtd": "00"}})
    assert measurements_of(content) == ([LAUNCH_A, LAUNCH_B], 0x30000)
    assert measurements_of({"verification": {**content["verification"], "policy": None}})[1] is None


@pytest.mark.parametrize(
    ("verification", "expected"),
    [
        (None, "aleph_no_measurement"),
        ({"backend": "tdx", "measurements": []}, "aleph_no_measurement"),
        ({"backend": "sev_snp", "measurements": []}, "aleph_no_measurement"),
        ({"backend": "sev_snp"}, "aleph_no_measurement"),
        (
            {"backend": "sev_snp", "measurements": [{"platform": "sev_snp", "registers": {}}]},
            "aleph_malformed",
        ),
        (
            {"backend": "sev_snp", "measurements": [{"platform": "sev_snp", "registers": {"launch": "ab"}}]},
            "aleph_malformed",
        ),
        (
            {
                "backend": "sev_snp",
                "measurements": [{"platform": "sev_snp", "registers": {"launch": LAUNCH_A}}],
                "policy": "0x30000",
            },
            "aleph_malformed",
        ),
    ],
    ids=["none", "another backend", "empty", "no list", "no launch", "short launch", "policy as text"],
)
def test_a_program_without_usable_measurements_is_refused(verification: Any, expected: str) -> None:
    assert reason(measurements_of, {"verification": verification}) == expected


def test_programs_combine_into_one_model_s_terms() -> None:
    published = combine({HASH_A: ([LAUNCH_B], 0x30000), HASH_B: ([LAUNCH_A, LAUNCH_B], None)})
    assert published == Published((LAUNCH_A, LAUNCH_B), 0x30000, (HASH_A, HASH_B))
    floor = Tcb(3, 0, 8, 115)
    terms = terms_of(published, None, floor)
    assert terms.measurements == frozenset({bytes.fromhex(LAUNCH_A), bytes.fromhex(LAUNCH_B)})
    assert terms.policy == 0x30000 and terms.tcb_floor == floor
    assert terms_of(published, 0x30000, None).policy == 0x30000  # the catalog's agrees
    assert reason(terms_of, published, 0x10000, None) == "aleph_policy_mismatch"
    unpoliced = combine({HASH_A: ([LAUNCH_A], None)})
    assert terms_of(unpoliced, None, None).policy is None
    assert terms_of(unpoliced, 0x10000, None).policy == 0x10000  # the catalog's own, then
    assert reason(combine, {HASH_A: ([LAUNCH_A], 0x30000), HASH_B: ([LAUNCH_B], 0x10000)}) == (
        "aleph_policy_conflict"
    )
    assert reason(combine, {}) == "aleph_program_missing"


# -- the catalog ------------------------------------------------------------------------------------------

ENTRY = f"""
[models."enclave"]
description = "in an SEV-SNP VM"
tee = true
pricing = "per_call"
price = 10
upstream_url = "https://127.0.0.1:9443"
attestation = "sev-snp"
aleph_publisher = "{LIBERTAI}"
aleph_model = "qwen3.8-27b-tee"
"""


def entry(tmp_path: Path, text: str = ENTRY) -> Model:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return load_catalog(path)["enclave"]


def test_an_attested_entry_may_name_its_publisher_instead_of_measurements(tmp_path: Path) -> None:
    model = entry(tmp_path)
    assert (model.aleph_publisher, model.aleph_model, model.aleph_api) == (
        LIBERTAI,
        "qwen3.8-27b-tee",
        DEFAULT_API,
    )
    assert model.attested and model.measurements == () and model.policy is None
    other = entry(tmp_path, ENTRY + 'aleph_api = "http://127.0.0.1:8080/"\npolicy = 0x30000\n')
    assert other.aleph_api == "http://127.0.0.1:8080" and other.policy == 0x30000


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("attestation", 'measurements = ["' + "ab" * 48 + '"]\nattestation'), "not both"),
        ((f'aleph_publisher = "{LIBERTAI}"\n', ""), "aleph_publisher must be"),
        (('aleph_model = "qwen3.8-27b-tee"\n', ""), "aleph_model must name"),
        ((LIBERTAI, LIBERTAI[:-1]), "aleph_publisher must be"),
        ((LIBERTAI, LIBERTAI.replace("C", "c", 1)), "EIP-55"),
        (('"qwen3.8-27b-tee"', "3"), "aleph_model must name"),
        (('"qwen3.8-27b-tee"', '"qwen3.8-27b-tee"\naleph_api = "ftp://x"'), "aleph_api must be"),
        (('attestation = "sev-snp"\n', ""), "go with attestation"),
    ],
    ids=[
        "both sources",
        "no publisher",
        "no model",
        "short address",
        "bad checksum",
        "model not text",
        "ftp",
        "no attestation",
    ],
)
def test_a_wrong_aleph_entry_is_refused_with_its_words(
    tmp_path: Path, change: tuple[str, str], words: str
) -> None:
    with pytest.raises(CatalogError) as refused:
        entry(tmp_path, ENTRY.replace(*change, 1))
    assert words in str(refused.value)


def test_an_entry_without_either_source_names_both(tmp_path: Path) -> None:
    text = ENTRY.replace(f'aleph_publisher = "{LIBERTAI}"\n', "").replace(
        'aleph_model = "qwen3.8-27b-tee"\n', ""
    )
    with pytest.raises(CatalogError) as refused:
        entry(tmp_path, text)
    assert "measurements must list" in str(refused.value) and "aleph_publisher" in str(refused.value)
    assert entry(tmp_path, ENTRY.replace(LIBERTAI, LIBERTAI.lower())).aleph_publisher == LIBERTAI.lower()


# -- the cache -------------------------------------------------------------------------------------------


class Scripted(Measurements):
    """``Measurements`` whose fetches answer from ``answers`` (a Published, or an AlephError to
    raise), counting them."""

    def __init__(self, ttl: float, answers: list[Published | AlephError]) -> None:
        super().__init__(ttl, timeout=1.0)
        self.answers = answers
        self.fetches = 0

    def fetch(self, api: str, publisher: str, model: str) -> Published:
        answer = self.answers[min(self.fetches, len(self.answers) - 1)]
        self.fetches += 1
        if isinstance(answer, AlephError):
            raise answer
        return answer


def test_the_cache_fetches_in_the_foreground_only_when_empty(tmp_path: Path) -> None:
    model = entry(tmp_path)
    first, second = Published((LAUNCH_A,), 0x30000, (HASH_A,)), Published((LAUNCH_B,), None, (HASH_B,))
    cache = Scripted(ttl=0.0, answers=[first, second])
    assert cache.terms(model).measurements == frozenset({bytes.fromhex(LAUNCH_A)})
    assert cache.published(model) == first and cache.fetches == 1  # stale (TTL 0), but a request waits not
    assert cache.published(model, background=True) == second and cache.fetches == 2
    assert Scripted(ttl=600.0, answers=[first]).published(model, background=True) == first


def test_an_unreachable_api_keeps_the_last_list_and_a_refusal_replaces_it(tmp_path: Path) -> None:
    model = entry(tmp_path)
    published = Published((LAUNCH_A,), None, (HASH_A,))
    down = AlephError("aleph_unavailable", "the Aleph API answered 502")
    revoked = AlephError("aleph_no_deployment", "no deployment of 'm' is active")
    cache = Scripted(ttl=0.0, answers=[published, down, revoked])
    assert cache.published(model) == published
    assert cache.published(model, background=True) == published and cache.fetches == 2  # kept
    assert reason(cache.published, model, True) == "aleph_no_deployment"
    assert reason(cache.published, model) == "aleph_no_deployment"  # cached
    assert cache.fetches == 3
    nothing = Scripted(ttl=600.0, answers=[down])
    assert reason(nothing.published, model) == "aleph_unavailable"
    assert reason(nothing.published, model) == "aleph_unavailable" and nothing.fetches == 1
