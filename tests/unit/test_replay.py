"""Kept answers (``app.payments.replay``) and payment ids (``app.x402.extensions.payment_identifier``)."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag

from app.payments.answers import Answer
from app.payments.replay import seal, unseal
from app.settings import Settings
from app.x402.codec import decode_header, encode_header
from app.x402.extensions.payment_identifier import fingerprint, payment_identifier
from app.x402.verdict import Verdict

HEADER = encode_header({"x402Version": 2, "payload": {"signature": "0x" + "ab" * 65}})
FP = fingerprint(HEADER, "cd" * 32)
ANSWER = Answer(200, {"Content-Type": "application/json", "Date": "today", "X-Receipt": "r"}, b"")


def test_a_kept_answer_opens_only_with_its_header_and_id() -> None:
    blob = seal(ANSWER, b'{"choices": []}', HEADER, FP, "id-0001-abcdefghijk")
    again = unseal(blob, HEADER, FP, "id-0001-abcdefghijk")
    assert (again.status, again.body) == (200, b'{"choices": []}')
    assert again.headers == {
        "Content-Type": "application/json",
        "X-Receipt": "r",
    }  # not the per-response ones
    assert b"choices" not in blob
    other = encode_header({"x402Version": 2, "payload": {"signature": "0x" + "ac" * 65}})
    for header, payment_id, data in (
        (other, "id-0001-abcdefghijk", blob),  # another payment's header
        (HEADER, "id-0002-abcdefghijk", blob),  # the id is authenticated
        (HEADER, "id-0001-abcdefghijk", blob[:-1] + bytes([blob[-1] ^ 1])),  # changed at rest
    ):
        with pytest.raises(InvalidTag):
            unseal(data, header, FP, payment_id)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("a" * 15, False),
        ("a" * 16, True),
        ("A_z-09" * 21 + "ab", True),
        ("a" * 129, False),
        ("a" * 16 + "!", False),
    ],
)
def test_a_payment_id_is_16_to_128_of_letters_digits_dash_underscore(value: str, accepted: bool) -> None:
    header = encode_header({"x402Version": 2, "extensions": {"payment-identifier": {"info": {"id": value}}}})
    found = payment_identifier(decode_header(header))
    assert (found == value) if accepted else isinstance(found, Verdict)


def test_no_id_is_no_id() -> None:
    declared = {"payment-identifier": {"info": {"required": False}}}
    assert payment_identifier({"x402Version": 2, "extensions": declared}) is None
    assert payment_identifier(None) is None  # no header, or one that does not decode


def test_answers_are_kept_ten_minutes_by_default() -> None:
    env = {"X402_PAY_TO": "0x" + "11" * 20, "X402_RELAYER_KEY": "0x" + "22" * 32, "REDIS_URL": "redis://x"}
    assert Settings.from_env(env).replay_seconds == 600
    assert Settings.from_env({**env, "X402_REPLAY_SECONDS": "60"}).replay_seconds == 60
