"""The paid path end to end on anvil + redis-server + the stand-in model (issue: the paid path)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import requests
from eth_account import Account

from app.backends.upstream import abandoned_after
from app.catalog import load_catalog, quote_for
from app.payments.keys import LEDGER_STREAM, PAYMENT_KEYS, payment_key
from app.payments.ledger import Ledger
from app.payments.receipts import derived_key
from app.settings import DEFAULT_CATALOG
from app.x402.codec import decode_header
from tests.support import CHAT_BODY, OPERATOR_KEY, Proxy, settle_response

pytestmark = pytest.mark.integration


def expected_price(body: dict[str, Any], route: str = "chat") -> int:
    model = load_catalog(DEFAULT_CATALOG)[body["model"]]
    return quote_for(model, route, body).amount


def test_unpaid_call_gets_402_with_v2_header_and_v1_body(proxy: Proxy) -> None:
    response = proxy.post()
    assert response.status_code == 402
    assert response.headers["Cache-Control"] == "no-store"
    assert "PAYMENT-REQUIRED" in response.headers["Access-Control-Expose-Headers"]
    v2 = decode_header(response.headers["PAYMENT-REQUIRED"])
    v1 = response.json()
    amount = expected_price(CHAT_BODY)
    assert v2["x402Version"] == 2 and v2["resource"]["url"].endswith("/v1/chat/completions")
    assert v2["accepts"] == [
        {
            "scheme": "exact",
            "network": "eip155:8453",
            "amount": str(amount),
            "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
            "payTo": proxy.wallets.pay_to,
            "maxTimeoutSeconds": proxy.settings.max_timeout_seconds,
            "extra": {"name": "USD Coin", "version": "2"},
        },
        {
            "scheme": "upto",
            "network": "eip155:8453",
            "amount": str(amount),  # the maximum: upto charges the host's reported usage
            "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
            "payTo": proxy.wallets.pay_to,
            # the permit must outlive the call, since it settles after the answer
            "maxTimeoutSeconds": max(
                proxy.settings.max_timeout_seconds,
                math.ceil(abandoned_after(proxy.settings) + proxy.settings.upstream_timeout),
            ),
            "extra": {
                "name": "USD Coin",
                "version": "2",
                "assetTransferMethod": "permit2",
                "facilitatorAddress": proxy.wallets.relayer,
            },
        },
        {
            "scheme": "batch-settlement",
            "network": "eip155:8453",
            "amount": str(amount),  # the most one call may be charged on its channel
            "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
            "payTo": proxy.wallets.pay_to,
            "maxTimeoutSeconds": max(
                proxy.settings.max_timeout_seconds,
                math.ceil(abandoned_after(proxy.settings) + proxy.settings.upstream_timeout),
            ),
            "extra": {
                "name": "USD Coin",
                "version": "2",
                # our own key, never the relayer's: it signs claims and refunds
                "receiverAuthorizer": Account.from_key(
                    derived_key(proxy.wallets.relayer_key, "receiver authorizer")
                ).address,
                "withdrawDelay": 86400,
                "minDeposit": str(10 * amount),  # ten calls' maximum
            },
        },
    ]
    assert v2["accepts"][2]["extra"]["receiverAuthorizer"] != proxy.wallets.relayer
    assert v1["x402Version"] == 1 and v1["error"] == "payment_required"
    (entry,) = v1["accepts"]
    assert entry["network"] == "base" and entry["maxAmountRequired"] == str(amount)
    assert entry["resource"].startswith("http://") and "outputSchema" not in entry


def test_quote_is_the_same_for_the_same_body_and_grows_with_max_tokens(proxy: Proxy) -> None:
    first, again = proxy.requirement(), proxy.requirement()
    assert first["amount"] == again["amount"]
    dearer = proxy.requirement({**CHAT_BODY, "max_tokens": 4000})
    assert int(dearer["amount"]) > int(first["amount"])


def test_unknown_model_is_404_without_a_402(proxy: Proxy) -> None:
    response = proxy.post(body={**CHAT_BODY, "model": "no-such-model"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "PAYMENT-REQUIRED" not in response.headers


@pytest.mark.parametrize("version", [2, 1])
def test_paid_call_settles_on_chain_and_serves_the_answer(proxy: Proxy, version: int) -> None:
    requirement = proxy.requirement(version=version)
    amount = int(requirement["amount" if version == 2 else "maxAmountRequired"])
    payer_before, payee_before = proxy.balances()

    response = proxy.pay(proxy.payment(requirement, version))

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("stand-in answer")
    settled = settle_response(response, version)
    assert settled["success"] is True
    assert settled["network"] == ("eip155:8453" if version == 2 else "base")
    assert settled["payer"] == proxy.wallets.payer.lower()
    receipt = proxy.chain.rpc.call("eth_getTransactionReceipt", [settled["transaction"]])
    assert int(receipt["status"], 16) == 1
    assert proxy.balances() == (payer_before - amount, payee_before + amount)


def test_upstream_gets_the_operator_key_and_the_priced_body_never_the_buyers_headers(
    proxy: Proxy, standin
) -> None:
    body = {"model": "hermes-3-8b-tee", "messages": [{"role": "user", "content": "hi"}]}  # no max_tokens
    payment = proxy.payment(proxy.requirement(body))
    response = proxy.pay(
        payment, body, extra_headers={"Authorization": "Bearer buyer-secret", "Cookie": "s=1"}
    )
    assert response.status_code == 200, response.text
    (received,) = standin.received
    headers = {k.lower(): v for k, v in received.headers.items()}
    assert headers["authorization"] == f"Bearer {OPERATOR_KEY}"
    assert "cookie" not in headers and "payment-signature" not in headers and "x-payment" not in headers
    assert received.body["max_tokens"] == load_catalog(DEFAULT_CATALOG)["hermes-3-8b-tee"].default_max_tokens
    assert received.body["messages"] == body["messages"]
    assert OPERATOR_KEY not in response.text and OPERATOR_KEY not in str(response.headers)


def test_completions_route_is_paid_too(proxy: Proxy, standin) -> None:
    body = {"model": "hermes-3-8b-tee", "prompt": "Once upon a time", "max_tokens": 16}
    requirement = proxy.requirement(body, path="/v1/completions")
    assert int(requirement["amount"]) == expected_price(body, "completions")
    response = proxy.pay(proxy.payment(requirement), body, path="/v1/completions")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"].startswith("stand-in answer")
    assert standin.received[0].path == "/v1/completions"


def test_stream_passes_through_chunk_by_chunk(proxy: Proxy, standin) -> None:
    standin.behaviour.chunks, standin.behaviour.chunk_delay = 4, 0.2
    body = {**CHAT_BODY, "stream": True}
    payment = proxy.payment(proxy.requirement(body))
    started = time.monotonic()
    response = proxy.pay(payment, body, stream=True)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert settle_response(response)["success"] is True
    arrivals: list[tuple[float, bytes]] = []
    for line in response.iter_lines():
        if line:
            arrivals.append((time.monotonic() - started, line))
    events = [line for _, line in arrivals if not line.startswith(b":")]  # SSE comments are not events
    assert events[-1] == b"data: [DONE]" and len(events) == 5
    assert arrivals[-1][1].startswith(b": x402-receipt ")  # the signed receipt closes the stream
    # the first event reached us well before the last was even produced: nothing was buffered
    assert arrivals[-1][0] - arrivals[0][0] >= 3 * 0.2 * 0.8
    key = payment_key(8453, proxy.settings.asset, payment.authorization.from_, payment.authorization.nonce)
    assert Ledger(_redis(proxy)).get(key)["state"] == "served"


def test_same_payment_twice_is_refused_and_moves_no_money(proxy: Proxy, standin) -> None:
    payment = proxy.payment(proxy.requirement())
    assert proxy.pay(payment).status_code == 200
    balances = proxy.balances()
    again = proxy.pay(payment)
    assert again.status_code == 402
    assert decode_header(again.headers["PAYMENT-REQUIRED"])["error"] == "invalid_exact_evm_nonce_already_used"
    assert again.json()["error"] == "invalid_exact_evm_nonce_already_used"
    assert proxy.balances() == balances
    assert len(standin.received) == 1


def test_concurrent_copies_of_one_payment_serve_once(proxy: Proxy, standin) -> None:
    from concurrent.futures import ThreadPoolExecutor

    payment = proxy.payment(proxy.requirement())
    payer_before, _ = proxy.balances()
    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(r.status_code for r in pool.map(lambda _: proxy.pay(payment), range(8)))
    assert statuses.count(200) == 1 and set(statuses) <= {200, 402, 503}  # 503: still in progress
    assert len(standin.received) == 1
    assert proxy.balances()[0] == payer_before - int(payment.authorization.value)


def _redis(proxy: Proxy):
    import redis

    return redis.Redis.from_url(proxy.settings.redis_url)


def _forged(proxy: Proxy, requirement: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The real requirement with some fields changed, as a cheating client would sign it."""
    return {**requirement, **changes}


