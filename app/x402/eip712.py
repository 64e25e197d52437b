"""EIP-712 hashing of EIP-3009 ``TransferWithAuthorization`` and secp256k1 recovery/signing.

The typed data has a fixed shape, so it is hashed directly (no generic typed-data encoder) with a
cached domain separator, and the curve work goes to coincurve (libsecp256k1). A unit test
cross-checks the digest against eth-account's generic encoder.
"""

from __future__ import annotations

from functools import lru_cache

from coincurve import PrivateKey, PublicKey
from eth_hash.auto import keccak

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2

DOMAIN_TYPEHASH = keccak(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)


def word(value: int | str | bytes) -> bytes:
    """One 32-byte EIP-712/ABI word: an int (uint, big-endian), a 0x address (left-padded) or 32
    bytes as they are (bytes32). Shared by every scheme's struct hashes."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return bytes(12) + bytes.fromhex(value[2:])
    return value.to_bytes(32, "big")


@lru_cache(maxsize=64)
def domain_separator(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    """The token's EIP-712 domain separator (cached: it is the same for every payment)."""
    return keccak(
        DOMAIN_TYPEHASH
        + keccak(name.encode("utf-8"))
        + keccak(version.encode("utf-8"))
        + word(chain_id)
        + word(verifying_contract)
    )


def authorization_digest(
    separator: bytes,
    from_: str,
    to: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: bytes,
) -> bytes:
    """The 32-byte digest an EIP-3009 authorization signature signs."""
    struct_hash = keccak(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH
        + word(from_)
        + word(to)
        + word(value)
        + word(valid_after)
        + word(valid_before)
        + nonce
    )
    return keccak(b"\x19\x01" + separator + struct_hash)


def split_signature(signature: bytes) -> tuple[int, bytes, bytes]:
    """(v, r, s) of a 65-byte r‖s‖v signature."""
    return signature[64], signature[:32], signature[32:64]


def is_canonical_ecdsa(signature: bytes) -> bool:
    """What USDC accepts: 65 bytes, v in {27, 28}, 0 < r < n, 0 < s <= n/2 (low-s)."""
    if len(signature) != 65:
        return False
    v, r, s = split_signature(signature)
    r_int, s_int = int.from_bytes(r, "big"), int.from_bytes(s, "big")
    return v in (27, 28) and 0 < r_int < SECP256K1_N and 0 < s_int <= SECP256K1_HALF_N


def address_of_public_key(public_key: PublicKey) -> str:
    """The lower-case 0x address of a secp256k1 public key: the last 20 bytes of the keccak-256 of its
    uncompressed 64-byte form."""
    return "0x" + keccak(public_key.format(compressed=False)[1:])[-20:].hex()


def recover_signer(digest: bytes, signature: bytes) -> str | None:
    """Lower-case address that signed ``digest``, or None when the signature is not canonical."""
    if not is_canonical_ecdsa(signature):
        return None
    v, r, s = split_signature(signature)
    try:
        public_key = PublicKey.from_signature_and_message(r + s + bytes([v - 27]), digest, hasher=None)
    except ValueError:
        return None
    return address_of_public_key(public_key)


def sign_digest(private_key: bytes, digest: bytes) -> bytes:
    """A canonical 65-byte r‖s‖v signature (v in {27, 28}, low-s) of ``digest``."""
    raw = PrivateKey(private_key).sign_recoverable(digest, hasher=None)
    return raw[:64] + bytes([raw[64] + 27])


def address_of_key(private_key: bytes) -> str:
    """The lower-case 0x address of a 32-byte private key; raises ``ValueError`` for a key coincurve refuses
    (zero, or not below the curve order)."""
    return address_of_public_key(PrivateKey(private_key).public_key)
