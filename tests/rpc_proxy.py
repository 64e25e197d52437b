"""A fault-injecting JSON-RPC proxy for tests: sits between the proxy under test and anvil.

It forwards batches unchanged unless told otherwise: run a hook before ``eth_sendRawTransaction``
(e.g. pause the token so the settlement reverts), delay methods, hide receipts, report a stale
block number, or stop answering altogether.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests


class FaultyRpc:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.before_send: Callable[[], None] | None = None
        self.delays: dict[str, float] = {}
        self.hide_receipts = False
        self.stale_block: int | None = None
        self.down = False
        self.calls: list[str] = []
        self.requests: list[list[str]] = []  # the methods of each HTTP request (one round trip)
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if owner.down:
                    self.close_connection = True
                    self.connection.close()
                    return
                data = json.dumps(owner.handle(json.loads(body))).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def handle(self, payload: Any) -> Any:
        calls = payload if isinstance(payload, list) else [payload]
        methods = [c.get("method", "") for c in calls]
        with self._lock:
            self.calls.extend(methods)
            self.requests.append(methods)
        for method in methods:
            time.sleep(self.delays.get(method, 0.0))
            if method == "eth_sendRawTransaction" and self.before_send is not None:
                self.before_send()
        answers = requests.post(self.upstream, json=payload, timeout=30).json()
        for answer in answers if isinstance(answers, list) else [answers]:
            method = methods[calls.index(next(c for c in calls if c.get("id") == answer.get("id")))]
            if method == "eth_getTransactionReceipt" and self.hide_receipts:
                answer["result"] = None
            if method == "eth_blockNumber" and self.stale_block is not None:
                answer["result"] = hex(self.stale_block)
        return answers

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