REFUSALS = [
    ("cheaper amount", {"amount": "1"}, "invalid_payment_requirements"),
    ("other payee", {"payTo": "0x000000000000000000000000000000000000dEaD"}, "invalid_payment_requirements"),
    ("other asset", {"asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e"}, "invalid_payment_requirements"),
    ("other network", {"network": "eip155:84532"}, "network_mismatch"),
    ("other scheme", {"scheme": "deferred"}, "unsupported_scheme"),  # a scheme we do not offer
]


@pytest.mark.parametrize(("case", "changes", "reason"), REFUSALS, ids=[c[0] for c in REFUSALS])
def test_wrong_payments_are_refused_with_a_reason_and_change_nothing(
    proxy: Proxy, standin, case: str, changes: dict[str, Any], reason: str
) -> None:
    requirement = proxy.requirement()
    payment = proxy.payment(_forged(proxy, requirement, **changes))
    balances = proxy.balances()
    response = proxy.pay(payment)
    assert response.status_code == 402
    assert response.json()["error"] == reason
    assert proxy.balances() == balances and standin.received == []
    assert _redis(proxy).keys(PAYMENT_KEYS) == []


def test_v1_payment_for_the_wrong_value_is_refused(proxy: Proxy, standin) -> None:
    requirement = proxy.requirement(version=1)
    payment = proxy.payment(
        {**requirement, "maxAmountRequired": str(int(requirement["maxAmountRequired"]) - 1)}, 1
    )
    response = proxy.pay(payment)
    assert response.status_code == 402
    assert response.json()["error"] == "invalid_exact_evm_payload_authorization_value_mismatch"
    assert standin.received == []


