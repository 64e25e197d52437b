"""Trust the buyer can check: signed receipts tying payment, request and answer; discovery."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import requests
from eth_account import Account
from eth_account.messages import encode_typed_data

from app.cli import main
from app.payments.receipts import STREAM_RECEIPT_PREFIX, Receipt, sha256_hex, verify_receipt
from app.x402.codec import decode_header, encode_header
from tests.support import CHAT_BODY, Proxy, proxy_with, settle_response

pytestmark = pytest.mark.integration


def paid_post(proxy: Proxy, body: dict, stream: bool = False) -> tuple[bytes, requests.Response]:
    """Pay for ``body`` sending exact bytes we keep, as a buyer saving its request would."""
    payment = proxy.payment(proxy.requirement(body))
    raw = json.dumps(body).encode()
    headers = {"PAYMENT-SIGNATURE": encode_header(payment.to_wire()), "Content-Type": "application/json"}
    response = requests.post(
        proxy.url + "/v1/chat/completions", data=raw, headers=headers, timeout=30, stream=stream
    )
    return raw, response


def receipt_address(proxy: Proxy) -> str:
    return requests.get(proxy.url + "/.well-known/x402", timeout=10).json()["receiptAddress"]


def test_paid_answer_carries_a_receipt_over_payment_request_and_response(proxy: Proxy) -> None:
    raw, response = paid_post(proxy, CHAT_BODY)
    assert response.status_code == 200
    receipt = Receipt.from_header(response.headers["X-Receipt"])
    address = receipt_address(proxy)
    assert verify_receipt(receipt, raw, response.content, address)
    assert receipt.tx == settle_response(response)["transaction"]
    assert receipt.payer == proxy.wallets.payer.lower() and receipt.network == "eip155:8453"
    assert receipt.amount == int(proxy.requirement()["amount"]) and receipt.model == "hermes-3-8b-tee"
    assert address != Account.from_key(proxy.settings.relayer_key).address  # never the relayer key
    tampered = response.content.replace(b"stand-in", b"stand-out")
    assert verify_receipt(receipt, raw, tampered, address).reason == "receipt_response_mismatch"
    assert verify_receipt(receipt, raw + b" ", response.content, address).reason == "receipt_request_mismatch"
    assert verify_receipt(receipt, raw, response.content, proxy.wallets.pay_to).reason == "receipt_signature"


def test_a_receipt_is_recovered_with_plain_eth_account(proxy: Proxy) -> None:
    """The receipt carries its EIP-712 domain, types and primaryType: eth-account alone recovers the
    proxy's receipt address from it (the three lines in the README)."""
    _raw, response = paid_post(proxy, CHAT_BODY)
    receipt = json.loads(base64.b64decode(response.headers["X-Receipt"]))
    typed = {key: receipt[key] for key in ("domain", "types", "primaryType", "message")}
    signer = Account.recover_message(encode_typed_data(full_message=typed), signature=receipt["signature"])
    assert signer == receipt_address(proxy)
    assert receipt["message"]["tx"] == settle_response(response)["transaction"]


def test_payment_response_carries_the_offer_receipt_extensions_receipt(proxy: Proxy) -> None:
    """``extensions["offer-receipt"].info.receipt`` as its spec says: format eip712, the payload, a
    signature over the spec's own Receipt type (not sent), by the proxy's receipt key. Only for the
    operator's own URL (``X402_PUBLIC_URL``): a client's Host header never names what is signed."""
    _raw, unnamed = paid_post(proxy, CHAT_BODY)
    assert "extensions" not in settle_response(unnamed)
    for public in proxy_with(proxy, public_url="https://api.example.test"):
        _raw, response = paid_post(public, CHAT_BODY)
        _raw, streamed = paid_post(public, {**CHAT_BODY, "stream": True})
        assert "extensions" not in settle_response(streamed)  # sent before anything was delivered
    settled = settle_response(response)
    info = settled["extensions"]["offer-receipt"]["info"]
    receipt = info["receipt"]
    assert (
        info["version"] == 1
        and receipt["format"] == "eip712"
        and set(receipt) == {"format", "payload", "signature"}
    )
    payload = receipt["payload"]
    assert payload["resourceUrl"] == "https://api.example.test/v1/chat/completions"
    assert payload["network"] == "eip155:8453"
    assert (payload["payer"], payload["transaction"]) == (settled["payer"], settled["transaction"])
    spec_types = {
        "EIP712Domain": [
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
        ],
        "Receipt": [
            {"name": "network", "type": "string"},
            {"name": "resourceUrl", "type": "string"},
            {"name": "payer", "type": "string"},
            {"name": "issuedAt", "type": "uint256"},
            {"name": "transaction", "type": "string"},
        ],
    }
    typed = {
        "domain": {"name": "x402 receipt", "version": "1", "chainId": 8453},
        "types": spec_types,
        "primaryType": "Receipt",
        "message": payload,
    }
    signer = Account.recover_message(encode_typed_data(full_message=typed), signature=receipt["signature"])
    assert signer == receipt_address(proxy)


def test_stream_ends_with_a_receipt_over_everything_streamed(proxy: Proxy) -> None:
    raw, response = paid_post(proxy, {**CHAT_BODY, "stream": True}, stream=True)
    streamed = b"".join(response.iter_content(None))
    head = Receipt.from_header(response.headers["X-Receipt"])
    assert head.response_sha256 == "" and head.request_sha256 == sha256_hex(raw)
    cut = streamed.rindex(STREAM_RECEIPT_PREFIX)
    final = Receipt.from_header(streamed[cut + len(STREAM_RECEIPT_PREFIX) :].strip().decode())
    assert verify_receipt(final, raw, streamed[:cut], receipt_address(proxy))
    assert final.tx == head.tx


