"""Nothing secret leaks (issue: hostile input and failing parts).

Paid calls, refused calls and upstream failures are made with a unique marker in the prompt, an
upstream API key marker and a client address of our own (the test client binds 127.0.0.2), while
every logger is captured at DEBUG together with the process's stdout/stderr. None of the prompt,
the upstream key, the relayer key, a payment header or the client address may appear in a log
line or in Redis; no answer may carry the upstream key or the model host's own headers; and no
client input can choose where the proxy sends the call.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
import requests
from requests.adapters import HTTPAdapter

from app import create_checked_app
from app.devnet import DevChain, Wallets
from app.devnet.standin import StandinModel
from app.logs import JsonFormatter
from app.settings import Settings
from app.x402.codec import encode_header
from app.x402.wire import V2_HEADER
from tests.security.forge import authorization_for, new_key, sign, wrap
from tests.support import CHAT_BODY, Proxy, serve

pytestmark = pytest.mark.integration

CLIENT_IP = "127.0.0.2"  # our client's source address: only a leak could put it in a log line
STANDIN_SERVER = "standin-model"  # the stand-in's Server header


class FromClientAddress(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (CLIENT_IP, 0)
        super().init_poolmanager(*args, **kwargs)


def client() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", FromClientAddress())
    return session


@dataclass
class Secrets:
    prompt: str = field(default_factory=lambda: f"prompt-marker-{uuid.uuid4().hex}")
    upstream_key: str = field(default_factory=lambda: f"sk-marker-{uuid.uuid4().hex}")
    relayer_key: str = ""
    headers: list[str] = field(default_factory=list)

    def all(self) -> dict[str, str]:
        found = {
            "prompt": self.prompt,
            "upstream key": self.upstream_key,
            "relayer key": self.relayer_key.removeprefix("0x"),
            "client address": CLIENT_IP,
        }
        found.update({f"payment header {i}": value for i, value in enumerate(self.headers)})
        return found


@pytest.fixture
def secrets(settings: Settings) -> Secrets:
    return Secrets(relayer_key=settings.relayer_key)


def start(settings: Settings, wallets: Wallets, chain: DevChain) -> Proxy:
    server = serve(create_checked_app(settings))
    return Proxy(f"http://127.0.0.1:{server.server_port}", settings, wallets, chain, server)


@pytest.fixture
def marked(settings: Settings, wallets: Wallets, chain: DevChain, secrets: Secrets) -> Iterator[Proxy]:
    """The proxy with an upstream API key we can search for."""
    proxy = start(settings.with_overrides(upstream_api_key=secrets.upstream_key), wallets, chain)
    yield proxy
    assert proxy.server is not None
    proxy.server.shutdown()


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog at DEBUG for every logger, including those that do not propagate to the root."""
    caplog.set_level(logging.DEBUG)
    detached: list[logging.Logger] = []
    disabled: list[logging.Logger] = []
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        caplog.set_level(logging.DEBUG, logger=name)
        if logger.disabled:
            logger.disabled = False
            disabled.append(logger)
        if not logger.propagate:
            logger.addHandler(caplog.handler)
            detached.append(logger)
    yield caplog
    for logger in detached:
        logger.removeHandler(caplog.handler)
    for logger in disabled:
        logger.disabled = True


def log_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(logger name, everything the record holds: message, arguments, traceback, extra fields, and the
    JSON line the deployed log format writes of it)."""
    formatter, written = logging.Formatter("%(name)s %(levelname)s %(message)s"), JsonFormatter()
    return [
        (r.name, formatter.format(r) + " " + written.format(r) + " " + repr(r.__dict__))
        for r in caplog.records
    ]


def redis_contents(proxy: Proxy) -> list[bytes]:
    """Every key and every value in the proxy's Redis database."""
    db = redis.Redis.from_url(proxy.settings.redis_url)
    found: list[bytes] = []
    try:
        for key in db.scan_iter(count=1000):
            found.append(key)
            kind = db.type(key).decode()
            if kind == "string":
                found.append(db.get(key) or b"")
            elif kind == "hash":
                found.extend(k + b"=" + v for k, v in db.hgetall(key).items())
            elif kind == "stream":
                found.extend(repr(entry).encode() for entry in db.xrange(key))
            elif kind == "list":
                found.extend(db.lrange(key, 0, -1))
            elif kind == "set":
                found.extend(db.smembers(key))
            elif kind == "zset":
                found.extend(m for m, _ in db.zrange(key, 0, -1, withscores=True))
            else:
                found.append(f"unread type {kind}".encode())
    finally:
        db.close()
    return found


