"""The pure ``batch-settlement`` protocol (``app.x402.batch_settlement``): parsing, the channel id,
the EIP-712 digests, the offline voucher checks.

The channel id and the digests are cross-checked against the official PyPI x402 2.25 code
(``compute_channel_id``, ``build_erc3009_deposit_nonce``, and eth-account's generic EIP-712 encoder
fed the official type definitions and domain), and the payloads come from the official
batch-settlement client run in-process, so a type string, field order or wire key that differs from
the scheme's fails here.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st
from x402.http.utils import encode_payment_required_header
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.batch_settlement import ChannelConfig as OfficialConfig
from x402.mechanisms.evm.batch_settlement import compute_channel_id
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions
from x402.mechanisms.evm.batch_settlement.client.refund import RefundOptions, _RefundResponse
from x402.mechanisms.evm.batch_settlement.client.storage import (
    BatchSettlementClientContext,
    InMemoryClientChannelStorage,
)
from x402.mechanisms.evm.batch_settlement.constants import BATCH_PERMIT2_WITNESS_TYPES, VOUCHER_TYPES
from x402.mechanisms.evm.batch_settlement.encoding import build_erc3009_deposit_nonce
from x402.mechanisms.evm.batch_settlement.utils import get_batch_settlement_eip712_domain
from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo

from app.x402.batch_settlement import (
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    MAX_WITHDRAW_DELAY,
    MIN_WITHDRAW_DELAY,
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    ZERO_ADDRESS,
    BatchPayment,
    ChannelConfig,
    ChannelTerms,
    Erc3009Deposit,
    Permit2Deposit,
    Voucher,
    channel_id,
    check_amounts,
    check_voucher,
    erc3009_deposit_nonce,
    payload_of,
    permit2_deposit_digest,
    receive_authorization_digest,
    voucher_digest,
)
from app.x402.batch_settlement import checks as bs
from app.x402.batch_settlement import payload as wire_codes
from app.x402.batch_settlement.payload import PayloadKind
from app.x402.eip712 import recover_signer
from app.x402.upto import PERMIT2_ADDRESS
from app.x402.verdict import INVALID_PAYLOAD, Verdict
from app.x402.wire import Requirement

PAYER_KEY = "0x" + "11" * 32
AUTHORIZER_KEY = "0x" + "12" * 32
PAYER = Account.from_key(PAYER_KEY).address.lower()
PAYER_AUTHORIZER = Account.from_key(AUTHORIZER_KEY).address.lower()
PAY_TO = "0x" + "22" * 20
RECEIVER_AUTHORIZER = "0x" + "44" * 20
USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
CHAIN_ID = 8453
MAXIMUM = 2_500
DELAY = 900
REQUIREMENT = Requirement(
    network="eip155:8453",
    amount=MAXIMUM,
    asset=USDC,
    pay_to=PAY_TO,
    max_timeout_seconds=120,
    asset_name="USD Coin",
    asset_version="2",
    scheme="batch-settlement",
)
TERMS = ChannelTerms.of(REQUIREMENT, RECEIVER_AUTHORIZER, DELAY)

addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
bytes32 = st.binary(min_size=32, max_size=32)
configs = st.builds(
    ChannelConfig,
    payer=addresses,
    payer_authorizer=st.one_of(st.just(ZERO_ADDRESS), addresses),
    receiver=addresses,
    receiver_authorizer=addresses,
    token=addresses,
    withdraw_delay=st.integers(0, 2**40 - 1),
    salt=bytes32,
)
chain_ids = st.integers(1, 2**64)
uint128 = st.integers(0, 2**128 - 1)


def accepts(method: str | None = None) -> dict[str, Any]:
    """Our 402 entry for ``REQUIREMENT`` as the scheme's spec shapes it."""
    extra: dict[str, Any] = {
        "receiverAuthorizer": RECEIVER_AUTHORIZER,
        "withdrawDelay": DELAY,
        "name": REQUIREMENT.asset_name,
        "version": REQUIREMENT.asset_version,
        "minDeposit": str(MAXIMUM * 10),
    }
    if method:
        extra["assetTransferMethod"] = method
    return {**REQUIREMENT.to_v2(), "extra": extra}


