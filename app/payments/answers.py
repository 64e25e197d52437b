"""What the money path answers, without Flask: a status, headers and a body, which the web layer
sends as it is; and the one JSON error shape, ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


@dataclass
class Answer:
    """An HTTP answer: ``body`` is the bytes, or the chunks of a stream as they come."""

    status: int
    headers: dict[str, str]
    body: bytes | Iterator[bytes]


def error_answer(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Answer:
    """The JSON error shape every 4xx/5xx but the 402 challenge uses; never cached."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    base = {"Content-Type": "application/json", "Cache-Control": "no-store"}
    return Answer(status, {**base, **(headers or {})}, body)