def test_expired_and_not_yet_valid_authorizations_are_refused(proxy: Proxy, standin) -> None:
    requirement = proxy.requirement()
    expired = proxy.payment(requirement, now=int(time.time()) - 3600)
    assert proxy.pay(expired).json()["error"] == "invalid_exact_evm_payload_authorization_valid_before"
    v1_requirement = proxy.requirement(version=1)
    late = proxy.payment(v1_requirement, 1, now=int(time.time()) + 1200)  # validAfter = now + 600
    assert proxy.pay(late).json()["error"] == "invalid_exact_evm_payload_authorization_valid_after"
    assert standin.received == []


def test_signature_by_another_key_is_refused(proxy: Proxy, standin) -> None:
    import os

    from app.x402.wire import Authorization, PaymentPayload

    requirement = proxy.requirement()
    honest = proxy.payment(requirement)
    stranger = proxy.payment(requirement, key="0x" + os.urandom(32).hex(), nonce=honest.authorization.nonce)
    # the stranger's signature over an authorization that claims to come from our payer
    forged = PaymentPayload(
        version=2,
        scheme="exact",
        network="eip155:8453",
        authorization=Authorization(
            **{**stranger.authorization.__dict__, "from_": honest.authorization.from_}
        ),
        signature=stranger.signature,
        accepted=requirement,
    )
    balances = proxy.balances()
    response = proxy.pay(forged)
    assert response.status_code == 402
    assert response.json()["error"] == "invalid_exact_evm_payload_signature"
    assert proxy.balances() == balances and standin.received == []