def official_client(storage: InMemoryClientChannelStorage | None = None) -> BatchSettlementEvmScheme:
    """The official client for a payer whose vouchers a separate authorizer key signs."""
    options = BatchSettlementEvmSchemeOptions(
        storage=storage or InMemoryClientChannelStorage(),
        voucher_signer=EthAccountSigner(Account.from_key(AUTHORIZER_KEY)),
    )
    return BatchSettlementEvmScheme(EthAccountSigner(Account.from_key(PAYER_KEY)), options)


def official_wire(
    method: str | None = None, channel: BatchSettlementClientContext | None = None
) -> dict[str, Any]:
    """A v2 payload as the official client builds it: a deposit on a new channel, a voucher on one
    whose local state is ``channel``."""
    entry = accepts(method)
    requirements = PaymentRequirements.model_validate(entry)
    storage = InMemoryClientChannelStorage()
    client = official_client(storage)
    if channel is not None:
        config = client.build_channel_config(requirements)
        storage.set(compute_channel_id(config, CHAIN_ID).lower(), channel)
    return {"x402Version": 2, "accepted": entry, "payload": client.create_payment_payload(requirements)}


def official_refund_wire(amount: str | None) -> dict[str, Any]:
    """The whole ``PAYMENT-SIGNATURE`` the official client sends to ask for a refund, captured from
    its public ``refund`` (which first probes the URL for the 402)."""
    storage = InMemoryClientChannelStorage()
    client = official_client(storage)
    requirements = PaymentRequirements.model_validate(accepts())
    config = client.build_channel_config(requirements)
    key = compute_channel_id(config, CHAIN_ID).lower()
    storage.set(key, BatchSettlementClientContext(charged_cumulative_amount="7000", balance="25000"))
    required = PaymentRequired(
        x402_version=2,
        error="payment_required",
        resource=ResourceInfo(url="https://proxy.test/v1/chat/completions"),
        accepts=[requirements],
    )
    sent: list[str] = []

    class Captured(Exception):
        pass

    def fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
        if "PAYMENT-SIGNATURE" in headers:
            sent.append(headers["PAYMENT-SIGNATURE"])
            raise Captured
        return _RefundResponse(402, {"PAYMENT-REQUIRED": encode_payment_required_header(required)})

    with pytest.raises(Captured):
        client.refund("https://proxy.test/v1/chat/completions", RefundOptions(amount=amount, fetch=fetch))
    return json.loads(base64.b64decode(sent[0]))


def parsed(wire: dict[str, Any]) -> BatchPayment:
    payment = payload_of(wire)
    assert isinstance(payment, BatchPayment), payment
    return payment


def official_config(config: ChannelConfig) -> OfficialConfig:
    return OfficialConfig.from_dict({**config.to_wire(), "salt": "0x" + config.salt.hex()})


def eip712_digest(domain: dict[str, Any], types: dict[str, Any], message: dict[str, Any]) -> bytes:
    signable = encode_typed_data(domain_data=domain, message_types=types, message_data=message)
    return keccak(b"\x19\x01" + signable.header + signable.body)


# -- the channel id and the digests, against the official code ------------------------------------


@settings(max_examples=60, deadline=None)
@given(config=configs, chain_id=chain_ids)
def test_the_channel_id_is_the_official_one(config: ChannelConfig, chain_id: int) -> None:
    expected = compute_channel_id(official_config(config), chain_id)
    assert channel_id(config, chain_id) == bytes.fromhex(expected[2:])


@settings(max_examples=60, deadline=None)
@given(channel=bytes32, max_claimable=uint128, chain_id=chain_ids)
def test_the_voucher_digest_is_the_eip712_hash_of_the_official_voucher_type(
    channel: bytes, max_claimable: int, chain_id: int
) -> None:
    domain = get_batch_settlement_eip712_domain(chain_id)
    message = {"channelId": channel, "maxClaimableAmount": max_claimable}
    assert voucher_digest(channel, max_claimable, chain_id) == eip712_digest(domain, VOUCHER_TYPES, message)


