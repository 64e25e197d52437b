"""The SIWx client lane works on its own: its virtualenv builds and the official client signs in.

``siwx_venv.siwx_python()`` builds (or reuses) the virtualenv of the official PyPI ``x402`` 2.25 client
with its sign-in-with-x extension (``signinwithethereum`` needs an older eth-account and web3 than
ours). In it, the official ``create_siwx_payload`` signs a challenge like the one our 402 declares;
here, in our own environment, eth_account recovers the signer from the EIP-4361 message it printed,
and that message is the one we rebuild from the payload's fields, line for line (the layout
``siwx_client.py`` records at its top). No server is involved.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct

from tests.interop.siwx_venv import clean_env, siwx_python

SIGNER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"  # anvil's first account
CLIENT_TIMEOUT = 60  # seconds, for the signing process (the venv is built before it starts)

# Run by the virtualenv's Python: argv[1] the declared info with the chosen chain, argv[2] the key.
SIGN = """
import asyncio, json, sys
from eth_account import Account
from x402.extensions.sign_in_with_x import create_siwx_message, create_siwx_payload
info, account = json.loads(sys.argv[1]), Account.from_key(sys.argv[2])
payload = asyncio.run(create_siwx_payload(info, account, info["uri"]))
print(json.dumps({"message": create_siwx_message(info, account.address),
                  "payload": payload.model_dump(by_alias=True, exclude_none=True)}))
"""


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def eip4361(payload: dict[str, Any]) -> str:
    """The message rebuilt from a SIWx payload without a statement, notBefore or requestId."""
    return "\n".join(
        [
            f"{payload['domain']} wants you to sign in with your Ethereum account:",
            payload["address"],
            "",
            "",
            f"URI: {payload['uri']}",
            f"Version: {payload['version']}",
            f"Chain ID: {payload['chainId'].removeprefix('eip155:')}",
            f"Nonce: {payload['nonce']}",
            f"Issued At: {payload['issuedAt']}",
            f"Expiration Time: {payload['expirationTime']}",
            "Resources:",
            *(f"- {resource}" for resource in payload["resources"]),
        ]
    )


def test_official_siwx_client_signs_an_eip4361_message_we_can_verify() -> None:
    now = datetime.now(UTC)
    uri = "http://127.0.0.1:1234/v1/chat/completions"
    info = {
        "domain": "127.0.0.1:1234",
        "uri": uri,
        "version": "1",
        "nonce": secrets.token_hex(20),
        "issuedAt": iso(now),
        "expirationTime": iso(now + timedelta(minutes=5)),
        "chainId": "eip155:8453",
        "type": "eip191",
        "resources": [uri],
    }
    done = subprocess.run(
        [str(siwx_python()), "-c", SIGN, json.dumps(info), SIGNER_KEY],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    signed = json.loads(done.stdout)
    message, payload = signed["message"], signed["payload"]
    print(message)

    address = Account.from_key(SIGNER_KEY).address
    assert payload == {**info, "address": address, "signature": payload["signature"]}
    assert message == eip4361(payload)
    assert Account.recover_message(encode_defunct(text=message), signature=payload["signature"]) == address
