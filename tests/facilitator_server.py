"""A real x402 facilitator on loopback, for the facilitator settlement backend's tests: the official
Python SDK's facilitator (``x402FacilitatorSync`` with its web3 signer) behind ``/verify``,
``/settle`` and ``/supported``, settling on the test anvil.

It can be made to misbehave after (or instead of) settling for real: ``app.config["broadcast"] =
False`` skips the settlement, and ``app.config["answer"]``, given the honest result (None when
nothing was broadcast), returns what ``/settle`` answers instead — a 5xx, garbled JSON, another
transaction's hash, or a late answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.serving import BaseWSGIServer
from x402 import x402FacilitatorSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.schemas.helpers import parse_payment_payload, parse_payment_requirements

from tests.support import serve


def facilitator_app(private_key: str, rpc_url: str, network: str = "eip155:8453") -> Flask:
    facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(facilitator, FacilitatorWeb3Signer(private_key, rpc_url), networks=network)
    app = Flask("test-facilitator")
    app.config["settled"] = []
    app.config["broadcast"] = True
    app.config["answer"] = None  # Callable[[dict[str, Any] | None], ResponseReturnValue] | None

    def parsed() -> tuple[Any, Any]:
        body = request.get_json()
        payload = parse_payment_payload(body["paymentPayload"])
        return payload, parse_payment_requirements(body["x402Version"], body["paymentRequirements"])

    @app.post("/verify")
    def verify() -> Any:
        return jsonify(facilitator.verify(*parsed()).model_dump(by_alias=True, exclude_none=True))

    @app.post("/settle")
    def settle() -> Any:
        result: dict[str, Any] | None = None
        if app.config["broadcast"]:
            result = facilitator.settle(*parsed()).model_dump(by_alias=True, exclude_none=True)
            app.config["settled"].append(result)
        answer: Callable[[dict[str, Any] | None], Any] | None = app.config["answer"]
        return jsonify(result) if answer is None else answer(result)

    @app.get("/supported")
    def supported() -> Any:
        return jsonify(facilitator.get_supported().model_dump(by_alias=True, exclude_none=True))

    return app


def start_facilitator(private_key: str, rpc_url: str) -> tuple[BaseWSGIServer, Flask]:
    app = facilitator_app(private_key, rpc_url)
    return serve(app), app