@settings(max_examples=30, deadline=None)
@given(channel=bytes32, salt=bytes32)
def test_the_erc3009_deposit_nonce_is_the_official_one(channel: bytes, salt: bytes) -> None:
    expected = build_erc3009_deposit_nonce("0x" + channel.hex(), "0x" + salt.hex())
    assert erc3009_deposit_nonce(channel, salt) == bytes.fromhex(expected[2:])


@settings(max_examples=30, deadline=None)
@given(parts=st.tuples(addresses, uint128, addresses, uint128, uint128, bytes32), chain_id=chain_ids)
def test_the_permit2_deposit_digest_is_the_eip712_hash_of_the_official_witness_type(
    parts: tuple[Any, ...], chain_id: int
) -> None:
    token, amount, spender, nonce, deadline, channel = parts
    permit = Permit2Deposit(PAYER, token, amount, spender, nonce, deadline, channel, b"")
    domain = {"name": "Permit2", "chainId": chain_id, "verifyingContract": PERMIT2_ADDRESS}
    message = {
        "permitted": {"token": token, "amount": amount},
        "spender": spender,
        "nonce": nonce,
        "deadline": deadline,
        "witness": {"channelId": channel},
    }
    assert permit2_deposit_digest(permit, chain_id) == eip712_digest(
        domain, BATCH_PERMIT2_WITNESS_TYPES, message
    )


# -- what the official client sends --------------------------------------------------------------


def test_the_official_erc3009_deposit_parses_and_passes() -> None:
    payment = parsed(official_wire())
    assert payment.kind == "deposit" and payment.deposit is not None
    assert payment.config == ChannelConfig(
        PAYER, PAYER_AUTHORIZER, PAY_TO, RECEIVER_AUTHORIZER, USDC.lower(), DELAY, bytes(32)
    )
    assert payment.voucher.max_claimable == MAXIMUM
    assert isinstance(payment.deposit.authorization, Erc3009Deposit)
    assert payment.deposit.amount == MAXIMUM * 10  # the 402's minDeposit
    digest = receive_authorization_digest(
        payment, CHAIN_ID, REQUIREMENT.asset_name, REQUIREMENT.asset_version
    )
    assert recover_signer(digest, payment.deposit.authorization.signature) == PAYER
    checked = check_voucher(payment, TERMS, charged=0, maximum=MAXIMUM, balance=payment.deposit.amount)
    assert checked.verdict and checked.ecdsa_signer


def test_the_official_permit2_deposit_parses_and_its_signature_recovers_to_the_payer() -> None:
    payment = parsed(official_wire("permit2"))
    assert payment.deposit is not None
    permit = payment.deposit.authorization
    assert isinstance(permit, Permit2Deposit)
    assert (permit.from_, permit.token, permit.amount) == (PAYER, USDC.lower(), payment.deposit.amount)
    assert permit.spender == PERMIT2_DEPOSIT_COLLECTOR_ADDRESS.lower()
    assert permit.channel_id == payment.voucher.channel_id == channel_id(payment.config, CHAIN_ID)
    assert recover_signer(permit2_deposit_digest(permit, CHAIN_ID), permit.signature) == PAYER
    assert check_voucher(payment, TERMS, charged=0, maximum=MAXIMUM, balance=permit.amount).verdict


def test_the_official_voucher_on_an_open_channel_parses_and_passes() -> None:
    state = BatchSettlementClientContext(charged_cumulative_amount="7000", balance="25000")
    payment = parsed(official_wire(channel=state))
    assert payment.kind == "voucher" and payment.deposit is None
    assert payment.voucher.max_claimable == 7_000 + MAXIMUM
    checked = check_voucher(payment, TERMS, charged=7_000, maximum=MAXIMUM, balance=25_000, claimed=7_000)
    assert checked.verdict and checked.ecdsa_signer
    stale = check_voucher(payment, TERMS, charged=6_000, maximum=MAXIMUM, balance=25_000)
    assert stale.verdict.reason == bs.CUMULATIVE_AMOUNT_MISMATCH


