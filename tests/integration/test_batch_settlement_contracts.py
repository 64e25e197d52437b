"""Our x402BatchSettlement escrow and its two deposit collectors (contracts/) at their canonical
addresses on anvil, driven by the official PyPI ``x402`` 2.25 ``batch-settlement`` code: deposits
signed by ``client.eip3009`` / ``client.permit2``, vouchers by ``client.voucher.sign_voucher``,
claim batches and refunds by ``authorizer_signer``, collector data and claim tuples built by the
official facilitator helpers and every call encoded with the official ABI (``abi.py``). A selector,
tuple layout, type string or domain that differs from the published contracts fails here.

Reverts are checked twice where it matters: ``eth_call`` from the sender names the exact custom
error (or the token's / Permit2's own), and the same transaction, mined, fails and moves nothing.
Tests that travel in time (``evm_increaseTime``) take an anvil snapshot first and revert to it, so
the session's chain clock stays on the wall clock for the other modules.

Amounts are atomic USDC units (6 decimals), times unix seconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pytest
from eth_abi import decode, encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from x402.mechanisms.evm import EthAccountSigner, FacilitatorWeb3Signer
from x402.mechanisms.evm.batch_settlement.abi import BATCH_SETTLEMENT_ABI
from x402.mechanisms.evm.batch_settlement.authorizer_signer import (
    LocalAuthorizerSigner,
    sign_claim_batch,
    sign_refund,
)
from x402.mechanisms.evm.batch_settlement.client.eip3009 import (
    create_batch_settlement_eip3009_deposit_payload,
)
from x402.mechanisms.evm.batch_settlement.client.permit2 import (
    create_batch_settlement_permit2_deposit_payload,
)
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.constants import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    REFUND_TYPES,
    VOUCHER_TYPES,
)
from x402.mechanisms.evm.batch_settlement.encoding import build_eip2612_permit_data
from x402.mechanisms.evm.batch_settlement.facilitator.claim import (
    build_voucher_claim_args,
    execute_claim_with_signature,
)
from x402.mechanisms.evm.batch_settlement.facilitator.deposit_eip3009 import (
    build_eip3009_deposit_collector_data,
)
from x402.mechanisms.evm.batch_settlement.facilitator.deposit_permit2 import (
    build_permit2_deposit_collector_data,
)
from x402.mechanisms.evm.batch_settlement.facilitator.settle import execute_settle
from x402.mechanisms.evm.batch_settlement.facilitator.utils import to_contract_channel_config
from x402.mechanisms.evm.batch_settlement.types import (
    ChannelConfig,
    ClaimPayload,
    DepositPayload,
    SettlePayload,
    VoucherClaim,
)
from x402.mechanisms.evm.batch_settlement.utils import (
    compute_channel_id,
    get_batch_settlement_eip712_domain,
)
from x402.mechanisms.evm.constants import PERMIT2_ADDRESS
from x402.schemas import PaymentRequirements

from app.backends.rpc import RpcFailure
from app.backends.token import selector
from app.devnet import BASE_USDC, PROJECT_ROOT, DevChain, Service, place_batch_settlement_contracts
from app.x402.batch_settlement import payload as ours
from tests.support import USDC, RpcSigner, abi_type, calldata, send_signed

pytestmark = pytest.mark.integration

NETWORK = "eip155:8453"
CHAIN_ID = 8453
ESCROW = BATCH_SETTLEMENT_ADDRESS
ERC3009_COLLECTOR = ERC3009_DEPOSIT_COLLECTOR_ADDRESS
PERMIT2_COLLECTOR = PERMIT2_DEPOSIT_COLLECTOR_ADDRESS
DELAY = 900  # seconds, the scheme's minimum withdraw delay
DEPOSIT = 1 * USDC
MAX_UINT = 2**256 - 1
ZERO = "0x" + "00" * 20
TX_GAS = 29_000_000  # below anvil's 30M block gas limit: room for a 100-channel batch

DEPOSITED = keccak(b"Deposited(bytes32,address,address,uint128,uint128)")
CLAIMED = keccak(b"Claimed(bytes32,address,address,uint128,uint128)")
SETTLED = keccak(b"Settled(address,address,address,uint128)")
WITHDRAW_INITIATED = keccak(b"WithdrawInitiated(bytes32,address,uint128,uint256)")
WITHDRAW_CANCELED = keccak(b"WithdrawCanceled(bytes32)")
WITHDRAWN = keccak(b"Withdrawn(bytes32,address,uint128)")
REFUNDED = keccak(b"Refunded(bytes32,address,address,uint128)")


# --- parties, transactions and reads over the project's RPC client -----------------------------------


@dataclass(frozen=True)
class Key:
    """A fresh secp256k1 key with gas money on the chain."""

    key: str

    @property
    def address(self) -> str:
        """The checksummed address of ``key``."""
        return str(Account.from_key(self.key).address)

    @property
    def signer(self) -> EthAccountSigner:
        """The official client's eth_account signer for ``key``."""
        return EthAccountSigner(Account.from_key(self.key))


def new_key(chain: DevChain, eth: int = 10**20) -> Key:
    """A new random key whose address holds ``eth`` wei (100 ETH by default) for gas."""
    made = Key("0x" + os.urandom(32).hex())
    chain.set_eth(made.address, eth)
    return made


@dataclass(frozen=True)
class Parties:
    """The payer (holds USDC), the receiver (gets settled money), its authorizer (signs claim
    batches and refunds), the relayer (submits transactions) and a stranger (may do nothing)."""

    payer: Key
    receiver: Key
    authorizer: Key
    relayer: Key
    stranger: Key


