"""A model host's error message reaches a buyer only scrubbed: no key, host, URL, address or token."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from app.backends.upstream import ERROR_MESSAGE_LIMIT, host_error_message

KEY = "sk-op3rator-0123456789abcdefghij"
HOSTS = ["https://gpu-node-7.internal.example:8443", "http://10.0.3.7:8080"]


def scrubbed(message: object, shape: str = "openai") -> str:
    body = {
        "openai": {"error": {"message": message}},
        "plain": {"message": message},
        "fastapi": {"detail": message},
    }
    return host_error_message(json.dumps(body[shape]).encode(), [KEY], HOSTS)


def test_the_reason_survives_and_what_names_the_operator_does_not() -> None:
    text = scrubbed(
        f"This model's maximum context length is 8192 tokens; you asked 9000 (key {KEY}, "
        "served by gpu-node-7.internal.example at 10.0.3.7:8080, docs http://wiki.local/x, "
        "Bearer abc.def, token ab12cd34ef56ab12cd34ef56ab12)"
    )
    assert "maximum context length is 8192 tokens; you asked 9000" in text
    for secret in (
        KEY,
        "gpu-node-7",
        "internal.example",
        "10.0.3.7",
        "wiki.local",
        "abc.def",
        "ab12cd34ef56",
    ):
        assert secret not in text


def test_every_common_error_shape_is_read() -> None:
    for shape in ("openai", "plain", "fastapi"):
        assert scrubbed("prompt too long", shape) == "prompt too long"


def test_no_message_gives_nothing() -> None:
    assert host_error_message(b"<html>502</html>", [KEY], HOSTS) == ""
    assert host_error_message(b'{"error": 5}', [KEY], HOSTS) == ""
    assert scrubbed(["a list"]) == ""


@given(
    st.text(max_size=200),
    st.text(max_size=200),
    st.sampled_from([KEY, "gpu-node-7.internal.example", "10.0.3.7"]),
)
def test_a_secret_anywhere_in_any_message_is_never_passed(before: str, after: str, secret: str) -> None:
    text = scrubbed(before + secret + after)
    assert secret not in text
    assert len(text) <= ERROR_MESSAGE_LIMIT and text.isprintable()
