"""What an ``upto`` call costs: the host's reported usage, priced, floored, capped at the maximum; and
the usage read out of a stream as it passes through, the usage event dropped when the buyer did not
ask for it."""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.catalog import Model
from app.catalog.usage import MAX_DEPTH, StreamUsage, Usage, charge, usage_from, usage_of_answer

TOKENS = Model(
    name="tok",
    description="",
    tee=True,
    pricing="per_token",
    input_per_million=200_000,
    output_per_million=600_000,
    floor=1000,
)
FLAT = Model(name="flat", description="", tee=True, pricing="per_call", price=5000, floor=1)
BIG = 2**63

MALFORMED: list[Any] = [
    None,
    [],
    "usage",
    3,
    {},
    {"prompt_tokens": 1},
    {"completion_tokens": 1},
    {"prompt_tokens": -1, "completion_tokens": 1},
    {"prompt_tokens": 1, "completion_tokens": -1},
    {"prompt_tokens": 1.0, "completion_tokens": 1},
    {"prompt_tokens": 1, "completion_tokens": 2.5},
    {"prompt_tokens": "1", "completion_tokens": 1},
    {"prompt_tokens": True, "completion_tokens": 1},
    {"prompt_tokens": 1, "completion_tokens": False},
    {"prompt_tokens": None, "completion_tokens": 1},
    {"prompt_tokens": BIG, "completion_tokens": 1},
    {"prompt_tokens": 1, "completion_tokens": BIG},
    {"prompt_tokens": "many", "completion_tokens": -1},
]


# --- usage objects ------------------------------------------------------------------------------------


def test_usage_from_a_well_formed_object() -> None:
    value = {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46, "extra": {"x": 1}}
    assert usage_from(value) == Usage(prompt_tokens=12, completion_tokens=34)
    assert usage_from({"prompt_tokens": 0, "completion_tokens": 0}) == Usage(0, 0)
    assert usage_from({"prompt_tokens": BIG - 1, "completion_tokens": BIG - 1}) == Usage(BIG - 1, BIG - 1)


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_usage_is_unknown(value: Any) -> None:
    assert usage_from(value) is None


def test_usage_of_a_json_answer() -> None:
    answer = {
        "object": "chat.completion",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7},
    }
    assert usage_of_answer(json.dumps(answer).encode()) == Usage(5, 7)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b'"usage"',
        b"null",
        b'{"choices": []}',
        b'{"usage": {"prompt_tokens": "many", "completion_tokens": -1}}',
        b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}',  # cut short
        b"[" * 100_000,  # too deep for the parser
        b'{"usage": {"prompt_tokens": 1' + b"0" * 5000 + b', "completion_tokens": 2}}',  # int too long
    ],
)
def test_usage_of_a_bad_answer_is_unknown(content: bytes) -> None:
    assert usage_of_answer(content) is None


def test_json_nested_too_deep_is_not_parsed() -> None:
    # eth-account (py_ecc) raises the recursion limit to 100000: the C parser would then overflow
    # the C stack on deep nesting and kill the process instead of raising.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(100_000, limit))
    try:
        for opener in (b"[", b'{"a":'):
            assert usage_of_answer(opener * 200_000) is None
            watcher = StreamUsage(keep_usage_event=False)
            deep = b'data: {"usage": ' + opener * 200_000 + b"\n\n"
            assert run(watcher, [deep]) == deep
            assert watcher.usage is None
    finally:
        sys.setrecursionlimit(limit)


def nested(depth: int) -> Any:
    """A list nested ``depth`` levels deep."""
    return json.loads("[" * depth + "]" * depth)


