"""``x402-proxy devnet [--demo]``: the whole proxy on one laptop (anvil as Base, Redis, the stand-in
model, the proxy), and the quiet request handler its server and the tests use."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from app.amounts import USDC_UNIT
from app.cli.common import DEMO_BODY, EXIT_BAD_INPUT, parse_usdc, usdc


def quiet_request_handler() -> type:
    """A werkzeug ``WSGIRequestHandler`` class that writes no access lines and logs its other messages to
    the ``werkzeug`` logger without the client's address (the devnet's and the tests' servers use it)."""
    from werkzeug.serving import WSGIRequestHandler

    class QuietRequestHandler(WSGIRequestHandler):
        """No access log: it would print client addresses."""

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            return

        def log(self, type: str, message: str, *args: object) -> None:
            """Server errors, without the client's address."""
            level = logging.ERROR if type == "error" else logging.INFO
            logging.getLogger("werkzeug").log(level, message, *args)

    return QuietRequestHandler


def cmd_devnet(args: argparse.Namespace) -> int:
    """``x402-proxy devnet [--port] [--demo]``: anvil, Redis (or an in-process fake), the stand-in model
    (without an upstream key) and the proxy on 127.0.0.1; serves until Ctrl-C, or ``--demo`` pays one call.
    Exit 0; 1 when a part cannot start or the demo call does not answer 200."""
    from werkzeug.serving import make_server

    from app import create_checked_app
    from app.cli.wallet import pay
    from app.devnet import (
        DevChain,
        DevnetError,
        Wallets,
        fake_redis_or_none,
        prepare_chain,
        require_checkout,
        start_anvil,
        start_redis,
    )
    from app.devnet.standin import StandinModel
    from app.settings import Settings, SettingsError

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `timeout`, supervisors: stop like Ctrl-C
    services: list[Any] = []
    try:
        require_checkout()
        fake_redis = fake_redis_or_none()  # checked before anything starts
        anvil = start_anvil()
        services.append(anvil)
        wallets = Wallets.fresh()
        chain = DevChain(anvil.url)
        prepare_chain(chain, wallets, 100 * USDC_UNIT)
        redis_service = start_redis()
        if redis_service:
            services.append(redis_service)
        overrides = {
            "X402_PAY_TO": wallets.pay_to,
            "X402_RPC_URLS": anvil.url,
            "X402_RELAYER_KEY": wallets.relayer_key,  # the devnet's own, funded relayer
            "X402_RELAYER_KEYS": "",
            "X402_RELAYER_KEYS_FILE": "",
            "REDIS_URL": redis_service.url if redis_service else "redis://in-process",
            "X402_NETWORK": "eip155:8453",
        }
        settings = Settings.from_env(overrides=overrides)
        if not redis_service:
            print(
                "WARNING: redis-server not found; using an in-process fake Redis (one process only, "
                "nothing persists). Install redis-server for a real set-up.",
                file=sys.stderr,
            )
            settings = settings.with_overrides(redis_client=fake_redis)
        if not settings.upstream_api_key:
            standin = StandinModel().start()
            services.append(standin)
            settings = settings.with_overrides(upstream_url=standin.url)
        app = create_checked_app(settings)
        server = make_server(
            "127.0.0.1", args.port, app, threaded=True, request_handler=quiet_request_handler()
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        services.append(server)
    except (DevnetError, SettingsError, OSError) as exc:
        print(f"x402-proxy devnet: {exc}", file=sys.stderr)
        _stop(services)
        return EXIT_BAD_INPUT if isinstance(exc, SettingsError) else 1
    except BaseException:  # e.g. anvil stopped answering: main says so; no child process outlives us
        _stop(services)
        raise

    url = f"http://127.0.0.1:{args.port}/v1/chat/completions"
    print(f"devnet up: chain {anvil.url} (id 8453, USDC at {chain.token}) · proxy {url}")
    print(f"demo payer {wallets.payer} holds {usdc(chain.balance(wallets.payer))}; payee {wallets.pay_to}")
    print(f"demo payer key (devnet only): {wallets.payer_key}")
    print(f"try: x402-proxy pay {url} --key {wallets.payer_key}")
    if redis_service:  # the operator's commands (reconcile, revenue, channels) read these, as serve does
        env = {k: overrides[k] for k in ("REDIS_URL", "X402_PAY_TO", "X402_RPC_URLS", "X402_RELAYER_KEY")}
        print("operator commands (devnet only): export " + " ".join(f"{k}={v}" for k, v in env.items()))
    try:
        if args.demo:
            before = chain.balance(wallets.pay_to)
            result = pay(url, bytes.fromhex(wallets.payer_key[2:]), DEMO_BODY, parse_usdc("0.10"))
            answer = json.loads(result.body)
            print(f"paid call → HTTP {result.status}: {answer['choices'][0]['message']['content']!r}")
            print(f"settlement: {result.settlement}")
            after = chain.balance(wallets.pay_to)
            print(f"payee balance {usdc(before)} → {usdc(after)} (price {usdc(result.amount)})")
            return 0 if result.status == 200 else 1
        print("serving; Ctrl-C to stop")
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        _stop(services)
    return 0


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM: raise ``KeyboardInterrupt`` in the main thread, so the devnet stops its children."""
    raise KeyboardInterrupt


def _stop(services: list[Any]) -> None:
    for service in reversed(services):
        (getattr(service, "shutdown", None) or service.stop)()
