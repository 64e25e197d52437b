"""Our Permit2 and x402UptoPermit2Proxy (contracts/) at their canonical addresses on anvil, paid with
the official Python x402 ``upto`` client (PyPI x402 2.25: ``UptoEvmScheme.create_payment_payload``
with an eth_account signer) and settled by the relayer named in ``extra.facilitatorAddress``.

The settle calldata is built from the official facilitator's own argument builder and ABI, so a
selector or tuple layout that differs from the published contracts fails here. Reverts are checked
twice: ``eth_call`` from the sender names the exact custom error, and the same transaction, mined,
fails and moves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest
from eth_abi import decode, encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from x402.extensions.eip2612_gas_sponsoring import EIP2612_GAS_SPONSORING_KEY
from x402.mechanisms.evm import EthAccountSigner, FacilitatorWeb3Signer
from x402.mechanisms.evm.constants import (
    PERMIT2_ADDRESS,
    X402_UPTO_PERMIT2_PROXY_ABI,
    X402_UPTO_PERMIT2_PROXY_ADDRESS,
    X402_UPTO_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI,
)
from x402.mechanisms.evm.types import UptoPermit2Payload
from x402.mechanisms.evm.upto import UptoEvmClientScheme, UptoEvmFacilitatorScheme
from x402.mechanisms.evm.upto.client import _sign_upto_permit2_authorization
from x402.mechanisms.evm.upto.permit2_utils import _build_upto_permit2_settle_args
from x402.schemas import PaymentPayload, PaymentRequirements

from app.backends.rpc import RpcFailure
from app.backends.token import selector
from app.devnet import BASE_USDC, PROJECT_ROOT, DevChain, Service, Wallets, place_upto_contracts
from tests.support import USDC, RpcSigner, calldata

pytestmark = pytest.mark.integration

PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
PROXY = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
MAXIMUM = 2 * USDC  # what the payer authorizes
CHARGE = 123_456  # what the facilitator settles
WITNESS_TYPE = "Witness(address to,address facilitator,uint256 validAfter)"
WITNESS_TYPE_STRING = "Witness witness)TokenPermissions(address token,uint256 amount)" + WITNESS_TYPE
SETTLED = keccak(b"Settled()")
SETTLED_WITH_PERMIT = keccak(b"SettledWithPermit()")
PERMIT_FAILED_WITH_REASON = keccak(b"EIP2612PermitFailedWithReason(address,address,string)")
MAX_UINT = 2**256 - 1


# --- ABI and transactions over the project's RPC client -----------------------------------------


def call(chain: DevChain, to: str, signature: str, types: list[str], args: list[Any], out: list[str]) -> Any:
    data = selector(signature) + encode(types, args)
    answer = chain.rpc.call("eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"])
    values = decode(out, bytes.fromhex(answer[2:]))
    return values[0] if len(values) == 1 else values


def error(signature: str, types: tuple[str, ...] = (), args: tuple[Any, ...] = ()) -> str:
    """The revert data of a custom error (or ``Error(string)``) as 0x-hex."""
    return "0x" + (selector(signature) + encode(list(types), list(args))).hex()


def revert_data(chain: DevChain, sender: str, to: str, data: bytes) -> str | None:
    """What ``data`` from ``sender`` reverts with in ``eth_call``; None when it does not revert."""
    try:
        chain.rpc.call("eth_call", [{"from": sender, "to": to, "data": "0x" + data.hex()}, "latest"])
    except RpcFailure as refused:
        return refused.error.data
    return None


def send(chain: DevChain, key: str, to: str, data: bytes) -> dict[str, Any]:
    """Sign with ``key`` and broadcast (fixed gas, so a reverting call is mined too); the receipt."""
    account = Account.from_key(key)
    nonce = int(chain.rpc.call("eth_getTransactionCount", [account.address, "pending"]), 16)
    fee = int(chain.rpc.call("eth_gasPrice", []), 16)
    signed = account.sign_transaction(
        {
            "type": 2,
            "chainId": 8453,
            "nonce": nonce,
            "to": to,
            "value": 0,
            "data": data,
            "gas": 500_000,
            "maxFeePerGas": 2 * fee + 10**9,
            "maxPriorityFeePerGas": 10**9,
        }
    )
    tx_hash = chain.rpc.call("eth_sendRawTransaction", ["0x" + bytes(signed.raw_transaction).hex()])
    deadline = time.monotonic() + 10
    while (receipt := chain.rpc.call("eth_getTransactionReceipt", [tx_hash])) is None:
        assert time.monotonic() < deadline, f"no receipt for {tx_hash}"
        time.sleep(0.01)
    return dict(receipt)


def latest_timestamp(chain: DevChain) -> int:
    return int(chain.rpc.call("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)


# --- the official client's payloads ---------------------------------------------------------------


def requirement(wallets: Wallets, amount: int = MAXIMUM, timeout: int = 300) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="upto",
        network="eip155:8453",
        asset=BASE_USDC,
        amount=str(amount),
        pay_to=wallets.pay_to,
        max_timeout_seconds=timeout,
        extra={"name": "USD Coin", "version": "2", "facilitatorAddress": wallets.relayer},
    )


def signed_payload(signer: Any, wallets: Wallets, extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``payload`` of a PaymentPayload, as the official ``upto`` client makes it."""
    payload: dict[str, Any] = UptoEvmClientScheme(signer).create_payment_payload(
        requirement(wallets), extensions
    )
    return payload


