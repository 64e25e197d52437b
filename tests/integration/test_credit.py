"""A wallet's credit, spent by signing in (issue 16 §2), on anvil, real Redis and the stand-in host:
the change of an exact call and a failed call's payment become credit, and a signed-in wallet is
served from it with no new payment and no transaction."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from eth_abi import encode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import to_checksum_address
from x402 import x402ClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.mechanisms.evm import EthAccountSignerWithRPC
from x402.mechanisms.evm.upto import UptoEvmClientScheme

from app.backends.token import selector
from app.devnet import PROJECT_ROOT
from app.devnet.standin import Behaviour, StandinModel
from app.payments.keys import LEDGER_STREAM, SIWX_SECRET_KEY, credit_keys
from app.payments.receipts import STREAM_RECEIPT_PREFIX, Receipt, verify_receipt
from app.payments.signin import NONCE_CLOCK_MARGIN
from app.settings import DEFAULT_CATALOG
from app.x402.extensions.sign_in_with_x import FUTURE_SKEW, MAX_AGE, SignIn, iso, message_text, new_nonce
from tests.security.forge import authorization_for, header_of, sign, wrap
from tests.support import CHAT_BODY, Proxy, key_of, moved_since, proxy_with, usage_price

pytestmark = pytest.mark.integration

STREAM_BODY = {**CHAT_BODY, "stream": True}
# priced for 2000 completion tokens, answered with a handful: most of its payment is change
BIG_BODY = {**CHAT_BODY, "max_tokens": 2000}
WALLET_ARTIFACT = PROJECT_ROOT / "contracts" / "ERC1271Wallet.json"
GUNICORN_FIELD_LIMIT = 8190  # gunicorn's default limit_request_field_size: a header line's bytes
MARKER = "zq-credit-privacy-marker-4471"


@pytest.fixture
def credit_proxy(proxy: Proxy, catalog_file: Path) -> Iterator[Proxy]:
    """A proxy whose catalog floor is 1 atomic unit: an exact call's usage price is then below its
    priced maximum, so it leaves change."""
    yield from proxy_with(proxy, catalog_path=catalog_file)


def challenge_of(response: requests.Response) -> dict[str, Any]:
    return json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))


def reason_of(response: requests.Response) -> str:
    """The reason code of a 402 (``error`` of its v2 challenge)."""
    assert response.status_code == 402, response.text
    return str(challenge_of(response)["error"])


def info_of(proxy: Proxy, body: dict[str, Any] = CHAT_BODY) -> dict[str, Any]:
    """The sign-in challenge (``info``) of a fresh 402 for ``body``."""
    return dict(challenge_of(proxy.post(body=body))["extensions"]["sign-in-with-x"]["info"])


def sign_in_header(
    info: dict[str, Any], key: str, address: str | None = None, changes: dict[str, Any] | None = None
) -> str:
    """A ``SIGN-IN-WITH-X`` header for the challenge ``info``, signed EIP-191 by ``key`` (on behalf
    of ``address``: a contract wallet the key owns); ``changes`` replace payload fields (None drops
    one) before the message is signed."""
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
    } | (changes or {})
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
    return encoded(payload)


def encoded(payload: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(payload).encode()).decode()


def payload_of(header: str) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(header)))


def signed_in(
    proxy: Proxy,
    body: dict[str, Any] = CHAT_BODY,
    key: str | None = None,
    address: str | None = None,
    **kwargs: Any,
) -> requests.Response:
    """Ask a 402, sign its challenge in and send the same body with only ``SIGN-IN-WITH-X``."""
    header = sign_in_header(info_of(proxy, body), key or proxy.wallets.payer_key, address)
    return proxy.post(body=body, headers={"SIGN-IN-WITH-X": header}, **kwargs)


def get_credit(proxy: Proxy, header: str | None = None) -> requests.Response:
    headers = {"SIGN-IN-WITH-X": header} if header is not None else {}
    return requests.get(proxy.url + "/v1/credit", headers=headers, timeout=30)


def credit_of(proxy: Proxy, key: str | None = None, address: str | None = None) -> dict[str, Any]:
    """``GET /v1/credit`` signed in with the nonce of its own 401."""
    unsigned = get_credit(proxy)
    assert unsigned.status_code == 401, unsigned.text
    info = unsigned.json()["extensions"]["sign-in-with-x"]["info"]
    statement = get_credit(proxy, sign_in_header(info, key or proxy.wallets.payer_key, address))
    assert statement.status_code == 200, statement.text
    return dict(statement.json())


def give_change(proxy: Proxy) -> int:
    """Pay ``BIG_BODY`` with exact; the change credited (``X-Credit-Added``)."""
    paid = proxy.pay(proxy.payment(proxy.requirement(BIG_BODY)), BIG_BODY)
    assert paid.status_code == 200, paid.text
    return int(paid.headers["X-Credit-Added"])


def sse_events(text: str) -> list[str]:
    return [event for event in text.split("\n\n") if event.strip()]


def receipt_address(proxy: Proxy) -> str:
    return str(requests.get(proxy.url + "/.well-known/x402", timeout=10).json()["receiptAddress"])


def stream_receipt(response: requests.Response) -> tuple[Receipt, bytes]:
    """The receipt a stream ends with, and the bytes it covers (everything before it)."""
    content = response.content
    tail = content.rindex(STREAM_RECEIPT_PREFIX)
    return Receipt.from_header(content[tail + len(STREAM_RECEIPT_PREFIX) :].strip().decode()), content[:tail]


def usage_event(events: list[str]) -> dict[str, int] | None:
    found = [json.loads(e.removeprefix("data: "))["usage"] for e in events if '"usage"' in e]
    assert len(found) <= 1
    return found[0] if found else None


def redis_of(proxy: Proxy) -> redis.Redis:
    return redis.Redis.from_url(proxy.settings.redis_url)


# --- the change of an exact call -------------------------------------------------------------------


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
    assert "PAYMENT-RESPONSE" not in served.headers
    charged = int(served.headers["X-Credit-Charged"])
    assert charged == usage_price(proxy, served.json()["usage"])
    assert int(served.headers["X-Credit-Balance"]) == change - charged
    assert proxy.balances() == before  # no transaction
    receipt = Receipt.from_header(served.headers["X-Receipt"])
    assert (receipt.tx, receipt.amount, receipt.authorized) == (
        "",
        charged,
        int(proxy.requirement()["amount"]),
    )
    assert receipt.payer.lower() == proxy.wallets.payer.lower()
    assert verify_receipt(receipt, served.request.body, served.content, receipt_address(proxy))


def test_a_streams_change_is_credited_in_a_comment_before_its_receipt(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    """The stream is asked for its usage either way; the buyer sees the usage event only when it asked.
    The same work costs the same, so both streams leave the same change, and the wallet can spend it."""
    proxy = credit_proxy
    changes = []
    for asked in (True, False):
        body = {**BIG_BODY, "stream": True} | ({"stream_options": {"include_usage": True}} if asked else {})
        maximum = int(proxy.requirement(body)["amount"])
        paid = proxy.pay(proxy.payment(proxy.requirement(body)), body)
        assert paid.status_code == 200, paid.text
        assert standin.received[-1].body["stream_options"] == {"include_usage": True}
        events = sse_events(paid.text)
        assert events[-3] == "data: [DONE]"
        assert events[-2].startswith(": x402-credit-added ") and events[-1].startswith(": x402-receipt ")
        added = int(events[-2].removeprefix(": x402-credit-added "))
        usage = usage_event(events)
        assert (usage is not None) == asked
        if usage is not None:
            assert added == maximum - usage_price(proxy, usage)
        receipt, covered = stream_receipt(paid)
        assert b": x402-credit-added " in covered  # the receipt covers the comment too
        assert verify_receipt(receipt, paid.request.body, covered, receipt_address(proxy))
        assert receipt.amount == maximum
        changes.append(added)
    assert changes[0] == changes[1] > 0
    assert credit_of(proxy)["balance"] == 2 * changes[0]

    before = proxy.balances()
    served = signed_in(proxy)
    assert served.status_code == 200, served.text
    assert int(served.headers["X-Credit-Balance"]) == 2 * changes[0] - int(served.headers["X-Credit-Charged"])
    assert proxy.balances() == before


def test_with_exact_change_kept_nothing_is_credited(credit_proxy: Proxy, standin: StandinModel) -> None:
    """``X402_EXACT_CHANGE=keep``: no header, no stream comment, no credit; a stream is forwarded as
    the buyer sent it."""
    for proxy in proxy_with(credit_proxy, exact_change=False):
        before = proxy.balances()
        maximum = int(proxy.requirement(BIG_BODY)["amount"])
        paid = proxy.pay(proxy.payment(proxy.requirement(BIG_BODY)), BIG_BODY)
        assert paid.status_code == 200, paid.text
        assert "X-Credit-Added" not in paid.headers
        stream_body = {**BIG_BODY, "stream": True}
        streamed = proxy.pay(proxy.payment(proxy.requirement(stream_body)), stream_body)
        assert streamed.status_code == 200, streamed.text
        assert "stream_options" not in standin.received[-1].body
        events = sse_events(streamed.text)
        assert events[-2] == "data: [DONE]" and events[-1].startswith(": x402-receipt ")
        assert not any("x402-credit" in event for event in events)
        assert moved_since(proxy, before) == 2 * maximum

        refused = signed_in(proxy)
        assert reason_of(refused) == "insufficient_credit"
        statement = credit_of(proxy)
        assert statement["balance"] == 0 and statement["lots"] == [] and statement["recent"] == []


# --- spending it ----------------------------------------------------------------------------------


def test_a_stream_is_served_from_credit_with_no_transaction(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    change = give_change(proxy)
    maximum = int(proxy.requirement(STREAM_BODY)["amount"])
    before = proxy.balances()

    served = signed_in(proxy, STREAM_BODY)

    assert served.status_code == 200, served.text
    assert proxy.balances() == before
    assert standin.received[-1].body["stream_options"] == {"include_usage": True}  # asked of the host
    events = sse_events(served.text)
    assert usage_event(events) is None  # but not passed on: the buyer did not ask
    assert events[-3] == "data: [DONE]"
    assert events[-2].startswith(": x402-credit ") and events[-1].startswith(": x402-receipt ")
    credit = json.loads(events[-2].removeprefix(": x402-credit "))
    receipt, covered = stream_receipt(served)
    prompt_tokens, completion_tokens = (int(n) for n in receipt.usage.split("+"))
    price = usage_price(proxy, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})
    assert credit == {"charged": price, "balance": change - price}
    assert (receipt.tx, receipt.amount, receipt.authorized) == ("", price, maximum)
    assert verify_receipt(receipt, served.request.body, covered, receipt_address(proxy))
    assert credit_of(proxy)["balance"] == change - price


def test_credit_below_the_priced_maximum_is_refused_and_changes_nothing(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    change = give_change(proxy)
    dear = {**CHAT_BODY, "max_tokens": 4000}
    assert int(proxy.requirement(dear)["amount"]) > change
    before, statement, calls = proxy.balances(), credit_of(proxy), len(standin.received)

    refused = signed_in(proxy, dear)

    assert reason_of(refused) == "insufficient_credit"
    assert str(change) in refused.headers["X-Payment-Error"]
    assert len(standin.received) == calls
    assert proxy.balances() == before
    assert credit_of(proxy) == statement
    assert statement["balance"] == change and statement["held"] == 0


# --- a failed call's payment ------------------------------------------------------------------------


def test_a_failed_calls_payment_becomes_credit_by_signing_in_and_its_header_is_then_refused(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    standin.behaviour = Behaviour(status=500, times=2)  # both tries of the call fail
    payment = proxy.payment(proxy.requirement())
    amount = payment.authorization.value
    before = proxy.balances()
    failed = proxy.pay(payment)
    assert failed.status_code == 502, failed.text
    assert moved_since(proxy, before) == amount
    waiting = credit_of(proxy)
    assert (waiting["balance"], waiting["redeemable"]) == (0, amount)
    paid = proxy.balances()

    served = signed_in(proxy)

    assert served.status_code == 200, served.text
    assert proxy.balances() == paid  # no new transaction
    charged = int(served.headers["X-Credit-Charged"])
    assert charged == usage_price(proxy, served.json()["usage"])
    assert int(served.headers["X-Credit-Balance"]) == amount - charged
    assert Receipt.from_header(served.headers["X-Receipt"]).tx == ""
    assert redis_of(proxy).hget(key_of(proxy, payment), "state") == b"credited"
    calls = len(standin.received)

    again = proxy.pay(payment)

    assert reason_of(again) == "invalid_exact_evm_nonce_already_used"
    assert "this payment became your wallet's credit" in again.headers["X-Payment-Error"]
    assert len(standin.received) == calls and proxy.balances() == paid
    statement = credit_of(proxy)
    assert (statement["balance"], statement["redeemable"]) == (amount - charged, 0)
    assert [lot["left"] for lot in statement["lots"]] == [amount - charged]
    assert [entry["kind"] for entry in statement["recent"]] == ["spent", "failed_call"]


def test_a_failed_calls_payment_redeemed_by_its_header_is_no_credit_later(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    """The header wins the race: the payment buys its call (and leaves its change), and the
    pointer in the wallet's credit is dropped at the next sign-in."""
    proxy = credit_proxy
    standin.behaviour = Behaviour(status=500, times=2)
    payment = proxy.payment(proxy.requirement())
    amount = payment.authorization.value
    assert proxy.pay(payment).status_code == 502
    redeemed = proxy.pay(payment)
    assert redeemed.status_code == 200, redeemed.text
    change = int(redeemed.headers["X-Credit-Added"])
    assert change == amount - usage_price(proxy, redeemed.json()["usage"])
    paid = proxy.balances()

    refused = signed_in(proxy)

    assert reason_of(refused) == "insufficient_credit"
    assert proxy.balances() == paid
    assert redis_of(proxy).hget(key_of(proxy, payment), "state") == b"served"
    statement = credit_of(proxy)
    assert (statement["balance"], statement["redeemable"]) == (change, 0)
    assert [lot["left"] for lot in statement["lots"]] == [change]
    assert [entry["kind"] for entry in statement["recent"]] == ["change"]


