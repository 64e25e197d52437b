"""CPU per payment verification, in this process (no I/O): ours vs eth-account's generic EIP-712 path.

Ours, per payment header: ``app.x402.wire.parse_payment_header`` (strict base64 + JSON + wire
object), ``app.x402.checks.match_requirement`` and ``check_authorization`` (recipient, value, time
window, EIP-712 digest and coincurve recovery, low-s). Baseline, for the same payments:
``Account.recover_message(encode_typed_data(full_message=...))``, the typed-data path the reference
facilitator uses. Measured with ``time.process_time`` over the whole batch; payments are signed
beforehand by distinct keys.

Goal (issue "Fast"): <= 0.15 ms per verification.

    python -m benchmarks.verify_cpu [--payments 5000]
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data

from app.x402.checks import check_authorization, match_requirement
from app.x402.codec import encode_header
from app.x402.payer import sign_payment
from app.x402.wire import PaymentPayload, Requirement, parse_payment_header

from .harness import Row, print_table

GOAL = 0.00015
USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"

TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ],
}


def requirement() -> Requirement:
    return Requirement(
        network="eip155:8453",
        amount=1000,
        asset=USDC,
        pay_to=PAY_TO,
        max_timeout_seconds=120,
        asset_name="USD Coin",
        asset_version="2",
    )


def payments(count: int, keys: int = 64) -> list[tuple[str, PaymentPayload]]:
    ours = requirement().to_v2()
    signers = [os.urandom(32) for _ in range(keys)]
    now = int(time.time())
    signed = []
    for i in range(count):
        payment = sign_payment(ours, 2, signers[i % keys], now, os.urandom(32))
        signed.append((encode_header(payment.to_wire()), payment))
    return signed


def typed_data(payment: PaymentPayload) -> dict[str, Any]:
    auth = payment.authorization
    return {
        "types": TYPES,
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": "USD Coin", "version": "2", "chainId": 8453, "verifyingContract": USDC},
        "message": {
            "from": auth.from_,
            "to": auth.to,
            "value": auth.value,
            "validAfter": auth.valid_after,
            "validBefore": auth.valid_before,
            "nonce": auth.nonce,
        },
    }


def ours_cpu(batch: list[tuple[str, PaymentPayload]]) -> float:
    req = requirement()
    now = int(time.time())
    gc.collect()
    started = time.process_time()
    for header, _ in batch:
        parsed = parse_payment_header(header, 2)
        assert isinstance(parsed, PaymentPayload)
        assert match_requirement(parsed, req)
        offline = check_authorization(parsed, req, now)
        assert offline.verdict and offline.ecdsa_signer
    return (time.process_time() - started) / len(batch)


def baseline_cpu(batch: list[tuple[str, PaymentPayload]]) -> float:
    gc.collect()
    started = time.process_time()
    for _, payment in batch:
        signer = Account.recover_message(
            encode_typed_data(full_message=typed_data(payment)), signature=payment.signature
        )
        assert signer.lower() == payment.authorization.from_
    return (time.process_time() - started) / len(batch)


def breakdown(batch: list[tuple[str, PaymentPayload]]) -> str:
    """Where our time goes: each step run alone over the batch (ms per payment)."""
    try:
        from app.x402.codec import b64decode_strict, strict_json_loads
        from app.x402.eip712 import authorization_digest, domain_separator, recover_signer
        from app.x402.wire import payment_from_wire
    except ImportError as exc:
        return f"(no breakdown: {exc})"
    req = requirement()
    now = int(time.time())
    headers = [h for h, _ in batch]
    raw = [b64decode_strict(h) for h in headers]
    wires = [strict_json_loads(r) for r in raw]
    parsed = [payment_from_wire(w, 2) for w in wires]
    separator = domain_separator(req.asset_name, req.asset_version, req.chain_id, req.asset)
    digests = [
        authorization_digest(separator, a.from_, a.to, a.value, a.valid_after, a.valid_before, a.nonce)
        for a in (p.authorization for p in parsed)
    ]
    steps = {
        "base64": lambda: [b64decode_strict(h) for h in headers],
        "strict JSON": lambda: [strict_json_loads(r) for r in raw],
        "wire object": lambda: [payment_from_wire(w, 2) for w in wires],
        "match_requirement": lambda: [match_requirement(p, req) for p in parsed],
        "check_authorization": lambda: [check_authorization(p, req, now) for p in parsed],
        "  of which digest": lambda: [
            authorization_digest(
                domain_separator(req.asset_name, req.asset_version, req.chain_id, req.asset),
                a.from_,
                a.to,
                a.value,
                a.valid_after,
                a.valid_before,
                a.nonce,
            )
            for a in (p.authorization for p in parsed)
        ],
        "  of which recovery": lambda: [
            recover_signer(d, p.signature) for d, p in zip(digests, parsed, strict=True)
        ],
    }
    parts = []
    for name, step in steps.items():
        gc.collect()
        started = time.process_time()
        step()
        parts.append(f"{name.strip()} {(time.process_time() - started) / len(batch) * 1000:.3f}")
    return "ms per payment by step: " + ", ".join(parts)


def run(count: int = 5000) -> list[Row]:
    batch = payments(count)
    ours_cpu(batch[:200])  # warm caches (domain separator, imports)
    baseline_cpu(batch[:50])
    ours = ours_cpu(batch)
    baseline = baseline_cpu(batch)
    return [
        Row(
            "verify_cpu",
            "CPU per verification",
            f"{ours * 1000:.3f} ms",
            f"{baseline * 1000:.3f} ms eth-account",
            f"{ours / baseline:.2f}",
            f"<= {GOAL * 1000:g} ms",
            ours <= GOAL,
            f"{count} distinct payments, time.process_time; ours = parse + match + check (incl. digest, "
            "coincurve recovery); baseline = encode_typed_data + recover_message only; " + breakdown(batch),
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--payments", type=int, default=5000)
    args = parser.parse_args()
    print_table(run(args.payments))


if __name__ == "__main__":
    main()
