"""What a call actually used, as the model host reports it, and what the ``upto`` scheme charges for it.

Pure: no I/O. The buyer authorizes a maximum (``price(model, work)``); the proxy charges what the
host's OpenAI ``usage`` object says was used, never more than that maximum. A missing or malformed
``usage`` is unknown usage, and unknown usage is charged the maximum.

For streams, ``StreamUsage`` reads the usage event out of the raw SSE bytes as they pass through and,
when the proxy itself asked the host for it (``stream_options.include_usage``), keeps it from a
buyer who did not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import sub
from typing import Any

from app.catalog import Model

_TOKENS_LIMIT = 2**63  # token counts at or above this are not believed
_PER = 1_000_000  # catalog prices are per million tokens
MAX_EVENT_BYTES = 1 << 20  # a bigger SSE event passes through unexamined (bounds what is held)
_BLANK = (b"\n", b"\r\n")
# JSON nested deeper than this is not parsed. Importing eth-account raises the recursion limit to
# 100000 (py_ecc), which lets the C JSON parser overflow the C stack (a segfault, not an exception)
# on a few tens of thousands of "[" from a host; real answers nest a handful of levels.
MAX_DEPTH = 500
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")  # an opener steps up 1, a closer down 1
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


@dataclass(frozen=True)
class Usage:
    """Tokens the host reports for one call (all choices together)."""

    prompt_tokens: int
    completion_tokens: int


def _tokens(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _TOKENS_LIMIT:
        return value
    return None


def usage_from(value: Any) -> Usage | None:
    """The ``Usage`` of a parsed OpenAI ``usage`` object, or None when it is missing or malformed:
    ``prompt_tokens`` and ``completion_tokens`` must both be integers (not booleans) in 0..2⁶³-1."""
    if not isinstance(value, dict):
        return None
    prompt = _tokens(value.get("prompt_tokens"))
    completion = _tokens(value.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def _too_deep(data: bytes) -> bool:
    """Whether parsing ``data`` could nest deeper than ``MAX_DEPTH`` (linear, in C loops)."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False
    skeleton = _STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKETS)  # structure, strings out
    steps: Iterator[int] = map(sub, skeleton, repeat(1))  # +1 per opener, -1 per closer
    return max(accumulate(steps, initial=0)) > MAX_DEPTH


def _parse(data: bytes) -> Any:
    """JSON ``data``, or None for anything that is not JSON or nests too deep (never raises)."""
    if _too_deep(data):
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def usage_of_answer(content: bytes) -> Usage | None:
    """The usage a whole JSON answer (``chat.completion``, ``text_completion``) reports, or None."""
    answer = _parse(content)
    if not isinstance(answer, dict):
        return None
    return usage_from(answer.get("usage"))


