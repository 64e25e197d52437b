"""The official PyPI ``x402`` 2.25 client with its sign-in-with-x (SIWx) extension, as a peer process.

Run with the Python of the SIWx client's own virtualenv (``siwx_venv.siwx_python()``): its
``signinwithethereum`` needs an older eth-account and web3 than our environment has, so this script
imports nothing from our ``app`` or ``tests`` packages, only the client's own.

    siwx_client.py --url URL --key 0xPRIVATEKEY [--body JSON] [--method POST|GET] [--no-pay]
                   [--requests N] [--scheme exact|upto|both] [--rpc URL] [--timeout SECONDS]

It builds ``x402Client()`` (default spend controls) with the EVM ``exact`` scheme registered
(``register_exact_evm_client``: v2 ``eip155:*`` and v1), or ``upto`` (``UptoEvmScheme``), or both (the
first one the 402 lists then wins), and the SIWx client extension (``create_siwx_client_extension``,
``register_extension``) for the same key; ``--no-pay`` registers no scheme, so only signing in can
succeed. ``--rpc`` gives the signer chain reads (``EthAccountSignerWithRPC``), which ``upto`` needs to
add an EIP-2612 permit when the payer has not approved Permit2. It sends the request N times, one
after another, through ``httpx.AsyncClient(transport=x402_httpx_transport(client))``, and records
every request that transport sent (wrapping the inner transport): method, status, whether it carried
``PAYMENT-SIGNATURE`` ("paid") and whether it carried ``SIGN-IN-WITH-X`` ("signed_in").

How the client behaves (x402 2.25, ``x402/http/clients/httpx.py``): on a 402 whose v2
``PaymentRequired.extensions`` declares ``sign-in-with-x`` with an ``eip191`` entry in
``supportedChains``, the extension's ``transport_hooks.http.on_payment_required`` signs the declared
info and the request is re-sent with ``SIGN-IN-WITH-X`` alone; if that answer is not a 402 it is the
answer. Otherwise the client pays the ORIGINAL 402 (it does not read the second one) with
``PAYMENT-SIGNATURE`` alone: the two headers never travel together. The hook swallows its own errors
(a challenge whose domain or uri is not the answering origin, a nonce siwe rejects, …): the client
then pays without trying to sign in. Without a scheme (``--no-pay``) a refused sign-in makes the
transport raise ``PaymentError`` ("Failed to handle payment: …"); that request's entry in
``responses`` is then ``{"error": "..."}`` (and ``sent`` still lists both 402s).

Output, one JSON object on stdout:
``{"responses": [{"status", "headers": {lower-case name: value}, "body": text} | {"error"}, ...],
"sent": [{"method", "status", "paid", "signed_in"}, ...]}``. Bodies (streams too) are read whole.

The EIP-4361 message that is signed (EIP-191 ``personal_sign``) is siwe 5.0.2's ``prepare_message``
of the declared info plus ``address`` (the signer's EIP-55 checksummed address) and ``chainId``
(the number after ``eip155:``); every value is copied verbatim (timestamps are not re-formatted,
the nonce must be ≥ 8 ASCII letters or digits), lines are joined by a bare LF, no trailing LF:

    {domain} wants you to sign in with your Ethereum account:
    {address}
    <empty line>
    {statement}                        this line only if a statement is present (even an empty one)
    <empty line>
    URI: {uri}
    Version: {version}
    Chain ID: {chain id as a decimal number}
    Nonce: {nonce}
    Issued At: {issuedAt}
    Expiration Time: {expirationTime}  only if set (non-empty)
    Not Before: {notBefore}            only if set (non-empty)
    Request ID: {requestId}            only if present (even empty)
    Resources:                         only if resources is present (even an empty list)
    - {resources[0]}
    - {resources[1]} ...

So without a statement, the address line is followed by TWO empty lines before ``URI:``. An example
(anvil's first key, no statement; ``test_siwx_lane.py`` prints one with ``pytest -s``):

    127.0.0.1:1234 wants you to sign in with your Ethereum account:
    0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266


    URI: http://127.0.0.1:1234/v1/chat/completions
    Version: 1
    Chain ID: 8453
    Nonce: 380fec89cf1e43ad36a3b1d3823efe0bb01ced55
    Issued At: 2026-11-30T10:12:08.293Z
    Expiration Time: 2026-11-30T10:17:08.293Z
    Resources:
    - http://127.0.0.1:1234/v1/chat/completions

The ``SIGN-IN-WITH-X`` header is standard base64 of the JSON payload (``domain, address, uri, version,
chainId`` as "eip155:8453", ``type`` "eip191", ``nonce, issuedAt``, the optional fields that were set,
and ``signature``, 0x-prefixed 65-byte hex).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import httpx
from eth_account import Account
from x402 import x402Client
from x402.extensions.sign_in_with_x import CreateSIWxClientExtensionOptions, create_siwx_client_extension
from x402.http.clients.httpx import PaymentError, x402_httpx_transport
from x402.mechanisms.evm import EthAccountSigner, EthAccountSignerWithRPC
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.upto import UptoEvmScheme

PAYMENT_SIGNATURE = "payment-signature"
SIGN_IN_WITH_X = "sign-in-with-x"


class RecordingTransport(httpx.AsyncBaseTransport):
    """The transport under x402's: everything the client put on the wire, with the answer's status."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.sent: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.sent.append(
            {
                "method": request.method,
                "status": response.status_code,
                "paid": PAYMENT_SIGNATURE in request.headers,
                "signed_in": SIGN_IN_WITH_X in request.headers,
            }
        )
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def build_client(key: str, scheme: str, pay: bool, rpc: str | None) -> x402Client:
    account = Account.from_key(key)
    client = x402Client()
    if pay:
        signer = EthAccountSignerWithRPC(account, rpc) if rpc else EthAccountSigner(account)
        if scheme in ("exact", "both"):
            register_exact_evm_client(client, signer)
        if scheme in ("upto", "both"):
            client.register("eip155:*", UptoEvmScheme(signer))
    client.register_extension(
        create_siwx_client_extension(CreateSIWxClientExtensionOptions(signers=[account]))
    )
    return client