def test_json_nested_up_to_the_limit_is_parsed() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2}
    # The answer object is one level, its "deep" list the others.
    assert usage_of_answer(json.dumps({"usage": usage, "deep": nested(MAX_DEPTH - 1)}).encode()) == Usage(
        1, 2
    )
    assert usage_of_answer(json.dumps({"usage": usage, "deep": nested(MAX_DEPTH)}).encode()) is None
    # Brackets inside strings are text, not structure: an answer full of them is parsed.
    code = {"usage": usage, "choices": [{"message": {"content": "[{" * 10_000 + '"\\'}}]}
    assert usage_of_answer(json.dumps(code).encode()) == Usage(1, 2)
    many = {"usage": usage, "logprobs": [{"top": [{"t": i}]} for i in range(5_000)]}  # wide, not deep
    assert usage_of_answer(json.dumps(many).encode()) == Usage(1, 2)


@given(st.binary(max_size=200))
def test_usage_of_answer_never_raises(content: bytes) -> None:
    result = usage_of_answer(content)
    assert result is None or isinstance(result, Usage)


# --- the charge -----------------------------------------------------------------------------------


def test_per_token_charge_is_the_reported_usage_priced() -> None:
    # 10_000 × 0.2 + 5_000 × 0.6 = 2_000 + 3_000
    assert charge(TOKENS, Usage(10_000, 5_000), 1_000_000) == 5_000


def test_per_token_charge_rounds_up_exactly() -> None:
    model = Model(
        name="odd", description="", tee=True, pricing="per_token", input_per_million=1, output_per_million=3
    )
    assert charge(model, Usage(1_000_000, 0), 100) == 1  # exactly one unit: no rounding
    assert charge(model, Usage(1_000_001, 0), 100) == 2  # one token over: the next unit
    assert charge(model, Usage(0, 333_334), 100) == 2  # 1_000_002 / 10⁶
    assert charge(model, Usage(2_000_000, 1_000_000), 100) == 5
    assert charge(model, Usage(2_000_000, 1_000_001), 100) == 6


def test_per_token_charge_is_never_below_the_floor() -> None:
    assert charge(TOKENS, Usage(0, 0), 50_000) == 1000
    assert charge(TOKENS, Usage(1, 1), 50_000) == 1000
    assert charge(TOKENS, Usage(5_000, 0), 50_000) == 1000  # 1_000 exactly: the floor itself
    assert charge(TOKENS, Usage(5_001, 0), 50_000) == 1001


def test_per_token_charge_is_capped_at_the_maximum() -> None:
    assert charge(TOKENS, Usage(10**9, 10**9), 50_000) == 50_000
    assert charge(TOKENS, Usage(BIG - 1, BIG - 1), 50_000) == 50_000
    assert charge(TOKENS, Usage(10_000, 5_000), 5_000) == 5_000  # exactly the maximum
    assert charge(TOKENS, Usage(10_000, 5_001), 5_000) == 5_000
    assert charge(TOKENS, Usage(0, 0), 500) == 500  # a maximum below the floor still caps


def test_per_call_charges_the_maximum() -> None:
    assert charge(FLAT, Usage(0, 0), 5000) == 5000
    assert charge(FLAT, Usage(10**6, 10**6), 5000) == 5000
    assert charge(FLAT, None, 5000) == 5000


@pytest.mark.parametrize("value", MALFORMED)
def test_unknown_usage_charges_the_maximum(value: Any) -> None:
    assert charge(TOKENS, usage_from(value), 7_777) == 7_777
    content = json.dumps({"usage": value}).encode()
    assert charge(TOKENS, usage_of_answer(content), 7_777) == 7_777


def test_charge_is_an_int() -> None:
    assert type(charge(TOKENS, Usage(3, 3), 10**6)) is int


models = st.builds(
    Model,
    name=st.just("m"),
    description=st.just(""),
    tee=st.just(True),
    pricing=st.sampled_from(["per_token", "per_call"]),
    price=st.integers(0, 10**9),
    input_per_million=st.integers(0, 10**9),
    output_per_million=st.integers(0, 10**9),
    floor=st.integers(1, 10**7),
)
usages = st.none() | st.builds(Usage, st.integers(0, BIG - 1), st.integers(0, BIG - 1))