def test_credit_and_a_failed_calls_payment_together_pay_a_call_neither_covers_alone(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    change = give_change(proxy)
    standin.behaviour = Behaviour(status=500, times=2)
    payment = proxy.payment(proxy.requirement())
    amount = payment.authorization.value
    assert proxy.pay(payment).status_code == 502
    body = next(
        body
        for tokens in range(2000, 4001, 50)
        if max(change, amount)
        < int(proxy.requirement(body := {**CHAT_BODY, "max_tokens": tokens})["amount"])
        <= change + amount
    )
    paid = proxy.balances()

    served = signed_in(proxy, body)

    assert served.status_code == 200, served.text
    charged = int(served.headers["X-Credit-Charged"])
    assert int(served.headers["X-Credit-Balance"]) == change + amount - charged
    assert proxy.balances() == paid
    assert redis_of(proxy).hget(key_of(proxy, payment), "state") == b"credited"


@pytest.mark.parametrize("failure", ["error", "cut"])
def test_a_host_failing_while_serving_from_credit_charges_nothing(
    credit_proxy: Proxy, standin: StandinModel, failure: str
) -> None:
    proxy = credit_proxy
    change = give_change(proxy)
    before = proxy.balances()
    if failure == "error":
        standin.behaviour = Behaviour(status=500, times=2)
        failed = signed_in(proxy)
        assert failed.status_code == 502
        assert failed.json()["error"]["code"] == "upstream_unavailable"
        assert "nothing was charged" in failed.json()["error"]["message"]
    else:
        standin.behaviour = Behaviour(cut_after=2)
        cut = signed_in(proxy, STREAM_BODY, stream=True)
        assert cut.status_code == 200
        received = b""
        with pytest.raises(requests.exceptions.ChunkedEncodingError):  # the break is visible
            for chunk in cut.iter_content(None):
                received += chunk
        assert b'"code": "upstream_cut"' in received and b"x402-credit" not in received
    statement = credit_of(proxy)
    assert (statement["balance"], statement["held"]) == (change, 0)
    assert [entry["kind"] for entry in statement["recent"]] == ["change"]
    assert proxy.balances() == before


# --- refused sign-ins --------------------------------------------------------------------------------

Forge = Callable[[Proxy], str]


def with_changes(**changes: Any) -> Forge:
    """A sign-in with some fields changed before signing (a callable is called then: times are now's)."""

    def forge(proxy: Proxy) -> str:
        made = {name: value() if callable(value) else value for name, value in changes.items()}
        return sign_in_header(info_of(proxy), proxy.wallets.payer_key, changes=made)

    return forge


def used_before(proxy: Proxy) -> str:
    header = sign_in_header(info_of(proxy), proxy.wallets.payer_key)
    first = proxy.post(body=CHAT_BODY, headers={"SIGN-IN-WITH-X": header})
    assert first.status_code == 200, first.text
    return header


def issued_long_ago(proxy: Proxy) -> str:
    """A nonce tagged with the proxy's own secret, issued 400 s ago, in a message dated now."""
    secret = bytes.fromhex(redis_of(proxy).get(SIWX_SECRET_KEY).decode())
    nonce = new_nonce(secret, int(time.time()) - 400, os.urandom(8))
    return with_changes(nonce=nonce)(proxy)


def another_key(proxy: Proxy) -> str:
    return sign_in_header(info_of(proxy), "0x" + os.urandom(32).hex(), proxy.wallets.payer)


def altered_after_signing(proxy: Proxy) -> str:
    payload = payload_of(sign_in_header(info_of(proxy), proxy.wallets.payer_key))
    return encoded(payload | {"statement": "Pay nothing."})


def without_nonce(proxy: Proxy) -> str:
    payload = payload_of(sign_in_header(info_of(proxy), proxy.wallets.payer_key))
    return encoded({k: v for k, v in payload.items() if k != "nonce"})


def signature_not_hex(proxy: Proxy) -> str:
    payload = payload_of(sign_in_header(info_of(proxy), proxy.wallets.payer_key))
    return encoded(payload | {"signature": "0xnothex"})


REFUSALS: list[tuple[str, Forge, str]] = [
    ("nonce used twice", used_before, "invalid_siwx_nonce"),
    ("nonce not issued by the proxy", with_changes(nonce=lambda: os.urandom(20).hex()), "invalid_siwx_nonce"),
    ("nonce issued too long ago", issued_long_ago, "invalid_siwx_issued_at_too_old"),
    (
        "issuedAt too old",
        with_changes(issuedAt=lambda: iso(time.time() - 400)),
        "invalid_siwx_issued_at_too_old",
    ),
    (
        "issuedAt in the future",
        with_changes(issuedAt=lambda: iso(time.time() + 3600)),
        "invalid_siwx_issued_at_in_future",
    ),
    ("expired", with_changes(expirationTime=lambda: iso(time.time() - 1)), "invalid_siwx_expired"),
    ("another domain", with_changes(domain="evil.example"), "invalid_siwx_domain_mismatch"),
    (
        "another origin",
        with_changes(uri="https://evil.example/v1/chat/completions"),
        "invalid_siwx_uri_mismatch",
    ),
    ("another chain", with_changes(chainId="eip155:84532"), "invalid_siwx_chain_id"),
    ("signed by another key", another_key, "invalid_siwx_signature"),
    ("message altered after signing", altered_after_signing, "invalid_siwx_signature"),
    ("malformed header", lambda _proxy: "not base64 at all!", "invalid_siwx_header"),
    ("not an object", lambda _proxy: encoded([1, 2]), "invalid_siwx_header"),  # type: ignore[arg-type]
    ("without a nonce", without_nonce, "invalid_siwx_header"),
    ("signature not hex", signature_not_hex, "invalid_siwx_malformed_signature"),
]


@pytest.mark.parametrize(("forge", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_a_refused_sign_in_is_a_402_with_its_reason_and_charges_nothing(
    credit_proxy: Proxy, standin: StandinModel, forge: Forge, reason: str
) -> None:
    proxy = credit_proxy
    give_change(proxy)
    header = forge(proxy)
    before, statement, calls = proxy.balances(), credit_of(proxy), len(standin.received)

    refused = proxy.post(body=CHAT_BODY, headers={"SIGN-IN-WITH-X": header})

    assert reason_of(refused) == reason
    assert refused.headers["X-Payment-Error"]
    assert challenge_of(refused)["extensions"]["sign-in-with-x"]["info"]["nonce"]  # a fresh one to sign
    assert len(standin.received) == calls
    assert proxy.balances() == before
    assert credit_of(proxy) == statement


def dearest_within(proxy: Proxy, budget: int) -> dict[str, Any]:
    """The chat body (``CHAT_BODY``'s messages) with the most ``max_tokens`` whose priced maximum is at
    most ``budget`` (a binary search over real 402s)."""
    low, high = 1, 4096
    while low < high:
        middle = (low + high + 1) // 2
        if int(proxy.requirement({**CHAT_BODY, "max_tokens": middle})["amount"]) <= budget:
            low = middle
        else:
            high = middle - 1
    return {**CHAT_BODY, "max_tokens": low}


@pytest.mark.parametrize("copies", [False, True], ids=["two sign-ins over the balance", "one sign-in twice"])
def test_two_sign_ins_at_once_serve_one(credit_proxy: Proxy, standin: StandinModel, copies: bool) -> None:
    """Two sign-ins whose maximums together exceed the balance, or two copies of one sign-in, sent
    at once: one is served, the other refused (short of credit, or its nonce used)."""
    proxy = credit_proxy
    balance = give_change(proxy)
    # the dearest body the balance covers: once one call is charged, what is left is short of another
    body = dearest_within(proxy, balance)
    price = int(proxy.requirement(BIG_BODY)["amount"]) - balance  # what a call with this usage costs
    assert balance - price < int(proxy.requirement(body)["amount"]) <= balance
    headers = [sign_in_header(info_of(proxy, body), proxy.wallets.payer_key) for _ in range(2)]
    if copies:
        headers[1] = headers[0]
    standin.behaviour = Behaviour(delay=0.5)  # the first call still holds its maximum when the second asks
    before, calls = proxy.balances(), len(standin.received)
    start = threading.Barrier(2)
    answers: list[requests.Response] = []

    def sign_in(header: str) -> None:
        start.wait()
        answers.append(proxy.post(body=body, headers={"SIGN-IN-WITH-X": header}))

    threads = [threading.Thread(target=sign_in, args=(header,)) for header in headers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(a.status_code for a in answers) == [200, 402], [a.text for a in answers]
    (served,) = [a for a in answers if a.status_code == 200]
    (refused,) = [a for a in answers if a.status_code == 402]
    assert reason_of(refused) == ("invalid_siwx_nonce" if copies else "insufficient_credit")
    assert len(standin.received) == calls + 1
    assert proxy.balances() == before
    charged = int(served.headers["X-Credit-Charged"])
    statement = credit_of(proxy)
    assert (statement["balance"], statement["held"]) == (balance - charged, 0)


def test_a_call_in_flight_holds_its_maximum_until_it_is_charged(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    change = give_change(proxy)
    maximum = int(proxy.requirement()["amount"])
    standin.behaviour = Behaviour(delay=1.0)
    standin.received.clear()  # the paid call that gave the change reached the host too
    answers: list[requests.Response] = []
    call = threading.Thread(target=lambda: answers.append(signed_in(proxy)))
    call.start()
    deadline = time.monotonic() + 10
    while not standin.received and time.monotonic() < deadline:  # the host has the call: it is held
        time.sleep(0.02)

    during = credit_of(proxy)
    call.join(30)

    assert (during["balance"], during["held"]) == (change - maximum, maximum)
    (served,) = answers
    assert served.status_code == 200, served.text
    after = credit_of(proxy)
    assert (after["balance"], after["held"]) == (change - int(served.headers["X-Credit-Charged"]), 0)


def test_unknown_usage_leaves_no_change_and_costs_the_maximum_from_credit(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    """The rule of upto: a host that reports no usage is charged the maximum, so an exact call
    leaves no change, and a call from credit costs its whole hold."""
    proxy = credit_proxy
    change = give_change(proxy)
    standin.behaviour = Behaviour(usage="omit")
    paid = proxy.pay(proxy.payment(proxy.requirement(BIG_BODY)), BIG_BODY)
    assert paid.status_code == 200, paid.text
    assert "X-Credit-Added" not in paid.headers
    served = signed_in(proxy)
    assert served.status_code == 200, served.text
    maximum = int(proxy.requirement()["amount"])
    assert int(served.headers["X-Credit-Charged"]) == maximum
    assert int(served.headers["X-Credit-Balance"]) == change - maximum
    assert Receipt.from_header(served.headers["X-Receipt"]).usage == "unreported"


@pytest.mark.parametrize("route", ["completions", "ping"])
def test_the_other_paid_routes_are_served_from_credit_too(
    credit_proxy: Proxy, standin: StandinModel, route: str
) -> None:
    proxy = credit_proxy
    change = give_change(proxy)
    before = proxy.balances()
    if route == "ping":
        url = proxy.url + "/v1/models/hermes-3-8b-tee/ping"
        info = challenge_of(requests.get(url, timeout=10))["extensions"]["sign-in-with-x"]["info"]
        header = sign_in_header(info, proxy.wallets.payer_key)
        served = requests.get(url, headers={"SIGN-IN-WITH-X": header}, timeout=30)
        price = int(
            challenge_of(requests.get(url, timeout=10))["accepts"][0]["amount"]
        )  # no usage: the floor
    else:
        body = {"model": CHAT_BODY["model"], "prompt": "Once upon a time", "max_tokens": 16}
        info = challenge_of(proxy.post("/v1/completions", body))["extensions"]["sign-in-with-x"]["info"]
        served = proxy.post(
            "/v1/completions", body, headers={"SIGN-IN-WITH-X": sign_in_header(info, proxy.wallets.payer_key)}
        )
        price = usage_price(proxy, served.json()["usage"])
    assert served.status_code == 200, served.text
    assert int(served.headers["X-Credit-Charged"]) == price
    assert int(served.headers["X-Credit-Balance"]) == change - price
    assert proxy.balances() == before


# --- GET /v1/credit ------------------------------------------------------------------------------------


def test_get_credit_asks_a_sign_in_then_states_the_wallets_credit_once_per_nonce(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    proxy = credit_proxy
    unsigned = get_credit(proxy)
    assert unsigned.status_code == 401
    assert unsigned.headers["WWW-Authenticate"].startswith("SIWX ")
    assert unsigned.json()["error"]["code"] == "sign_in_required"
    info = unsigned.json()["extensions"]["sign-in-with-x"]["info"]
    assert info["uri"] == proxy.url + "/v1/credit"
    assert get_credit(proxy).json()["extensions"]["sign-in-with-x"]["info"]["nonce"] != info["nonce"]  # fresh
    change = give_change(proxy)
    spent = signed_in(proxy)
    assert spent.status_code == 200, spent.text
    charged = int(spent.headers["X-Credit-Charged"])
    header = sign_in_header(info, proxy.wallets.payer_key)

    stated = get_credit(proxy, header)

    assert stated.status_code == 200, stated.text
    credit = stated.json()
    assert credit["address"] == to_checksum_address(proxy.wallets.payer)
    assert (credit["balance"], credit["held"], credit["redeemable"]) == (change - charged, 0, 0)
    assert credit["creditSeconds"] == proxy.settings.credit_seconds
    (lot,) = credit["lots"]
    assert lot["left"] == change - charged
    # the credit's life, rounded up to a thirtieth of it (credit of one step shares a lot)
    step = proxy.settings.credit_seconds // 30
    assert 0 <= lot["expires"] - (time.time() + proxy.settings.credit_seconds) < step + 60
    assert [(e["kind"], e["amount"]) for e in credit["recent"]] == [("spent", charged), ("change", change)]
    assert credit["recent"][1]["tx"].startswith("0x")  # the change names the payment's transaction

    again = get_credit(proxy, header)

    assert again.status_code == 401
    assert again.json()["error"]["code"] == "invalid_siwx_nonce"
    assert again.json()["extensions"]["sign-in-with-x"]["info"]["nonce"] != info["nonce"]


def test_with_a_public_url_a_sign_in_is_bound_to_it_whatever_host_a_request_names(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    """``X402_PUBLIC_URL`` set: every challenge names its origin, and a sign-in a site obtained for
    its own domain is refused even sent under that site's Host."""
    public = "https://credit.proxy.example"
    for proxy in proxy_with(credit_proxy, public_url=public):
        key = proxy.wallets.payer_key
        change = give_change(proxy)
        info = info_of(proxy)
        assert (info["domain"], info["uri"]) == ("credit.proxy.example", public + "/v1/chat/completions")
        elsewhere = proxy.post(body=CHAT_BODY, headers={"Host": "evil.example"})
        assert (
            challenge_of(elsewhere)["extensions"]["sign-in-with-x"]["info"]["domain"]
            == "credit.proxy.example"
        )
        theirs = {"domain": "evil.example", "uri": "http://evil.example/v1/chat/completions"}
        forged = sign_in_header(info_of(proxy), key, changes=theirs)

        refused = proxy.post(body=CHAT_BODY, headers={"SIGN-IN-WITH-X": forged, "Host": "evil.example"})
        served = proxy.post(body=CHAT_BODY, headers={"SIGN-IN-WITH-X": sign_in_header(info, key)})

        assert reason_of(refused) == "invalid_siwx_domain_mismatch"
        assert served.status_code == 200, served.text
        assert int(served.headers["X-Credit-Balance"]) == change - int(served.headers["X-Credit-Charged"])


# --- a contract wallet (EIP-1271) ---------------------------------------------------------------------


def test_a_contract_wallet_signs_in_through_eip1271(credit_proxy: Proxy, standin: StandinModel) -> None:
    """The wallet pays an exact call (its owner signs the EIP-3009 authorization), its change is
    credited to the wallet, and its owner's signature spends it: the signature does not recover to
    the wallet, so the proxy asks the wallet (``isValidSignature``). A wallet that refuses its
    signatures cannot sign in."""
    proxy, chain = credit_proxy, credit_proxy.chain
    owner_key = "0x" + os.urandom(32).hex()
    wallet = Account.create().address
    chain.rpc.call("anvil_setCode", [wallet, json.loads(WALLET_ARTIFACT.read_text())["deployedBytecode"]])
    owner = Account.from_key(owner_key).address
    chain.transact(wallet, selector("setOwner(address)") + encode(["address"], [owner]))
    chain.mint(wallet, 10**6)
    requirement = proxy.requirement(BIG_BODY)
    auth = authorization_for(requirement, wallet)
    paid = proxy.post(body=BIG_BODY, headers=header_of(wrap(auth, sign(owner_key, auth), requirement)))
    assert paid.status_code == 200, paid.text
    change = int(paid.headers["X-Credit-Added"])
    holding = chain.balance(wallet)

    served = signed_in(proxy, key=owner_key, address=wallet)

    assert served.status_code == 200, served.text
    charged = int(served.headers["X-Credit-Charged"])
    assert int(served.headers["X-Credit-Balance"]) == change - charged
    assert Receipt.from_header(served.headers["X-Receipt"]).payer.lower() == wallet.lower()
    assert chain.balance(wallet) == holding
    assert signed_in(proxy, key=owner_key).status_code == 402  # the owner's own address has no credit
    chain.transact(wallet, selector("setRefuse(bool)") + encode(["bool"], [True]))
    calls = len(standin.received)

    refused = signed_in(proxy, key=owner_key, address=wallet)

    assert reason_of(refused) == "invalid_siwx_signature"
    assert len(standin.received) == calls
    chain.transact(wallet, selector("setRefuse(bool)") + encode(["bool"], [False]))
    assert credit_of(proxy, owner_key, wallet)["balance"] == change - charged


# --- expiry -------------------------------------------------------------------------------------------


def test_credit_past_its_lifetime_is_not_spendable_and_its_expiry_is_in_the_ledger(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    for proxy in proxy_with(credit_proxy, credit_seconds=2):
        change = give_change(proxy)
        (lot,) = credit_of(proxy)["lots"]
        assert lot["left"] == change
        while time.time() < lot["expires"] + 1:  # expired once past its last second
            time.sleep(0.05)

        refused = signed_in(proxy)

        assert reason_of(refused) == "insufficient_credit"
        entries = [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _id, fields in redis_of(proxy).xrange(LEDGER_STREAM)
        ]
        expired = [e for e in entries if e["event"] == "credit_expired"]
        assert [(e["payer"], int(e["amount"])) for e in expired] == [(proxy.wallets.payer.lower(), change)]
        statement = credit_of(proxy)
        assert (statement["balance"], statement["lots"]) == (0, [])
        assert statement["recent"][0]["kind"] == "expired"


def test_credit_held_across_its_expiry_is_charged_and_the_rest_expires_in_the_books(
    credit_proxy: Proxy, standin: StandinModel
) -> None:
    """A call holds credit before the lot expires and is charged after: the charge stands, and what
    it gives back finds its lot expired. The ledger accounts for every unit: credited = spent +
    expired."""
    for proxy in proxy_with(credit_proxy, credit_seconds=2):
        change = give_change(proxy)
        (lot,) = credit_of(proxy)["lots"]
        standin.behaviour = Behaviour(delay=max(0.0, lot["expires"] + 1.2 - time.time()))

        served = signed_in(proxy)

        assert served.status_code == 200, served.text
        assert time.time() > lot["expires"] + 1
        charged = int(served.headers["X-Credit-Charged"])
        assert (charged, int(served.headers["X-Credit-Balance"])) == (
            usage_price(proxy, served.json()["usage"]),
            0,
        )
        entries = [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _id, fields in redis_of(proxy).xrange(LEDGER_STREAM)
        ]
        amounts = {
            name: sum(int(e["amount"]) for e in entries if e["event"] == name)
            for name in ("credit", "credit_spent", "credit_expired")
        }
        assert amounts == {"credit": change, "credit_spent": charged, "credit_expired": change - charged}
        statement = credit_of(proxy)
        assert (statement["balance"], statement["held"], statement["lots"]) == (0, 0, [])


# --- privacy ------------------------------------------------------------------------------------------


def everything_in(client: redis.Redis) -> bytes:
    """Every key and value in Redis, whatever its type."""
    parts: list[bytes] = []
    for key in client.scan_iter("*", count=1000):
        kind = client.type(key)
        parts.append(key)
        if kind == b"string":
            parts.append(client.get(key) or b"")
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                parts += [field, value]
        elif kind == b"list":
            parts += client.lrange(key, 0, -1)
        elif kind == b"set":
            parts += list(client.smembers(key))
        elif kind == b"zset":
            parts += client.zrange(key, 0, -1)
        elif kind == b"stream":
            for _id, fields in client.xrange(key):
                for field, value in fields.items():
                    parts += [field, value]
        else:
            raise AssertionError(f"unexpected Redis type {kind!r} of {key!r}")
    return b"\n".join(parts)


def test_no_prompt_or_completion_reaches_redis(credit_proxy: Proxy, standin: StandinModel) -> None:
    proxy = credit_proxy
    marked = {**CHAT_BODY, "messages": [{"role": "user", "content": f"tell me about {MARKER}"}]}
    big, stream = {**marked, "max_tokens": 2000}, {**marked, "stream": True}
    completions = []
    paid = proxy.pay(proxy.payment(proxy.requirement(big)), big)  # change credited
    assert paid.status_code == 200
    completions.append(paid.json()["choices"][0]["message"]["content"])
    served = signed_in(proxy, marked)  # spent from credit
    assert served.status_code == 200
    completions.append(served.json()["choices"][0]["message"]["content"])
    streamed = signed_in(proxy, stream)
    assert streamed.status_code == 200
    completions.append(
        "".join(
            json.loads(e.removeprefix("data: "))["choices"][0]["delta"].get("content", "")
            for e in sse_events(streamed.text)
            if e.startswith("data: {") and '"choices": [{' in e
        )
    )
    standin.behaviour = Behaviour(status=500, times=2)
    assert proxy.pay(proxy.payment(proxy.requirement(marked)), marked).status_code == 502
    assert signed_in(proxy, marked).status_code == 200  # the failed call's payment claimed into credit
    assert credit_of(proxy)["recent"]

    client = redis_of(proxy)
    kept = [
        key
        for kind in ("credit", "credit-log", "credit-sources")
        for key in client.scan_iter(f"x402:{{p*}}:{kind}:*")
    ]
    assert len(kept) == 3  # the wallet's hash, its recent entries and its sources are among what is read
    everything = everything_in(client)
    for secret in (MARKER, *completions):
        assert secret and secret.encode() not in everything


# --- header size --------------------------------------------------------------------------------------


@pytest.mark.parametrize("public_url", ["", "https://confidential-inference.gateway.example.org"])
def test_the_official_upto_clients_header_echoing_every_extension_fits_a_header_line(
    credit_proxy: Proxy, standin: StandinModel, public_url: str
) -> None:
    """The official client echoes every extension the 402 declares (sign-in-with-x among them) into
    its payment header, and with EIP-2612 gas sponsoring adds a signed permit: the whole
    ``PAYMENT-SIGNATURE`` line stays under gunicorn's default limit for one header line, on the
    route whose 402 is the largest (chat: the longest bazaar schema), with a loopback URL and with a
    public one (named three times: the resource, the sign-in's domain and uri)."""
    for proxy in proxy_with(credit_proxy, public_url=public_url):
        client = x402ClientSync()
        signer = EthAccountSignerWithRPC(
            Account.from_key(proxy.wallets.payer_key), proxy.settings.rpc_urls[0]
        )
        client.register("eip155:*", UptoEvmClientScheme(signer))
        response = wrapRequestsWithPayment(requests.Session(), client).post(
            proxy.url + "/v1/chat/completions", json=BIG_BODY, timeout=60
        )
        assert response.status_code == 200, response.text
    header = response.request.headers["PAYMENT-SIGNATURE"]
    sent = payload_of(header)
    assert sent["accepted"]["scheme"] == "upto"
    assert {"sign-in-with-x", "payment-identifier", "eip2612GasSponsoring", "bazaar"} <= set(
        sent["extensions"]
    )
    assert sent["extensions"]["eip2612GasSponsoring"]["info"]["signature"]
    assert sent["resource"]["url"] == (public_url or proxy.url) + "/v1/chat/completions"
    line = len(b"PAYMENT-SIGNATURE: " + header.encode())
    assert line < GUNICORN_FIELD_LIMIT, line


# --- found wanting once, fixed ------------------------------------------------------------------------


def test_a_browser_may_send_a_sign_in(proxy: Proxy) -> None:
    preflight = requests.options(
        proxy.url + "/v1/chat/completions",
        headers={
            "Origin": "https://wallet.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,sign-in-with-x",
        },
        timeout=10,
    )
    assert preflight.status_code == 204
    allowed = {name.strip().lower() for name in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "payment-signature", "sign-in-with-x"} <= allowed


def test_a_sign_in_without_credit_leaves_only_its_nonce_for_its_life(
    proxy: Proxy, standin: StandinModel
) -> None:
    """A wallet with no credit that signs in writes no credit and no entry: only its used nonce,
    kept as long as the nonce could be used (a free request cannot make Redis keep a key longer)."""
    stranger = "0x" + os.urandom(32).hex()  # a throwaway key: free to make, no credit, never paid
    refused = signed_in(proxy, key=stranger)
    assert reason_of(refused) == "insufficient_credit"
    wallet, log, nonces, sources = credit_keys(8453, proxy.settings.asset, Account.from_key(stranger).address)
    client = redis_of(proxy)
    nonce = payload_of(refused.request.headers["SIGN-IN-WITH-X"])["nonce"]
    assert not client.exists(wallet) and not client.exists(log) and not client.exists(sources)
    assert client.zrange(nonces, 0, -1) == [nonce.encode()]
    # as long as it could be used, and a margin for hosts whose clocks run ahead
    assert 0 < client.ttl(nonces) <= MAX_AGE + FUTURE_SKEW + NONCE_CLOCK_MARGIN + 5


def test_a_credit_statement_is_never_stored_by_caches(credit_proxy: Proxy) -> None:
    info = get_credit(credit_proxy).json()["extensions"]["sign-in-with-x"]["info"]
    stated = get_credit(credit_proxy, sign_in_header(info, credit_proxy.wallets.payer_key))
    assert stated.status_code == 200
    assert "no-store" in stated.headers.get("Cache-Control", "")


def test_a_model_priced_per_call_streams_as_the_buyer_asked(
    proxy: Proxy, standin: StandinModel, tmp_path: Path
) -> None:
    """Usage cannot change a per-call price, so an exact stream of such a model is forwarded as the
    buyer sent it (no usage asked of the host, which may not support it) and leaves no change."""
    catalog = tmp_path / "per_call.toml"
    catalog.write_text(
        DEFAULT_CATALOG.read_text().replace(
            '\npricing = "per_token"', '\npricing = "per_call"\nprice = 1777', 1
        )
    )
    for flat in proxy_with(proxy, catalog_path=catalog):
        body = {**CHAT_BODY, "stream": True}
        requirement = flat.requirement(body)
        assert int(requirement["amount"]) == 1777
        streamed = flat.pay(flat.payment(requirement), body)
        assert streamed.status_code == 200, streamed.text
        assert "stream_options" not in standin.received[-1].body
        assert "x402-credit" not in streamed.text
