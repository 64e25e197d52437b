"""The stand-in model host must behave like a real (good or bad) upstream, since proxy tests lean on it."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from app.catalog.usage import StreamUsage, Usage, usage_of_answer
from app.devnet import standin
from app.devnet.standin import Behaviour, Received, StandinModel
from app.devnet.standin_server import UsageMode

ROOT = Path(__file__).resolve().parents[2]
SECRET = "the launch codes are 0000"


@pytest.fixture
def model() -> Iterator[StandinModel]:
    with StandinModel() as server:
        yield server


@pytest.fixture(scope="module")
def shared_model() -> Iterator[StandinModel]:
    with StandinModel() as server:
        yield server


def chat_body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": "hermes-3-8b-tee",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": SECRET},
        ],
        "max_tokens": 64,
        "stream": stream,
        **extra,
    }


def sse_payloads(resp: requests.Response, stamps: list[float] | None = None) -> Iterator[str]:
    """The ``data:`` payloads of an SSE response, optionally noting when each arrived."""
    for line in resp.iter_lines(chunk_size=None):
        if line.startswith(b"data: "):
            if stamps is not None:
                stamps.append(time.monotonic())
            yield line[len(b"data: ") :].decode()


def test_url_and_lifecycle() -> None:
    server = StandinModel()
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert not server.url.endswith("/")
    with server:
        assert requests.get(f"{server.url}/v1/models", timeout=5).status_code == 200
    server.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v1/models", timeout=2)
    with pytest.raises(RuntimeError):
        server.start()


def test_stop_without_start_frees_port() -> None:
    server = StandinModel()
    server.stop()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port))


def test_chat_completion_shape(model: StandinModel) -> None:
    resp = requests.post(f"{model.url}/v1/chat/completions", json=chat_body(), timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert int(resp.headers["Content-Length"]) == len(resp.content)
    data = resp.json()
    assert data["object"] == "chat.completion"
    assert data["id"]
    assert isinstance(data["created"], int)
    assert data["model"] == "hermes-3-8b-tee"
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "stand-in answer: 2 messages, max_tokens=64"}
    assert choice["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert SECRET not in resp.text


def test_chat_without_max_tokens(model: StandinModel) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    data = requests.post(f"{model.url}/v1/chat/completions", json=body, timeout=5).json()
    assert data["choices"][0]["message"]["content"] == "stand-in answer: 1 messages, max_tokens=none"
    assert data["model"] == "m"


def test_completions_shape(model: StandinModel) -> None:
    body = {"model": "hermes-3-8b-tee", "prompt": SECRET, "max_tokens": 16}
    resp = requests.post(f"{model.url}/v1/completions", json=body, timeout=5)
    assert resp.status_code == 200
    data = resp.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "stand-in answer: 1 prompts, max_tokens=16"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert (
        data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    )
    assert SECRET not in resp.text


def test_models(model: StandinModel) -> None:
    resp = requests.get(f"{model.url}/v1/models", timeout=5)
    assert resp.status_code == 200
    assert resp.json() == {"object": "list", "data": [{"id": "hermes-3-8b-tee", "object": "model"}]}
    with StandinModel(model="other-model") as other:
        assert requests.get(f"{other.url}/v1/models", timeout=5).json()["data"][0]["id"] == "other-model"


def test_received_records_body_and_headers(model: StandinModel) -> None:
    body = chat_body()
    requests.post(
        f"{model.url}/v1/chat/completions?x=1",
        json=body,
        headers={"Authorization": "Bearer upstream-key", "X-Trace": "abc"},
        timeout=5,
    )
    requests.get(f"{model.url}/v1/models", timeout=5)
    assert len(model.received) == 2
    first, second = model.received
    assert isinstance(first, Received)
    assert first.path == "/v1/chat/completions?x=1"
    assert first.body == body
    assert first.headers["Authorization"] == "Bearer upstream-key"
    assert first.headers["X-Trace"] == "abc"
    assert second.path == "/v1/models"
    assert second.body == {}


def test_chunked_request_body_is_read(model: StandinModel) -> None:
    body = chat_body()
    payload = json.dumps(body).encode()
    resp = requests.post(
        f"{model.url}/v1/chat/completions",
        data=iter([payload[:10], payload[10:]]),  # a generator body goes out chunked
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert resp.status_code == 200
    assert model.received[-1].body == body


def test_stream_yields_chunks_then_done(model: StandinModel) -> None:
    model.behaviour = Behaviour(chunks=4)
    with requests.post(
        f"{model.url}/v1/chat/completions", json=chat_body(stream=True), stream=True, timeout=5
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Transfer-Encoding"] == "chunked"
        payloads = list(sse_payloads(resp))
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    assert len(events) == 4
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert [e["choices"][0]["delta"]["content"] for e in events] == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert len({e["id"] for e in events}) == 1


def test_completions_stream(model: StandinModel) -> None:
    body = {"model": "m", "prompt": "x", "stream": True}
    with requests.post(f"{model.url}/v1/completions", json=body, stream=True, timeout=5) as resp:
        payloads = list(sse_payloads(resp))
    assert payloads[-1] == "[DONE]"
    texts = [json.loads(p)["choices"][0]["text"] for p in payloads[:-1]]
    assert texts == [f"tok{i} " for i in range(5)]


def test_stream_include_usage_adds_a_usage_chunk(model: StandinModel) -> None:
    model.behaviour = Behaviour(chunks=3)
    body = chat_body(stream=True, stream_options={"include_usage": True})
    with requests.post(f"{model.url}/v1/chat/completions", json=body, stream=True, timeout=5) as resp:
        payloads = list(sse_payloads(resp))
    assert payloads[-1] == "[DONE]"
    last = json.loads(payloads[-2])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 3
    assert len(payloads) == 5


def test_stream_chunks_arrive_separately(model: StandinModel) -> None:
    model.behaviour = Behaviour(chunks=5, chunk_delay=0.05)
    stamps: list[float] = []
    start = time.monotonic()
    with requests.post(
        f"{model.url}/v1/chat/completions", json=chat_body(stream=True), stream=True, timeout=5
    ) as resp:
        payloads = list(sse_payloads(resp, stamps))
    end = time.monotonic()
    assert len(payloads) == 6
    # 4 gaps of 50 ms: the first event must be in hand well before the stream is over.
    assert stamps[0] - start < end - start - 0.15
    assert stamps[4] - stamps[0] >= 0.15
    assert all(b - a >= 0.03 for a, b in itertools.pairwise(stamps[:5]))  # one event per write


def test_delay_before_response(model: StandinModel) -> None:
    model.behaviour = Behaviour(delay=0.2)
    start = time.monotonic()
    assert requests.get(f"{model.url}/v1/models", timeout=5).status_code == 200
    assert time.monotonic() - start >= 0.2
    with pytest.raises(requests.ReadTimeout):
        requests.post(f"{model.url}/v1/chat/completions", json=chat_body(), timeout=0.05)


def test_requests_are_served_concurrently(model: StandinModel) -> None:
    model.behaviour = Behaviour(delay=0.3)
    codes: list[int] = []

    def call() -> None:
        codes.append(
            requests.post(f"{model.url}/v1/chat/completions", json=chat_body(), timeout=5).status_code
        )

    threads = [threading.Thread(target=call) for _ in range(5)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 5
    assert time.monotonic() - start < 1.0
    assert len(model.received) == 5


@pytest.mark.parametrize("status", [500, 502, 429])
def test_error_status_gives_json_error(model: StandinModel, status: int) -> None:
    model.behaviour = Behaviour(status=status)
    for path in ("/v1/chat/completions", "/v1/completions"):
        resp = requests.post(f"{model.url}{path}", json=chat_body(stream=True), timeout=5)
        assert resp.status_code == status
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.json() == {"error": {"message": "stand-in failure", "type": "server_error"}}


def test_behaviour_can_change_between_calls(model: StandinModel) -> None:
    url = f"{model.url}/v1/chat/completions"
    model.behaviour.status = 500
    assert requests.post(url, json=chat_body(), timeout=5).status_code == 500
    model.behaviour.status = 200
    assert requests.post(url, json=chat_body(), timeout=5).status_code == 200


def test_reset_closes_without_response(model: StandinModel) -> None:
    model.behaviour = Behaviour(reset=True)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{model.url}/v1/chat/completions", json=chat_body(), timeout=5)
    assert len(model.received) == 1  # the request did arrive
    model.behaviour = Behaviour()
    assert requests.get(f"{model.url}/v1/models", timeout=5).status_code == 200


@pytest.mark.parametrize("cut_after", [0, 2, 5])
def test_cut_after_breaks_stream_before_done(model: StandinModel, cut_after: int) -> None:
    model.behaviour = Behaviour(chunks=5, cut_after=cut_after)
    got: list[str] = []
    with (
        pytest.raises((requests.exceptions.ChunkedEncodingError, requests.ConnectionError)),
        requests.post(
            f"{model.url}/v1/chat/completions", json=chat_body(stream=True), stream=True, timeout=5
        ) as resp,
    ):
        assert resp.status_code == 200
        got.extend(sse_payloads(resp))
    assert len(got) == cut_after
    assert "[DONE]" not in got


def test_unknown_paths_and_methods_are_404(model: StandinModel) -> None:
    assert requests.get(f"{model.url}/nope", timeout=5).status_code == 404
    resp = requests.get(f"{model.url}/v1/chat/completions", timeout=5)
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found_error"
    assert requests.delete(f"{model.url}/v1/models", timeout=5).status_code == 404


def test_bad_bodies_are_400(model: StandinModel) -> None:
    url = f"{model.url}/v1/chat/completions"
    assert requests.post(url, data=b"not json", timeout=5).status_code == 400
    assert requests.post(url, json=[1, 2], timeout=5).status_code == 400
    assert requests.post(url, json={"model": "m"}, timeout=5).status_code == 400
    assert requests.post(f"{model.url}/v1/completions", json={"prompt": 3}, timeout=5).status_code == 400


def test_keep_alive_session_survives_many_calls(model: StandinModel) -> None:
    with requests.Session() as session:
        for _ in range(5):
            assert session.post(f"{model.url}/v1/chat/completions", json=chat_body(), timeout=5).ok
            with session.post(
                f"{model.url}/v1/chat/completions", json=chat_body(stream=True), stream=True, timeout=5
            ) as resp:
                assert list(sse_payloads(resp))[-1] == "[DONE]"


def test_nothing_is_logged(model: StandinModel, capfd: pytest.CaptureFixture[str]) -> None:
    url = f"{model.url}/v1/chat/completions"
    requests.post(url, json=chat_body(), timeout=5)
    with requests.post(url, json=chat_body(stream=True), stream=True, timeout=5) as resp:
        list(sse_payloads(resp))
    requests.get(f"{model.url}/missing", timeout=5)
    model.behaviour = Behaviour(cut_after=1)
    with (
        pytest.raises(requests.RequestException),
        requests.post(url, json=chat_body(stream=True), stream=True, timeout=5) as resp,
    ):
        list(sse_payloads(resp))
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


@settings(max_examples=25, deadline=None)
@given(
    contents=st.lists(st.text(max_size=30), min_size=0, max_size=6),
    max_tokens=st.one_of(st.none(), st.integers(min_value=1, max_value=4096)),
)
def test_answer_echoes_counts_not_prompt(
    shared_model: StandinModel, contents: list[str], max_tokens: int | None
) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": c} for c in contents]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    data = requests.post(f"{shared_model.url}/v1/chat/completions", json=body, timeout=5).json()
    limit = "none" if max_tokens is None else max_tokens
    expected = f"stand-in answer: {len(contents)} messages, max_tokens={limit}"
    assert data["choices"][0]["message"]["content"] == expected


@contextlib.contextmanager
def standin_cli(*options: str) -> Iterator[str]:
    """``python -m app.devnet.standin --port 0 *options`` in the foreground: yields its URL; it must
    stop cleanly on SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.devnet.standin", "--port", "0", *options],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip().rsplit(" ", 1)[-1]
        assert url.startswith(("http://127.0.0.1:", "https://127.0.0.1:"))  # https with --tls-cert
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0


