"""The stand-in model's HTTP side: a threaded server that knows its open connections (so a stopped
stand-in really stops) and a handler that routes requests, reads bodies byte for byte, answers JSON,
streams one chunk per SSE event, cuts streams and resets connections as ``Behaviour`` says.

With TLS, the accept loop only wraps each accepted socket (no I/O: ``do_handshake_on_connect=False``)
with the context current at that moment; the handshake runs in the connection's handler thread, so a
client that never completes one pins only its own thread (for at most ``HANDSHAKE_TIMEOUT`` seconds)."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from app.devnet.standin import StandinModel

ERROR_BODY: dict[str, Any] = {"error": {"message": "stand-in failure", "type": "server_error"}}
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS client has to complete its handshake

# How answers report token usage: "report" truthfully, "omit" never (no ``usage`` in JSON answers, no
# usage event in streams even when asked), "malformed" with ``MALFORMED_USAGE`` in place of the counts.
UsageMode = Literal["report", "omit", "malformed"]
USAGE_MODES: tuple[str, ...] = get_args(UsageMode)
MALFORMED_USAGE: dict[str, Any] = {"prompt_tokens": "many", "completion_tokens": -1}


@dataclass
class Behaviour:
    """How the next requests are answered; tests change it between calls to simulate a bad host."""

    status: int = 200  # HTTP status to answer with (e.g. 500 for a failing host)
    delay: float = 0.0  # seconds before the response starts
    chunk_delay: float = 0.0  # seconds between SSE chunks
    chunks: int = 5  # number of content chunks in a stream
    cut_after: int | None = None  # for streams: drop the connection after this many chunks (no [DONE])
    reset: bool = False  # close the connection without any response
    times: int | None = None  # status/reset apply to this many model calls, then it recovers (None: all)
    error_message: str = "stand-in failure"  # the message of an error answer
    usage: UsageMode = "report"  # "report", "omit" or "malformed" token usage (see UsageMode)
    unterminated: bool = False  # for streams: end without [DONE] and without the last blank line

    def __post_init__(self) -> None:
        if self.usage not in USAGE_MODES:
            raise ValueError(f"usage must be one of {', '.join(USAGE_MODES)}, not {self.usage!r}")


@dataclass
class Received:
    """One request as it reached the host, so tests can assert what the proxy forwarded."""

    path: str  # raw request target, query string included
    headers: dict[str, str]
    body: dict[str, Any]  # the JSON object sent, or {} when there was none / it was not an object


class _BadRequest(Exception):
    """The request body is not a usable OpenAI request; answered with a 400."""


class _Server(ThreadingHTTPServer):
    """Threaded server that knows its owner and its open connections (so stop() can drop them)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], owner: StandinModel, tls: ssl.SSLContext | None = None
    ) -> None:
        self.owner = owner
        self.tls = tls  # replaced whole (never mutated) by StandinModel.reload_certificate
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept one connection; with TLS, wrap it for a handshake its handler thread will run."""
        sock, address = super().get_request()
        context = self.tls  # one read: a concurrent reload gives this connection the old or the new one
        if context is None:
            return sock, address
        try:
            return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address
        except OSError:
            sock.close()
            raise  # serve_forever's _handle_request_noblock drops it quietly

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay silent: the default prints a traceback to stderr for every client that hangs up."""

    def drop_connections(self) -> None:
        """Close keep-alive connections so a stopped server really stops answering."""
        with self.connections_lock:
            conns = list(self.connections)
            self.connections.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """Routes one connection's requests; behaviour is snapshotted per request."""

    protocol_version = "HTTP/1.1"
    server_version = "standin-model/1"
    sys_version = ""
    timeout = 120  # idle keep-alive connections should not pin threads forever
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls
    server: _Server

    def setup(self) -> None:
        """Register the connection (so stop() can drop it, mid-handshake too), then, with TLS, run the
        handshake here, in this connection's thread. A failed or timed-out handshake raises: the
        server's ``handle_error`` stays silent and the socket is closed."""
        sock: socket.socket = self.request  # super().setup() names it self.connection
        with self.server.connections_lock:
            self.server.connections.add(sock)
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(HANDSHAKE_TIMEOUT)
                sock.do_handshake()
                self.server.owner._handshake_done()
            super().setup()  # sets the keep-alive read timeout
        except BaseException:
            with self.server.connections_lock:
                self.server.connections.discard(sock)
            raise

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Never log: request lines and errors could carry user data."""

    # --- HTTP methods -------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # --- routing ------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        owner = self.server.owner
        raw = self._read_body()
        body = _parse_object(raw)
        owner._record(Received(path=self.path, headers=dict(self.headers.items()), body=body))
        route = (self.command, urlsplit(self.path).path.rstrip("/"))
        known = {("POST", CHAT_PATH), ("POST", COMPLETIONS_PATH), ("GET", MODELS_PATH)}
        if route not in known:
            self._send_json(404, {"error": {"message": "not found", "type": "not_found_error"}})
            return

        behaviour = owner._snapshot(model_call=self.command == "POST")  # later test edits don't bleed in
        if behaviour.delay > 0:
            time.sleep(behaviour.delay)
        if behaviour.reset:
            self._reset()
            return
        if behaviour.status != 200:
            error = {"error": {**ERROR_BODY["error"], "message": behaviour.error_message}}
            self._send_json(behaviour.status, error)
            return

        if route == ("GET", MODELS_PATH):
            self._send_json(200, {"object": "list", "data": [{"id": owner.model, "object": "model"}]})
            return
        chat = route[1] == CHAT_PATH
        if raw and not body:
            self._bad_request("body must be a JSON object")
            return
        try:
            answer = owner._answer(body, chat=chat, usage=behaviour.usage)
        except _BadRequest as exc:
            self._bad_request(str(exc))
            return
        if body.get("stream") is True:
            self._stream(owner, body, behaviour, chat=chat)
        else:
            self._send_json(200, answer)

    # --- request body -------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        """Read a Content-Length or chunked body, so keep-alive connections stay in sync."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # --- responses ----------------------------------------------------------------------------

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)

    def _bad_request(self, message: str) -> None:
        self._send_json(400, {"error": {"message": message, "type": "invalid_request_error"}})

    def _reset(self) -> None:
        """Abort with a TCP RST and no bytes at all, like a host that crashed mid-request."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _write_chunk(self, data: bytes) -> bool:
        """Send one HTTP chunk in a single write (wfile is unbuffered); False if the client left."""
        try:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        except OSError:
            self.close_connection = True
            return False
        return True

    def _stream(self, owner: StandinModel, body: dict[str, Any], behaviour: Behaviour, *, chat: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        count = max(0, behaviour.chunks)
        cut = behaviour.cut_after
        events = owner._stream_events(body, count, chat=chat, usage=behaviour.usage)
        for sent, event in enumerate(events):
            if cut is not None and sent >= cut:
                break
            if sent and behaviour.chunk_delay > 0:
                time.sleep(behaviour.chunk_delay)
            ending = b"" if behaviour.unterminated and sent == len(events) - 1 else b"\n\n"
            if not self._write_chunk(b"data: %s%s" % (json.dumps(event).encode(), ending)):
                return
        if behaviour.unterminated:
            self._write_chunk(b"")
            return
        if cut is not None:
            # Hang up with the chunked body unfinished: the client must see an incomplete read.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self._write_chunk(b"data: [DONE]\n\n"):
            self._write_chunk(b"")  # zero-length chunk = the chunked terminator "0\r\n\r\n"


def _parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or {} for anything else (empty, invalid, a list...)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
