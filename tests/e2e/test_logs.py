"""One log format for every logger: each line gunicorn and the app write is a JSON object with time,
level, logger, message and pid, and the request id when the line belongs to a request."""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from app import logs
from app.devnet import DevChain, Service, Wallets, free_port
from app.devnet.standin import StandinModel
from app.settings import Settings
from tests.e2e.test_gunicorn import gunicorn_env, start_gunicorn, wait_until_up
from tests.support import Proxy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REQUEST_ID_RE = re.compile(r"[0-9a-f]{32}")
LINE_KEYS = {"time", "level", "logger", "message", "pid"}


def parsed(text: str) -> list[dict[str, Any]]:
    """Every non-empty line of ``text`` as the JSON object it must be."""
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"a log line that is not JSON: {line[:300]}")
        assert isinstance(entry, dict) and entry.keys() >= LINE_KEYS, line[:300]
        datetime.fromisoformat(entry["time"])
        entries.append(entry)
    return entries


@pytest.mark.integration
def test_every_line_gunicorn_and_the_app_write_is_json(
    anvil: Service,
    redis_service: Service,
    redis_client: Any,
    wallets: Wallets,
    chain: DevChain,
    standin: StandinModel,
    settings: Settings,
) -> None:
    port = free_port()
    process = start_gunicorn(gunicorn_env(anvil, redis_service, wallets, standin.url, port))
    proxy = Proxy(f"http://127.0.0.1:{port}", settings, wallets, chain)
    try:
        wait_until_up(process, proxy.url)
        paid = proxy.pay(proxy.payment(proxy.requirement()))
        missing = requests.get(proxy.url + "/no-such-page", timeout=10)
        bad_header = proxy.post(headers={"PAYMENT-SIGNATURE": "not base64 at all"})
    finally:
        process.terminate()
        stdout, stderr = process.communicate(timeout=30)
    assert paid.status_code == 200 and missing.status_code == 404 and bad_header.status_code in (400, 402)
    written = parsed(stdout) + parsed(stderr)
    server = [line["message"] for line in written if line["logger"] == "gunicorn.error"]
    assert any(m.startswith("Starting gunicorn") for m in server), server
    assert any(m.startswith("Booting worker") for m in server), server
    assert any("Shutting down" in m for m in server), server  # the master's last words, too
    access = [line for line in written if line["logger"] == "x402.access"]
    assert all(REQUEST_ID_RE.fullmatch(line["request_id"]) for line in access), access
    assert len({line["request_id"] for line in access}) == len(access)  # one id per request
    (served,) = [line for line in access if line.get("outcome") == "served"]
    assert served["request_id"] == paid.headers["X-Request-Id"] and served["level"] == "INFO"
    assert served["payer"] == wallets.payer.lower() and served["route"] == "/v1/chat/completions"
    (unmatched,) = [line for line in access if line["status"] == 404]
    assert unmatched["route"] == "unmatched" and unmatched["request_id"] == missing.headers["X-Request-Id"]
    assert all("client_ip" not in line for line in access)  # X402_LOG_CLIENT_IP is off


@pytest.mark.integration
def test_a_refusal_to_start_is_one_json_line(
    anvil: Service, redis_service: Service, wallets: Wallets
) -> None:
    env = gunicorn_env(anvil, redis_service, wallets, "http://127.0.0.1:9", free_port())
    env["X402_PAY_TO"] = "0x1234"
    process = start_gunicorn(env)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 4  # gunicorn's "application failed to load": no respawn loop
    written = parsed(stdout) + parsed(stderr)
    (refusal,) = [line for line in written if "refusing to start" in line["message"]]
    assert refusal["level"] == "CRITICAL" and "X402_PAY_TO" in refusal["message"]
    assert "Traceback" not in stderr


class Lines(logging.Handler):
    """The JSON lines a logger writes, formatted as they are emitted (as a stream handler does)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler, log = Lines(), logging.getLogger("x402.test")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)
    log.setLevel(logging.NOTSET)


def test_lines_written_during_a_request_carry_its_id_and_notes_end_with_it(lines: Lines) -> None:
    log = logging.getLogger("x402.test")
    facts = logs.begin("a" * 32)
    try:
        log.warning("during %s", "the request")
        logs.note(model="m", amount=5)
        assert logs.current() is facts and facts.fields == {"model": "m", "amount": 5}
    finally:
        logs.end()
    logs.note(outcome="served")  # after the line: a no-op
    log.info("after", extra={"fields": {"status": 200, "message": "cannot replace the message"}})
    during, after = lines.lines
    assert during["request_id"] == "a" * 32 and during["message"] == "during the request"
    assert during["level"] == "WARNING" and during["logger"] == "x402.test"
    assert "request_id" not in after and after["status"] == 200 and after["message"] == "after"
    assert facts.fields == {"model": "m", "amount": 5} and logs.current() is None


def test_each_thread_has_its_own_request(lines: Lines) -> None:
    log = logging.getLogger("x402.test")
    both_open = threading.Barrier(2)

    def request(request_id: str) -> None:
        logs.begin(request_id)
        both_open.wait(timeout=5)
        log.info(request_id)
        logs.end()

    threads = [threading.Thread(target=request, args=(c * 32,)) for c in "bc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert {line["message"]: line["request_id"] for line in lines.lines} == {c * 32: c * 32 for c in "bc"}
    assert logs.current() is None  # this thread never had one


def test_a_traceback_stays_inside_its_line() -> None:
    record = logging.LogRecord("x402.test", logging.ERROR, __file__, 1, "failed", None, None)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert line["message"] == "failed" and "RuntimeError: boom" in line["exc"]


def test_the_log_module_imports_no_flask() -> None:
    """The money path (app.payments) calls ``app.logs.note``: the module must not pull in Flask."""
    tree = ast.parse((PROJECT_ROOT / "app" / "logs.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {
        "__future__",
        "contextvars",
        "json",
        "logging",
        "sys",
        "time",
        "dataclasses",
        "datetime",
        "typing",
    }
