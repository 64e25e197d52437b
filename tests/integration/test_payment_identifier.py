"""Idempotent retries with the ``payment-identifier`` extension (issue 16 §1), on anvil, real Redis
and the stand-in host; payments made by the official PyPI x402 client, the id attached with its own
``append_payment_identifier_to_extensions``."""

from __future__ import annotations

import base64
import json
import socket
import time
from typing import Any

import pytest
import redis
import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.extensions.payment_identifier import append_payment_identifier_to_extensions
from x402.http.x402_http_client import x402HTTPClientSync
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequired

from app.devnet.standin import StandinModel
from app.payments.replay import replay_key
from tests.support import CHAT_BODY, Proxy, approve_permit2, moved_since, proxy_with, settle_response

pytestmark = pytest.mark.integration

MARKER = "zq-identifier-privacy-marker-7731"


def signed_header(proxy: Proxy, body: dict[str, Any], payment_id: str | None, scheme: str = "exact") -> str:
    """A ``PAYMENT-SIGNATURE`` made by the official client for ``body``'s 402, with ``payment_id``
    attached by the official helper (None: the declaration echoed, no id)."""
    challenge = json.loads(base64.b64decode(proxy.post(body=body).headers["PAYMENT-REQUIRED"]))
    challenge["accepts"] = [entry for entry in challenge["accepts"] if entry["scheme"] == scheme]
    client = x402ClientSync()
    signer = EthAccountSigner(Account.from_key(proxy.wallets.payer_key))
    if scheme == "exact":
        register_exact_evm_client(client, signer)
    else:
        client.register("eip155:*", UptoEvmClientScheme(signer))
    http = x402HTTPClientSync(client)
    payload = http.create_payment_payload(PaymentRequired.model_validate(challenge))
    extensions = dict(payload.extensions or {})
    if payment_id is not None:
        append_payment_identifier_to_extensions(extensions, payment_id)
    payload.extensions = extensions
    return str(http.encode_payment_signature_header(payload)["PAYMENT-SIGNATURE"])


def post(proxy: Proxy, body: dict[str, Any], header: str, **kwargs: Any) -> requests.Response:
    return requests.post(
        proxy.url + "/v1/chat/completions",
        json=body,
        headers={"PAYMENT-SIGNATURE": header},
        timeout=30,
        **kwargs,
    )


def test_the_402_declares_an_optional_payment_identifier(proxy: Proxy) -> None:
    challenge = json.loads(base64.b64decode(proxy.post().headers["PAYMENT-REQUIRED"]))
    declared = challenge["extensions"]["payment-identifier"]
    assert declared["info"]["required"] is False  # a real boolean, or the official client attaches nothing
    assert declared["schema"]["properties"]["id"]["pattern"] == "^[a-zA-Z0-9_-]+$"


@pytest.mark.parametrize("scheme", ["exact", "upto"])
def test_a_retry_with_the_same_id_gets_the_same_answer_and_pays_once(
    proxy: Proxy, standin: StandinModel, scheme: str
) -> None:
    if scheme == "upto":
        approve_permit2(proxy.chain, proxy.wallets.payer)
    header = signed_header(proxy, CHAT_BODY, "retry-" + scheme + "-0001-abcdef", scheme)
    before = proxy.balances()

    first = post(proxy, CHAT_BODY, header)
    again = post(proxy, CHAT_BODY, header)  # a dropped connection, an SDK retry, another worker

    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.content == first.content
    assert again.headers["PAYMENT-RESPONSE"] == first.headers["PAYMENT-RESPONSE"]
    assert again.headers["X-Receipt"] == first.headers["X-Receipt"]
    assert len(standin.received) == 1  # one model call
    assert moved_since(proxy, before) == int(
        settle_response(first).get("amount") or proxy.requirement()["amount"]
    )


def test_a_stream_is_replayed_whole(proxy: Proxy, standin: StandinModel) -> None:
    body = {**CHAT_BODY, "stream": True}
    header = signed_header(proxy, body, "stream-replay-0001-abcdef")
    first = post(proxy, body, header)
    again = post(proxy, body, header)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and b"data: [DONE]" in again.content
    assert len(standin.received) == 1


def test_the_same_id_for_another_payment_is_a_conflict_and_changes_nothing(
    proxy: Proxy, standin: StandinModel
) -> None:
    payment_id = "conflict-0001-abcdefgh"
    paid = post(proxy, CHAT_BODY, signed_header(proxy, CHAT_BODY, payment_id))
    assert paid.status_code == 200
    before, calls = proxy.balances(), len(standin.received)

    other_body = {**CHAT_BODY, "max_tokens": 32}
    other_payment = post(proxy, other_body, signed_header(proxy, other_body, payment_id))
    same_header_other_body = post(proxy, other_body, paid.request.headers["PAYMENT-SIGNATURE"])

    for refused in (other_payment, same_header_other_body):
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "payment_identifier_conflict"
    assert proxy.balances() == before and len(standin.received) == calls


