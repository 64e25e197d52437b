"""A fault-injecting JSON-RPC proxy for tests: sits between the proxy under test and anvil.

It forwards batches unchanged unless told otherwise: run a hook before ``eth_sendRawTransaction``
(e.g. pause the token so the settlement reverts), delay methods, hide receipts, report a stale
block number, or stop answering altogether. It can also lie the way a faulty endpoint does: pass a
transaction on and then drop the connection or answer too late, refuse transactions it never
passed on, strip logs from receipts or their status, and answer chosen ``eth_call`` selectors with
something malformed (``0x``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

SEND = "eth_sendRawTransaction"


class FaultyRpc:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.before_send: Callable[[], None] | None = None
        self.delays: dict[str, float] = {}
        self.hide_receipts = False
        self.stale_block: int | None = None
        self.stale_only_with: str | None = None  # report the stale block only in batches with this method
        self.down = False
        self.drop_after_send = False  # pass a transaction on, then close the connection unanswered
        self.hold_after_send = 0.0  # pass a transaction on, then wait this long before answering (s)
        self.refuse_sends: str | None = None  # answer sends with this error, without passing them on
        self.strip_receipt_topics: set[str] = set()  # topic0 (0x hex) of the receipt logs to remove
        self.garble_receipts = False  # receipts come without a status
        self.call_lies: dict[str, str] = {}  # eth_call 4-byte selector (0x hex) → the answer given
        self.calls: list[str] = []
        self.requests: list[list[str]] = []  # the methods of each HTTP request (one round trip)
        self.sent_raw: list[str] = []  # every signed transaction that reached this endpoint
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
                payload = json.loads(body)
                data = json.dumps(owner.handle(payload)).encode()
                sends = SEND in {c.get("method") for c in owner.calls_of(payload)}
                if sends and owner.drop_after_send:
                    self.close_connection = True
                    self.connection.close()
                    return
                if sends:
                    time.sleep(owner.hold_after_send)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client stopped waiting (its RPC timeout): nobody to answer
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @staticmethod
    def calls_of(payload: Any) -> list[dict[str, Any]]:
        return payload if isinstance(payload, list) else [payload]

    def handle(self, payload: Any) -> Any:
        calls = self.calls_of(payload)
        methods = [c.get("method", "") for c in calls]
        with self._lock:
            self.calls.extend(methods)
            self.requests.append(methods)
        for call in calls:
            method = call.get("method", "")
            time.sleep(self.delays.get(method, 0.0))
            if method == SEND:
                with self._lock:
                    self.sent_raw.append(call["params"][0])
                if self.before_send is not None:
                    self.before_send()
        refused = [c for c in calls if c.get("method") == SEND and self.refuse_sends is not None]
        passed_on = [c for c in calls if c not in refused]
        forwarded = requests.post(self.upstream, json=passed_on, timeout=30).json() if passed_on else []
        by_id = {a.get("id"): a for a in forwarded}
        answers = []
        for call in calls:
            if call in refused:
                error = {"code": -32005, "message": self.refuse_sends}
                answers.append({"jsonrpc": "2.0", "id": call.get("id"), "error": error})
            else:
                answers.append(self._lie(call, by_id[call.get("id")], methods))
        return answers if isinstance(payload, list) else answers[0]

    def _lie(self, call: dict[str, Any], answer: dict[str, Any], methods: list[str]) -> dict[str, Any]:
        method = call.get("method")
        result = answer.get("result")
        if method == "eth_getTransactionReceipt" and self.hide_receipts:
            answer["result"] = None
        elif method == "eth_getTransactionReceipt" and isinstance(result, dict):
            result["logs"] = [
                log for log in result["logs"] if (log["topics"] or [""])[0] not in self.strip_receipt_topics
            ]
            if self.garble_receipts:
                del result["status"]
        elif method == "eth_blockNumber" and self.stale_block is not None:
            if self.stale_only_with is None or self.stale_only_with in methods:
                answer["result"] = hex(self.stale_block)
        elif method == "eth_call" and "result" in answer:
            selector = str(call["params"][0].get("data", ""))[:10]
            answer["result"] = self.call_lies.get(selector, result)
        return answer

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