def send(chain: DevChain, sender: Key, to: str, data: bytes, gas: int = 2_000_000) -> dict[str, Any]:
    """Sign ``data`` to ``to`` with ``sender``'s key and broadcast it with a fixed ``gas`` limit (so a
    reverting call is mined too); returns the receipt once mined."""
    return send_signed(chain, sender.key, to, data, gas)


def sent_ok(chain: DevChain, sender: Key, to: str, data: bytes, gas: int = 2_000_000) -> dict[str, Any]:
    """``send`` that must succeed; returns the receipt."""
    receipt = send(chain, sender, to, data, gas)
    assert receipt["status"] == "0x1", f"reverted: {revert_data(chain, sender, to, data)}"
    return receipt


def revert_data(chain: DevChain, sender: Key, to: str, data: bytes) -> str | None:
    """What ``data`` from ``sender`` reverts with in ``eth_call`` (0x-hex); None when it does not."""
    try:
        chain.rpc.call("eth_call", [{"from": sender.address, "to": to, "data": "0x" + data.hex()}, "latest"])
    except RpcFailure as refused:
        return str(refused.error.data)
    return None


def error(signature: str, types: tuple[str, ...] = (), args: tuple[Any, ...] = ()) -> str:
    """The revert data of a custom error (or ``Error(string)``) as 0x-hex."""
    return "0x" + (selector(signature) + encode(list(types), list(args))).hex()


def reason(text: str) -> str:
    """The revert data of ``require(..., text)``."""
    return error("Error(string)", ("string",), (text,))


def assert_reverts(chain: DevChain, sender: Key, data: bytes, expected: str, to: str = ESCROW) -> None:
    """``data`` to ``to`` from ``sender`` reverts with ``expected`` in simulation; mined it fails and
    the escrow's USDC does not move."""
    assert revert_data(chain, sender, to, data) == expected
    before = chain.balance(ESCROW)
    assert send(chain, sender, to, data)["status"] == "0x0"
    assert chain.balance(ESCROW) == before


def view(chain: DevChain, name: str, args: list[Any]) -> Any:
    """Call the escrow's view ``name`` with ``args`` through the official ABI; one output unwrapped."""
    (function,) = [f for f in BATCH_SETTLEMENT_ABI if f.get("name") == name and f["type"] == "function"]
    data = calldata(BATCH_SETTLEMENT_ABI, name, args)
    answer = chain.rpc.call("eth_call", [{"to": ESCROW, "data": "0x" + data.hex()}, "latest"])
    values = decode([abi_type(o) for o in function["outputs"]], bytes.fromhex(answer[2:]))
    return values[0] if len(values) == 1 else values


def escrow_data(name: str, *args: Any) -> bytes:
    """Calldata of the escrow's ``name`` with ``args``, encoded from the official ABI."""
    return calldata(BATCH_SETTLEMENT_ABI, name, list(args))


def cid(config: ChannelConfig) -> bytes:
    """The official client's channel id of ``config`` on Base, as 32 bytes."""
    return bytes.fromhex(compute_channel_id(config, CHAIN_ID)[2:])


def state(chain: DevChain, config: ChannelConfig) -> tuple[int, int]:
    """``channels(id)``: (balance, totalClaimed)."""
    return tuple(view(chain, "channels", [cid(config)]))  # type: ignore[return-value]


def logs(receipt: dict[str, Any], topic: bytes) -> list[dict[str, Any]]:
    """The escrow's logs in ``receipt`` whose first topic is ``topic``."""
    return [
        log
        for log in receipt["logs"]
        if log["address"].lower() == ESCROW.lower() and log["topics"][0] == "0x" + topic.hex()
    ]


def word(value: str | int | bytes) -> str:
    """An indexed topic (0x + 32 bytes) of an address, integer or bytes32."""
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, str):
        return "0x" + value[2:].lower().rjust(64, "0")
    return "0x" + value.to_bytes(32, "big").hex()