@given(model=models, usage=usages, maximum=st.integers(0, 10**12))
def test_charge_is_within_the_floor_and_the_maximum(model: Model, usage: Usage | None, maximum: int) -> None:
    amount = charge(model, usage, maximum)
    assert type(amount) is int
    assert amount <= maximum
    assert amount >= min(model.floor, maximum)


@given(model=models, usage=st.builds(Usage, st.integers(0, 10**7), st.integers(0, 10**7)))
def test_uncapped_charge_is_the_smallest_amount_covering_the_usage(model: Model, usage: Usage) -> None:
    maximum = 10**30
    amount = charge(model, usage, maximum)
    if model.pricing == "per_call":
        assert amount == maximum
        return
    cost = usage.prompt_tokens * model.input_per_million + usage.completion_tokens * model.output_per_million
    if amount > model.floor:
        assert (amount - 1) * 10**6 < cost <= amount * 10**6
    else:
        assert amount == model.floor
        assert cost <= model.floor * 10**6


# --- streams ------------------------------------------------------------------------------------------


def event(payload: dict[str, Any], newline: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(payload).encode() + newline + newline


def content_event(i: int, newline: bytes = b"\n") -> bytes:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": f"t{i}"}}],
    }
    return event(chunk, newline)


def usage_event(prompt: int = 11, completion: int = 22, newline: bytes = b"\n") -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return event({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}, newline)


def run(watcher: StreamUsage, chunks: list[bytes]) -> bytes:
    return b"".join(watcher.feed(chunk) for chunk in chunks) + watcher.end()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def test_stream_usage_is_found_and_the_event_kept() -> None:
    stream = content_event(0) + content_event(1) + usage_event(3, 4) + b"data: [DONE]\n\n"
    watcher = StreamUsage(keep_usage_event=True)
    assert watcher.usage is None
    assert run(watcher, [stream]) == stream
    assert watcher.usage == Usage(3, 4)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_stream_usage_event_is_dropped_when_not_asked_for(newline: bytes) -> None:
    head = content_event(0, newline) + content_event(1, newline)
    tail = b"data: [DONE]" + newline + newline
    stream = head + usage_event(3, 4, newline) + tail
    for chunks in ([stream], bytewise(stream)):
        watcher = StreamUsage(keep_usage_event=False)
        assert run(watcher, chunks) == head + tail
        assert watcher.usage == Usage(3, 4)


def test_content_passes_on_as_soon_as_its_event_is_complete() -> None:
    watcher = StreamUsage(keep_usage_event=False)
    first = content_event(0)
    assert watcher.feed(first[:10]) == b""  # held: the event is not complete yet
    assert watcher.feed(first[10:] + b"data: {") == first
    assert watcher.end() == b"data: {"  # an unfinished event is handed back at the end


def test_keep_never_holds_anything_back() -> None:
    watcher = StreamUsage(keep_usage_event=True)
    stream = content_event(0) + usage_event() + b"data: [DONE]\n\n"
    for piece in split(stream, [3, 50, 51, 120]):
        assert watcher.feed(piece) == piece
    assert watcher.end() == b""
    assert watcher.usage == Usage(11, 22)


def test_the_last_acceptable_usage_wins() -> None:
    malformed = event({"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": -1}})
    stream = usage_event(1, 2) + content_event(0) + usage_event(5, 6) + malformed + b"data: [DONE]\n\n"
    watcher = StreamUsage(keep_usage_event=True)
    run(watcher, [stream])
    assert watcher.usage == Usage(5, 6)


def test_usage_on_content_events_counts_but_they_are_kept() -> None:
    # Some hosts put usage on every chunk (and OpenAI puts "usage": null on content chunks).
    with_usage = event(
        {
            "choices": [{"index": 0, "delta": {"content": "x"}}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1},
        }
    )
    null_usage = event({"choices": [{"index": 0, "delta": {"content": "y"}}], "usage": None})
    no_choices = event({"choices": [], "prompt_filter_results": []})  # no usage: not the usage event
    stream = with_usage + null_usage + no_choices + b"data: [DONE]\n\n"
    watcher = StreamUsage(keep_usage_event=False)
    assert run(watcher, [stream]) == stream
    assert watcher.usage == Usage(2, 1)