def resigned(wallets: Wallets, payload: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``payload`` with authorization fields changed (``valid_after`` goes to the witness) and signed
    again by the payer with the client's own EIP-712 signing function."""
    authorization = UptoPermit2Payload.from_dict(payload).permit2_authorization
    if "valid_after" in changes:
        witness = dataclasses.replace(authorization.witness, valid_after=str(changes.pop("valid_after")))
        authorization = dataclasses.replace(authorization, witness=witness)
    authorization = dataclasses.replace(authorization, **{k: str(v) for k, v in changes.items()})
    signer = EthAccountSigner(Account.from_key(wallets.payer_key))
    signature = _sign_upto_permit2_authorization(signer, authorization, requirement(wallets))
    return UptoPermit2Payload(permit2_authorization=authorization, signature=signature).to_dict()


def tampered(payload: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """``payload`` with one authorization field changed after signing (``witness.to`` style paths)."""
    edited = json.loads(json.dumps(payload))
    node = edited["permit2Authorization"]
    *path, last = field.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    return edited


def settle_data(payload: dict[str, Any], amount: int) -> bytes:
    args = _build_upto_permit2_settle_args(UptoPermit2Payload.from_dict(payload), amount)
    return calldata(X402_UPTO_PERMIT2_PROXY_ABI, "settle", list(args))


def settle_with_permit_data(
    payload: dict[str, Any], amount: int, permit: dict[str, Any] | None = None
) -> bytes:
    """``settleWithPermit`` calldata with the EIP-2612 permit the client put in ``__extensions``
    (or ``permit``, such an ``info`` object), split as the official facilitator splits it."""
    info = permit or payload["__extensions"][EIP2612_GAS_SPONSORING_KEY]["info"]
    raw = bytes.fromhex(info["signature"][2:])
    permit2612 = (int(info["amount"]), int(info["deadline"]), raw[:32], raw[32:64], raw[64])
    args = _build_upto_permit2_settle_args(UptoPermit2Payload.from_dict(payload), amount)
    return calldata(X402_UPTO_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI, "settleWithPermit", [permit2612, *args])


# --- fixtures and checks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def placed(chain: DevChain) -> dict[str, str]:
    return place_upto_contracts(chain)


def approve_permit2(chain: DevChain, key: str, amount: int = MAX_UINT) -> None:
    chain.set_eth(Account.from_key(key).address, 10**18)
    data = selector("approve(address,uint256)") + encode(["address", "uint256"], [PERMIT2, amount])
    assert send(chain, key, BASE_USDC, data)["status"] == "0x1"


def balances(chain: DevChain, *addresses: str) -> list[int]:
    return [chain.balance(address) for address in addresses]


def assert_reverts(chain: DevChain, key: str, data: bytes, expected: str, wallets: Wallets) -> None:
    """``data`` to the proxy from ``key`` reverts with ``expected`` in simulation, and mined it fails
    and moves no USDC."""
    sender = Account.from_key(key).address
    assert revert_data(chain, sender, PROXY, data) == expected
    before = balances(chain, wallets.payer, wallets.pay_to)
    assert send(chain, key, PROXY, data)["status"] == "0x0"
    assert balances(chain, wallets.payer, wallets.pay_to) == before


def nonce_spent(chain: DevChain, owner: str, nonce: int) -> bool:
    word = call(
        chain,
        PERMIT2,
        "nonceBitmap(address,uint256)",
        ["address", "uint256"],
        [owner, nonce >> 8],
        ["uint256"],
    )
    return bool(word >> (nonce & 0xFF) & 1)


def proxy_events(receipt: dict[str, Any]) -> list[bytes]:
    return [
        bytes.fromhex(log["topics"][0][2:])
        for log in receipt["logs"]
        if log["address"].lower() == PROXY.lower()
    ]


def allowance(chain: DevChain, owner: str) -> int:
    return int(
        call(
            chain,
            BASE_USDC,
            "allowance(address,address)",
            ["address", "address"],
            [owner, PERMIT2],
            ["uint256"],
        )
    )


# --- tests -------------------------------------------------------------------------------------------


def test_the_contracts_sit_where_the_sdk_looks_and_publish_its_constants(
    placed: dict[str, str], chain: DevChain
) -> None:
    assert placed == {"Permit2": PERMIT2_ADDRESS, "x402UptoPermit2Proxy": X402_UPTO_PERMIT2_PROXY_ADDRESS}
    assert (PERMIT2, PROXY) == (PERMIT2_ADDRESS, X402_UPTO_PERMIT2_PROXY_ADDRESS)
    domain = encode_typed_data(
        domain_data={"name": "Permit2", "chainId": 8453, "verifyingContract": PERMIT2},
        message_types={"Noop": [{"name": "x", "type": "uint256"}]},
        message_data={"x": 0},
    ).header
    assert call(chain, PERMIT2, "DOMAIN_SEPARATOR()", [], [], ["bytes32"]) == domain
    assert call(chain, PROXY, "PERMIT2()", [], [], ["address"]).lower() == PERMIT2.lower()
    assert call(chain, PROXY, "WITNESS_TYPEHASH()", [], [], ["bytes32"]) == keccak(WITNESS_TYPE.encode())
    assert call(chain, PROXY, "WITNESS_TYPE_STRING()", [], [], ["string"]) == WITNESS_TYPE_STRING
    nobody = Account.create().address
    packed = call(
        chain,
        PERMIT2,
        "allowance(address,address,address)",
        ["address", "address", "address"],
        [nobody, BASE_USDC, PROXY],
        ["uint160", "uint48", "uint48"],
    )
    assert packed == (0, 0, 0)
    assert call(chain, BASE_USDC, "nonces(address)", ["address"], [nobody], ["uint256"]) == 0
    permit_type = b"Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)"
    assert call(chain, BASE_USDC, "PERMIT_TYPEHASH()", [], [], ["bytes32"]) == keccak(permit_type)
    for name in placed:
        artifact = json.loads((PROJECT_ROOT / "contracts" / f"{name}.json").read_text())
        assert chain.rpc.call("eth_getCode", [placed[name], "latest"]) == artifact["deployedBytecode"]


def test_the_named_facilitator_settles_less_than_the_signed_maximum_once(
    placed: dict[str, str], chain: DevChain, wallets: Wallets
) -> None:
    approve_permit2(chain, wallets.payer_key)
    payload = signed_payload(Account.from_key(wallets.payer_key), wallets)
    authorization = payload["permit2Authorization"]
    assert authorization["spender"] == PROXY and authorization["permitted"]["amount"] == str(MAXIMUM)
    assert authorization["witness"] == {
        "to": wallets.pay_to,
        "facilitator": wallets.relayer,
        "validAfter": "0",
    }
    nonce = int(authorization["nonce"])
    before = balances(chain, wallets.payer, wallets.pay_to)

    receipt = send(chain, wallets.relayer_key, PROXY, settle_data(payload, CHARGE))

    assert receipt["status"] == "0x1"
    assert balances(chain, wallets.payer, wallets.pay_to) == [before[0] - CHARGE, before[1] + CHARGE]
    assert balances(chain, PROXY, PERMIT2, wallets.relayer) == [0, 0, 0]
    assert proxy_events(receipt) == [SETTLED]
    assert nonce_spent(chain, wallets.payer, nonce)
    assert not nonce_spent(chain, wallets.payer, nonce ^ 1)
    assert_reverts(chain, wallets.relayer_key, settle_data(payload, 1), error("InvalidNonce()"), wallets)


def test_the_witness_and_the_permit_bound_who_settles_how_much_and_to_whom(
    placed: dict[str, str], chain: DevChain, wallets: Wallets
) -> None:
    approve_permit2(chain, wallets.payer_key)
    payload = signed_payload(Account.from_key(wallets.payer_key), wallets)
    stranger = "0x" + bytes(Account.create().key).hex()
    chain.set_eth(Account.from_key(stranger).address, 10**18)
    data = settle_data(payload, CHARGE)

    assert_reverts(chain, stranger, data, error("UnauthorizedFacilitator()"), wallets)
    assert_reverts(chain, wallets.payer_key, data, error("UnauthorizedFacilitator()"), wallets)
    over = settle_data(payload, MAXIMUM + 1)
    assert_reverts(chain, wallets.relayer_key, over, error("AmountExceedsPermitted()"), wallets)
    assert_reverts(chain, wallets.relayer_key, settle_data(payload, 0), error("InvalidAmount()"), wallets)
    elsewhere = tampered(payload, "witness.to", wallets.relayer)
    assert_reverts(
        chain, wallets.relayer_key, settle_data(elsewhere, CHARGE), error("InvalidSigner()"), wallets
    )
    bigger = tampered(payload, "permitted.amount", str(2 * MAXIMUM))
    bigger_data = settle_data(bigger, MAXIMUM + 1)
    assert_reverts(chain, wallets.relayer_key, bigger_data, error("InvalidSigner()"), wallets)

    before = balances(chain, wallets.payer, wallets.pay_to)
    assert send(chain, wallets.relayer_key, PROXY, settle_data(payload, MAXIMUM))["status"] == "0x1"
    assert balances(chain, wallets.payer, wallets.pay_to) == [before[0] - MAXIMUM, before[1] + MAXIMUM]


def test_a_permit_settles_neither_before_valid_after_nor_after_its_deadline(
    placed: dict[str, str], chain: DevChain, wallets: Wallets
) -> None:
    approve_permit2(chain, wallets.payer_key)
    payload = signed_payload(Account.from_key(wallets.payer_key), wallets)
    now = latest_timestamp(chain)

    early = resigned(wallets, payload, valid_after=now + 3600)
    assert_reverts(
        chain, wallets.relayer_key, settle_data(early, CHARGE), error("PaymentTooEarly()"), wallets
    )
    late = resigned(wallets, payload, deadline=now - 1)
    expired = error("SignatureExpired(uint256)", ("uint256",), (now - 1,))
    assert_reverts(chain, wallets.relayer_key, settle_data(late, CHARGE), expired, wallets)

    started = resigned(wallets, payload, valid_after=now - 1)  # validAfter is inclusive
    assert send(chain, wallets.relayer_key, PROXY, settle_data(started, CHARGE))["status"] == "0x1"


def test_without_a_permit2_allowance_or_after_the_payer_cancels_nothing_moves(
    placed: dict[str, str], chain: DevChain, wallets: Wallets
) -> None:
    payload = signed_payload(Account.from_key(wallets.payer_key), wallets)
    no_allowance = error("Error(string)", ("string",), ("TRANSFER_FROM_FAILED",))
    assert_reverts(chain, wallets.relayer_key, settle_data(payload, CHARGE), no_allowance, wallets)

    approve_permit2(chain, wallets.payer_key, CHARGE - 1)  # too small an allowance fails alike
    assert_reverts(chain, wallets.relayer_key, settle_data(payload, CHARGE), no_allowance, wallets)

    approve_permit2(chain, wallets.payer_key)
    nonce = int(payload["permit2Authorization"]["nonce"])
    cancel = selector("invalidateUnorderedNonces(uint256,uint256)") + encode(
        ["uint256", "uint256"], [nonce >> 8, 1 << (nonce & 0xFF)]
    )
    assert send(chain, wallets.payer_key, PERMIT2, cancel)["status"] == "0x1"
    assert nonce_spent(chain, wallets.payer, nonce)
    assert_reverts(chain, wallets.relayer_key, settle_data(payload, CHARGE), error("InvalidNonce()"), wallets)


def test_settle_with_permit_needs_no_approval_transaction_from_the_payer(
    placed: dict[str, str], chain: DevChain, wallets: Wallets
) -> None:
    signer = RpcSigner(wallets.payer_key, chain.rpc)
    payload = signed_payload(signer, wallets, {EIP2612_GAS_SPONSORING_KEY: {}})
    info = payload["__extensions"][EIP2612_GAS_SPONSORING_KEY]["info"]
    assert (info["spender"], info["amount"], info["nonce"]) == (PERMIT2, str(MAXIMUM), "0")
    assert info["deadline"] == payload["permit2Authorization"]["deadline"]
    assert allowance(chain, wallets.payer) == 0
    assert chain.rpc.call("eth_getTransactionCount", [wallets.payer, "latest"]) == "0x0"

    mismatch = dict(info, amount=str(MAXIMUM - 1))
    mismatched = settle_with_permit_data(payload, CHARGE, mismatch)
    assert_reverts(chain, wallets.relayer_key, mismatched, error("Permit2612AmountMismatch()"), wallets)
    before = balances(chain, wallets.payer, wallets.pay_to)

    receipt = send(chain, wallets.relayer_key, PROXY, settle_with_permit_data(payload, CHARGE))

    assert receipt["status"] == "0x1"
    assert proxy_events(receipt) == [SETTLED_WITH_PERMIT]
    assert balances(chain, wallets.payer, wallets.pay_to) == [before[0] - CHARGE, before[1] + CHARGE]
    assert allowance(chain, wallets.payer) == MAXIMUM - CHARGE
    assert call(chain, BASE_USDC, "nonces(address)", ["address"], [wallets.payer], ["uint256"]) == 1

    # The used EIP-2612 permit again, with a new Permit2 payment: the token refuses the permit, the
    # proxy reports it and settles on the allowance that is left.
    again = signed_payload(Account.from_key(wallets.payer_key), wallets)
    receipt = send(chain, wallets.relayer_key, PROXY, settle_with_permit_data(again, CHARGE, info))
    assert receipt["status"] == "0x1"
    assert proxy_events(receipt) == [PERMIT_FAILED_WITH_REASON, SETTLED_WITH_PERMIT]
    (failure,) = [
        log for log in receipt["logs"] if log["topics"][0] == "0x" + PERMIT_FAILED_WITH_REASON.hex()
    ]
    assert decode(["string"], bytes.fromhex(failure["data"][2:])) == ("EIP2612: invalid signature",)
    assert allowance(chain, wallets.payer) == MAXIMUM - 2 * CHARGE
    assert chain.rpc.call("eth_getTransactionCount", [wallets.payer, "latest"]) == "0x0"


def test_a_contract_wallet_pays_through_eip1271_on_the_token_and_on_permit2(
    placed: dict[str, str], chain: DevChain, wallets: Wallets
) -> None:
    wallet = Account.create().address
    artifact = json.loads((PROJECT_ROOT / "contracts" / "ERC1271Wallet.json").read_text())
    chain.rpc.call("anvil_setCode", [wallet, artifact["deployedBytecode"]])
    chain.transact(wallet, selector("setOwner(address)") + encode(["address"], [wallets.payer]))
    chain.mint(wallet, MAXIMUM)
    signer = RpcSigner(wallets.payer_key, chain.rpc, address=wallet)
    payload = signed_payload(signer, wallets, {EIP2612_GAS_SPONSORING_KEY: {}})
    assert payload["permit2Authorization"]["from"] == wallet

    receipt = send(chain, wallets.relayer_key, PROXY, settle_with_permit_data(payload, CHARGE))

    assert receipt["status"] == "0x1"
    assert proxy_events(receipt) == [SETTLED_WITH_PERMIT]  # the token took the wallet's permit
    assert chain.balance(wallet) == MAXIMUM - CHARGE
    chain.transact(wallet, selector("setRefuse(bool)") + encode(["bool"], [True]))
    refused = signed_payload(signer, wallets)
    data = settle_data(refused, CHARGE)
    assert revert_data(chain, wallets.relayer, PROXY, data) == error("InvalidContractSignature()")
    assert chain.balance(wallet) == MAXIMUM - CHARGE


def test_the_official_facilitator_verifies_and_settles_against_these_contracts(
    placed: dict[str, str], anvil: Service, chain: DevChain, wallets: Wallets
) -> None:
    approve_permit2(chain, wallets.payer_key)
    accepted = requirement(wallets)
    payment = PaymentPayload(
        x402_version=2,
        accepted=accepted,
        payload=signed_payload(Account.from_key(wallets.payer_key), wallets),
    )
    facilitator = UptoEvmFacilitatorScheme(FacilitatorWeb3Signer(wallets.relayer_key, anvil.url))
    verified = facilitator.verify(payment, accepted)
    assert verified.is_valid, verified.invalid_reason
    before = balances(chain, wallets.payer, wallets.pay_to)

    settled = facilitator.settle(payment, accepted.model_copy(update={"amount": str(CHARGE)}))

    assert settled.success, (settled.error_reason, settled.error_message)
    assert settled.amount == str(CHARGE)
    assert balances(chain, wallets.payer, wallets.pay_to) == [before[0] - CHARGE, before[1] + CHARGE]
    again = facilitator.settle(payment, accepted.model_copy(update={"amount": str(CHARGE)}))
    assert not again.success


def test_permit2_takes_compact_signatures_and_names_malformed_ones(
    placed: dict[str, str], chain: DevChain, wallets: Wallets
) -> None:
    approve_permit2(chain, wallets.payer_key)
    payload = signed_payload(Account.from_key(wallets.payer_key), wallets)
    signature = bytes.fromhex(payload["signature"][2:])
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]

    def with_signature(raw: bytes) -> bytes:
        return settle_data(dict(payload, signature="0x" + raw.hex()), CHARGE)

    short = with_signature(signature[:63])
    assert_reverts(chain, wallets.relayer_key, short, error("InvalidSignatureLength()"), wallets)
    unrecoverable = with_signature(signature[:64] + bytes([v + 2]))  # v = 29 or 30: ecrecover gives 0
    assert_reverts(chain, wallets.relayer_key, unrecoverable, error("InvalidSignature()"), wallets)

    compact = r + (s | (v - 27) << 255).to_bytes(32, "big")  # EIP-2098 (r, vs)
    before = balances(chain, wallets.payer, wallets.pay_to)
    assert send(chain, wallets.relayer_key, PROXY, with_signature(compact))["status"] == "0x1"
    assert balances(chain, wallets.payer, wallets.pay_to) == [before[0] - CHARGE, before[1] + CHARGE]