def test_payer_without_funds_is_refused_and_may_pay_once_funded(proxy: Proxy, standin) -> None:
    requirement = proxy.requirement()
    payer_balance, _ = proxy.balances()
    broke = proxy.payment(requirement)
    # empty the payer's wallet with an authorization of its whole balance, submitted directly
    drain = proxy.payment({**requirement, "amount": str(payer_balance)})
    from app.backends.token import transfer_calldata

    proxy.chain.transact(proxy.chain.token, transfer_calldata(drain.authorization, drain.signature, True))
    assert proxy.balances()[0] == 0
    refused = proxy.pay(broke)
    assert refused.status_code == 402
    assert refused.json()["error"] == "invalid_exact_evm_insufficient_balance"
    proxy.chain.mint(proxy.wallets.payer, 10**6)
    retried = proxy.pay(broke)  # the refused claim was released: the same header now pays
    assert retried.status_code == 200, retried.text
    assert len(standin.received) == 1


def test_payment_submitted_first_by_someone_else_is_served_once(proxy: Proxy, standin) -> None:
    """Preemption: anyone can submit a signed authorization. If it paid us, we serve it, once."""
    from app.backends.token import transfer_calldata

    payment = proxy.payment(proxy.requirement())
    proxy.chain.transact(proxy.chain.token, transfer_calldata(payment.authorization, payment.signature, True))
    balances = proxy.balances()
    response = proxy.pay(payment)
    assert response.status_code == 200, response.text
    assert settle_response(response)["success"] is True
    assert proxy.balances() == balances  # the money moved once, by the other submitter's transaction
    assert proxy.pay(payment).status_code == 402
    assert len(standin.received) == 1