@pytest.mark.parametrize("amount", [None, "1500"])
def test_the_official_refund_request_parses_and_is_zero_charge(amount: str | None) -> None:
    payment = parsed(official_refund_wire(amount))
    assert payment.kind == "refund"
    assert payment.refund_amount == (None if amount is None else int(amount))
    assert payment.voucher.max_claimable == 7_000
    checked = check_voucher(payment, TERMS, charged=7_000, maximum=MAXIMUM, balance=25_000)
    assert checked.verdict and checked.ecdsa_signer


def test_the_config_round_trips_to_the_wire_shape() -> None:
    wire = official_wire()
    assert parsed(wire).config.to_wire() == wire["payload"]["channelConfig"]


# -- signatures ----------------------------------------------------------------------------------


def signed(config: ChannelConfig, max_claimable: int, key: str = AUTHORIZER_KEY) -> BatchPayment:
    """A voucher payment for ``config`` signed by ``key`` with eth-account and the official types."""
    channel = channel_id(config, CHAIN_ID)
    signature = Account.sign_typed_data(
        key,
        domain_data=get_batch_settlement_eip712_domain(CHAIN_ID),
        message_types=VOUCHER_TYPES,
        message_data={"channelId": channel, "maxClaimableAmount": max_claimable},
    ).signature
    return BatchPayment("voucher", accepts(), config, Voucher(channel, max_claimable, bytes(signature)))


OURS = ChannelConfig(PAYER, PAYER_AUTHORIZER, PAY_TO, RECEIVER_AUTHORIZER, USDC.lower(), DELAY, b"\x07" * 32)


@settings(max_examples=40, deadline=None)
@given(max_claimable=st.integers(1, 2**128 - 1), salt=bytes32)
def test_a_voucher_signed_with_eth_account_recovers_to_the_payer_authorizer(
    max_claimable: int, salt: bytes
) -> None:
    payment = signed(dataclasses.replace(OURS, salt=salt), max_claimable)
    digest = voucher_digest(payment.voucher.channel_id, max_claimable, CHAIN_ID)
    assert recover_signer(digest, payment.voucher.signature) == PAYER_AUTHORIZER
    checked = check_voucher(payment, TERMS, charged=max_claimable - 1, maximum=1, balance=max_claimable)
    assert checked.verdict and checked.ecdsa_signer


CONFIG_CHANGES = {
    "payer": "0x" + "55" * 20,
    "payer_authorizer": "0x" + "55" * 20,
    "receiver": "0x" + "55" * 20,
    "receiver_authorizer": "0x" + "55" * 20,
    "token": "0x" + "55" * 20,
    "withdraw_delay": DELAY + 1,
    "salt": b"\x08" * 32,
}


@pytest.mark.parametrize("name", sorted(CONFIG_CHANGES))
def test_any_changed_config_field_breaks_the_channel_id(name: str) -> None:
    payment = signed(OURS, 5_000)
    changed = dataclasses.replace(payment, config=dataclasses.replace(OURS, **{name: CONFIG_CHANGES[name]}))
    checked = check_voucher(changed, TERMS, charged=2_500, maximum=MAXIMUM, balance=10_000)
    assert checked.verdict.reason == bs.CHANNEL_ID_MISMATCH


def test_a_changed_channel_id_or_amount_breaks_the_signature() -> None:
    payment = signed(OURS, 5_000)
    assert check_voucher(payment, TERMS, charged=2_500, maximum=MAXIMUM, balance=10_000).verdict
    more = dataclasses.replace(payment, voucher=dataclasses.replace(payment.voucher, max_claimable=5_001))
    checked = check_voucher(more, TERMS, charged=2_501, maximum=MAXIMUM, balance=10_000)
    assert checked.verdict.reason == bs.INVALID_VOUCHER_SIGNATURE
    other = dataclasses.replace(OURS, salt=b"\x09" * 32)  # a real channel, signature for another
    moved = dataclasses.replace(
        payment,
        config=other,
        voucher=dataclasses.replace(payment.voucher, channel_id=channel_id(other, CHAIN_ID)),
    )
    checked = check_voucher(moved, TERMS, charged=2_500, maximum=MAXIMUM, balance=10_000)
    assert checked.verdict.reason == bs.INVALID_VOUCHER_SIGNATURE
    alone = dataclasses.replace(
        payment, voucher=dataclasses.replace(payment.voucher, channel_id=b"\x01" * 32)
    )
    checked = check_voucher(alone, TERMS, charged=2_500, maximum=MAXIMUM, balance=10_000)
    assert checked.verdict.reason == bs.CHANNEL_ID_MISMATCH


