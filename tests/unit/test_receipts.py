"""Receipts as self-describing EIP-712 typed data (``app.payments.receipts``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from eth_account import Account

from app.payments.receipts import Receipt
from app.x402.codec import decode_header, encode_header

KEY = "0x" + "42" * 32
RECEIPT = Receipt(
    tx="0x" + "ab" * 32,
    payer="0x" + "11" * 20,
    amount=1234,
    model="hermes-3-8b-tee",
    network="eip155:8453",
    request_sha256="cd" * 32,
    response_sha256="ef" * 32,
    time=1_800_000_000,
    authorized=2470,
    usage="12+40",
).signed(KEY)


def test_a_receipt_round_trips_and_names_its_signer() -> None:
    again = Receipt.from_header(RECEIPT.to_header())
    assert again == RECEIPT
    assert again.signer() == Account.from_key(KEY).address


@pytest.mark.parametrize("field", ["amount", "authorized", "usage", "responseSha256", "payer"])
def test_any_signed_field_changed_no_longer_recovers_to_the_proxy(field: str) -> None:
    wire = decode_header(RECEIPT.to_header())
    value = wire["message"][field]
    wire["message"][field] = (
        value + 1 if isinstance(value, int) else ("0x" + "22" * 20 if field == "payer" else "x")
    )
    assert Receipt.from_header(encode_header(wire)).signer() != Account.from_key(KEY).address


def test_a_receipt_of_another_schema_or_domain_is_refused() -> None:
    for change in (
        lambda w: w["types"]["Receipt"].pop(),
        lambda w: w["domain"].update(version="9"),
        lambda w: w.update(primaryType="Other"),
        lambda w: w["message"].update(extra="1"),
    ):
        wire = json.loads(json.dumps(decode_header(RECEIPT.to_header())))
        change(wire)
        with pytest.raises(ValueError):
            Receipt.from_header(encode_header(wire))


def test_an_exact_receipt_has_no_maximum_and_no_usage() -> None:
    exact = dataclasses.replace(RECEIPT, authorized=0, usage="", signature="").signed(KEY)
    assert Receipt.from_header(exact.to_header()).signer() == Account.from_key(KEY).address


@pytest.mark.parametrize(
    ("field", "value"),
    [("network", "eip155"), ("amount", None), ("amount", 1000.5), ("amount", "1000"), ("usage", 5)],
)
def test_malformed_receipt_fields_are_refused_not_crashed_on(field: str, value: object) -> None:
    wire = decode_header(RECEIPT.to_header())
    wire["message"][field] = value
    with pytest.raises(ValueError):
        Receipt.from_header(encode_header(wire))


def test_the_receipt_domain_and_type_are_the_published_ones() -> None:
    typed = RECEIPT.typed_data()
    assert typed["domain"] == {"name": "x402-tee-proxy receipt", "version": "4", "chainId": 8453}
    assert typed["primaryType"] == "Receipt"
    names = ["tx", "payer", "amount", "model", "network", "requestSha256", "responseSha256", "time"]
    tee = ["teeMeasurement", "teeEvidence"]  # an attested enclave's measurement and evidence hash
    assert [f["name"] for f in typed["types"]["Receipt"]] == [*names, "authorized", "usage", *tee]