async def run(args: argparse.Namespace) -> dict[str, Any]:
    client = build_client(args.key, args.scheme, not args.no_pay, args.rpc)
    recorder = RecordingTransport(httpx.AsyncHTTPTransport())
    method = args.method or ("POST" if args.body is not None else "GET")
    headers = {"content-type": "application/json"} if args.body is not None else {}
    content = args.body.encode() if args.body is not None else None
    responses: list[dict[str, Any]] = []
    async with httpx.AsyncClient(
        transport=x402_httpx_transport(client, recorder), timeout=args.timeout
    ) as http:
        for _ in range(args.requests):
            try:
                response = await http.request(method, args.url, headers=headers, content=content)
            except (PaymentError, httpx.HTTPError) as exc:
                responses.append({"error": f"{type(exc).__name__}: {exc}"})
                continue
            responses.append(
                {
                    "status": response.status_code,
                    "headers": {name.lower(): value for name, value in response.headers.items()},
                    "body": response.text,
                }
            )
    return {"responses": responses, "sent": recorder.sent}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True, help="the payer's private key, 0x-prefixed hex")
    parser.add_argument("--body", help="a JSON request body, sent as given (default: none)")
    parser.add_argument("--method", choices=("POST", "GET"), help="default: POST with --body, else GET")
    parser.add_argument("--no-pay", action="store_true", help="register no payment scheme: sign in only")
    parser.add_argument("--requests", type=int, default=1, help="how many times to send it, one by one")
    parser.add_argument("--scheme", choices=("exact", "upto", "both"), default="exact")
    parser.add_argument("--rpc", help="a JSON-RPC URL for the signer's chain reads (upto gas sponsoring)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds, per HTTP exchange")
    args = parser.parse_args(argv)
    if args.body is not None:
        json.loads(args.body)  # a bad --body is the caller's error, not the server's
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    return args


def main(argv: list[str]) -> int:
    print(json.dumps(asyncio.run(run(parse_args(argv)))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