def test_only_the_payer_authorizer_may_sign_and_only_canonically() -> None:
    by_payer = signed(OURS, 5_000, key=PAYER_KEY)
    checked = check_voucher(by_payer, TERMS, charged=2_500, maximum=MAXIMUM, balance=10_000)
    assert checked.verdict.reason == bs.INVALID_VOUCHER_SIGNATURE
    good = signed(OURS, 5_000)
    sig = good.voucher.signature
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    high_s = sig[:32] + (n - int.from_bytes(sig[32:64], "big")).to_bytes(32, "big") + bytes([sig[64] ^ 1])
    for bad in (high_s, sig + b"\x00"):
        tampered = dataclasses.replace(good, voucher=dataclasses.replace(good.voucher, signature=bad))
        checked = check_voucher(tampered, TERMS, charged=2_500, maximum=MAXIMUM, balance=10_000)
        assert checked.verdict.reason == bs.INVALID_VOUCHER_SIGNATURE
    zero_one = sig[:64] + bytes([sig[64] - 27])
    tampered = dataclasses.replace(good, voucher=dataclasses.replace(good.voucher, signature=zero_one))
    assert check_voucher(tampered, TERMS, charged=2_500, maximum=MAXIMUM, balance=10_000).verdict


def test_a_zero_payer_authorizer_leaves_the_signature_to_the_chain() -> None:
    smart = dataclasses.replace(OURS, payer_authorizer=ZERO_ADDRESS)
    payment = signed(smart, 5_000, key=PAYER_KEY)
    long_signature = dataclasses.replace(
        payment, voucher=dataclasses.replace(payment.voucher, signature=b"\x01" * 97)
    )
    for candidate in (payment, long_signature):
        checked = check_voucher(candidate, TERMS, charged=2_500, maximum=MAXIMUM, balance=10_000)
        assert checked.verdict and not checked.ecdsa_signer
    # the amounts are still checked offline
    checked = check_voucher(payment, TERMS, charged=2_499, maximum=MAXIMUM, balance=10_000)
    assert checked.verdict.reason == bs.CUMULATIVE_AMOUNT_MISMATCH


# -- each check at its boundary ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"receiver": "0x" + "55" * 20}, bs.RECEIVER_MISMATCH),
        ({"receiver_authorizer": "0x" + "55" * 20}, bs.RECEIVER_AUTHORIZER_MISMATCH),
        ({"receiver_authorizer": ZERO_ADDRESS}, bs.RECEIVER_AUTHORIZER_MISMATCH),
        ({"token": "0x" + "55" * 20}, bs.TOKEN_MISMATCH),
        ({"withdraw_delay": DELAY + 1}, bs.WITHDRAW_DELAY_MISMATCH),
    ],
)
def test_a_config_that_is_not_ours_is_refused(changes: dict[str, Any], reason: str) -> None:
    payment = signed(dataclasses.replace(OURS, **changes), 5_000)  # id and signature are right
    assert (
        check_voucher(payment, TERMS, charged=2_500, maximum=MAXIMUM, balance=10_000).verdict.reason == reason
    )


def test_our_terms_match_in_any_letter_case() -> None:
    from eth_utils import to_checksum_address

    shouting = dataclasses.replace(
        TERMS,
        receiver=to_checksum_address(PAY_TO),
        receiver_authorizer=RECEIVER_AUTHORIZER.upper().replace("X", "x"),
    )
    assert check_voucher(
        signed(OURS, 5_000), shouting, charged=2_500, maximum=MAXIMUM, balance=10_000
    ).verdict


