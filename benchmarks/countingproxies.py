"""Loopback proxies that count I/O: a JSON-RPC HTTP proxy (one record per HTTP request, with the
methods of its batch) and a Redis TCP relay (one record per round trip, with the commands in it).

A Redis round trip is counted each time the client sends after the server has answered (or for the
first time on a connection): a pipeline or a MULTI block sent in one go is one round trip, N
commands each awaited are N. Commands are read from the RESP stream; ``EVALSHA`` is named by its
script when the script is known.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests


@dataclass
class RpcRecord:
    at: float
    methods: list[str]


class CountingRpc:
    """HTTP JSON-RPC proxy in front of ``upstream`` that records every request's methods."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.records: list[RpcRecord] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                at = time.perf_counter()
                try:
                    payload = json.loads(body)
                    calls = payload if isinstance(payload, list) else [payload]
                    methods = [str(c.get("method", "?")) for c in calls]
                except ValueError:
                    methods = ["<unparsable>"]
                with owner._lock:
                    owner.records.append(RpcRecord(at, methods))
                answer = owner._session().post(
                    owner.upstream, data=body, headers={"Content-Type": "application/json"}, timeout=30
                )
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.trust_env = False
        return s

    def since(self, mark: float) -> list[RpcRecord]:
        with self._lock:
            return [r for r in self.records if r.at >= mark]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class RedisTrip:
    at: float
    connection: int
    commands: list[str] = field(default_factory=list)


class _RespReader:
    """Incremental reader of client commands (RESP arrays of bulk strings)."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[list[bytes]]:
        self.buffer += data
        commands = []
        while True:
            parsed = self._one()
            if parsed is None:
                return commands
            commands.append(parsed)

    def _one(self) -> list[bytes] | None:
        buf = self.buffer
        if not buf.startswith(b"*"):
            end = buf.find(b"\r\n")  # an inline command
            if end < 0:
                return None
            self.buffer = buf[end + 2 :]
            return buf[:end].split()
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        count, pos, parts = int(buf[1:end]), end + 2, []
        for _ in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0 or buf[pos : pos + 1] != b"$":
                return None
            size = int(buf[pos + 1 : end])
            start = end + 2
            if len(buf) < start + size + 2:
                return None
            parts.append(buf[start : start + size])
            pos = start + size + 2
        self.buffer = buf[pos:]
        return parts


class CountingRedis:
    """TCP relay in front of a Redis server that records round trips and their commands."""

    def __init__(self, upstream_port: int, scripts: dict[str, str] | None = None) -> None:
        self.upstream_port = upstream_port
        self.trips: list[RedisTrip] = []
        self._script_names = {
            hashlib.sha1(src.encode()).hexdigest(): name for name, src in (scripts or {}).items()
        }
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _name(self, command: list[bytes]) -> str:
        if not command:
            return "?"
        name = command[0].decode(errors="replace").upper()
        if name == "EVALSHA" and len(command) > 1:
            sha = command[1].decode(errors="replace")
            return f"EVALSHA({self._script_names.get(sha, sha[:8])})"
        if name in ("CLIENT", "SCRIPT") and len(command) > 1:
            return f"{name} {command[1].decode(errors='replace').upper()}"
        return name

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections += 1
                number = self._connections
                self._sockets += [client, server]
            state = {"answered": True, "trip": None}
            reader = _RespReader()
            threading.Thread(
                target=self._up, args=(client, server, number, state, reader), daemon=True
            ).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(
        self,
        client: socket.socket,
        server: socket.socket,
        number: int,
        state: dict[str, Any],
        reader: _RespReader,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                at = time.perf_counter()
                names = [self._name(c) for c in reader.feed(data)]
                with self._lock:
                    if state["answered"] or state["trip"] is None:
                        state["trip"] = RedisTrip(at, number)
                        self.trips.append(state["trip"])
                        state["answered"] = False
                    state["trip"].commands.extend(names)
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _down(self, server: socket.socket, client: socket.socket, state: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                with self._lock:
                    state["answered"] = True
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    def since(self, mark: float) -> list[RedisTrip]:
        with self._lock:
            return [t for t in self.trips if t.at >= mark]

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
