"""A stand-in OpenAI-compatible model host, as the upstream for the devnet demo and for tests.

It answers ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` with deterministic
answers, and can be told (through a mutable ``Behaviour``) to be slow, to fail with an HTTP
status, to reset the connection, or to cut a stream short. It is built on ``http.server``
rather than werkzeug so that it controls the socket byte for byte: one chunk per SSE event, a
connection that dies mid-stream, a reset with no response at all.

Prompts are never logged nor echoed: answers only say how many messages and which ``max_tokens``
they saw, and every answer reports the field paths the request carried (``standin_received``: names
such as ``messages[].content``, never values), so a test on real processes can check what the proxy
forwarded. The bodies are also kept in memory (``received``).

With ``tls`` (a certificate and a private key, PEM files) it serves HTTPS, as an enclave serving an
RA-TLS certificate does; ``reload_certificate`` makes later connections get another certificate.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import signal
import ssl
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from app.devnet.standin_server import (
    MALFORMED_USAGE,
    USAGE_MODES,
    Behaviour,
    Received,
    UsageMode,
    _BadRequest,
    _Server,
)


def _words(value: Any) -> int:
    """Rough, deterministic token count of a prompt, without ever keeping the text."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return _words(value.get("content")) + _words(value.get("text"))
    return 0


def field_paths(value: Any, prefix: str = "") -> set[str]:
    """Every field path of a JSON value (``tools[].function.name``): names only, never values."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.add(path)
            paths |= field_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            paths |= field_paths(item, prefix + "[]")
    return paths


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _usage(mode: UsageMode, prompt_tokens: int, completion_tokens: int) -> dict[str, Any] | None:
    """The ``usage`` object an answer carries as ``mode`` says (None: it carries none)."""
    if mode == "omit":
        return None
    if mode == "malformed":
        return dict(MALFORMED_USAGE)
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def _tls_context(certificate: Path, key: Path) -> ssl.SSLContext:
    """A server context serving ``certificate`` (PEM, leaf first) with ``key`` (PEM, unencrypted)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    return context


