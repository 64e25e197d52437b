"""The payment token's ABI (an EIP-3009 token such as USDC): the view calls and the settlement calldata
sent to it, and what its logs in a receipt prove about one authorization.

Pure: builds and reads JSON-RPC values, asks nothing (``app.backends.chain`` does the asking).
"""

from __future__ import annotations

from typing import Any

from eth_abi import decode, encode
from eth_hash.auto import keccak

from app.backends.rpc import Call, ChainUnavailable, word_value
from app.x402.eip712 import split_signature
from app.x402.wire import Authorization

TRANSFER_TOPIC = keccak(b"Transfer(address,address,uint256)")
AUTHORIZATION_USED_TOPIC = keccak(b"AuthorizationUsed(address,bytes32)")


def selector(signature: str) -> bytes:
    """The 4-byte function selector of a Solidity signature such as ``"paused()"``."""
    return keccak(signature.encode())[:4]


SEL_BALANCE_OF = selector("balanceOf(address)")
SEL_AUTHORIZATION_STATE = selector("authorizationState(address,bytes32)")
SEL_PAUSED = selector("paused()")
SEL_NAME = selector("name()")
SEL_IS_BLACKLISTED = selector("isBlacklisted(address)")
SEL_VERSION = selector("version()")
SEL_TWA_VRS = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
SEL_TWA_BYTES = selector("transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")


class ReceiptContradiction(ChainUnavailable):
    """A receipt that contradicts itself or the token's logs: status 1 for a transaction that was to
    use this authorization, without the token's ``Transfer`` and ``AuthorizationUsed`` logs for it
    (EIP-3009 emits both), or a transaction the logs name whose receipt does not hold the log. An
    RPC fault (or a facilitator naming another transaction): resolved from chain state later."""


def eth_call(to: str, data: bytes) -> Call:
    """The JSON-RPC call of a view: ``data`` (selector + ABI arguments) to ``to``, at the latest block."""
    return "eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"]


def transfer_calldata(auth: Authorization, signature: bytes, use_vrs: bool) -> bytes:
    """``transferWithAuthorization`` calldata: the v,r,s overload for EOAs, bytes for contract wallets."""
    head = [auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce]
    if use_vrs:
        v, r, s = split_signature(signature)
        types = [
            "address",
            "address",
            "uint256",
            "uint256",
            "uint256",
            "bytes32",
            "uint8",
            "bytes32",
            "bytes32",
        ]
        return SEL_TWA_VRS + encode(types, [*head, v, r, s])
    types = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"]
    return SEL_TWA_BYTES + encode(types, [*head, signature])


def abi_string(answer: Any) -> str:
    """An ``eth_call`` answer holding one ABI-encoded ``string`` (``name()``, ``version()``), decoded;
    "" for anything else (``0x``, a short or garbled answer, an ``RpcError``)."""
    if not isinstance(answer, str) or len(answer) < 130:
        return ""
    try:
        return str(decode(["string"], bytes.fromhex(answer[2:]))[0])
    except Exception:
        return ""


def _address_topic(address: str) -> str:
    """An address as an indexed log topic: left-padded to 32 bytes, lower case."""
    return "0x" + bytes(12).hex() + address[2:].lower()


def transfer_topics(auth: Authorization) -> list[str]:
    """ERC-20 ``Transfer(from, to, value)``: from and to indexed, value in the data."""
    return transfer_topics_between(auth.from_, auth.to)


def transfer_topics_between(from_: str, to: str) -> list[str]:
    """The topics of an ERC-20 ``Transfer`` from ``from_`` to ``to`` (0x addresses)."""
    return ["0x" + TRANSFER_TOPIC.hex(), _address_topic(from_), _address_topic(to)]


def authorization_used_topics(auth: Authorization) -> list[str]:
    """EIP-3009 ``AuthorizationUsed(authorizer, nonce)``: both indexed."""
    return ["0x" + AUTHORIZATION_USED_TOPIC.hex(), _address_topic(auth.from_), "0x" + auth.nonce.hex()]


def is_log(log: dict[str, Any], asset: str, topics: list[str]) -> bool:
    """The log (a JSON-RPC log object) is ``asset``'s, with exactly these topics (lower-case hex)."""
    return (
        str(log.get("address", "")).lower() == asset.lower()
        and [str(t).lower() for t in log.get("topics", [])] == topics
    )


def logged(receipt: dict[str, Any], asset: str, topics: list[str], value: int | None = None) -> bool:
    """The receipt is a success holding the asset's log with these topics (and this one-word value)."""
    return receipt.get("status") == "0x1" and any(
        is_log(log, asset, topics) and (value is None or word_value(log.get("data")) == value)
        for log in receipt.get("logs", [])
    )


def transfer_logged(receipt: dict[str, Any], asset: str, auth: Authorization) -> bool:
    """For the receipt of a transaction that was to settle this authorization (ours, or the one a
    facilitator names): True when it holds the token's ``AuthorizationUsed(from, nonce)`` **and**
    ``Transfer(from, to, value)`` (EIP-3009 emits both); False when it reverted (status 0), or when
    it used the authorization and moved another amount than ``value`` (not the payment expected).

    A status of 1 is not enough: some tokens skip a used nonce without reverting and move nothing,
    and a ``Transfer`` alone may be another authorization's payment of the same amount. Status 1
    without this authorization's ``AuthorizationUsed``, or without any ``Transfer`` from the payer
    to the payee, is not an answer but a contradiction: ``ReceiptContradiction`` (an RPC fault, to
    be resolved from chain state later; never "reverted, nothing charged").
    """
    if receipt.get("status") == "0x0":
        return False
    transfers = [log for log in receipt.get("logs", []) if is_log(log, asset, transfer_topics(auth))]
    if logged(receipt, asset, authorization_used_topics(auth)) and transfers:
        return any(word_value(log.get("data")) == auth.value for log in transfers)
    raise ReceiptContradiction(f"{receipt.get('transactionHash')} does not show this authorization's payment")


def pulled_logged(receipt: dict[str, Any], asset: str, from_: str, to: str, amount: int) -> bool:
    """For the receipt of our ``upto`` settlement: True when it holds the token's ``Transfer(from_,
    to, amount)``; False when it reverted (status 0). Status 1 without that transfer is an RPC
    fault: ``ReceiptContradiction`` (the proxy contract either pulls exactly ``amount`` or reverts)."""
    if receipt.get("status") == "0x0":
        return False
    if logged(receipt, asset, transfer_topics_between(from_, to), amount):
        return True
    raise ReceiptContradiction(f"{receipt.get('transactionHash')} does not show the upto transfer")
