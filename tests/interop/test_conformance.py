"""The 402 answer against the properties PyPI ``x402-conformance`` 1.6 grades as P1–P7.

``x402conf resource URL`` sends one unpaid **GET** (no body, no method option) and grades the answer:

- P1 it is HTTP 402;
- P2 the PaymentRequired decodes: the ``PAYMENT-REQUIRED`` header as base64 JSON, else a v1 JSON body;
- P3 it has ``x402Version`` (1 or 2), for v2 ``resource.url`` (and it came in the header), and a
  non-empty ``accepts``;
- P4 every entry has non-empty string ``scheme``, ``network``, ``asset``, ``payTo``, an amount
  (``amount``; v1 ``maxAmountRequired``) that is a string of digits above 0, a positive integer
  ``maxTimeoutSeconds``, an object ``extra``; v2 networks are CAIP-2; v1 entries carry ``resource``
  and ``description``;
- P5 exact on EVM names the token's EIP-712 domain in ``extra.name`` / ``extra.version``
  (``assetTransferMethod`` absent, ``eip3009``, ``permit2`` or ``erc7710``);
- P6 the ``PAYMENT-REQUIRED`` header fits client limits (a warning above 8 KB, an error above 16 KB);
- P7 a v2 entry whose payment flow is not an authorization declares ``extra.paymentFlow`` (a warning).

Our paid routes are POST-only, so the tool cannot reach them. Here:

1. our own check of the same properties on the POST 402s (written from the list above, and stricter:
   it grades the v1 body too, the way the legacy v1 client validates it, and holds the header to 8 KB);
2. the tool's own grading function (``x402conf.harness.check_402``) applied to the POST answer, so a
   change in the tool's rules shows up here;
3. ``x402conf resource`` itself against the paid GET route (``/v1/models/<model>/ping``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from x402conf import harness

from tests.interop.paid import CLIENT_TIMEOUT
from tests.support import CHAT_BODY, Proxy

pytestmark = pytest.mark.integration

CAIP2_RE = re.compile(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}")
DIGITS_RE = re.compile(r"[0-9]+")
HEADER_BUDGET = 8 * 1024
V1_EVM_NAMES = {"base", "base-sepolia"}
TRANSFER_METHODS = {"eip3009", "permit2", "erc7710"}
COMPLETIONS_BODY = {"model": "hermes-3-8b-tee", "prompt": "Say hello.", "max_tokens": 16}
PAID_POST_ROUTES = [("/v1/chat/completions", CHAT_BODY), ("/v1/completions", COMPLETIONS_BODY)]
PAID_GET_ROUTE = "/v1/models/hermes-3-8b-tee/ping"

Problems = dict[str, list[str]]


def _positive_digits(value: Any) -> bool:
    return isinstance(value, str) and DIGITS_RE.fullmatch(value) is not None and int(value) > 0


def _absolute_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def entry_problems(entry: Any, version: int) -> Problems:
    """P4, P5 and P7 for one ``accepts`` entry."""
    found: Problems = {"P4": [], "P5": [], "P7": []}
    if not isinstance(entry, dict):
        found["P4"].append("entry is not an object")
        return found
    p4 = found["P4"]
    for key in ("scheme", "network", "asset", "payTo"):
        if not (isinstance(entry.get(key), str) and entry[key]):
            p4.append(f"{key} is not a non-empty string")
    amount_key = "amount" if version == 2 else "maxAmountRequired"
    if not _positive_digits(entry.get(amount_key)):
        p4.append(f"{amount_key} is not a string of digits above 0")
    timeout = entry.get("maxTimeoutSeconds")
    if type(timeout) is not int or timeout <= 0:  # a JSON integer: not a bool, not 60.0
        p4.append("maxTimeoutSeconds is not a positive integer")
    extra = entry.get("extra")
    if not isinstance(extra, dict):
        p4.append("extra is not an object")
        extra = {}
    network = entry.get("network")
    if version == 2 and isinstance(network, str) and not CAIP2_RE.fullmatch(network):
        p4.append("network is not CAIP-2")
    if version == 1:
        if network not in V1_EVM_NAMES:
            p4.append("network is not a v1 network name")
        if not _absolute_url(entry.get("resource")):
            p4.append("resource is not an absolute URL")
        for key in ("description", "mimeType"):
            if not isinstance(entry.get(key), str):
                p4.append(f"{key} is not a string")
        if "outputSchema" in entry:
            p4.append("outputSchema is present (the v1 client refuses even null)")

    evm = isinstance(network, str) and (network.startswith("eip155:") or network in V1_EVM_NAMES)
    if entry.get("scheme") == "exact" and evm:
        method = extra.get("assetTransferMethod", "eip3009")
        if method not in TRANSFER_METHODS:
            found["P5"].append(f"assetTransferMethod {method!r} is unknown")
        domain = [extra.get("name"), extra.get("version")]
        if method == "eip3009" and not all(isinstance(v, str) and v for v in domain):
            found["P5"].append("extra.name / extra.version (the token's EIP-712 domain) missing")
    flow = extra.get("paymentFlow")
    if flow is not None and not (isinstance(flow, str) and flow):
        found["P7"].append("extra.paymentFlow is present but not a non-empty string")
    return found


def payment_required_problems(status: int, headers: Any, body: bytes) -> tuple[Problems, dict[str, Any]]:
    """P1–P7 for one 402, grading the v2 header and the v1 body separately. Returns (problems, decoded)."""
    found: Problems = {f"P{i}": [] for i in range(1, 8)}
    decoded: dict[str, Any] = {}
    if status != 402:
        found["P1"].append(f"HTTP {status}, not 402")
        return found, decoded

    header = headers.get("PAYMENT-REQUIRED")
    if header is None:
        found["P2"].append("no PAYMENT-REQUIRED header")
    else:
        if len(header.encode()) > HEADER_BUDGET:
            found["P6"].append(f"PAYMENT-REQUIRED is {len(header.encode())} bytes, above {HEADER_BUDGET}")
        try:
            decoded[2] = json.loads(base64.b64decode(header, validate=True))
        except (binascii.Error, ValueError):
            found["P2"].append("PAYMENT-REQUIRED is not standard base64 of JSON")
    try:
        decoded[1] = json.loads(body)
    except ValueError:
        found["P2"].append("the body is not JSON")

    for version in (2, 1):
        required = decoded.get(version)
        if required is None:
            continue
        where = "header" if version == 2 else "body"
        if not isinstance(required, dict):
            found["P2"].append(f"the {where} is not a JSON object")
            continue
        if type(required.get("x402Version")) is not int or required["x402Version"] != version:
            found["P3"].append(f"the {where} has x402Version {required.get('x402Version')!r}, not {version}")
        if version == 2:
            resource = required.get("resource")
            if not (isinstance(resource, dict) and _absolute_url(resource.get("url"))):
                found["P3"].append("resource.url is not an absolute URL")
        accepts = required.get("accepts")
        if not (isinstance(accepts, list) and accepts):
            found["P3"].append(f"accepts in the {where} is missing or empty")
            continue
        for index, entry in enumerate(accepts):
            for check, problems in entry_problems(entry, version).items():
                found[check].extend(f"{where} accepts[{index}]: {p}" for p in problems)
    return found, decoded


def unpaid_402(
    proxy: Proxy, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> requests.Response:
    return requests.post(proxy.url + path, json=body, headers=headers, timeout=CLIENT_TIMEOUT)


REFUSED = {"X-PAYMENT": base64.b64encode(b'{"x402Version":1}').decode()}  # a malformed payment: a 402 again


@pytest.mark.parametrize(("path", "body"), PAID_POST_ROUTES)
@pytest.mark.parametrize("sent", [None, REFUSED], ids=["unpaid", "refused"])
def test_post_402_has_the_p1_to_p7_properties(
    proxy: Proxy, path: str, body: dict[str, Any], sent: dict[str, str] | None
) -> None:
    response = unpaid_402(proxy, path, body, sent)

    problems, decoded = payment_required_problems(response.status_code, response.headers, response.content)

    assert {check: found for check, found in problems.items() if found} == {}
    assert set(decoded) == {1, 2}
    assert decoded[2]["resource"]["url"] == proxy.url + path


@pytest.mark.parametrize(("path", "body"), PAID_POST_ROUTES)
def test_v2_header_and_v1_body_ask_for_the_same_payment(
    proxy: Proxy, path: str, body: dict[str, Any]
) -> None:
    """Whichever a client reads, it signs the same thing, and it is the token's real domain."""
    response = unpaid_402(proxy, path, body)
    _, decoded = payment_required_problems(response.status_code, response.headers, response.content)
    (v2, upto, batch), (v1,) = decoded[2]["accepts"], decoded[1]["accepts"]  # x402 v1: exact only
    assert (upto["scheme"], upto["amount"]) == ("upto", v2["amount"])
    assert (batch["scheme"], batch["amount"]) == ("batch-settlement", v2["amount"])

    assert (v2["network"], v1["network"]) == ("eip155:8453", "base")
    assert v1["maxAmountRequired"] == v2["amount"]
    assert v1["resource"] == decoded[2]["resource"]["url"]
    for key in ("scheme", "asset", "payTo", "maxTimeoutSeconds", "extra"):
        assert v1[key] == v2[key], key
    assert v2["extra"] == {"name": proxy.settings.asset_name, "version": proxy.settings.asset_version}