def charge(model: Model, usage: Usage | None, maximum: int) -> int:
    """What an ``upto`` call costs, in atomic units of the asset (USDC: 10⁻⁶ USD), given ``maximum``,
    the amount the buyer authorized (the catalog price of the request, in the same units).

    The charge rule (issue 15):

    - per_token with known usage: ``ceil((prompt_tokens × input_per_million + completion_tokens ×
      output_per_million) / 10⁶)``, prices being atomic units per million tokens; raised to the
      model's ``floor``, then capped at ``maximum``. Integer arithmetic only.
    - per_call: ``maximum`` (the price does not depend on usage).
    - unknown usage (``None``: missing or malformed): ``maximum``.

    So the result is never above ``maximum``, and never below ``min(floor, maximum)``.
    """
    if usage is None or model.pricing != "per_token":
        return maximum
    numerator = (
        usage.prompt_tokens * model.input_per_million + usage.completion_tokens * model.output_per_million
    )
    return min(max(-(-numerator // _PER), model.floor), maximum)


def _event_data(event: bytes) -> bytes | None:
    """The ``data`` of an SSE event's lines (joined by newlines, as an SSE client does), or None."""
    parts: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"data"):
            field, colon, value = line.removesuffix(b"\r").partition(b":")
            if field == b"data":
                parts.append(value.removeprefix(b" ") if colon else b"")
    return b"\n".join(parts) if parts else None


class StreamUsage:
    """Watches the raw SSE bytes of an OpenAI-compatible stream, chunk by chunk, for its usage.

    ``feed`` every chunk as it arrives from the host (chunks may split lines and events anywhere)
    and pass on what it returns; ``end`` returns what is still held when the host is done. Events
    end with a blank line; lines end with LF or CRLF (a lone CR is not a line end here). ``usage``
    is that of the last event whose JSON carries a ``usage`` object ``usage_from`` accepts.

    With ``keep_usage_event`` (the buyer asked for ``stream_options.include_usage``), the output is
    the input, byte for byte, and nothing is ever held back. Without it (the proxy added the option),
    each event whose JSON has ``"choices": []`` and a ``usage`` object is dropped, and everything
    else passes through unchanged; an incomplete event is held until its end tells which it is.

    Bytes that are not SSE, not UTF-8 or not JSON pass through and just carry no usage. An event
    longer than ``max_event_bytes`` passes through as it comes and is not examined, so at most that
    much is ever held. Each byte is scanned a bounded number of times: the cost is linear.
    """

    def __init__(self, keep_usage_event: bool = True, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._keep = keep_usage_event
        self._max = max_event_bytes
        self._usage: Usage | None = None
        self._event = bytearray()  # the complete lines of the event in progress
        self._line = bytearray()  # the line in progress (in an oversized event: its first 2 bytes)
        self._oversized = False  # the event in progress passes through unexamined

    @property
    def usage(self) -> Usage | None:
        """The usage found so far (None until a usage event has arrived, or if none was usable)."""
        return self._usage

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk from the host; return the bytes to pass on now."""
        out = bytearray()
        start = 0
        while True:
            end = chunk.find(b"\n", start) + 1
            if not end:
                break
            self._line_ends(chunk[start:end], out)
            start = end
        if start < len(chunk):
            self._line_goes_on(chunk[start:], out)
        return chunk if self._keep else bytes(out)

    def end(self) -> bytes:
        """The host is done: return whatever is still held. An unterminated last event is examined
        (and dropped when it is the usage event to drop) as if it had ended."""
        out = bytearray()
        if not self._oversized:
            event = bytes(self._event + self._line)
            if event:
                self._event_ends(event, out)
        self._event.clear()
        self._line.clear()
        self._oversized = False
        return b"" if self._keep else bytes(out)

    # --- scanning ---------------------------------------------------------------------------------

    def _line_goes_on(self, piece: bytes, out: bytearray) -> None:
        """``piece`` (no newline in it) continues the line in progress."""
        if self._oversized:
            out += piece
            if len(self._line) < 2:  # enough to tell a blank line ("\r\n") from any other
                self._line += piece[: 2 - len(self._line)]
            return
        self._line += piece
        if len(self._event) + len(self._line) > self._max:
            self._give_up(out)

    def _line_ends(self, piece: bytes, out: bytearray) -> None:
        """``piece`` (ending with its newline, and the only one) completes the line in progress."""
        if self._oversized:
            out += piece
            if len(self._line) + len(piece) <= 2 and bytes(self._line) + piece in _BLANK:
                self._oversized = False  # that event is over
            self._line.clear()
            return
        if self._line:
            self._line += piece
            line = bytes(self._line)
            self._line.clear()
        else:
            line = piece
        if line not in _BLANK:
            self._event += line
            if len(self._event) > self._max:
                self._give_up(out)
        elif self._event:
            event = bytes(self._event) + line
            self._event.clear()
            self._event_ends(event, out)
        else:
            out += line  # a blank line with no event before it

    def _give_up(self, out: bytearray) -> None:
        """The event in progress is too big to hold: release it and let the rest of it through."""
        out += self._event
        out += self._line
        self._event.clear()
        del self._line[2:]
        self._oversized = True

    def _event_ends(self, event: bytes, out: bytearray) -> None:
        """A whole event: note its usage, and pass it on unless it is the usage event to drop."""
        data = _event_data(event)
        # Only JSON that spells "usage" (literally or with \\u escapes) is worth parsing.
        if data is not None and (b"usage" in data or b"\\u" in data):
            payload = _parse(data)
            if isinstance(payload, dict):
                usage = usage_from(payload.get("usage"))
                if usage is not None:
                    self._usage = usage
                if payload.get("choices") == [] and isinstance(payload.get("usage"), dict):
                    return  # the usage-only event: not passed on (when keep, the output is the input)
        out += event