@pytest.mark.parametrize(
    ("delay", "ok"),
    [
        (MIN_WITHDRAW_DELAY - 1, False),
        (MIN_WITHDRAW_DELAY, True),
        (MAX_WITHDRAW_DELAY, True),
        (MAX_WITHDRAW_DELAY + 1, False),
    ],
)
def test_the_withdraw_delay_bounds(delay: int, ok: bool) -> None:
    terms = dataclasses.replace(TERMS, withdraw_delay=delay)
    payment = signed(dataclasses.replace(OURS, withdraw_delay=delay), 5_000)
    verdict = check_voucher(payment, terms, charged=2_500, maximum=MAXIMUM, balance=10_000).verdict
    assert verdict.ok is ok
    assert ok or verdict.reason == bs.WITHDRAW_DELAY_OUT_OF_RANGE


def amounts(kind: PayloadKind, max_claimable: int, **state: int) -> Verdict:
    payment = BatchPayment(kind, {}, OURS, Voucher(b"", max_claimable, b""))
    return check_amounts(payment, **state)


def test_the_cumulative_is_charged_plus_this_calls_maximum_exactly() -> None:
    assert amounts("voucher", 5_000, charged=2_500, maximum=2_500, balance=5_000)
    for wrong in (4_999, 5_001):
        verdict = amounts("deposit", wrong, charged=2_500, maximum=2_500, balance=10_000)
        assert verdict.reason == bs.CUMULATIVE_AMOUNT_MISMATCH


def test_a_refund_voucher_charges_nothing() -> None:
    assert amounts("refund", 2_500, charged=2_500, maximum=2_500, balance=5_000)
    assert amounts("refund", 5_000, charged=2_500, maximum=2_500, balance=5_000).reason == (
        bs.CUMULATIVE_AMOUNT_MISMATCH
    )


def test_a_voucher_must_stay_within_the_balance() -> None:
    assert amounts("voucher", 5_000, charged=2_500, maximum=2_500, balance=5_000)
    over = amounts("voucher", 5_000, charged=2_500, maximum=2_500, balance=4_999)
    assert over.reason == bs.CUMULATIVE_EXCEEDS_BALANCE
    empty = amounts("voucher", 0, charged=0, maximum=0, balance=0)
    assert empty.reason == bs.CHANNEL_NOT_FOUND


def test_a_voucher_must_not_fall_below_the_claimed_total() -> None:
    # our charged total lags what the chain says was claimed (a lost Redis): refused, not re-sold
    assert amounts("voucher", 5_000, charged=2_500, maximum=2_500, balance=9_000, claimed=2_500)
    low = amounts("voucher", 5_000, charged=2_500, maximum=2_500, balance=9_000, claimed=2_501)
    assert low.reason == bs.CUMULATIVE_BELOW_CLAIMED
    assert amounts("refund", 2_500, charged=2_500, maximum=2_500, balance=9_000, claimed=2_500)
    refund_low = amounts("refund", 2_500, charged=2_500, maximum=2_500, balance=9_000, claimed=2_501)
    assert refund_low.reason == bs.CUMULATIVE_BELOW_CLAIMED


# -- the parser ----------------------------------------------------------------------------------


def test_other_schemes_are_left_to_their_parsers() -> None:
    assert payload_of({"x402Version": 2, "accepted": {"scheme": "exact"}}) is None
    assert payload_of({"x402Version": 1, "accepted": {"scheme": "batch-settlement"}}) is None
    assert payload_of(None) is None
    assert payload_of([]) is None