def marked_body(secrets: Secrets, **changes: Any) -> dict[str, Any]:
    return {
        **CHAT_BODY,
        "messages": [{"role": "user", "content": f"Tell me about {secrets.prompt}"}],
        **changes,
    }


def paid(
    proxy: Proxy,
    session: requests.Session,
    secrets: Secrets,
    body: dict[str, Any],
    path: str = "/v1/chat/completions",
    **kwargs: Any,
) -> requests.Response:
    requirement = proxy.requirement(body, path=path)
    header = encode_header(proxy.payment(requirement).to_wire())
    secrets.headers.append(header)
    headers = {V2_HEADER: header, **kwargs.pop("headers", {})}
    return session.post(proxy.url + path, json=body, headers=headers, timeout=30, **kwargs)


def test_no_secret_reaches_logs_redis_or_answers(
    marked: Proxy,
    standin: StandinModel,
    secrets: Secrets,
    all_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    proxy, session = marked, client()
    answers: dict[str, requests.Response] = {}
    body = marked_body(secrets)

    answers["paid"] = paid(proxy, session, secrets, body)
    assert answers["paid"].status_code == 200, answers["paid"].text
    streamed = paid(proxy, session, secrets, {**body, "stream": True})
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    answers["paid stream"] = streamed
    completion = {"model": CHAT_BODY["model"], "prompt": f"Once upon {secrets.prompt}", "max_tokens": 16}
    answers["paid completion"] = paid(proxy, session, secrets, completion, "/v1/completions")
    assert answers["paid completion"].status_code == 200

    # refused: signed by a stranger's key (reaches the claim and the chain), and malformed
    real = proxy.requirement(body)
    auth = authorization_for(real, proxy.wallets.payer)
    forged = encode_header(wrap(auth, sign(new_key(), auth), real).to_wire())
    secrets.headers.append(forged)
    answers["refused"] = session.post(
        proxy.url + "/v1/chat/completions", json=body, headers={V2_HEADER: forged}
    )
    assert answers["refused"].json()["error"] == "invalid_exact_evm_payload_signature"
    junk = "eyJ4NDAyVmVyc2lvbiI6Mn0" + uuid.uuid4().hex  # base64-looking, not canonical
    secrets.headers.append(junk)
    answers["malformed"] = session.post(
        proxy.url + "/v1/chat/completions", json=body, headers={V2_HEADER: junk}
    )
    assert answers["malformed"].status_code == 402
    answers["unpaid"] = session.post(proxy.url + "/v1/chat/completions", json=body)
    answers["bad json"] = session.post(
        proxy.url + "/v1/chat/completions", data=json.dumps(body)[:-1].encode(), timeout=30
    )
    assert answers["bad json"].status_code == 400

    # the model host fails after settlement (502, redeemable), then refuses the call (its 400)
    standin.behaviour.status = 500
    answers["upstream 500"] = paid(proxy, session, secrets, body)
    assert answers["upstream 500"].status_code == 502
    standin.behaviour.status = 400
    answers["upstream 400"] = paid(proxy, session, secrets, body)
    assert answers["upstream 400"].status_code >= 400
    standin.behaviour.status = 200
    for path in ("/v1/models", "/healthz", "/readyz", "/v1/models/hermes-3-8b-tee/ping"):
        answers[path] = session.get(proxy.url + path, timeout=30)

    # the model host did see the prompt six times (the point of a call; its 500 is tried once more);
    # /readyz probes its model list
    assert len([r for r in standin.received if r.path != "/v1/models"]) == 6
    output = capfd.readouterr()
    lines = log_lines(all_logs)
    assert any(r.threadName != threading.main_thread().name for r in all_logs.records), (
        "no log line from the proxy's own threads was captured: the capture is broken"
    )
    for what, secret in secrets.all().items():
        leaked = [line for _, line in lines if secret in line]
        assert not leaked, f"{what} in a log line: {leaked[0][:400]}"
        assert secret not in output.out and secret not in output.err, f"{what} on stdout/stderr"
        assert not [v for v in redis_contents(proxy) if secret.encode() in v], f"{what} stored in Redis"
    # 127.0.0.1 is also where anvil, Redis and the model host live: only the client libraries'
    # lines about the proxy's own outbound connections (urllib3, redis-py) may name it
    outbound = ("urllib3", "redis.")
    local = [line for name, line in lines if "127.0.0.1" in line and not name.startswith(outbound)]
    assert not local, f"a loopback address in a log line: {local[0][:400]}"

    for name, answer in answers.items():
        text = answer.text + json.dumps(dict(answer.headers))
        assert secrets.upstream_key not in text, f"upstream key in the {name} answer"
        assert secrets.relayer_key.removeprefix("0x") not in text, f"relayer key in the {name} answer"
        assert STANDIN_SERVER not in json.dumps(dict(answer.headers)), f"model host header in {name}"
        assert "Traceback" not in answer.text
    for name in ("paid", "paid stream", "paid completion"):
        assert answers[name].headers["Cache-Control"] == "no-store, private", name
    for name in ("upstream 500", "upstream 400", "refused", "malformed", "unpaid", "bad json"):
        assert "no-store" in answers[name].headers["Cache-Control"], name


class EchoingHost:
    """A hostile or careless model host: answers 401 quoting the credential it received (as some
    OpenAI-compatible hosts do) and adds internal headers of its own."""

    def __init__(self) -> None:
        owner = self
        self.calls = 0

        class Handler(BaseHTTPRequestHandler):
            server_version = "internal-llm-gateway/7"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                owner.calls += 1
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                credential = self.headers.get("Authorization", "").removeprefix("Bearer ")
                data = json.dumps(
                    {"error": {"message": f"Incorrect API key provided: {credential}", "type": "auth"}}
                ).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Upstream-Node", "10.0.3.7:8080")
                self.send_header("Set-Cookie", "upstream-session=abc")
                self.send_header("WWW-Authenticate", f'Bearer realm="{credential}"')
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_an_upstream_that_echoes_the_key_does_not_leak_it(
    settings: Settings, wallets: Wallets, chain: DevChain, secrets: Secrets
) -> None:
    host = EchoingHost()
    proxy = start(
        settings.with_overrides(upstream_url=host.url, upstream_api_key=secrets.upstream_key), wallets, chain
    )
    try:
        response = paid(proxy, client(), secrets, marked_body(secrets))
    finally:
        assert proxy.server is not None
        proxy.server.shutdown()
        host.stop()
    assert host.calls == 1
    assert response.status_code >= 400
    assert secrets.upstream_key not in response.text, f"the operator's key reached the buyer: {response.text}"
    for name in ("X-Upstream-Node", "Set-Cookie", "WWW-Authenticate"):
        assert name not in response.headers
    assert "internal-llm-gateway" not in json.dumps(dict(response.headers))


TRICKS: list[tuple[str, dict[str, str], dict[str, Any]]] = [
    ("Host", {"Host": "OTHER"}, {}),
    ("X-Forwarded-Host", {"X-Forwarded-Host": "OTHER", "X-Forwarded-Proto": "http"}, {}),
    ("Forwarded", {"Forwarded": "host=OTHER;proto=http"}, {}),
    ("X-Original-URL", {"X-Original-URL": "http://OTHER/v1/chat/completions"}, {}),
    ("body base_url", {}, {"base_url": "http://OTHER/v1"}),
    ("body api_base", {}, {"api_base": "http://OTHER/v1"}),
    ("body upstream_url", {}, {"upstream_url": "http://OTHER", "url": "http://OTHER/v1/chat/completions"}),
]


@pytest.mark.parametrize(("trick", "headers", "fields"), TRICKS, ids=[t[0] for t in TRICKS])
def test_the_client_cannot_choose_the_upstream_host(
    proxy: Proxy,
    standin: StandinModel,
    secrets: Secrets,
    trick: str,
    headers: dict[str, str],
    fields: dict[str, Any],
) -> None:
    with StandinModel() as other:
        where = other.url.removeprefix("http://")
        body = {**CHAT_BODY, **{k: v.replace("OTHER", where) for k, v in fields.items()}}
        sent = {k: v.replace("OTHER", where) for k, v in headers.items()}
        if fields:  # a body field naming a host is not a field of the policy: refused before any 402
            response = requests.post(proxy.url + "/v1/chat/completions", json=body, timeout=30)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "unknown_field"
        else:
            response = paid(proxy, requests.Session(), secrets, body, headers=sent)
            assert response.status_code == 200, response.text
        assert other.received == []
    assert len(standin.received) == (0 if fields else 1)


def test_a_request_the_http_server_refuses_logs_no_client_address(
    proxy: Proxy, all_logs: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """The devnet/test server (``app.cli.devnet.quiet_request_handler``) drops access lines; its error
    lines (a header line over 64 KB, a garbled request line) must not name the client either."""
    host, port = proxy.url.removeprefix("http://").split(":")
    for request in (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GARBAGE \x00\x01 HTTP/9\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=10, source_address=(CLIENT_IP, 0)) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert b"Error response" in answer  # refused by the HTTP server itself
    output = capfd.readouterr()
    leaked = [line for _, line in log_lines(all_logs) if CLIENT_IP in line]
    assert not leaked, f"client address in a log line: {leaked[0][:300]}"
    assert CLIENT_IP not in output.out + output.err, "client address on stdout/stderr"