def _encode(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def _v2(change: Any) -> Any:
    def mutate(status: int, headers: dict[str, str], v2: dict[str, Any], v1: dict[str, Any]) -> Any:
        change(v2)
        return status, {**headers, "PAYMENT-REQUIRED": _encode(v2)}, v1

    return mutate


def _v1(change: Any) -> Any:
    def mutate(status: int, headers: dict[str, str], v2: dict[str, Any], v1: dict[str, Any]) -> Any:
        change(v1)
        return status, headers, v1

    return mutate


FAULTS = {
    "P1": lambda status, headers, v2, v1: (200, headers, v1),
    "P2": lambda status, headers, v2, v1: (status, {**headers, "PAYMENT-REQUIRED": "%%%"}, v1),
    "P3": _v2(lambda v2: v2.update(accepts=[])),
    "P4": _v1(lambda v1: v1["accepts"][0].update(outputSchema=None)),
    "P5": _v2(lambda v2: v2["accepts"][0]["extra"].pop("name")),
    "P6": _v2(lambda v2: v2["resource"].update(description="x" * HEADER_BUDGET)),
    "P7": _v2(lambda v2: v2["accepts"][0]["extra"].update(paymentFlow="")),
}


@pytest.mark.parametrize("check", sorted(FAULTS))
def test_our_check_catches_each_fault(proxy: Proxy, check: str) -> None:
    """Our grading is only worth something if it fails a 402 broken in just the way it looks for."""
    response = unpaid_402(proxy, *PAID_POST_ROUTES[0])
    _, decoded = payment_required_problems(response.status_code, response.headers, response.content)
    headers = {"PAYMENT-REQUIRED": response.headers["PAYMENT-REQUIRED"]}
    status, headers, v1 = FAULTS[check](response.status_code, headers, decoded[2], decoded[1])

    problems, _ = payment_required_problems(status, headers, json.dumps(v1).encode())

    assert [name for name, found in problems.items() if found] == [check]


@pytest.mark.parametrize(("path", "body"), PAID_POST_ROUTES)
def test_the_tools_own_grading_passes_on_the_post_402(proxy: Proxy, path: str, body: dict[str, Any]) -> None:
    """x402conf's grading function on our POST answer (the CLI would GET, which these routes refuse)."""
    response = unpaid_402(proxy, path, body)
    graded = harness.check_402(
        {
            "status": response.status_code,
            "headers": {k.lower(): v for k, v in response.headers.items()},
            "body": response.content,
        }
    )

    assert [c["check"].split()[0] for c in graded] == ["P1", "P2", "P6", "P3", "P4", "P5", "P7"]
    assert [(c["check"], c["detail"]) for c in graded if not c["pass"]] == []


def test_x402conf_resource_passes_on_the_paid_get_route(proxy: Proxy) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "x402conf", "resource", proxy.url + PAID_GET_ROUTE, "--fail-on-error"],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    report = json.loads(result.stdout)
    (run,) = report["results"]
    failed = [(c["check"], c["detail"]) for c in run["checks"] if not c["pass"]]
    assert result.returncode == 0 and failed == [], failed
    assert {c["check"].split()[0] for c in run["checks"]} == {"P1", "P2", "P3", "P4", "P5", "P6", "P7"}
