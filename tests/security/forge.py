"""Helpers for the hostile-input tests: sign payments exactly as a cheating client would (any domain,
any field), send raw HTTP, and read what the proxy left behind in Redis and on chain."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import redis
from eth_abi import encode

from app.backends.token import selector
from app.devnet import BASE_USDC
from app.payments.keys import PAYMENT_KEYS
from app.x402.codec import encode_header
from app.x402.eip712 import address_of_key, authorization_digest, domain_separator, sign_digest
from app.x402.wire import V1_HEADER, V2_HEADER, Authorization, PaymentPayload
from tests.support import CHAT_BODY, Proxy

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PING = "/v1/models/hermes-3-8b-tee/ping"
SEPOLIA_USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
STRANGER = "0x000000000000000000000000000000000000dEaD"
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True)
class Domain:
    """An EIP-712 domain of the token (the real one by default)."""

    name: str = "USD Coin"
    version: str = "2"
    chain_id: int = 8453
    contract: str = BASE_USDC


BASE_DOMAIN = Domain()


def new_key() -> str:
    return "0x" + os.urandom(32).hex()


def address_of(key: str) -> str:
    """Lower-case address of a 0x-hex private key."""
    return address_of_key(bytes.fromhex(key[2:]))


def digest_of(auth: Authorization, domain: Domain = BASE_DOMAIN) -> bytes:
    separator = domain_separator(domain.name, domain.version, domain.chain_id, domain.contract)
    return authorization_digest(
        separator, auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce
    )


def sign(key: str, auth: Authorization, domain: Domain = BASE_DOMAIN) -> bytes:
    """A canonical 65-byte signature of ``auth`` under ``domain`` by ``key``."""
    return sign_digest(bytes.fromhex(key[2:]), digest_of(auth, domain))


def authorization_for(
    requirement: dict[str, Any],
    payer: str,
    *,
    version: int = 2,
    now: int | None = None,
    **changes: Any,
) -> Authorization:
    """The authorization an honest wallet signs for ``requirement``, with ``changes`` applied."""
    now = now or int(time.time())
    amount = requirement["amount" if version == 2 else "maxAmountRequired"]
    auth = Authorization(
        from_=payer.lower(),
        to=str(requirement["payTo"]).lower(),
        value=int(amount),
        valid_after=0 if version == 2 else now - 600,
        valid_before=now + int(requirement["maxTimeoutSeconds"]),
        nonce=os.urandom(32),
    )
    return replace(auth, **changes)


def wrap(
    auth: Authorization,
    signature: bytes,
    requirement: dict[str, Any],
    version: int = 2,
    network: str | None = None,
) -> PaymentPayload:
    """A payment payload around ``auth``; for v2 ``accepted`` echoes ``requirement`` (whose scheme and
    network are the ones read), for v1 ``network`` may override the entry's."""
    return PaymentPayload(
        version=version,
        scheme=requirement["scheme"],
        network=network or requirement["network"],
        authorization=auth,
        signature=signature,
        accepted=requirement if version == 2 else None,
    )


def header_of(payment: PaymentPayload, header_version: int | None = None) -> dict[str, str]:
    name = V2_HEADER if (header_version or payment.version) == 2 else V1_HEADER
    return {name: encode_header(payment.to_wire())}


@dataclass
class Attempt:
    """One hostile request: its headers, body and path, plus extra addresses whose token balances
    must not change (contract wallets, strangers)."""

    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=lambda: dict(CHAT_BODY))
    path: str = CHAT
    watch: tuple[str, ...] = ()


def send(proxy: Proxy, attempt: Attempt) -> Any:
    import requests

    method = "GET" if attempt.path.endswith("/ping") else "POST"
    return requests.request(
        method,
        proxy.url + attempt.path,
        json=None if method == "GET" else attempt.body,
        headers=attempt.headers,
        timeout=30,
    )


def redis_of(proxy: Proxy) -> redis.Redis:
    return redis.Redis.from_url(proxy.settings.redis_url)


def payment_states(proxy: Proxy) -> dict[str, str]:
    """State of every payment hash in Redis, by key."""
    client = redis_of(proxy)
    try:
        return {
            key.decode(): (client.hget(key, "state") or b"").decode()
            for key in client.scan_iter(match=PAYMENT_KEYS, count=1000)
        }
    finally:
        client.close()


def relayer_tx_count(proxy: Proxy) -> int:
    return int(proxy.chain.rpc.call("eth_getTransactionCount", [proxy.wallets.relayer, "latest"]), 16)


def token_balances(proxy: Proxy, *extra: str) -> dict[str, int]:
    addresses = [proxy.wallets.payer, proxy.wallets.pay_to, *extra]
    return {a.lower(): proxy.chain.balance(a) for a in addresses}


def token_tx(proxy: Proxy, signature: str, types: list[str], args: list[Any]) -> None:
    receipt = proxy.chain.token_call(signature, types, args)
    assert int(receipt["status"], 16) == 1, f"{signature} reverted"


def call_contract(proxy: Proxy, to: str, signature: str, types: list[str], args: list[Any]) -> None:
    receipt = proxy.chain.transact(to, selector(signature) + encode(types, args))
    assert int(receipt["status"], 16) == 1, f"{signature} on {to} reverted"


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    proxy: Proxy,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    path: bytes = CHAT.encode(),
    method: bytes = b"POST",
    chunked: bool = False,
) -> RawResponse:
    """Send bytes exactly as given (no client-side header validation) and read the answer."""
    target = urlsplit(proxy.url)
    head = [method + b" " + path + b" HTTP/1.1", f"Host: {target.netloc}".encode(), b"Connection: close"]
    head.append(b"Content-Type: application/json")
    if chunked:
        head.append(b"Transfer-Encoding: chunked")
    else:
        head.append(b"Content-Length: " + str(len(body)).encode())
    head += [name + b": " + value for name, value in headers]
    payload = body
    if chunked:
        step = 65536
        payload = b"".join(
            f"{len(body[i : i + step]):x}\r\n".encode() + body[i : i + step] + b"\r\n"
            for i in range(0, len(body), step)
        )
        payload += b"0\r\n\r\n"
    with socket.create_connection((target.hostname, target.port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")

        def send_body() -> None:
            # the server may answer (413, 431) and stop reading before the end
            with contextlib.suppress(OSError):
                sock.sendall(payload)

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        received = _read_response(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout=30)
    head_bytes, _, rest = received.partition(b"\r\n\r\n")
    lines = head_bytes.split(b"\r\n")
    status = int(lines[0].split()[1])
    parsed: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding", "").lower() == "chunked":
        rest = _dechunk(rest)
    return RawResponse(status, parsed, rest)


def _read_response(sock: socket.socket) -> bytes:
    """One response: up to its Content-Length, its last chunk, or the end of the connection (the
    server may keep the socket open after answering a body it did not read)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
        head, found, rest = received.partition(b"\r\n\r\n")
        if not found:
            continue
        length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
        if length and len(rest) >= int(length.group(1)):
            return received
        if re.search(rb"(?im)^transfer-encoding:\s*chunked", head) and rest.endswith(b"0\r\n\r\n"):
            return received


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)