def test_main_runs_in_foreground() -> None:
    with standin_cli("--model", "cli-model") as url:
        assert requests.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"] == "cli-model"


# --- usage reporting ----------------------------------------------------------------------------------


def answer(model: StandinModel, path: str, body: dict[str, Any]) -> requests.Response:
    resp = requests.post(f"{model.url}{path}", json=body, timeout=5)
    assert resp.status_code == 200
    return resp


COMPLETIONS_BODY: dict[str, Any] = {"model": "m", "prompt": ["one two", "three"], "max_tokens": 8}


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", chat_body()), ("/v1/completions", COMPLETIONS_BODY)]
)
def test_usage_report_omit_and_malformed_in_json_answers(
    model: StandinModel, path: str, body: dict[str, Any]
) -> None:
    reported = answer(model, path, body)
    usage = reported.json()["usage"]
    assert usage_of_answer(reported.content) == Usage(usage["prompt_tokens"], usage["completion_tokens"])

    model.behaviour = Behaviour(usage="omit")
    omitted = answer(model, path, body)
    assert "usage" not in omitted.json()
    assert omitted.json()["choices"] == reported.json()["choices"]  # only the usage differs
    assert usage_of_answer(omitted.content) is None

    model.behaviour.usage = "malformed"
    malformed = answer(model, path, body)
    assert malformed.json()["usage"] == {"prompt_tokens": "many", "completion_tokens": -1}
    assert usage_of_answer(malformed.content) is None