def test_a_malformed_usage_event_is_dropped_but_gives_no_usage() -> None:
    malformed = event({"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": -1}})
    stream = content_event(0) + malformed + b"data: [DONE]\n\n"
    watcher = StreamUsage(keep_usage_event=False)
    assert run(watcher, [stream]) == content_event(0) + b"data: [DONE]\n\n"
    assert watcher.usage is None


def test_sse_details() -> None:
    usage = {"prompt_tokens": 8, "completion_tokens": 9}
    body = json.dumps({"choices": [], "usage": usage}, indent=1).encode()
    multiline = b"".join(b"data:" + line + b"\n" for line in body.split(b"\n")) + b"\n"  # no space
    commented = b": keep-alive\n\n"
    extra_blank = b"\n\r\n"
    with_id = b"id: 7\r\nevent: message\r\n" + usage_event(1, 1, b"\r\n")
    stream = commented + extra_blank + content_event(0) + multiline + with_id + b"data: [DONE]\n\n"
    watcher = StreamUsage(keep_usage_event=False)
    assert run(watcher, bytewise(stream)) == commented + extra_blank + content_event(0) + b"data: [DONE]\n\n"
    assert watcher.usage == Usage(1, 1)
    watcher = StreamUsage(keep_usage_event=True)
    run(watcher, [commented + multiline])
    assert watcher.usage == Usage(8, 9)


def test_an_escaped_usage_key_is_still_read() -> None:
    raw = b'data: {"choices": [], "\\u0075sage": {"prompt_tokens": 4, "completion_tokens": 4}}\n\n'
    watcher = StreamUsage(keep_usage_event=False)
    assert run(watcher, [raw]) == b""
    assert watcher.usage == Usage(4, 4)


def test_an_unterminated_last_event_is_examined_at_the_end() -> None:
    stream = (
        content_event(0) + b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
    )
    watcher = StreamUsage(keep_usage_event=False)
    assert run(watcher, [stream]) == content_event(0)
    assert watcher.usage == Usage(3, 2)
    cut = content_event(0) + b'data: {"choices": [], "usage": {"prompt_tok'
    watcher = StreamUsage(keep_usage_event=False)
    assert run(watcher, [cut]) == cut
    assert watcher.usage is None


def test_an_oversized_event_passes_through_unexamined() -> None:
    big = event({"choices": [{"index": 0, "delta": {"content": "x" * 500}}]})
    done = b"data: [DONE]\r\n\r\n"
    stream = big + content_event(0) + big + done
    for chunks in ([stream], bytewise(stream), split(stream, [30, 300, 520, 700])):
        watcher = StreamUsage(keep_usage_event=False, max_event_bytes=200)
        fed = 0
        out = bytearray()
        for chunk in chunks:
            out += watcher.feed(chunk)
            fed += len(chunk)
            assert fed - len(out) <= 200  # never holds more than the limit
        assert bytes(out) + watcher.end() == stream
    # The small events around big ones are still examined; a big one is not.
    watcher = StreamUsage(keep_usage_event=False, max_event_bytes=200)
    assert run(watcher, bytewise(big + usage_event(1, 2) + big + done)) == big + big + done
    assert watcher.usage == Usage(1, 2)
    # Inside a big event, a line that starts with CR is not a blank line, however it is chunked.
    odd = b"data: " + b"x" * 300 + b"\n\rjunk\r\n" + usage_event(1, 2)
    watcher = StreamUsage(keep_usage_event=False, max_event_bytes=200)
    assert run(watcher, bytewise(odd)) == odd
    assert watcher.usage is None
    huge_usage = event(
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}, "pad": "x" * 300}
    )
    watcher = StreamUsage(keep_usage_event=False, max_event_bytes=200)
    assert run(watcher, [huge_usage]) == huge_usage
    assert watcher.usage is None


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xfe\xfd\n\n\x00\x00\r\n\r\n",
        b"data: \xff\xfe usage \\u\n\n",
        b"data: " + b"[" * 100_000 + b" usage\n\n",
        b'data: {"usage": {"prompt_tokens": 1'
        + b"0" * 5000
        + b', "completion_tokens": 1}, "choices": []}\n\n',
        b"\r\r\r\n\r\n\n\n\n\r",
        b"no newline at all " * 100,
    ],
)
@pytest.mark.parametrize("keep", [True, False])
def test_garbage_passes_through(garbage: bytes, keep: bool) -> None:
    for chunks in ([garbage], bytewise(garbage[:2000])):
        watcher = StreamUsage(keep_usage_event=keep)
        assert run(watcher, chunks) == b"".join(chunks)
        assert watcher.usage is None