def test_verify_receipt_command(proxy: Proxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, response = paid_post(proxy, CHAT_BODY)
    (tmp_path / "request.json").write_bytes(raw)
    (tmp_path / "response.json").write_bytes(response.content)
    common = [
        "verify-receipt",
        "--request",
        str(tmp_path / "request.json"),
        "--receipt",
        response.headers["X-Receipt"],
    ]
    assert main([*common, "--response", str(tmp_path / "response.json"), "--proxy", proxy.url]) == 0
    assert "valid:" in capsys.readouterr().out
    (tmp_path / "edited.json").write_bytes(response.content + b"\n")
    assert main([*common, "--response", str(tmp_path / "edited.json"), "--proxy", proxy.url]) == 1
    assert "receipt_response_mismatch" in capsys.readouterr().out
    raw_stream, streamed = paid_post(proxy, {**CHAT_BODY, "stream": True}, stream=True)
    (tmp_path / "stream-request.json").write_bytes(raw_stream)
    (tmp_path / "stream.txt").write_bytes(b"".join(streamed.iter_content(None)))
    stream_args = [
        "verify-receipt",
        "--request",
        str(tmp_path / "stream-request.json"),
        "--response",
        str(tmp_path / "stream.txt"),
        "--address",
        receipt_address(proxy),
    ]
    assert main(stream_args) == 0


def test_well_known_lists_paid_resources_prices_and_the_receipt_address(proxy: Proxy) -> None:
    discovery = requests.get(proxy.url + "/.well-known/x402", timeout=10).json()
    assert discovery["network"] == "eip155:8453" and discovery["payTo"] == proxy.wallets.pay_to
    assert discovery["asset"] == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert discovery["extra"] == {"name": "USD Coin", "version": "2"}
    resources = {(r["method"], r["resource"].removeprefix(proxy.url)) for r in discovery["listing"]}
    # the shape origin crawlers (x402scan) read: the same resources as "METHOD /path"
    assert discovery["version"] == 1 and discovery["instructions"]
    assert set(discovery["resources"]) == {f"{method} {path}" for method, path in resources}
    assert {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models/hermes-3-8b-tee/ping"),
    } <= resources
    chat = next(r for r in discovery["listing"] if r["resource"].endswith("/chat/completions"))
    assert chat["models"][0]["tee"] is True and chat["models"][0]["pricing"]["output_per_million"] > 0
    assert discovery["receiptAddress"] == Account.from_key(proxy.settings.receipt_key).address
    # how a wallet spends its credit: the sign-in extension, the balance route, the terms
    assert discovery["credit"] == {
        "signIn": "sign-in-with-x",
        "balance": "GET /v1/credit",
        "exactChange": True,
        "creditSeconds": 30 * 86400,
    }


def test_the_ping_402_files_every_model_under_one_route_template(proxy: Proxy) -> None:
    unpaid = requests.get(proxy.url + "/v1/models/hermes-3-8b-tee/ping", timeout=10)
    bazaar = decode_header(unpaid.headers["PAYMENT-REQUIRED"])["extensions"]["bazaar"]
    assert bazaar["routeTemplate"] == "/v1/models/:model/ping"
    assert bazaar["info"]["input"]["pathParams"] == {"model": "hermes-3-8b-tee"}


def test_402_carries_the_bazaar_discovery_extension_and_stays_small(proxy: Proxy) -> None:
    response = proxy.post()
    header = response.headers["PAYMENT-REQUIRED"]
    assert len(header) < 8192
    bazaar = decode_header(header)["extensions"]["bazaar"]
    assert bazaar["info"]["input"]["method"] == "POST" and bazaar["info"]["input"]["bodyType"] == "json"
    assert bazaar["info"]["input"]["body"]["model"] == "hermes-3-8b-tee"
    assert bazaar["schema"]["properties"]["input"]["required"] == ["type", "method", "bodyType", "body"]
    ping = decode_header(
        requests.get(proxy.url + "/v1/models/hermes-3-8b-tee/ping", timeout=10).headers["PAYMENT-REQUIRED"]
    )
    ping_input = ping["extensions"]["bazaar"]["info"]["input"]
    assert ping_input == {"type": "http", "method": "GET", "pathParams": {"model": "hermes-3-8b-tee"}}


def test_privacy_audit_a_prompt_leaves_no_trace(proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    """A full paid call with a unique marker in the prompt: the marker is in no log line, no Redis
    key or value, no metric, no receipt field."""
    import os

    import redis

    marker = "audit-marker-" + os.urandom(8).hex()
    body = {"model": "hermes-3-8b-tee", "messages": [{"role": "user", "content": marker}], "max_tokens": 8}
    with caplog.at_level("DEBUG"):
        raw, response = paid_post(proxy, body)
    assert response.status_code == 200
    assert marker not in "\n".join(r.getMessage() for r in caplog.records)
    client = redis.Redis.from_url(proxy.settings.redis_url)
    stored: list[bytes] = []
    for key in client.scan_iter(count=1000):
        stored.append(key)
        kind = client.type(key)
        if kind == b"hash":
            stored += [b"%s=%s" % item for item in client.hgetall(key).items()]
        elif kind == b"stream":
            stored += [v for _, fields in client.xrange(key) for v in fields.values()]
        elif kind == b"string":
            stored.append(client.get(key) or b"")
    assert stored and not any(marker.encode() in item for item in stored)
    assert marker not in requests.get(proxy.url + "/metrics", timeout=10).text
    receipt = decode_header(response.headers["X-Receipt"])
    assert marker not in json.dumps(receipt) and receipt["message"]["requestSha256"] == sha256_hex(raw)
