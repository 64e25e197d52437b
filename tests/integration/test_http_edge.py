"""The HTTP edge: path variants, methods and CORS never open a free way to the model host."""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

import pytest
import requests

from app.devnet.standin import StandinModel
from tests.support import CHAT_BODY, Proxy

pytestmark = pytest.mark.integration

VARIANTS = [
    "/v1/chat/completions/",
    "//v1//chat/completions",
    "/v1/./chat/completions",
    "/v1/models/../chat/completions",
    "/v1/chat%2Fcompletions",
    "/v1/chat/%63ompletions",
    "/v1/chat/%2563ompletions",
    "/v1/chat/completions//",
]


def raw_request(
    proxy: Proxy, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
):
    """Send the path exactly as written (HTTP clients would normalise it first)."""
    target = urlsplit(proxy.url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
    connection.request(
        method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response, payload


@pytest.mark.parametrize("path", VARIANTS)
def test_every_spelling_of_the_paid_path_is_the_paid_route(
    proxy: Proxy, standin: StandinModel, path: str
) -> None:
    import json

    response, _ = raw_request(proxy, "POST", path, json.dumps(CHAT_BODY).encode())
    assert response.status == 402
    assert response.getheader("PAYMENT-REQUIRED")
    assert standin.received == []


def test_a_paid_call_through_a_path_variant_is_served_once(proxy: Proxy, standin: StandinModel) -> None:
    import json

    from app.x402.codec import encode_header

    payment = proxy.payment(proxy.requirement())
    header = {"PAYMENT-SIGNATURE": encode_header(payment.to_wire())}
    response, _ = raw_request(proxy, "POST", "//v1/chat/completions/", json.dumps(CHAT_BODY).encode(), header)
    assert response.status == 200
    again, _ = raw_request(proxy, "POST", "/v1/chat/completions", json.dumps(CHAT_BODY).encode(), header)
    assert again.status == 402
    assert len(standin.received) == 1


def test_options_preflight_is_free_and_exposes_the_payment_headers(
    proxy: Proxy, standin: StandinModel
) -> None:
    response = requests.options(
        proxy.url + "/v1/chat/completions",
        headers={
            "Origin": "https://wallet.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, payment-signature",
        },
        timeout=10,
    )
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "PAYMENT-SIGNATURE" in response.headers["Access-Control-Allow-Headers"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    exposed = response.headers["Access-Control-Expose-Headers"]
    assert all(h in exposed for h in ("PAYMENT-REQUIRED", "PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"))
    assert standin.received == []


def test_402_and_paid_answers_are_readable_by_browsers_and_never_cached(proxy: Proxy) -> None:
    challenge = proxy.post()
    assert challenge.headers["Access-Control-Allow-Origin"] == "*"
    assert "PAYMENT-REQUIRED" in challenge.headers["Access-Control-Expose-Headers"]
    paid = proxy.pay(proxy.payment(proxy.requirement()))
    assert paid.status_code == 200
    assert paid.headers["Cache-Control"] == "no-store, private"
    assert "PAYMENT-RESPONSE" in paid.headers["Access-Control-Expose-Headers"]


def test_client_headers_never_reach_the_upstream(proxy: Proxy, standin: StandinModel) -> None:
    payment = proxy.payment(proxy.requirement())
    response = proxy.pay(
        payment,
        extra_headers={
            "Payment-Retry": "1",
            "Cookie": "session=abc",
            "Authorization": "Bearer buyer",
            "X-Forwarded-For": "10.1.2.3",
        },
    )
    assert response.status_code == 200
    (received,) = standin.received
    sent = {k.lower() for k in received.headers}
    assert not sent & {"payment-retry", "cookie", "x-forwarded-for", "payment-signature", "x-payment"}