def stream_payloads(model: StandinModel, include_usage: bool) -> list[Any]:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    body = chat_body(stream=True, **extra)
    with requests.post(f"{model.url}/v1/chat/completions", json=body, stream=True, timeout=5) as resp:
        assert resp.status_code == 200
        payloads = list(sse_payloads(resp))
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


@pytest.mark.parametrize("usage", ["report", "omit", "malformed"])
def test_streams_carry_no_usage_unless_asked(model: StandinModel, usage: UsageMode) -> None:
    model.behaviour = Behaviour(chunks=3, usage=usage)
    events = stream_payloads(model, include_usage=False)
    assert len(events) == 3
    assert all("usage" not in e and e["choices"] for e in events)


def test_stream_usage_omitted_even_when_asked(model: StandinModel) -> None:
    model.behaviour = Behaviour(chunks=3, usage="omit")
    events = stream_payloads(model, include_usage=True)
    assert len(events) == 3
    assert all("usage" not in e and e["choices"] for e in events)


def test_stream_usage_malformed_when_asked(model: StandinModel) -> None:
    model.behaviour = Behaviour(chunks=3, usage="malformed")
    events = stream_payloads(model, include_usage=True)
    assert len(events) == 4
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": "many", "completion_tokens": -1}


@pytest.mark.parametrize(("mode", "expected"), [("report", Usage(7, 3)), ("omit", None), ("malformed", None)])
def test_stream_usage_as_the_proxy_reads_it(
    model: StandinModel, mode: UsageMode, expected: Usage | None
) -> None:
    """The raw bytes of a stand-in stream, watched as the proxy does, give the usage the switch says."""
    model.behaviour = Behaviour(chunks=3, usage=mode)
    body = chat_body(stream=True, stream_options={"include_usage": True})  # 2 + 5 words: 7 prompt tokens
    for keep in (True, False):
        watcher = StreamUsage(keep_usage_event=keep)
        with requests.post(f"{model.url}/v1/chat/completions", json=body, stream=True, timeout=5) as resp:
            raw = b"".join(resp.iter_content(chunk_size=None))
        out = b"".join(watcher.feed(raw[i : i + 7]) for i in range(0, len(raw), 7)) + watcher.end()
        assert watcher.usage == expected
        if keep or mode == "omit":
            assert out == raw
        else:  # the usage event, and only it, is gone
            events = raw.split(b"\n\n")[:-1]
            assert out == b"".join(e + b"\n\n" for e in events if b'"choices": []' not in e)
            assert len(out) < len(raw)


def test_behaviour_refuses_an_unknown_usage_mode() -> None:
    with pytest.raises(ValueError, match="usage must be one of report, omit, malformed"):
        Behaviour(usage="sometimes")  # type: ignore[arg-type]


def test_main_usage_option() -> None:
    with pytest.raises(SystemExit) as exc:
        standin.main(["--usage", "sometimes"])
    assert exc.value.code == 2
    with standin_cli("--usage", "malformed") as url:
        data = requests.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=5).json()
        assert data["usage"] == {"prompt_tokens": "many", "completion_tokens": -1}