def edit(wire: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``wire`` with the value at a dotted path replaced (``...`` deletes it)."""
    node = wire
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return wire


VOUCHER = wire_codes.VOUCHER_PAYLOAD_INVALID
DEPOSIT = wire_codes.DEPOSIT_PAYLOAD_INVALID
REFUND = wire_codes.REFUND_PAYLOAD_INVALID


@pytest.mark.parametrize(
    ("builder", "path", "value", "reason"),
    [
        ("voucher", "extra", 1, INVALID_PAYLOAD),
        ("voucher", "resource", "x", INVALID_PAYLOAD),
        ("voucher", "payload", "x", wire_codes.PAYLOAD_TYPE_INVALID),
        ("voucher", "payload.type", "claim", wire_codes.PAYLOAD_TYPE_INVALID),
        ("voucher", "payload.type", ..., wire_codes.PAYLOAD_TYPE_INVALID),
        ("voucher", "payload.voucher.channelId", "0x1234", wire_codes.CHANNEL_ID_INVALID),
        ("voucher", "payload.voucher.channelId", 5, wire_codes.CHANNEL_ID_INVALID),
        ("voucher", "payload.voucher.maxClaimableAmount", 5, VOUCHER),
        ("voucher", "payload.voucher.maxClaimableAmount", "-1", VOUCHER),
        ("voucher", "payload.voucher.maxClaimableAmount", str(2**128), VOUCHER),
        ("voucher", "payload.voucher.signature", "0x1234", VOUCHER),
        ("voucher", "payload.voucher.extra", "1", VOUCHER),
        ("voucher", "payload.channelConfig.withdrawDelay", "900", VOUCHER),
        ("voucher", "payload.channelConfig.withdrawDelay", True, VOUCHER),
        ("voucher", "payload.channelConfig.withdrawDelay", 2**40, VOUCHER),
        ("voucher", "payload.channelConfig.salt", "0x00", VOUCHER),
        ("voucher", "payload.channelConfig.payer", "0x12", VOUCHER),
        ("voucher", "payload.channelConfig.payerAuthorizer", ..., VOUCHER),
        ("voucher", "payload.deposit", {}, VOUCHER),
        ("voucher", "payload.amount", "1", VOUCHER),
        ("deposit", "payload.deposit.amount", "1.5", DEPOSIT),
        ("deposit", "payload.deposit.authorization", {}, DEPOSIT),
        ("deposit", "payload.deposit.authorization.permit2Authorization", {}, DEPOSIT),
        ("deposit", "payload.deposit.authorization.erc3009Authorization.salt", "0x01", DEPOSIT),
        ("deposit", "payload.deposit.authorization.erc3009Authorization.validBefore", 9, DEPOSIT),
        ("deposit", "payload.deposit", ..., DEPOSIT),
        ("permit2", "payload.deposit.authorization.permit2Authorization.witness.channelId", "0x", DEPOSIT),
        ("permit2", "payload.deposit.authorization.permit2Authorization.nonce", "0x01", DEPOSIT),
        ("refund", "payload.amount", "0", REFUND),
        ("refund", "payload.amount", 5, REFUND),
        ("refund", "payload.refundNonce", "1", REFUND),
    ],
)
def test_malformed_payloads_are_refused_with_a_stable_reason(
    builder: str, path: str, value: Any, reason: str
) -> None:
    state = BatchSettlementClientContext(charged_cumulative_amount="7000", balance="25000")
    wire = {
        "voucher": lambda: official_wire(channel=state),
        "deposit": official_wire,
        "permit2": lambda: official_wire("permit2"),
        "refund": lambda: official_refund_wire("1500"),
    }[builder]()
    verdict = payload_of(edit(wire, path, value))
    assert isinstance(verdict, Verdict) and verdict.reason == reason, verdict


def test_the_deposit_collectors_are_the_official_ones() -> None:
    from x402.mechanisms.evm.batch_settlement import constants

    assert ERC3009_DEPOSIT_COLLECTOR_ADDRESS == constants.ERC3009_DEPOSIT_COLLECTOR_ADDRESS
    assert PERMIT2_DEPOSIT_COLLECTOR_ADDRESS == constants.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS
    assert wire_codes.BATCH_SETTLEMENT_ADDRESS == constants.BATCH_SETTLEMENT_ADDRESS
    assert (MIN_WITHDRAW_DELAY, MAX_WITHDRAW_DELAY) == (
        constants.MIN_WITHDRAW_DELAY,
        constants.MAX_WITHDRAW_DELAY,
    )


def test_the_reason_codes_are_the_official_ones() -> None:
    from x402.mechanisms.evm.batch_settlement import errors

    official = {value for name, value in vars(errors).items() if name.startswith("ERR_")}
    ours = {
        value
        for module in (bs, wire_codes)
        for name, value in vars(module).items()
        if isinstance(value, str) and value.startswith("invalid_batch_settlement_evm_") and name.isupper()
    }
    assert ours and ours <= official
