"""The REFERENCE stack, built only from the official ``x402`` package (PyPI, 2.25), for side-by-side runs.

* ``app``: a Flask app whose ``POST /v1/chat/completions`` forwards the JSON body to the stand-in
  model; it is protected by the SDK's own Flask middleware (``x402.http.middleware.flask``), which
  verifies through the facilitator, runs the handler (buffering its answer), then settles through the
  facilitator. Served by gunicorn with our ``gunicorn.conf.py`` (``benchmarks.reference_stack:app``),
  configured by ``REF_*`` environment variables.
* ``facilitator_main``: the SDK's facilitator (``x402FacilitatorSync`` + ``FacilitatorWeb3Signer`` +
  ``register_exact_evm_facilitator``) behind ``/verify``, ``/settle`` and ``/supported`` on a
  werkzeug threaded loopback server, settling on the same anvil. One process: the SDK's signer hands
  out transaction nonces from process memory.

    python -m benchmarks.reference_stack facilitator --port P    # env REF_FACILITATOR_KEY, REF_RPC_URL
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests
from eth_account import Account
from flask import Flask, Response, jsonify, request

CHAT_PATH = "/v1/chat/completions"
NETWORK = "eip155:8453"


@dataclass
class Reference:
    gunicorn: Any  # benchmarks.harness.Gunicorn serving the paywalled app
    relayer: str  # the facilitator's account (pays gas, its nonce counts settlements)
    pay_to: str
    facilitator_url: str
    facilitator_pid: int


# --- the resource server (paywalled Flask app) -----------------------------------------------------


try:
    import httpx  # noqa: F401

    HAVE_HTTPX = True
except ImportError:
    HAVE_HTTPX = False


class _PerProcessSession:
    """Stands in for ``httpx.Client`` (``get``/``post``) when httpx is not installed: a requests
    session per process, so a connection opened in gunicorn's master is never shared by workers."""

    def __init__(self) -> None:
        self._pid = 0
        self._session: requests.Session | None = None

    def _current(self) -> requests.Session:
        if self._session is None or self._pid != os.getpid():
            self._session = requests.Session()
            self._session.trust_env = False
            self._pid = os.getpid()
        return self._session

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self._current().get(url, timeout=30, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self._current().post(url, timeout=30, **kwargs)


def create_reference_app() -> Flask:
    from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
    from x402.http.middleware.flask import PaymentMiddleware
    from x402.http.types import PaymentOption, RouteConfig
    from x402.mechanisms.evm.exact import register_exact_evm_server
    from x402.schemas import AssetAmount
    from x402.server import x402ResourceServerSync

    env = os.environ
    upstream = env["REF_UPSTREAM_URL"].rstrip("/")
    # the SDK's own transport (pip install 'x402[httpx]'), unless REF_FACILITATOR_TRANSPORT=requests
    if HAVE_HTTPX and env.get("REF_FACILITATOR_TRANSPORT") != "requests":
        config = FacilitatorConfig(url=env["REF_FACILITATOR_URL"])
    else:  # same calls, over requests, one session per process
        config = FacilitatorConfig(url=env["REF_FACILITATOR_URL"], http_client=_PerProcessSession())
    facilitator = HTTPFacilitatorClientSync(config)
    server = x402ResourceServerSync(facilitator)
    register_exact_evm_server(server, NETWORK)
    price = AssetAmount(
        amount=env["REF_PRICE"],
        asset=env["REF_ASSET"],
        extra={"name": env.get("REF_ASSET_NAME", "USD Coin"), "version": env.get("REF_ASSET_VERSION", "2")},
    )
    routes = {
        f"POST {CHAT_PATH}": RouteConfig(
            accepts=PaymentOption(
                scheme="exact",
                pay_to=env["REF_PAY_TO"],
                price=price,
                network=NETWORK,
                max_timeout_seconds=120,
            ),
            description="hermes-3-8b-tee call",
            mime_type="application/json",
        )
    }

    app = Flask("x402-reference")
    local = threading.local()

    def upstream_session() -> requests.Session:
        s = getattr(local, "session", None)
        if s is None or getattr(local, "pid", 0) != os.getpid():
            s = requests.Session()
            s.trust_env = False
            local.session, local.pid = s, os.getpid()
        return s

    @app.post(CHAT_PATH)
    def chat() -> Response:
        answer = upstream_session().post(upstream + CHAT_PATH, json=request.get_json(), timeout=120)
        return Response(answer.content, status=answer.status_code, content_type="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    # Asks the facilitator for /supported now (in gunicorn's master, as preload_app builds the app
    # there); then drops that HTTP connection so forked workers each open their own.
    PaymentMiddleware(app, routes, server)
    facilitator.close()
    return app


def __getattr__(name: str) -> Any:
    """``benchmarks.reference_stack:app`` builds the app on first access (gunicorn's import)."""
    if name == "app":
        globals()["app"] = built = create_reference_app()
        return built
    raise AttributeError(name)


# --- the facilitator -------------------------------------------------------------------------------


def facilitator_app(private_key: str, rpc_url: str) -> Flask:
    from x402 import x402FacilitatorSync
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.exact import register_exact_evm_facilitator
    from x402.schemas.helpers import parse_payment_payload, parse_payment_requirements

    facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(facilitator, FacilitatorWeb3Signer(private_key, rpc_url), networks=NETWORK)
    app = Flask("x402-reference-facilitator")

    def parsed() -> tuple[Any, Any]:
        body = request.get_json()
        return (
            parse_payment_payload(body["paymentPayload"]),
            parse_payment_requirements(body["x402Version"], body["paymentRequirements"]),
        )

    @app.post("/verify")
    def verify() -> Response:
        return jsonify(facilitator.verify(*parsed()).model_dump(by_alias=True, exclude_none=True))

    @app.post("/settle")
    def settle() -> Response:
        return jsonify(facilitator.settle(*parsed()).model_dump(by_alias=True, exclude_none=True))

    @app.get("/supported")
    def supported() -> Response:
        return jsonify(facilitator.get_supported().model_dump(by_alias=True, exclude_none=True))

    return app


def facilitator_main(port: int) -> None:
    from werkzeug.serving import make_server

    from app.cli.devnet import quiet_request_handler

    app = facilitator_app(os.environ["REF_FACILITATOR_KEY"], os.environ["REF_RPC_URL"])
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=quiet_request_handler())
    server.serve_forever()  # stopped by SIGTERM from the benchmark that started it


@contextlib.contextmanager
def reference_stack(dev: Any, price: int, workers: int = 2, threads: int = 32) -> Iterator[Reference]:
    """Start the facilitator (own relayer key, funded with gas) and the paywalled app under gunicorn
    on ``dev`` (a ``benchmarks.harness.Devnet``); both are stopped on exit."""
    from app.devnet import BASE_USDC, free_port

    from .harness import ROOT, Gunicorn, die_with_parent

    relayer_key = "0x" + os.urandom(32).hex()
    relayer = str(Account.from_key(relayer_key).address)
    pay_to = str(Account.create().address)
    dev.chain.set_eth(relayer, 10**20)
    port = free_port()
    facilitator = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.reference_stack", "facilitator", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "REF_FACILITATOR_KEY": relayer_key, "REF_RPC_URL": dev.anvil.url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    gunicorn = None
    try:
        deadline = time.monotonic() + 30
        while True:
            if facilitator.poll() is not None:
                raise RuntimeError("the reference facilitator exited at start")
            try:
                if requests.get(url + "/supported", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the reference facilitator did not come up in 30 s")
            time.sleep(0.1)
        env = {
            **os.environ,
            "REF_FACILITATOR_URL": url,
            "REF_UPSTREAM_URL": dev.standin.url,
            "REF_PAY_TO": pay_to,
            "REF_PRICE": str(price),
            "REF_ASSET": BASE_USDC,
        }
        gunicorn = Gunicorn("benchmarks.reference_stack:app", env, workers=workers, threads=threads).start()
        yield Reference(gunicorn, relayer, pay_to, url, facilitator.pid)
    finally:
        if gunicorn is not None:
            gunicorn.stop()
        if facilitator.poll() is None:
            facilitator.terminate()
            try:
                facilitator.wait(timeout=10)
            except subprocess.TimeoutExpired:
                facilitator.kill()
                facilitator.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("role", choices=["facilitator"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    facilitator_main(args.port)


if __name__ == "__main__":
    main()