def test_a_call_refused_or_failed_keeps_nothing_and_its_retry_takes_the_payment_path(
    proxy: Proxy, standin: StandinModel
) -> None:
    """The host fails (both tries): 502 with the payment redeemable; the retry with the same id is
    served by that payment, not replayed as a 502, and paid once."""
    standin.behaviour.status, standin.behaviour.times = 500, 2
    header = signed_header(proxy, CHAT_BODY, "failed-first-0001-abcd")
    before = proxy.balances()
    failed = post(proxy, CHAT_BODY, header)
    assert failed.status_code == 502
    served = post(proxy, CHAT_BODY, header)
    assert served.status_code == 200, served.text
    assert moved_since(proxy, before) == int(proxy.requirement()["amount"])


def test_a_malformed_id_is_refused(proxy: Proxy, standin: StandinModel) -> None:
    header = signed_header(proxy, CHAT_BODY, None)
    wire = json.loads(base64.b64decode(header))
    wire["extensions"]["payment-identifier"]["info"]["id"] = "short"
    refused = post(proxy, CHAT_BODY, base64.b64encode(json.dumps(wire).encode()).decode())
    assert refused.status_code == 402
    assert (
        json.loads(base64.b64decode(refused.headers["PAYMENT-REQUIRED"]))["error"]
        == "invalid_payment_identifier"
    )
    assert standin.received == []


def test_kept_answers_are_unreadable_at_rest(
    proxy: Proxy, standin: StandinModel, redis_client: redis.Redis
) -> None:
    """Neither the prompt nor the completion is in Redis in plain text: the kept answer is sealed
    with a key derived from the payment header, which Redis never sees."""
    body = {**CHAT_BODY, "messages": [{"role": "user", "content": f"tell me about {MARKER}"}]}
    payment_id = "privacy-0001-abcdefgh"
    answered = post(proxy, body, signed_header(proxy, body, payment_id))
    completion = answered.json()["choices"][0]["message"]["content"]
    assert answered.status_code == 200 and completion
    kept = redis_client.hgetall(replay_key(payment_id))
    assert set(kept) == {b"fp", b"state", b"blob"}
    assert payment_id.encode() not in b"".join(redis_client.scan_iter("x402:*"))  # only its hash
    everything = b"".join(
        key + b"".join(redis_client.hgetall(key).values()) if redis_client.type(key) == b"hash" else key
        for key in redis_client.scan_iter("x402:*")
    )
    secrets = (MARKER, completion, answered.headers["X-Receipt"], payment_id)
    for secret in (text.encode() for text in secrets):
        assert secret not in everything


def test_a_dropped_connection_is_retried_without_a_second_charge(proxy: Proxy, standin: StandinModel) -> None:
    """The buyer's connection drops while the model works: nothing is handed over, so nothing is
    kept; the payment stays redeemable and the retry with the same id is served by it, paid once."""
    standin.behaviour.delay = 0.5
    header = signed_header(proxy, CHAT_BODY, "dropped-0001-abcdefgh")
    before = proxy.balances()
    host, port = proxy.url.removeprefix("http://").split(":")
    payload = json.dumps(CHAT_BODY).encode()
    with socket.create_connection((host, int(port))) as dropped:
        dropped.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: "
            + host.encode()
            + b"\r\nContent-Type: application/json\r\n"
            b"PAYMENT-SIGNATURE: "
            + header.encode()
            + b"\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )
        time.sleep(0.1)  # the proxy has the request; the buyer goes away before the answer
    deadline = time.monotonic() + 10
    while len(standin.received) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the first request ends (its payment settled, the buyer gone)
    standin.behaviour.delay = 0.0

    retried = post(proxy, CHAT_BODY, header)

    assert retried.status_code == 200, retried.text
    assert moved_since(proxy, before) == int(proxy.requirement()["amount"])


@pytest.mark.parametrize("scheme", ["exact", "upto"])
def test_a_stream_dropped_midway_is_finished_and_replayed_whole(
    proxy: Proxy, standin: StandinModel, scheme: str
) -> None:
    """The buyer reads the first bytes of a paid stream and hangs up: the proxy reads the rest from
    the host all the same, so the retry under the id gets the whole stream, paid once."""
    if scheme == "upto":
        approve_permit2(proxy.chain, proxy.wallets.payer)
    standin.behaviour.chunk_delay = 0.2
    body = {**CHAT_BODY, "stream": True}
    header = signed_header(proxy, body, f"dropped-stream-{scheme}-0001", scheme)
    before = proxy.balances()
    with post(proxy, body, header, stream=True) as dropped:
        assert dropped.status_code == 200
        next(dropped.iter_content(chunk_size=None))  # the first bytes, then the connection closes
    deadline = time.monotonic() + 30
    while (retried := post(proxy, body, header)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)  # the first request is still reading the host
    assert retried.status_code == 200, retried.text
    assert b"data: [DONE]" in retried.content and b"tok4" in retried.content
    assert len(standin.received) == 1
    charged = proxy.balances()[1] - before[1]
    assert charged > 0 and moved_since(proxy, before) == charged
    assert post(proxy, body, header).content == retried.content


def test_another_proxy_over_the_same_redis_replays_the_answer(proxy: Proxy, standin: StandinModel) -> None:
    """Workers and hosts share the kept answers: the retry reaches another process."""
    header = signed_header(proxy, CHAT_BODY, "two-hosts-0001-abcdefg")
    before = proxy.balances()
    first = post(proxy, CHAT_BODY, header)
    for other in proxy_with(proxy):
        again = post(other, CHAT_BODY, header)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and len(standin.received) == 1
    assert moved_since(proxy, before) == int(proxy.requirement()["amount"])
