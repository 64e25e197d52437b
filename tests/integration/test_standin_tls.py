"""The model stand-in over HTTPS (``StandinModel(tls=...)``), on real sockets, as a confidential VM's
enclave serving an RA-TLS certificate of our own chain (``tests/tee_support.py``): it answers model
calls, serves exactly the certificate given, serves another one to new connections after
``reload_certificate`` while open connections keep theirs, and runs TLS handshakes in the connections'
own threads, so a client stuck before its handshake holds up nobody else."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from urllib3.exceptions import InsecureRequestWarning

from app.devnet.standin import StandinModel
from tests.tee_support import write_enclave_files
from tests.unit.test_standin_model import standin_cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHAT: dict[str, Any] = {"model": "hermes-3-8b-tee", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """An RA-TLS certificate of our chain and its key: (certificate PEM, key PEM, certificate DER)."""
    return write_enclave_files(tmp_path / "first")


@pytest.fixture
def enclave(files: tuple[Path, Path, bytes]) -> Iterator[StandinModel]:
    certificate, key, _der = files
    with StandinModel(tls=(certificate, key)) as server:
        yield server


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed RA-TLS certificate: its content is what counts
    return context


def served_der(url: str, timeout: float = 5) -> bytes:
    """The DER of the certificate ``url``'s server presents on a new connection (handshake only)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        _client_context().wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def post_chat(url: str, timeout: float = 5) -> requests.Response:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureRequestWarning)
        return requests.post(f"{url}/v1/chat/completions", json=CHAT, timeout=timeout, verify=False)


def wait_for(condition: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_it_answers_model_calls_and_probes_over_https(enclave: StandinModel) -> None:
    assert enclave.url == f"https://127.0.0.1:{enclave.port}"
    answer = post_chat(enclave.url)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"].startswith("stand-in answer: 1 messages")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureRequestWarning)
        models = requests.get(f"{enclave.url}/v1/models", timeout=5, verify=False)
    assert models.json()["data"][0]["id"] == "hermes-3-8b-tee"
    assert [r.path for r in enclave.received] == ["/v1/chat/completions", "/v1/models"]  # probes counted
    assert enclave.handshakes == 2  # requests opened a connection per call
    with pytest.raises(requests.ConnectionError):  # plain HTTP on the TLS port: no answer
        requests.get(f"http://127.0.0.1:{enclave.port}/v1/models", timeout=5)
    assert len(enclave.received) == 2


def test_it_serves_the_certificate_given(enclave: StandinModel, files: tuple[Path, Path, bytes]) -> None:
    _certificate, _key, der = files
    assert served_der(enclave.url) == der
    wait_for(lambda: enclave.handshakes == 1)  # a handshake-only probe: counted, no request received
    assert enclave.received == []


def test_a_reloaded_certificate_is_served_to_new_connections_only(
    enclave: StandinModel, files: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    _certificate, _key, first = files
    held = http.client.HTTPSConnection("127.0.0.1", enclave.port, timeout=5, context=_client_context())
    held.request("GET", "/v1/models")
    assert held.getresponse().read()  # a kept-alive connection, handshaken with the first certificate

    certificate, key, second = write_enclave_files(tmp_path / "second")
    assert second != first
    enclave.reload_certificate(certificate, key)
    assert served_der(enclave.url) == second
    assert post_chat(enclave.url).status_code == 200

    assert held.sock is not None
    assert held.sock.getpeercert(binary_form=True) == first
    held.request("GET", "/v1/models")  # the same connection, still answered
    assert held.getresponse().status == 200
    held.close()
    assert enclave.handshakes == 3  # held, the probe, the chat call: no new handshake for held's second


def test_a_bad_certificate_pair_leaves_the_served_one(
    enclave: StandinModel, files: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    certificate, _key, der = files
    _other_certificate, other_key, _ = write_enclave_files(tmp_path / "other")
    with pytest.raises(ssl.SSLError):  # the key is not the certificate's
        enclave.reload_certificate(certificate, other_key)
    with pytest.raises(OSError):
        enclave.reload_certificate(tmp_path / "missing.pem", other_key)
    assert served_der(enclave.url) == der
    with StandinModel() as plain, pytest.raises(RuntimeError, match="plain HTTP"):
        plain.reload_certificate(certificate, other_key)


def test_a_client_stuck_before_its_handshake_holds_up_nobody(
    enclave: StandinModel, files: tuple[Path, Path, bytes], capfd: pytest.CaptureFixture[str]
) -> None:
    _certificate, _key, der = files
    with contextlib.ExitStack() as stack:
        silent = stack.enter_context(socket.create_connection(("127.0.0.1", enclave.port), timeout=5))
        half = stack.enter_context(socket.create_connection(("127.0.0.1", enclave.port), timeout=5))
        half.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, never finished
        time.sleep(0.2)  # both accepted (and handed to their threads) before the next client comes
        started = time.monotonic()
        assert post_chat(enclave.url, timeout=5).status_code == 200
        assert served_der(enclave.url) == der
        assert time.monotonic() - started < 2
        silent.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # not TLS: its handshake fails
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            reply = silent.recv(1024)  # at most a TLS alert, then the server hangs up
        assert not reply.startswith(b"HTTP/")
    started = time.monotonic()
    enclave.stop()
    assert time.monotonic() - started < 5
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "SSLError" not in captured.err


def test_the_command_line_serves_https_with_the_files_given(files: tuple[Path, Path, bytes]) -> None:
    certificate, key, der = files
    with standin_cli("--tls-cert", str(certificate), "--tls-key", str(key)) as url:
        assert url.startswith("https://127.0.0.1:")
        assert served_der(url) == der
        assert post_chat(url).status_code == 200
    alone = subprocess.run(
        [sys.executable, "-m", "app.devnet.standin", "--port", "0", "--tls-cert", str(certificate)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert alone.returncode == 2 and "--tls-cert and --tls-key go together" in alone.stderr