# --- stream properties ------------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, bytes, Usage]:
    """A realistic stream (N content events, one usage event, [DONE]), split into random chunks;
    returns (stream, stream without the usage event, the usage)."""
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    count = draw(st.integers(0, 8))
    events: list[bytes] = []
    for i in range(count):
        delta: dict[str, Any] = {"content": draw(texts)}
        if i == 0:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "finish_reason": "stop" if i == count - 1 else None}
        chunk: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}
        if draw(st.booleans()):
            chunk["usage"] = None
        events.append(event(chunk, newline))
    usage = Usage(draw(st.integers(0, BIG - 1)), draw(st.integers(0, BIG - 1)))
    total = usage.prompt_tokens + usage.completion_tokens
    values = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {**values, "total_tokens": total},
    }
    head = b"".join(events)
    tail = b"data: [DONE]" + newline + newline
    return head + event(payload, newline) + tail, head + tail, usage


@settings(max_examples=300)
@given(case=streams(), cuts=st.lists(st.integers(0, 4000), max_size=30))
def test_keep_outputs_the_input_for_any_chunking(case: tuple[bytes, bytes, Usage], cuts: list[int]) -> None:
    stream, _, usage = case
    chunks = split(stream, cuts)
    watcher = StreamUsage(keep_usage_event=True)
    outputs = [watcher.feed(chunk) for chunk in chunks]
    assert outputs == chunks  # each chunk passes on as it comes
    assert watcher.end() == b""
    assert watcher.usage == usage


@settings(max_examples=300)
@given(case=streams(), cuts=st.lists(st.integers(0, 4000), max_size=30))
def test_drop_outputs_the_input_less_the_usage_event_for_any_chunking(
    case: tuple[bytes, bytes, Usage], cuts: list[int]
) -> None:
    stream, expected, usage = case
    watcher = StreamUsage(keep_usage_event=False)
    assert run(watcher, split(stream, cuts)) == expected
    assert watcher.usage == usage


@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=10), keep=st.booleans())
def test_garbage_never_raises(data: bytes, cuts: list[int], keep: bool) -> None:
    chunks = split(data, cuts)
    watcher = StreamUsage(keep_usage_event=keep, max_event_bytes=64)
    out = run(watcher, chunks)
    if keep:
        assert out == data
    else:
        assert len(out) <= len(data)


@given(
    parts=st.lists(
        st.sampled_from(
            [
                b"data: ",
                b"data:",
                b"\n",
                b"\r\n",
                b"\r",
                b"{",
                b"}",
                b'"usage"',
                b'"choices": []',
                b": ",
                b"\xff",
                b"[DONE]",
                b"x",
            ]
        ),
        max_size=40,
    ),
    cuts=st.lists(st.integers(0, 200), max_size=10),
)
def test_chunking_never_changes_the_result(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    whole = StreamUsage(keep_usage_event=False)
    expected = run(whole, [data])
    pieces = StreamUsage(keep_usage_event=False)
    assert run(pieces, split(data, cuts)) == expected
    assert pieces.usage == whole.usage
