"""A wallet's credit, spent by signing in (issue 16 §2), on anvil, real Redis and the stand-in host:
the change of an exact call and a failed call's payment become credit, and a signed-in wallet is
served from it with no new payment and no transaction."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from eth_account import Account
from eth_account.messages import encode_defunct

from app.devnet.standin import StandinModel
from app.x402.extensions.sign_in_with_x import SignIn, message_text
from tests.support import CHAT_BODY, Proxy, proxy_with, usage_price

pytestmark = pytest.mark.integration

STREAM_BODY = {**CHAT_BODY, "stream": True}
# priced for 2000 completion tokens, answered with a handful: most of its payment is change
BIG_BODY = {**CHAT_BODY, "max_tokens": 2000}


@pytest.fixture
def credit_proxy(proxy: Proxy, catalog_file: Path) -> Iterator[Proxy]:
    """A proxy whose catalog floor is 1 atomic unit: an exact call's usage price is then below its
    priced maximum, so it leaves change."""
    yield from proxy_with(proxy, catalog_path=catalog_file)


def challenge_of(response: requests.Response) -> dict[str, Any]:
    return json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))


def sign_in_header(info: dict[str, Any], key: str, address: str | None = None) -> str:
    """A ``SIGN-IN-WITH-X`` header for the challenge ``info``, signed EIP-191 by ``key`` (on behalf
    of ``address``: a contract wallet the key owns)."""
    account = Account.from_key(key)
    fields = {
        "domain": info["domain"],
        "address": address or account.address,
        "statement": info.get("statement"),
        "uri": info["uri"],
        "version": info["version"],
        "chainId": "eip155:8453",
        "type": "eip191",
        "nonce": info["nonce"],
        "issuedAt": info["issuedAt"],
        "expirationTime": info.get("expirationTime"),
        "resources": info.get("resources"),
    }
    sign_in = SignIn(
        domain=fields["domain"],
        address=fields["address"],
        uri=fields["uri"],
        version=fields["version"],
        chain_id=fields["chainId"],
        type="eip191",
        nonce=fields["nonce"],
        issued_at=fields["issuedAt"],
        signature=b"",
        statement=fields["statement"],
        expiration_time=fields["expirationTime"],
        resources=tuple(fields["resources"]) if fields["resources"] is not None else None,
    )
    signature = account.sign_message(encode_defunct(text=message_text(sign_in))).signature
    payload = {k: v for k, v in fields.items() if v is not None} | {
        "signature": "0x" + bytes(signature).hex()
    }
    return base64.b64encode(json.dumps(payload).encode()).decode()


def signed_in(proxy: Proxy, body: dict[str, Any] = CHAT_BODY, key: str | None = None) -> requests.Response:
    """Ask a 402, sign its challenge in and send the same body with only ``SIGN-IN-WITH-X``."""
    info = challenge_of(proxy.post(body=body))["extensions"]["sign-in-with-x"]["info"]
    header = sign_in_header(info, key or proxy.wallets.payer_key)
    return proxy.post(body=body, headers={"SIGN-IN-WITH-X": header})


def test_an_exact_calls_change_is_credited_and_spent_by_signing_in(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    requirement = proxy.requirement(BIG_BODY)
    maximum = int(requirement["amount"])
    paid = proxy.pay(proxy.payment(requirement), BIG_BODY)
    assert paid.status_code == 200, paid.text
    usage = paid.json()["usage"]
    change = maximum - usage_price(proxy, usage)
    assert change > 0
    assert int(paid.headers["X-Credit-Added"]) == change

    before = proxy.balances()
    served = signed_in(proxy)
    assert served.status_code == 200, served.text
    charged = int(served.headers["X-Credit-Charged"])
    assert charged == usage_price(proxy, served.json()["usage"])
    assert int(served.headers["X-Credit-Balance"]) == change - charged
    assert proxy.balances() == before  # no transaction
