"""EIP-712 digest of EIP-3009 TransferWithAuthorization, cross-checked with eth-account's generic encoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from app.x402.eip712 import (
    SECP256K1_HALF_N,
    SECP256K1_N,
    address_of_key,
    authorization_digest,
    domain_separator,
    is_canonical_ecdsa,
    recover_signer,
    sign_digest,
    split_signature,
)


@dataclass(frozen=True)
class Domain:
    name: str
    version: str
    chain_id: int
    verifying_contract: str


BASE = Domain("USD Coin", "2", 8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")
BASE_SEPOLIA = Domain("USDC", "2", 84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e")
DOMAINS = [BASE, BASE_SEPOLIA]

UINT256_MAX = 2**256 - 1


def typed_data(domain: Domain, auth: dict[str, Any]) -> dict[str, Any]:
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": domain.name,
            "version": domain.version,
            "chainId": domain.chain_id,
            "verifyingContract": domain.verifying_contract,
        },
        "message": {
            "from": to_checksum_address(auth["from"]),
            "to": to_checksum_address(auth["to"]),
            "value": auth["value"],
            "validAfter": auth["validAfter"],
            "validBefore": auth["validBefore"],
            "nonce": auth["nonce"],
        },
    }


def reference_digest(domain: Domain, auth: dict[str, Any]) -> bytes:
    return bytes(_hash_eip191_message(encode_typed_data(full_message=typed_data(domain, auth))))


def our_digest(domain: Domain, auth: dict[str, Any]) -> bytes:
    separator = domain_separator(domain.name, domain.version, domain.chain_id, domain.verifying_contract)
    return authorization_digest(
        separator,
        auth["from"],
        auth["to"],
        auth["value"],
        auth["validAfter"],
        auth["validBefore"],
        auth["nonce"],
    )


def mixed_case_address(raw: bytes, style: int) -> str:
    lower = "0x" + raw.hex()
    return [lower, lower.upper().replace("0X", "0x"), str(to_checksum_address(lower))][style]


addresses = st.builds(
    mixed_case_address, st.binary(min_size=20, max_size=20), st.integers(min_value=0, max_value=2)
)
uint256 = st.integers(min_value=0, max_value=UINT256_MAX)
authorizations = st.fixed_dictionaries(
    {
        "from": addresses,
        "to": addresses,
        "value": uint256,
        "validAfter": uint256,
        "validBefore": uint256,
        "nonce": st.binary(min_size=32, max_size=32),
    }
)


def fresh_key() -> bytes:
    return os.urandom(32)


def with_s(signature: bytes, s: int, v: int | None = None) -> bytes:
    v_byte = signature[64] if v is None else v
    return signature[:32] + s.to_bytes(32, "big") + bytes([v_byte])


def high_s_twin(signature: bytes) -> bytes:
    """Same (r, point) signature with s' = n - s and the recovery bit flipped: valid for ecrecover
    without the low-s rule, refused by USDC and by us."""
    v, _r, s = split_signature(signature)
    return with_s(signature, SECP256K1_N - int.from_bytes(s, "big"), 55 - v)


# -- digest ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DOMAINS), authorizations)
def test_digest_matches_eth_account(domain: Domain, auth: dict[str, Any]) -> None:
    assert our_digest(domain, auth) == reference_digest(domain, auth)


def test_digest_matches_eth_account_on_edge_values() -> None:
    for domain in DOMAINS:
        for value in (0, 1, UINT256_MAX):
            auth = {
                "from": "0x" + "ff" * 20,
                "to": "0x" + "00" * 20,
                "value": value,
                "validAfter": value,
                "validBefore": UINT256_MAX - value,
                "nonce": b"\xff" * 32,
            }
            assert our_digest(domain, auth) == reference_digest(domain, auth)


def test_digest_depends_on_every_field_and_on_the_domain() -> None:
    auth = {
        "from": "0x" + "11" * 20,
        "to": "0x" + "22" * 20,
        "value": 10_000,
        "validAfter": 0,
        "validBefore": 1_700_000_000,
        "nonce": b"\x33" * 32,
    }
    base = our_digest(BASE, auth)
    assert our_digest(BASE_SEPOLIA, auth) != base
    assert our_digest(Domain("USD Coin", "1", 8453, BASE.verifying_contract), auth) != base
    changed = {
        "from": "0x" + "12" * 20,
        "to": "0x" + "23" * 20,
        "value": 10_001,
        "validAfter": 1,
        "validBefore": 1_700_000_001,
        "nonce": b"\x34" * 32,
    }
    for key, value in changed.items():
        assert our_digest(BASE, {**auth, key: value}) != base, key


def test_domain_separator_matches_eth_account() -> None:
    from eth_account._utils.encode_typed_data.encoding_and_hashing import hash_domain

    for domain in DOMAINS:
        expected = hash_domain(
            {
                "name": domain.name,
                "version": domain.version,
                "chainId": domain.chain_id,
                "verifyingContract": domain.verifying_contract,
            }
        )
        separator = domain_separator(domain.name, domain.version, domain.chain_id, domain.verifying_contract)
        assert separator == bytes(expected)
        # checksummed or lower-case contract address: same separator
        lower = domain_separator(
            domain.name, domain.version, domain.chain_id, domain.verifying_contract.lower()
        )
        assert lower == separator


def test_known_vector_signature_recovers_with_eth_account() -> None:
    key = fresh_key()
    signer = Account.from_key(key)
    auth = {
        "from": signer.address,
        "to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
        "value": 10_000,
        "validAfter": 0,
        "validBefore": 1_900_000_000,
        "nonce": bytes.fromhex("f3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"),
    }
    for domain in DOMAINS:
        digest = our_digest(domain, auth)
        signed = Account.sign_typed_data(key, full_message=typed_data(domain, auth))
        assert digest == bytes(signed.message_hash)

        ours = sign_digest(key, digest)
        assert Account._recover_hash(digest, signature=ours) == signer.address
        assert (
            Account.recover_message(encode_typed_data(full_message=typed_data(domain, auth)), signature=ours)
            == signer.address
        )
        # eth-account signs deterministically (RFC 6979) and low-s, as does libsecp256k1.
        assert ours == bytes(signed.signature)
        assert recover_signer(digest, bytes(signed.signature)) == signer.address.lower()


# -- signing and recovery ----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_sign_digest_is_canonical_and_recovers(digest: bytes) -> None:
    key = fresh_key()
    signature = sign_digest(key, digest)
    assert len(signature) == 65
    v, r, s = split_signature(signature)
    assert v in (27, 28)
    assert 0 < int.from_bytes(s, "big") <= SECP256K1_HALF_N
    assert 0 < int.from_bytes(r, "big") < SECP256K1_N
    assert is_canonical_ecdsa(signature)
    assert recover_signer(digest, signature) == address_of_key(key)
    assert Account._recover_hash(digest, signature=signature).lower() == address_of_key(key)


def test_address_of_key_matches_eth_account() -> None:
    for _ in range(5):
        key = fresh_key()
        assert address_of_key(key) == Account.from_key(key).address.lower()


def test_recover_signer_returns_lower_case_address() -> None:
    key = fresh_key()
    digest = os.urandom(32)
    recovered = recover_signer(digest, sign_digest(key, digest))
    assert recovered is not None
    assert recovered == recovered.lower()
    assert recovered.startswith("0x") and len(recovered) == 42


def test_recover_signer_other_digest_gives_other_address() -> None:
    key = fresh_key()
    signature = sign_digest(key, b"\x01" * 32)
    assert recover_signer(b"\x02" * 32, signature) != address_of_key(key)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_high_s_twin_refused(digest: bytes) -> None:
    key = fresh_key()
    signature = sign_digest(key, digest)
    twin = high_s_twin(signature)
    # The twin is a valid signature for a permissive recoverer ...
    assert Account._recover_hash(digest, vrs=(twin[64], twin[:32], twin[32:64])).lower() == address_of_key(
        key
    )
    # ... but not canonical, so USDC would refuse it and so do we.
    assert not is_canonical_ecdsa(twin)
    assert recover_signer(digest, twin) is None


def test_v_zero_or_one_refused() -> None:
    key = fresh_key()
    digest = os.urandom(32)
    signature = sign_digest(key, digest)
    raw_v = signature[64] - 27
    assert recover_signer(digest, signature[:64] + bytes([raw_v])) is None
    assert recover_signer(digest, signature[:64] + bytes([1 - raw_v])) is None
    for v in (0, 1, 26, 29, 35, 36, 255):
        assert recover_signer(digest, signature[:64] + bytes([v])) is None


def test_zero_r_or_s_refused() -> None:
    key = fresh_key()
    digest = os.urandom(32)
    signature = sign_digest(key, digest)
    assert recover_signer(digest, bytes(32) + signature[32:]) is None
    assert recover_signer(digest, with_s(signature, 0)) is None
    assert recover_signer(digest, bytes(64) + bytes([27])) is None


@pytest.mark.parametrize("length", [0, 1, 63, 64, 66, 96, 130])
def test_wrong_length_refused(length: int) -> None:
    key = fresh_key()
    digest = os.urandom(32)
    signature = sign_digest(key, digest)
    candidate = (signature * 3)[:length]
    assert not is_canonical_ecdsa(candidate)
    assert recover_signer(digest, candidate) is None


def test_r_not_on_curve_returns_none_not_raises() -> None:
    digest = os.urandom(32)
    results = [
        recover_signer(digest, r.to_bytes(32, "big") + (1).to_bytes(32, "big") + b"\x1b")
        for r in range(1, 20)
    ]
    assert None in results  # some x coordinates have no curve point; they must not raise


# -- is_canonical_ecdsa ------------------------------------------------------------------------


def sig(r: int, s: int, v: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])


@pytest.mark.parametrize(
    ("signature", "expected"),
    [
        (sig(1, 1, 27), True),
        (sig(1, 1, 28), True),
        (sig(SECP256K1_N - 1, SECP256K1_HALF_N, 27), True),  # largest r, largest low s
        (sig(1, SECP256K1_HALF_N + 1, 27), False),  # smallest high s
        (sig(1, SECP256K1_N - 1, 28), False),
        (sig(0, 1, 27), False),
        (sig(1, 0, 27), False),
        (sig(SECP256K1_N, 1, 27), False),  # r == n
        (sig(2**256 - 1, 1, 27), False),
        (sig(1, 1, 0), False),
        (sig(1, 1, 1), False),
        (sig(1, 1, 26), False),
        (sig(1, 1, 29), False),
        (sig(1, 1, 27)[:64], False),
        (sig(1, 1, 27) + b"\x00", False),
        (b"", False),
    ],
)
def test_is_canonical_ecdsa(signature: bytes, expected: bool) -> None:
    assert is_canonical_ecdsa(signature) is expected


def test_split_signature() -> None:
    signature = bytes(range(65))
    v, r, s = split_signature(signature)
    assert (v, r, s) == (64, bytes(range(32)), bytes(range(32, 64)))