def test_canceled_authorization_is_refused(proxy: Proxy, standin) -> None:
    from eth_account import Account

    from app.devnet import BASE_USDC

    payment = proxy.payment(proxy.requirement())
    nonce = payment.authorization.nonce
    typed = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "CancelAuthorization": [
                {"name": "authorizer", "type": "address"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "CancelAuthorization",
        "domain": {"name": "USD Coin", "version": "2", "chainId": 8453, "verifyingContract": BASE_USDC},
        "message": {"authorizer": proxy.wallets.payer, "nonce": nonce},
    }
    signed = Account.sign_typed_data(proxy.wallets.payer_key, full_message=typed)
    proxy.chain.token_call(
        "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)",
        ["address", "bytes32", "uint8", "bytes32", "bytes32"],
        [proxy.wallets.payer, nonce, signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")],
    )
    balances = proxy.balances()
    response = proxy.pay(payment)
    assert response.status_code == 402
    assert response.json()["error"] == "invalid_exact_evm_nonce_already_used"
    assert proxy.balances() == balances and standin.received == []


def test_upstream_failure_after_settlement_leaves_the_payment_redeemable(proxy: Proxy, standin) -> None:
    payment = proxy.payment(proxy.requirement())
    payer_before, _ = proxy.balances()
    standin.behaviour.status = 500
    failed = proxy.pay(payment)
    assert failed.status_code == 502
    assert failed.json()["error"]["code"] == "upstream_unavailable"
    first_tx = settle_response(failed)["transaction"]
    standin.behaviour.status = 200
    served = proxy.pay(payment)
    assert served.status_code == 200, served.text
    assert settle_response(served)["transaction"] == first_tx
    assert proxy.balances()[0] == payer_before - payment.authorization.value  # charged once
    assert proxy.pay(payment).status_code == 402  # and served once
    events = [e[b"event"] for _, e in _redis(proxy).xrange(LEDGER_STREAM)]
    assert events == [b"settled", b"redeemable", b"served"]


def test_models_lists_prices_and_tee_flag(proxy: Proxy) -> None:
    response = requests.get(proxy.url + "/v1/models", timeout=10)
    assert response.status_code == 200
    (entry,) = response.json()["data"]
    assert entry["id"] == "hermes-3-8b-tee" and entry["tee"] is True
    assert entry["pricing"]["output_per_million"] > 0 and entry["pricing"]["network"] == "eip155:8453"


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT"])
def test_other_methods_on_paid_routes_never_reach_the_upstream(proxy: Proxy, standin, method: str) -> None:
    response = requests.request(method, proxy.url + "/v1/chat/completions", timeout=10)
    assert response.status_code == 405
    assert standin.received == []


def test_oversized_and_malformed_bodies_are_4xx_json(proxy: Proxy, standin) -> None:
    big = requests.post(
        proxy.url + "/v1/chat/completions",
        data=b"x" * (proxy.settings.max_body_bytes + 1),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert big.status_code == 413 and big.json()["error"]["code"]
    dup = requests.post(proxy.url + "/v1/chat/completions", data=b'{"model":"a","model":"b"}', timeout=10)
    assert dup.status_code == 400 and dup.json()["error"]["code"] == "invalid_json"
    deep = requests.post(proxy.url + "/v1/chat/completions", data=b"[" * 100_000, timeout=10)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"  # not a crashed worker
    junk = proxy.post(headers={"PAYMENT-SIGNATURE": "not base64!"})
    assert junk.status_code == 402 and junk.json()["error"] == "invalid_payload"
    assert standin.received == []


def test_non_tee_model_is_refused_before_any_402(settings, tmp_path, standin) -> None:
    from app import create_checked_app
    from tests.support import serve

    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        DEFAULT_CATALOG.read_text()
        + '\n[models."plain-model"]\ntee = false\npricing = "per_call"\nprice = 5000\n'
    )
    server = serve(create_checked_app(settings.with_overrides(catalog_path=catalog)))
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        refused = requests.post(
            url + "/v1/chat/completions", json={**CHAT_BODY, "model": "plain-model"}, timeout=10
        )
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_tee"
        assert "PAYMENT-REQUIRED" not in refused.headers
        listed = [m["id"] for m in requests.get(url + "/v1/models", timeout=10).json()["data"]]
        assert listed == ["hermes-3-8b-tee"]
    finally:
        server.shutdown()
    assert standin.received == []


def test_paid_ping_is_a_get_resource_at_the_floor_price(proxy: Proxy, standin) -> None:
    url = "/v1/models/hermes-3-8b-tee/ping"
    unpaid = requests.get(proxy.url + url, timeout=10)
    assert unpaid.status_code == 402
    requirement, upto, batch = decode_header(unpaid.headers["PAYMENT-REQUIRED"])["accepts"]
    assert upto["scheme"] == "upto" and upto["amount"] == requirement["amount"]
    assert batch["scheme"] == "batch-settlement" and batch["amount"] == requirement["amount"]
    floor = load_catalog(DEFAULT_CATALOG)["hermes-3-8b-tee"].floor
    assert requirement["amount"] == str(floor)
    head = requests.head(proxy.url + url, timeout=10)
    assert head.status_code == 402 and standin.received == []  # HEAD is charged like GET
    payment = proxy.payment(requirement)
    payer_before, _ = proxy.balances()
    from app.x402.codec import encode_header

    paid = requests.get(
        proxy.url + url, headers={"PAYMENT-SIGNATURE": encode_header(payment.to_wire())}, timeout=10
    )
    assert paid.status_code == 200, paid.text
    assert paid.json() == {"model": "hermes-3-8b-tee", "tee": True, "upstream_status": 200, "listed": True}
    assert settle_response(paid)["success"] is True
    assert proxy.balances()[0] == payer_before - floor
    assert [r.path for r in standin.received] == ["/v1/models"]
    assert requests.get(proxy.url + "/v1/models/no-such-model/ping", timeout=10).status_code == 404