def latest_timestamp(chain: DevChain) -> int:
    """The latest block's timestamp (unix seconds)."""
    return int(chain.rpc.call("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)


# --- the official client's channels, deposits, vouchers and claims -----------------------------------


def requirement(parties: Parties, amount: int = DEPOSIT, timeout: int = 3600) -> PaymentRequirements:
    """A ``batch-settlement`` requirement on Base for the test USDC, paying ``parties.receiver``."""
    return PaymentRequirements(
        scheme="batch-settlement",
        network=NETWORK,
        asset=BASE_USDC,
        amount=str(amount),
        pay_to=parties.receiver.address,
        max_timeout_seconds=timeout,
        extra={
            "name": "USD Coin",
            "version": "2",
            "receiverAuthorizer": parties.authorizer.address,
            "withdrawDelay": DELAY,
        },
    )


def channel(
    parties: Parties,
    payer: str | None = None,
    payer_authorizer: str | None = None,
    authorizer: str | None = None,
    salt: bytes | None = None,
) -> ChannelConfig:
    """A channel config (official type) from ``parties``: the payer signs its own vouchers unless
    ``payer_authorizer`` is given (the zero address: the payer contract answers EIP-1271)."""
    payer = payer or parties.payer.address
    return ChannelConfig(
        payer=payer,
        payer_authorizer=payer if payer_authorizer is None else payer_authorizer,
        receiver=parties.receiver.address,
        receiver_authorizer=authorizer or parties.authorizer.address,
        token=BASE_USDC,
        withdraw_delay=DELAY,
        salt="0x" + (salt or os.urandom(32)).hex(),
    )


def eip3009_deposit(
    parties: Parties, config: ChannelConfig, amount: int = DEPOSIT, signer: Any = None
) -> DepositPayload:
    """The official client's ERC-3009 deposit payload (authorization + a voucher for ``amount``)."""
    return create_batch_settlement_eip3009_deposit_payload(
        signer or parties.payer.signer, requirement(parties), config, amount, amount
    )


def deposit_data(payload: DepositPayload, collector_data: bytes | None = None) -> bytes:
    """``deposit`` calldata for ``payload``, with the collector and its data as the official
    facilitator builds them (``collector_data`` overrides the data)."""
    assert payload.channel_config is not None and payload.deposit is not None
    auth = payload.deposit.authorization
    if auth.erc3009_authorization is not None:
        collector, data = ERC3009_COLLECTOR, build_eip3009_deposit_collector_data(payload)
    else:
        collector, data = PERMIT2_COLLECTOR, build_permit2_deposit_collector_data(payload)
    return escrow_data(
        "deposit",
        to_contract_channel_config(payload.channel_config),
        int(payload.deposit.amount),
        collector,
        data if collector_data is None else collector_data,
    )


def funded(chain: DevChain, parties: Parties, config: ChannelConfig, amount: int = DEPOSIT) -> None:
    """Mint ``amount`` to the payer and deposit it into ``config``'s channel over ERC-3009."""
    chain.mint(config.payer, amount)
    sent_ok(chain, parties.relayer, ESCROW, deposit_data(eip3009_deposit(parties, config, amount)))


def voucher_claim(
    config: ChannelConfig, max_claimable: int, total: int, signer: EthAccountSigner | RpcSigner
) -> VoucherClaim:
    """A claim of ``total`` against a voucher for ``max_claimable`` signed by ``signer`` (official
    ``sign_voucher``)."""
    voucher = sign_voucher(signer, compute_channel_id(config, CHAIN_ID), max_claimable, NETWORK)
    return VoucherClaim(
        channel=config,
        max_claimable_amount=voucher.max_claimable_amount,
        signature=voucher.signature,
        total_claimed=str(total),
    )


def claim_data(claims: list[VoucherClaim], authorizer: Key) -> bytes:
    """``claimWithSignature`` calldata: the official claim tuples and ``authorizer``'s official
    ``ClaimBatch`` signature."""
    signature = sign_claim_batch(LocalAuthorizerSigner(authorizer.key), claims, NETWORK)
    return escrow_data("claimWithSignature", build_voucher_claim_args(claims), bytes.fromhex(signature[2:]))


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def placed(chain: DevChain) -> dict[str, str]:
    """The escrow and both collectors at their canonical addresses (Permit2 and the token are placed by
    the session's ``chain`` fixture)."""
    return place_batch_settlement_contracts(chain)


@pytest.fixture
def parties(chain: DevChain, placed: dict[str, str]) -> Parties:
    """Fresh parties with 100 ETH each; the payer also holds 10 USDC."""
    made = Parties(*(new_key(chain) for _ in range(5)))
    chain.mint(made.payer.address, 10 * USDC)
    return made


def warp(chain: DevChain, seconds: int) -> None:
    """Move the chain clock ``seconds`` ahead and mine a block there."""
    chain.rpc.call("evm_increaseTime", [seconds])
    chain.rpc.call("evm_mine", [])


# --- gas ---------------------------------------------------------------------------------------------


def claim_with_signature_gas(chain: DevChain, channels: int) -> int:
    """Gas used by one ``claimWithSignature`` transaction claiming ``channels`` fresh channels (one
    payer, one receiver and authorizer, a voucher and a first claim per channel; the receiver's
    running total is written for the first time in this transaction). The channels are funded in
    one ``multicall`` of ERC-3009 deposits. Returns the receipt's ``gasUsed``."""
    parties = Parties(*(new_key(chain) for _ in range(5)))
    configs = [channel(parties) for _ in range(channels)]
    chain.mint(parties.payer.address, channels * DEPOSIT)
    deposits = [deposit_data(eip3009_deposit(parties, config)) for config in configs]
    sent_ok(chain, parties.relayer, ESCROW, escrow_data("multicall", deposits), gas=TX_GAS)
    claims = [voucher_claim(c, DEPOSIT, DEPOSIT // 2, parties.payer.signer) for c in configs]
    receipt = sent_ok(chain, parties.relayer, ESCROW, claim_data(claims, parties.authorizer), gas=TX_GAS)
    assert len(logs(receipt, CLAIMED)) == channels
    assert view(chain, "receivers", [parties.receiver.address, BASE_USDC]) == (channels * DEPOSIT // 2, 0)
    return int(receipt["gasUsed"], 16)


# --- tests -------------------------------------------------------------------------------------------


def test_the_contracts_sit_where_the_sdk_looks_with_its_abi_domain_and_channel_id(
    placed: dict[str, str], chain: DevChain, parties: Parties
) -> None:
    assert placed == {
        "x402BatchSettlement": BATCH_SETTLEMENT_ADDRESS,
        "ERC3009DepositCollector": ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        "Permit2DepositCollector": PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    }
    assert (ESCROW, ERC3009_COLLECTOR, PERMIT2_COLLECTOR) == (
        ours.BATCH_SETTLEMENT_ADDRESS,
        ours.ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        ours.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    )
    for name, address in placed.items():
        artifact = json.loads((PROJECT_ROOT / "contracts" / f"{name}.json").read_text())
        assert chain.rpc.call("eth_getCode", [address, "latest"]) == artifact["deployedBytecode"]

    # Every function and event of the official ABI, with the same inputs and outputs.
    ours_abi = json.loads((PROJECT_ROOT / "contracts" / "x402BatchSettlement.json").read_text())["abi"]

    def shape(entry: dict[str, Any]) -> tuple[Any, ...]:
        inputs = tuple((abi_type(p), p.get("indexed", False)) for p in entry["inputs"])
        outputs = tuple(abi_type(p) for p in entry.get("outputs", []))
        return entry["type"], entry["name"], inputs, outputs, entry.get("stateMutability")

    published = {shape(entry) for entry in BATCH_SETTLEMENT_ABI}
    assert published <= {shape(entry) for entry in ours_abi if entry["type"] in ("function", "event")}

    domain = get_batch_settlement_eip712_domain(CHAIN_ID)
    separator = encode_typed_data(
        domain_data=domain,
        message_types=VOUCHER_TYPES,
        message_data={"channelId": b"\0" * 32, "maxClaimableAmount": 0},
    ).header
    raw = chain.rpc.call(
        "eth_call", [{"to": ESCROW, "data": "0x" + selector("DOMAIN_SEPARATOR()").hex()}, "latest"]
    )
    (answer,) = decode(["bytes32"], bytes.fromhex(raw[2:]))
    assert answer == separator == ours.batch_domain_separator(CHAIN_ID)

    for payer_authorizer in (None, ZERO):
        config = channel(parties, payer_authorizer=payer_authorizer)
        onchain = view(chain, "getChannelId", [to_contract_channel_config(config)])
        mine = ours.ChannelConfig(
            payer=config.payer.lower(),
            payer_authorizer=config.payer_authorizer.lower(),
            receiver=config.receiver.lower(),
            receiver_authorizer=config.receiver_authorizer.lower(),
            token=config.token.lower(),
            withdraw_delay=config.withdraw_delay,
            salt=bytes.fromhex(config.salt[2:]),
        )
        assert onchain == cid(config) == ours.channel_id(mine, CHAIN_ID)

    config = channel(parties)
    channel_id = cid(config)
    voucher = sign_voucher(parties.payer.signer, "0x" + channel_id.hex(), 777, NETWORK)
    digest = view(chain, "getVoucherDigest", [channel_id, 777])
    assert digest == ours.voucher_digest(channel_id, 777, CHAIN_ID)
    assert (
        Account._recover_hash(digest, signature=bytes.fromhex(voucher.signature[2:])) == parties.payer.address
    )
    refund_digest = view(chain, "getRefundDigest", [channel_id, 3, 555])
    expected = encode_typed_data(
        domain_data=domain,
        message_types=REFUND_TYPES,
        message_data={"channelId": channel_id, "nonce": 3, "amount": 555},
    )
    assert refund_digest == keccak(b"\x19\x01" + expected.header + expected.body)
    claims = [
        voucher_claim(config, 900, 400, parties.payer.signer),
        voucher_claim(channel(parties), 5, 5, parties.payer.signer),
    ]
    batch_digest = view(chain, "getClaimBatchDigest", [build_voucher_claim_args(claims)])
    batch_signature = sign_claim_batch(LocalAuthorizerSigner(parties.authorizer.key), claims, NETWORK)
    recovered = Account._recover_hash(batch_digest, signature=bytes.fromhex(batch_signature[2:]))
    assert recovered == parties.authorizer.address


def test_an_erc3009_deposit_lands_once_and_only_in_its_own_channel(chain: DevChain, parties: Parties) -> None:
    config = channel(parties)
    payload = eip3009_deposit(parties, config)
    before = chain.balance(ESCROW), chain.balance(parties.payer.address)

    receipt = sent_ok(chain, parties.relayer, ESCROW, deposit_data(payload))

    assert state(chain, config) == (DEPOSIT, 0)
    assert (chain.balance(ESCROW), chain.balance(parties.payer.address)) == (
        before[0] + DEPOSIT,
        before[1] - DEPOSIT,
    )
    assert chain.balance(ERC3009_COLLECTOR) == 0
    (log,) = logs(receipt, DEPOSITED)
    assert log["topics"][1:] == [word(cid(config)), word(config.payer), word(ERC3009_COLLECTOR)]
    assert decode(["uint128", "uint128"], bytes.fromhex(log["data"][2:])) == (DEPOSIT, DEPOSIT)

    used = reason("FiatTokenV2: authorization is used or canceled")
    assert_reverts(chain, parties.relayer, deposit_data(payload), used)

    # The same signed authorization offered to another channel of the same payer: the collector
    # derives the nonce from that channel's id, so the token sees another message.
    other = channel(parties)
    fresh = eip3009_deposit(parties, config)
    stolen = escrow_data(
        "deposit",
        to_contract_channel_config(other),
        DEPOSIT,
        ERC3009_COLLECTOR,
        build_eip3009_deposit_collector_data(fresh),
    )
    assert_reverts(chain, parties.relayer, stolen, reason("FiatTokenV2: invalid signature"))
    assert state(chain, other) == (0, 0)
    sent_ok(chain, parties.relayer, ESCROW, deposit_data(fresh))  # still good for its own channel
    assert state(chain, config) == (2 * DEPOSIT, 0)

    # Only the escrow may use a collector; only the canonical collectors may be used.
    direct = selector("collect(address,address,uint256,bytes32,bytes)") + encode(
        ["address", "address", "uint256", "bytes32", "bytes"],
        [config.payer, BASE_USDC, DEPOSIT, cid(config), build_eip3009_deposit_collector_data(fresh)],
    )
    assert revert_data(chain, parties.relayer, ERC3009_COLLECTOR, direct) == error("OnlyBatchSettlement()")
    assert revert_data(chain, parties.relayer, PERMIT2_COLLECTOR, direct) == error("OnlyBatchSettlement()")
    rogue = escrow_data("deposit", to_contract_channel_config(config), DEPOSIT, parties.stranger.address, b"")
    assert revert_data(chain, parties.relayer, ESCROW, rogue) == error(
        "UnknownCollector(address)", ("address",), (parties.stranger.address,)
    )
    short = ChannelConfig(**{**config.__dict__, "withdraw_delay": DELAY - 1})
    too_soon = escrow_data("deposit", to_contract_channel_config(short), DEPOSIT, ERC3009_COLLECTOR, b"")
    assert revert_data(chain, parties.relayer, ESCROW, too_soon) == error(
        "WithdrawDelayOutOfRange(uint40)", ("uint40",), (DELAY - 1,)
    )


def test_a_permit2_deposit_lands_after_the_payer_approved_permit2(chain: DevChain, parties: Parties) -> None:
    config = channel(parties)
    payload = create_batch_settlement_permit2_deposit_payload(
        parties.payer.signer, requirement(parties), config, DEPOSIT, DEPOSIT
    )
    failed = reason("TRANSFER_FROM_FAILED")
    assert_reverts(chain, parties.relayer, deposit_data(payload), failed)  # no allowance yet
    approve = selector("approve(address,uint256)") + encode(
        ["address", "uint256"], [PERMIT2_ADDRESS, MAX_UINT]
    )
    sent_ok(chain, parties.payer, BASE_USDC, approve)
    before = chain.balance(ESCROW)

    receipt = sent_ok(chain, parties.relayer, ESCROW, deposit_data(payload))

    assert state(chain, config) == (DEPOSIT, 0)
    assert chain.balance(ESCROW) == before + DEPOSIT
    assert chain.balance(PERMIT2_COLLECTOR) == 0
    (log,) = logs(receipt, DEPOSITED)
    assert log["topics"][3] == word(PERMIT2_COLLECTOR)
    assert_reverts(chain, parties.relayer, deposit_data(payload), error("InvalidNonce()"))
    other = channel(parties)  # the witness binds the channel
    again = create_batch_settlement_permit2_deposit_payload(
        parties.payer.signer, requirement(parties), config, DEPOSIT, DEPOSIT
    )
    moved = DepositPayload(channel_config=other, voucher=again.voucher, deposit=again.deposit)
    assert_reverts(chain, parties.relayer, deposit_data(moved), error("InvalidSigner()"))


def test_a_permit2_deposit_with_an_eip2612_permit_needs_no_approval_and_survives_a_used_permit(
    chain: DevChain, parties: Parties
) -> None:
    nonce_of = selector("nonces(address)") + encode(["address"], [parties.payer.address])

    def permit(value: int) -> bytes:
        answer = chain.rpc.call("eth_call", [{"to": BASE_USDC, "data": "0x" + nonce_of.hex()}, "latest"])
        signed = Account.from_key(parties.payer.key).sign_typed_data(
            {"name": "USD Coin", "version": "2", "chainId": CHAIN_ID, "verifyingContract": BASE_USDC},
            {
                "Permit": [
                    {"name": "owner", "type": "address"},
                    {"name": "spender", "type": "address"},
                    {"name": "value", "type": "uint256"},
                    {"name": "nonce", "type": "uint256"},
                    {"name": "deadline", "type": "uint256"},
                ]
            },
            {
                "owner": parties.payer.address,
                "spender": PERMIT2_ADDRESS,
                "value": value,
                "nonce": int(answer, 16),
                "deadline": MAX_UINT,
            },
        )
        return build_eip2612_permit_data(
            str(value),
            str(MAX_UINT),
            signed.v,
            "0x" + signed.r.to_bytes(32, "big").hex(),
            "0x" + signed.s.to_bytes(32, "big").hex(),
        )

    config = channel(parties)
    first = create_batch_settlement_permit2_deposit_payload(
        parties.payer.signer, requirement(parties), config, DEPOSIT, DEPOSIT
    )
    eip2612 = permit(3 * DEPOSIT)
    sent_ok(
        chain,
        parties.relayer,
        ESCROW,
        deposit_data(first, build_permit2_deposit_collector_data(first, eip2612)),
    )
    assert state(chain, config) == (DEPOSIT, 0)
    assert chain.rpc.call("eth_getTransactionCount", [parties.payer.address, "latest"]) == "0x0"

    # The same (now used) permit again: the token refuses it, the collector goes on with the
    # allowance the first one left.
    second = create_batch_settlement_permit2_deposit_payload(
        parties.payer.signer, requirement(parties), config, DEPOSIT, DEPOSIT
    )
    sent_ok(
        chain,
        parties.relayer,
        ESCROW,
        deposit_data(second, build_permit2_deposit_collector_data(second, eip2612)),
    )
    assert state(chain, config) == (2 * DEPOSIT, 0)


def test_claim_with_signature_over_several_channels_credits_the_receiver_and_skips_stale_entries(
    chain: DevChain, parties: Parties
) -> None:
    first, second = channel(parties), channel(parties)
    funded(chain, parties, first)
    funded(chain, parties, second)
    claims = [
        voucher_claim(first, 600_000, 250_000, parties.payer.signer),
        voucher_claim(second, 800_000, 800_000, parties.payer.signer),
    ]

    receipt = sent_ok(chain, parties.relayer, ESCROW, claim_data(claims, parties.authorizer))

    assert (state(chain, first), state(chain, second)) == ((DEPOSIT, 250_000), (DEPOSIT, 800_000))
    assert view(chain, "receivers", [parties.receiver.address, BASE_USDC]) == (1_050_000, 0)
    claimed = logs(receipt, CLAIMED)
    assert [log["topics"][1] for log in claimed] == [word(cid(first)), word(cid(second))]
    assert claimed[0]["topics"][2:] == [word(parties.receiver.address), word(BASE_USDC)]
    assert decode(["uint128", "uint128"], bytes.fromhex(claimed[0]["data"][2:])) == (250_000, 250_000)

    # One entry stale (not above the channel's totalClaimed), one fresh: the batch lands, the stale
    # entry changes nothing.
    again = [
        voucher_claim(first, 600_000, 600_000, parties.payer.signer),
        voucher_claim(second, 800_000, 700_000, parties.payer.signer),
    ]
    receipt = sent_ok(chain, parties.relayer, ESCROW, claim_data(again, parties.authorizer))
    assert (state(chain, first), state(chain, second)) == ((DEPOSIT, 600_000), (DEPOSIT, 800_000))
    assert view(chain, "receivers", [parties.receiver.address, BASE_USDC]) == (1_400_000, 0)
    (log,) = logs(receipt, CLAIMED)
    assert decode(["uint128", "uint128"], bytes.fromhex(log["data"][2:])) == (600_000, 350_000)

    # claim() directly from the receiver authorizer needs no batch signature; anyone else is refused.
    direct = escrow_data(
        "claim", build_voucher_claim_args([voucher_claim(first, 900_000, 700_000, parties.payer.signer)])
    )
    assert_reverts(chain, parties.stranger, direct, error("NotReceiverAuthorizer()"))
    sent_ok(chain, parties.authorizer, ESCROW, direct)
    assert state(chain, first) == (DEPOSIT, 700_000)


def test_bad_claims_revert_the_whole_batch(chain: DevChain, parties: Parties) -> None:
    config = channel(parties)
    funded(chain, parties, config)
    channel_id = cid(config)
    good = voucher_claim(config, 500_000, 100_000, parties.payer.signer)

    impostor = new_key(chain)
    assert_reverts(
        chain, parties.relayer, claim_data([good], impostor), error("InvalidAuthorizerSignature()")
    )
    over_voucher = voucher_claim(config, 500_000, 500_001, parties.payer.signer)
    assert_reverts(
        chain,
        parties.relayer,
        claim_data([good, over_voucher], parties.authorizer),
        error(
            "ClaimExceedsVoucher(bytes32,uint128,uint128)",
            ("bytes32", "uint128", "uint128"),
            (channel_id, 500_001, 500_000),
        ),
    )
    over_balance = voucher_claim(config, 2 * DEPOSIT, DEPOSIT + 1, parties.payer.signer)
    assert_reverts(
        chain,
        parties.relayer,
        claim_data([over_balance], parties.authorizer),
        error(
            "ClaimExceedsBalance(bytes32,uint128,uint128)",
            ("bytes32", "uint128", "uint128"),
            (channel_id, DEPOSIT + 1, DEPOSIT),
        ),
    )
    forged = voucher_claim(config, 500_000, 100_000, impostor.signer)
    assert_reverts(
        chain,
        parties.relayer,
        claim_data([forged], parties.authorizer),
        error("InvalidVoucherSignature(bytes32)", ("bytes32",), (channel_id,)),
    )
    foreign = channel(parties, authorizer=impostor.address)
    mixed = build_voucher_claim_args([good, voucher_claim(foreign, 1, 1, parties.payer.signer)])
    signature = bytes.fromhex(
        sign_claim_batch(LocalAuthorizerSigner(parties.authorizer.key), [good], NETWORK)[2:]
    )
    assert_reverts(
        chain,
        parties.relayer,
        escrow_data("claimWithSignature", mixed, signature),
        error("AuthorizerMismatch(uint256)", ("uint256",), (1,)),
    )
    assert_reverts(
        chain, parties.relayer, escrow_data("claimWithSignature", [], signature), error("EmptyClaims()")
    )
    assert state(chain, config) == (DEPOSIT, 0)
    sent_ok(chain, parties.relayer, ESCROW, claim_data([good], parties.authorizer))
    assert state(chain, config) == (DEPOSIT, 100_000)


def test_a_contract_wallet_payer_signs_vouchers_through_eip1271(chain: DevChain, parties: Parties) -> None:
    wallet = Account.create().address
    artifact = json.loads((PROJECT_ROOT / "contracts" / "ERC1271Wallet.json").read_text())
    chain.rpc.call("anvil_setCode", [wallet, artifact["deployedBytecode"]])
    chain.transact(wallet, selector("setOwner(address)") + encode(["address"], [parties.payer.address]))
    signer = RpcSigner(parties.payer.key, chain.rpc, address=wallet)
    config = channel(parties, payer=wallet, payer_authorizer=ZERO)
    chain.mint(wallet, DEPOSIT)
    sent_ok(chain, parties.relayer, ESCROW, deposit_data(eip3009_deposit(parties, config, signer=signer)))
    assert state(chain, config) == (DEPOSIT, 0)

    sent_ok(
        chain,
        parties.relayer,
        ESCROW,
        claim_data([voucher_claim(config, 400_000, 300_000, signer)], parties.authorizer),
    )
    assert state(chain, config) == (DEPOSIT, 300_000)

    # The same owner's plain ECDSA signature does not stand in for the wallet once it refuses.
    chain.transact(wallet, selector("setRefuse(bool)") + encode(["bool"], [True]))
    refused = claim_data([voucher_claim(config, 400_000, 400_000, signer)], parties.authorizer)
    assert_reverts(
        chain,
        parties.relayer,
        refused,
        error("InvalidVoucherSignature(bytes32)", ("bytes32",), (cid(config),)),
    )


def test_settle_sweeps_claimed_money_to_the_receiver_once(chain: DevChain, parties: Parties) -> None:
    config = channel(parties)
    funded(chain, parties, config)
    sent_ok(
        chain,
        parties.relayer,
        ESCROW,
        claim_data([voucher_claim(config, DEPOSIT, 420_000, parties.payer.signer)], parties.authorizer),
    )
    before = chain.balance(ESCROW)

    receipt = sent_ok(
        chain, parties.stranger, ESCROW, escrow_data("settle", parties.receiver.address, BASE_USDC)
    )

    assert chain.balance(parties.receiver.address) == 420_000
    assert chain.balance(ESCROW) == before - 420_000
    assert view(chain, "receivers", [parties.receiver.address, BASE_USDC]) == (420_000, 420_000)
    (log,) = logs(receipt, SETTLED)
    assert log["topics"][1:] == [
        word(parties.receiver.address),
        word(BASE_USDC),
        word(parties.stranger.address),
    ]
    assert decode(["uint128"], bytes.fromhex(log["data"][2:])) == (420_000,)

    receipt = sent_ok(
        chain, parties.stranger, ESCROW, escrow_data("settle", parties.receiver.address, BASE_USDC)
    )
    assert receipt["logs"] == []
    assert chain.balance(parties.receiver.address) == 420_000
    assert state(chain, config) == (DEPOSIT, 420_000)  # settling does not touch the channel


def test_a_withdrawal_waits_its_delay_and_pays_the_unclaimed_rest(
    chain: DevChain, parties: Parties, time_travel: None
) -> None:
    config = channel(parties)
    funded(chain, parties, config)
    sent_ok(
        chain,
        parties.relayer,
        ESCROW,
        claim_data([voucher_claim(config, DEPOSIT, 300_000, parties.payer.signer)], parties.authorizer),
    )
    contract_config = to_contract_channel_config(config)
    initiate = escrow_data("initiateWithdraw", contract_config, DEPOSIT)
    finalize = escrow_data("finalizeWithdraw", contract_config)

    assert_reverts(chain, parties.stranger, initiate, error("NotPayer()"))
    assert_reverts(chain, parties.stranger, finalize, error("NoPendingWithdrawal()"))
    receipt = sent_ok(chain, parties.payer, ESCROW, initiate)
    started = latest_timestamp(chain)
    assert view(chain, "pendingWithdrawals", [cid(config)]) == (DEPOSIT, started)
    (log,) = logs(receipt, WITHDRAW_INITIATED)
    assert decode(["uint128", "uint256"], bytes.fromhex(log["data"][2:])) == (DEPOSIT, started + DELAY)
    ready_at = error("WithdrawNotReady(uint256)", ("uint256",), (started + DELAY,))
    assert_reverts(chain, parties.payer, finalize, ready_at)

    warp(chain, DELAY)
    payer_before = chain.balance(parties.payer.address)
    receipt = sent_ok(chain, parties.stranger, ESCROW, finalize)

    assert chain.balance(parties.payer.address) == payer_before + DEPOSIT - 300_000
    assert state(chain, config) == (300_000, 300_000)
    assert view(chain, "pendingWithdrawals", [cid(config)]) == (0, 0)
    (log,) = logs(receipt, WITHDRAWN)
    assert decode(["uint128"], bytes.fromhex(log["data"][2:])) == (DEPOSIT - 300_000,)
    assert_reverts(chain, parties.payer, finalize, error("NoPendingWithdrawal()"))
    assert_reverts(chain, parties.payer, initiate, error("NothingToWithdraw()"))
    # What was claimed before is still the receiver's.
    sent_ok(chain, parties.relayer, ESCROW, escrow_data("settle", parties.receiver.address, BASE_USDC))
    assert chain.balance(parties.receiver.address) == 300_000


def test_a_claim_landing_before_finalize_wins_the_withdraw_race(
    chain: DevChain, parties: Parties, time_travel: None
) -> None:
    config = channel(parties)
    funded(chain, parties, config)
    voucher = voucher_claim(config, 600_000, 600_000, parties.payer.signer)  # signed before the withdrawal
    contract_config = to_contract_channel_config(config)
    sent_ok(chain, parties.payer, ESCROW, escrow_data("initiateWithdraw", contract_config, DEPOSIT))
    warp(chain, DELAY)

    sent_ok(chain, parties.relayer, ESCROW, claim_data([voucher], parties.authorizer))
    payer_before = chain.balance(parties.payer.address)
    sent_ok(chain, parties.payer, ESCROW, escrow_data("finalizeWithdraw", contract_config))

    assert chain.balance(parties.payer.address) == payer_before + 400_000
    assert state(chain, config) == (600_000, 600_000)

    # A deposit while a withdrawal is pending cancels it.
    funded(chain, parties, config)
    sent_ok(chain, parties.payer, ESCROW, escrow_data("initiateWithdraw", contract_config, 1))
    chain.mint(parties.payer.address, DEPOSIT)
    receipt = sent_ok(chain, parties.relayer, ESCROW, deposit_data(eip3009_deposit(parties, config)))
    assert state(chain, config) == (600_000 + 2 * DEPOSIT, 600_000)
    (log,) = logs(receipt, WITHDRAW_CANCELED)
    assert log["topics"][1] == word(cid(config))
    assert view(chain, "pendingWithdrawals", [cid(config)]) == (0, 0)
    warp(chain, DELAY)
    assert revert_data(
        chain, parties.payer, ESCROW, escrow_data("finalizeWithdraw", contract_config)
    ) == error("NoPendingWithdrawal()")


def test_refunds_pay_the_payer_back_by_signature_once_or_from_the_receiver(
    chain: DevChain, parties: Parties
) -> None:
    config = channel(parties)
    funded(chain, parties, config)
    channel_id = cid(config)
    contract_config = to_contract_channel_config(config)
    authorizer = LocalAuthorizerSigner(parties.authorizer.key)
    signature = sign_refund(authorizer, "0x" + channel_id.hex(), 250_000, 0, NETWORK)
    data = escrow_data("refundWithSignature", contract_config, 250_000, 0, bytes.fromhex(signature[2:]))
    payer_before = chain.balance(parties.payer.address)

    receipt = sent_ok(chain, parties.stranger, ESCROW, data)

    assert chain.balance(parties.payer.address) == payer_before + 250_000
    assert state(chain, config) == (DEPOSIT - 250_000, 0)
    assert view(chain, "refundNonce", [channel_id]) == 1
    (log,) = logs(receipt, REFUNDED)
    assert log["topics"][1:] == [word(channel_id), word(config.payer), word(parties.stranger.address)]
    replay = error("InvalidRefundNonce(uint256,uint256)", ("uint256", "uint256"), (1, 0))
    assert_reverts(chain, parties.stranger, data, replay)
    forged = sign_refund(LocalAuthorizerSigner(parties.stranger.key), "0x" + channel_id.hex(), 1, 1, NETWORK)
    forged_data = escrow_data("refundWithSignature", contract_config, 1, 1, bytes.fromhex(forged[2:]))
    assert_reverts(chain, parties.stranger, forged_data, error("InvalidAuthorizerSignature()"))

    assert_reverts(chain, parties.stranger, escrow_data("refund", contract_config, 1), error("NotReceiver()"))
    assert_reverts(chain, parties.payer, escrow_data("refund", contract_config, 1), error("NotReceiver()"))
    sent_ok(
        chain,
        parties.relayer,
        ESCROW,
        claim_data([voucher_claim(config, DEPOSIT, 150_000, parties.payer.signer)], parties.authorizer),
    )
    # More than is unclaimed: the refund pays what is left (balance - totalClaimed), as the official
    # facilitator's refund accounting expects.
    payer_before = chain.balance(parties.payer.address)
    sent_ok(chain, parties.receiver, ESCROW, escrow_data("refund", contract_config, DEPOSIT))
    assert chain.balance(parties.payer.address) == payer_before + DEPOSIT - 250_000 - 150_000
    assert state(chain, config) == (150_000, 150_000)
    assert_reverts(
        chain, parties.authorizer, escrow_data("refund", contract_config, 1), error("NothingToRefund()")
    )


def test_multicall_claims_and_settles_in_one_transaction(chain: DevChain, parties: Parties) -> None:
    first, second = channel(parties), channel(parties)
    funded(chain, parties, first)
    funded(chain, parties, second)
    claims = [
        voucher_claim(first, DEPOSIT, 111_111, parties.payer.signer),
        voucher_claim(second, DEPOSIT, 222_222, parties.payer.signer),
    ]
    calls = [
        claim_data(claims, parties.authorizer),
        escrow_data("settle", parties.receiver.address, BASE_USDC),
    ]

    receipt = sent_ok(chain, parties.relayer, ESCROW, escrow_data("multicall", calls))

    assert len(logs(receipt, CLAIMED)) == 2 and len(logs(receipt, SETTLED)) == 1
    assert chain.balance(parties.receiver.address) == 333_333
    assert view(chain, "receivers", [parties.receiver.address, BASE_USDC]) == (333_333, 333_333)
    # An inner failure reverts the whole multicall with the inner error.
    bad = [
        escrow_data("settle", parties.receiver.address, BASE_USDC),
        escrow_data("claim", build_voucher_claim_args(claims)),
    ]
    assert_reverts(chain, parties.relayer, escrow_data("multicall", bad), error("NotReceiverAuthorizer()"))


def test_the_official_facilitator_claims_and_settles_against_these_contracts(
    anvil: Service, chain: DevChain, parties: Parties
) -> None:
    config = channel(parties)
    funded(chain, parties, config)
    facilitator = FacilitatorWeb3Signer(parties.relayer.key, anvil.url, gas_limit=1_000_000)
    claims = ClaimPayload(claims=[voucher_claim(config, DEPOSIT, 345_678, parties.payer.signer)])

    claimed = execute_claim_with_signature(
        facilitator, claims, requirement(parties), LocalAuthorizerSigner(parties.authorizer.key)
    )

    assert claimed.success, (claimed.error_reason, claimed.error_message)
    assert state(chain, config) == (DEPOSIT, 345_678)
    settled = execute_settle(
        facilitator, SettlePayload(receiver=parties.receiver.address, token=BASE_USDC), requirement(parties)
    )
    assert settled.success, (settled.error_reason, settled.error_message)
    assert chain.balance(parties.receiver.address) == 345_678
    again = execute_settle(
        facilitator, SettlePayload(receiver=parties.receiver.address, token=BASE_USDC), requirement(parties)
    )
    assert not again.success


def test_claim_with_signature_gas_for_1_10_and_100_channels(chain: DevChain, placed: dict[str, str]) -> None:
    gas = {n: claim_with_signature_gas(chain, n) for n in (1, 10, 100)}
    print(f"claimWithSignature gas used: {gas}")
    assert gas[1] < 100_000
    assert gas[10] < 350_000
    assert gas[100] < 3_000_000
    assert (gas[100] - gas[10]) / 90 < 30_000  # per extra channel