class StandinModel:
    """Threaded HTTP/1.1 server on 127.0.0.1 (port 0 = free port); HTTPS with ``tls``.

    ``tls``: (certificate PEM file, private key PEM file); ``url`` is then ``https://host:port``.
    Connections are kept alive (HTTP/1.1, closed after 120 s idle), so a client that pools them keeps
    the certificate it first saw: only new connections see one swapped in by ``reload_certificate``.

    For tests: ``received`` lists every request (GET ``/v1/models`` probes too: path, headers, JSON
    body or {}), and ``handshakes`` counts completed TLS handshakes (new connections, including a
    handshake-only certificate probe that sends no request at all).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "hermes-3-8b-tee",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.model = model
        self.behaviour = Behaviour()
        self.received: list[Received] = []
        self.handshakes = 0
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        context = _tls_context(*tls) if tls is not None else None  # a bad file fails here, before binding
        self._server = _Server((host, port), self, context)  # binds now, so url is known before start()
        bound_host, bound_port = self._server.server_address[:2]
        self.host: str = str(bound_host)
        self.port: int = int(bound_port)
        self.url = f"{'https' if tls is not None else 'http'}://{self.host}:{self.port}"
        self._thread: threading.Thread | None = None
        self._stopped = False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> StandinModel:
        """Serve in a daemon thread; calling it again while running is a no-op."""
        if self._stopped:
            raise RuntimeError("StandinModel was stopped; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"standin-model-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and free the port; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._server.shutdown()  # only valid once serve_forever runs, else it would block
            self._thread.join(timeout=5)
        self._server.drop_connections()
        self._server.server_close()

    def wait(self) -> None:
        """Block until stop() is called (from a signal handler or another thread)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def __enter__(self) -> StandinModel:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- TLS ----------------------------------------------------------------------------------

    def reload_certificate(self, certificate: Path, key: Path, restart: bool = False) -> None:
        """Serve ``certificate`` (PEM) with ``key`` (PEM) to connections accepted from now on; open
        connections keep theirs, unless ``restart`` closes them as an enclave's restart would. The
        files are loaded into a new context first, so a bad pair raises (``ssl.SSLError`` or
        ``OSError``) and leaves the current certificate served."""
        if self._server.tls is None:
            raise RuntimeError("this stand-in serves plain HTTP; create it with tls=(certificate, key)")
        self._server.tls = _tls_context(certificate, key)
        if restart:
            self._server.drop_connections()

    # --- answers (called from handler threads) ------------------------------------------------

    def _handshake_done(self) -> None:
        with self._lock:
            self.handshakes += 1

    def _record(self, item: Received) -> None:
        with self._lock:
            self.received.append(item)

    def _snapshot(self, model_call: bool) -> Behaviour:
        """This request's behaviour; a fault limited by ``times`` is used up by model calls."""
        with self._lock:
            live = self.behaviour
            faulty = live.status != 200 or live.reset
            if faulty and live.times is not None:
                if live.times <= 0:
                    return dataclasses.replace(live, status=200, reset=False)
                live.times -= model_call
            return dataclasses.replace(live)

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-standin-{next(self._ids)}"

    def _requested_model(self, body: dict[str, Any]) -> str:
        value = body.get("model")
        return value if isinstance(value, str) and value else self.model

    def _answer(self, body: dict[str, Any], *, chat: bool, usage: UsageMode = "report") -> dict[str, Any]:
        """The non-streamed answer, its ``usage`` as ``usage`` says; also validates the request for
        the streamed one."""
        max_tokens = body.get("max_tokens")
        limit = "none" if max_tokens is None else str(max_tokens)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise _BadRequest("'messages' must be a list")
            text = f"stand-in answer: {len(messages)} messages, max_tokens={limit}"
            prompt_tokens = _words(messages)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str | list):
                raise _BadRequest("'prompt' must be a string or a list")
            prompts = len(prompt) if isinstance(prompt, list) else 1
            text = f"stand-in answer: {prompts} prompts, max_tokens={limit}"
            prompt_tokens = _words(prompt)
        prompt_tokens = max(1, prompt_tokens)
        answers = _count(body.get("n")) * (1 if chat or not isinstance(prompt, list) else len(prompt))
        completion_tokens = len(text.split()) * answers
        choices: list[dict[str, Any]] = []
        for index in range(answers):
            choice: dict[str, Any] = {"index": index, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
                choice["logprobs"] = None
            choices.append(choice)
        answer: dict[str, Any] = {
            "id": self._next_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self._requested_model(body),
            "choices": choices,
        }
        reported = _usage(usage, prompt_tokens, completion_tokens)
        if reported is not None:
            answer["usage"] = reported
        answer["standin_received"] = sorted(field_paths(body))
        return answer

    def _stream_events(
        self, body: dict[str, Any], count: int, *, chat: bool, usage: UsageMode = "report"
    ) -> list[dict[str, Any]]:
        """``count`` content chunks ("tok0 ", "tok1 ", ...), plus a usage chunk if asked for (and
        ``usage`` is not "omit")."""
        ident = self._next_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        model = self._requested_model(body)
        obj = "chat.completion.chunk" if chat else "text_completion"
        events: list[dict[str, Any]] = []
        for i in range(count):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if i == count - 1 else None}
            if chat:
                delta: dict[str, Any] = {"content": f"tok{i} "}
                if i == 0:
                    delta = {"role": "assistant", **delta}
                choice["delta"] = delta
            else:
                choice["text"] = f"tok{i} "
                choice["logprobs"] = None
            event = {"id": ident, "object": obj, "created": created, "model": model, "choices": [choice]}
            if i == 0:
                event["standin_received"] = sorted(field_paths(body))
            events.append(event)
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            prompt_tokens = max(1, _words(body.get("messages") if chat else body.get("prompt")))
            reported = _usage(usage, prompt_tokens, count)
            if reported is not None:
                events.append(
                    {
                        "id": ident,
                        "object": obj,
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": reported,
                    }
                )
        return events


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in in the foreground (``python -m app.devnet.standin --port 8500``)."""
    parser = argparse.ArgumentParser(
        description="Stand-in OpenAI-compatible model host (never logs prompts)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500, help="0 picks a free port")
    parser.add_argument("--model", default="hermes-3-8b-tee")
    parser.add_argument("--status", type=int, default=200, help="answer every model call with this status")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each response")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between stream chunks")
    parser.add_argument("--chunks", type=int, default=5, help="content chunks per stream")
    parser.add_argument(
        "--usage",
        choices=USAGE_MODES,
        default="report",
        help="token usage in answers: report it, omit it, or report a malformed one",
    )
    parser.add_argument(
        "--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM); needs --tls-key"
    )
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert is not None else None

    server = StandinModel(host=args.host, port=args.port, model=args.model, tls=tls)
    server.behaviour = Behaviour(
        status=args.status,
        delay=args.delay,
        chunk_delay=args.chunk_delay,
        chunks=args.chunks,
        usage=args.usage,
    )

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.stop, daemon=True).start()  # shutdown() can't run in this thread

    signal.signal(signal.SIGTERM, _on_signal)
    server.start()
    print(f"stand-in model {args.model} listening on {server.url}", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
