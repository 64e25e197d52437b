"""The request policy: what happens to every field of a paid request body, per route.

Each field of ``POST /v1/chat/completions`` and ``POST /v1/completions`` has exactly one rule:

- ``forward``:   checked (type and range) and forwarded as is;
- ``normalise``: checked and forwarded in a canonical form (the priced ``max_tokens``, say);
- ``input``:     text the model host reads: counted into the input bound, then forwarded;
- ``multiply``:  multiplies the priced output (``n``, ``best_of``), then forwarded;
- ``strip``:     accepted and never forwarded (it asks nothing of the model, or identifies the buyer);
- ``refuse``:    a 400 with a stable code, before any 402.

A field that is not in the table is refused (``unknown_field``), so nothing reaches the host that the
price did not see. The forwarded body is built from these rules, never copied from the request.

Input is counted as an **upper bound** of what a byte-level BPE tokenizer (Llama 3's, which Hermes 3
uses) can produce: every token of such a tokenizer covers at least one byte of the UTF-8 text, so a
text of ``b`` bytes is at most ``b`` tokens, whatever it holds (digits, CJK, emoji, whitespace runs).
A SentencePiece tokenizer with byte fallback adds at most one token (its dummy prefix) per text,
which the per-message overhead covers. The chat template's own tokens are added per message
(``message_overhead``), once for the assistant's turn, and once when tool definitions are present
(``tools_overhead``, the template's tool instructions). Structured values the template renders as
JSON (tools, schemas, tool calls) are counted as their JSON text, as templates print it.

This module is pure: no I/O, no Flask. Its entry point is :func:`read`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from app.catalog.chat import (
    _function_call_choice,
    _functions,
    _messages,
    _response_format,
    _tool_choice,
    _tools,
)
from app.catalog.reading import (
    MAX_LOGIT_BIAS,
    MAX_STOP_SEQUENCES,
    TOKEN_ID_KEY,
    Limits,
    PolicyError,
    Work,
    _bool,
    _int,
    _invalid,
    _list,
    _number,
    _object,
    _Reading,
    utf8_len,
)


class Rule(Enum):
    FORWARD = "forward"
    NORMALISE = "normalise"
    INPUT = "input"
    MULTIPLY = "multiply"
    STRIP = "strip"
    REFUSE = "refuse"


# --- generation parameters ---------------------------------------------------------------------


def _stop(reading: _Reading, value: Any, path: str) -> str | list[str]:
    if isinstance(value, str):
        return reading.text(value, path)
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_STOP_SEQUENCES:
        raise _invalid(path, f"a string or a list of 1 to {MAX_STOP_SEQUENCES} strings")
    return [reading.text(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _logit_bias(reading: _Reading, value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise _invalid(path, f"an object of at most {MAX_LOGIT_BIAS} token ids")
    vocab_size = reading.limits.vocab_size
    for key, bias in value.items():
        if not TOKEN_ID_KEY.fullmatch(key) or int(key) >= vocab_size:
            raise _invalid(f"{path} keys", f"token ids below {vocab_size}")
        _number(bias, f"{path}.{key}", -100, 100)
    return value


def _stream_options(value: Any, path: str) -> dict[str, bool]:
    _object(value, path, frozenset({"include_usage"}))
    return {"include_usage": _bool(value["include_usage"], f"{path}.include_usage")} if value else {}


def _plain(check: Callable[[Any, str], Any]) -> Callable[[_Reading, Any, str], Any]:
    """A check that counts nothing, as a field handler."""
    return lambda _reading, value, path: check(value, path)


def _bounded(low: float, high: float, above: bool = False) -> Callable[[_Reading, Any, str], Any]:
    return _plain(lambda value, path: _number(value, path, low, high, above))


def _top_k(value: Any, path: str) -> int:
    if _int(value, path, -1, 1000) == 0:
        raise _invalid(path, "-1 (off) or 1 to 1000")
    return value


def _int_bounded(low: int, high: int) -> Callable[[_Reading, Any, str], Any]:
    return _plain(lambda value, path: _int(value, path, low, high))


Handler = Callable[[_Reading, Any, str], Any]


@dataclass(frozen=True)
class Field:
    rule: Rule
    why: str
    handler: Handler | None = None  # forward/normalise/input: the forwarded value; None otherwise


# Fields whose value the route reads itself before the table (the model, the output size, the answer
# count); the table still names them so the policy is complete.
SAMPLING: dict[str, Field] = {
    "temperature": Field(Rule.FORWARD, "sampling; 0 to 2", _bounded(0, 2)),
    "top_p": Field(Rule.FORWARD, "sampling; above 0, at most 1", _bounded(0, 1, above=True)),
    "top_k": Field(Rule.FORWARD, "sampling (open-model hosts); -1 (off) or 1 to 1000", _plain(_top_k)),
    "min_p": Field(Rule.FORWARD, "sampling (open-model hosts); 0 to 1", _bounded(0, 1)),
    "repetition_penalty": Field(
        Rule.FORWARD, "sampling (open-model hosts); above 0, at most 2", _bounded(0, 2, above=True)
    ),
    "presence_penalty": Field(Rule.FORWARD, "sampling; -2 to 2", _bounded(-2, 2)),
    "frequency_penalty": Field(Rule.FORWARD, "sampling; -2 to 2", _bounded(-2, 2)),
    "seed": Field(Rule.FORWARD, "sampling; a signed 64-bit integer", _int_bounded(-(2**63), 2**63 - 1)),
    "logit_bias": Field(Rule.FORWARD, f"sampling; at most {MAX_LOGIT_BIAS} token ids", _logit_bias),
    "stop": Field(Rule.INPUT, "the host matches it against the output: counted as input", _stop),
    "stream": Field(Rule.FORWARD, "a JSON boolean", _plain(_bool)),
    "stream_options": Field(Rule.NORMALISE, "only include_usage, a boolean", _plain(_stream_options)),
    "user": Field(Rule.STRIP, "identifies the buyer to the host: never forwarded"),
    "metadata": Field(Rule.STRIP, "for stored completions, which this proxy never asks for"),
}
COMMON: dict[str, Field] = {
    "model": Field(Rule.FORWARD, "the catalog entry that prices the call"),
    "max_tokens": Field(Rule.NORMALISE, "the priced output limit of one answer; default and cap per model"),
    "n": Field(Rule.MULTIPLY, "answers to generate; each is priced; capped by max_choices"),
    **SAMPLING,
    "store": Field(Rule.STRIP, "false is accepted and dropped; true is refused: nothing is stored"),
    "service_tier": Field(Rule.STRIP, "auto and default are dropped; other tiers are refused"),
}
CHAT_FIELDS: dict[str, Field] = {
    "messages": Field(Rule.INPUT, "every text, name and tool call, plus the template's tokens", _messages),
    "max_completion_tokens": Field(Rule.NORMALISE, "as max_tokens (the larger of the two is priced)"),
    **COMMON,
    "tools": Field(Rule.INPUT, "rendered into the prompt as JSON, plus tools_overhead", _tools),
    "tool_choice": Field(Rule.INPUT, "rendered into the prompt", _tool_choice),
    "parallel_tool_calls": Field(Rule.FORWARD, "a JSON boolean", _plain(_bool)),
    "functions": Field(Rule.INPUT, "the older tools: rendered as JSON, plus tools_overhead", _functions),
    "function_call": Field(Rule.INPUT, "the older tool_choice", _function_call_choice),
    "response_format": Field(Rule.INPUT, "a json_schema is read by the host: counted", _response_format),
    "logprobs": Field(Rule.FORWARD, "a JSON boolean", _plain(_bool)),
    "top_logprobs": Field(Rule.FORWARD, "0 to 20, with logprobs: true", _int_bounded(0, 20)),
    "prediction": Field(Rule.REFUSE, "predicted outputs cost work the price does not see"),
    "audio": Field(Rule.REFUSE, "no audio output is sold"),
    "modalities": Field(Rule.REFUSE, "no output other than text is sold"),
    "reasoning_effort": Field(Rule.REFUSE, "not a switch of the models sold here"),
    "web_search_options": Field(Rule.REFUSE, "the model host has no web access to sell"),
}
COMPLETIONS_FIELDS: dict[str, Field] = {
    "prompt": Field(Rule.INPUT, "text counted by bytes, token ids one each; a list multiplies the output"),
    "best_of": Field(Rule.MULTIPLY, "answers generated per prompt (at least n); each is priced"),
    **COMMON,
    "suffix": Field(Rule.REFUSE, "fill-in-the-middle: the models sold here do not take it"),
    "echo": Field(Rule.FORWARD, "a JSON boolean; the echoed prompt was priced as input", _plain(_bool)),
    "logprobs": Field(Rule.FORWARD, "0 to 5", _int_bounded(0, 5)),
}
ROUTE_FIELDS: dict[str, dict[str, Field]] = {"chat": CHAT_FIELDS, "completions": COMPLETIONS_FIELDS}
ROUTE_INPUT_FIELDS = {"chat": "messages", "completions": "prompt"}


# --- reading a body ------------------------------------------------------------------------------


def _max_tokens(body: Mapping[str, Any], limits: Limits, route: str) -> int:
    names = ("max_tokens", "max_completion_tokens") if route == "chat" else ("max_tokens",)
    requested = [body[k] for k in names if body.get(k) is not None]
    for value in requested:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PolicyError("invalid_max_tokens", "max_tokens must be a positive integer")
    limit = max(requested) if requested else limits.default_max_tokens
    if limit > limits.max_tokens_cap:
        raise PolicyError(
            "max_tokens_too_large", f"max_tokens is capped at {limits.max_tokens_cap} for this model"
        )
    return limit


def _provider_switches(body: Mapping[str, Any]) -> None:
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise _invalid("store", "true or false (a JSON boolean)")
    if store is True:
        raise PolicyError("unsupported_field", "store: this proxy never asks a host to keep a completion")
    tier = body.get("service_tier")
    if tier is not None and tier not in ("auto", "default"):
        raise PolicyError("unsupported_field", "service_tier: only auto and default are sold")


def _prompts(reading: _Reading, value: Any) -> tuple[list[int], Any]:
    """The completions ``prompt``: (input tokens of each prompt, the value to forward).

    A string, a list of strings, a list of token ids, or a list of lists of token ids; text counts
    one token per byte, a token id one token.
    """
    if isinstance(value, str):
        return [utf8_len(value)], value
    items = _list(value, "prompt")
    last_id = reading.limits.vocab_size - 1
    if all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        for i, token in enumerate(items):
            _int(token, f"prompt[{i}]", 0, last_id)
        return [len(items)], items
    counts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            counts.append(utf8_len(item))
        elif isinstance(item, list) and item:
            for j, token in enumerate(item):
                _int(token, f"prompt[{i}][{j}]", 0, last_id)
            counts.append(len(item))
        else:
            raise _invalid(f"prompt[{i}]", "a string or a non-empty list of token ids")
    return counts, items


def read(route: str, body: Mapping[str, Any], limits: Limits) -> Work:
    """Check every field of a request body for ``route`` ("chat" or "completions") and measure it.

    Returns the :class:`Work` it asks for, with the body to forward. Raises :class:`PolicyError`
    (400, a code of ``POLICY_CODES``) when the body breaks the policy.
    """
    fields = ROUTE_FIELDS[route]
    unknown = sorted(key for key in body if key not in fields)
    if unknown:
        raise PolicyError("unknown_field", f"{unknown[0]} is not a field this proxy accepts on this route")
    for key, field in fields.items():  # the table's order, not the body's: one body, one answer
        if key in body and field.rule is Rule.REFUSE:
            raise PolicyError("unsupported_field", f"{key}: {field.why}")
    input_field = ROUTE_INPUT_FIELDS[route]
    if input_field not in body:
        raise PolicyError("invalid_request", f"{input_field} is required")
    _provider_switches(body)
    max_tokens = _max_tokens(body, limits, route)
    n = _choices(body.get("n", 1), "n", 1, limits)
    reading = _Reading(limits)
    reading.body["model"] = body["model"]
    for key, field in fields.items():
        if key in body and field.handler is not None and key != "model":
            reading.body[key] = field.handler(reading, body[key], key)
    if body.get("stream") is not True and "stream_options" in body:
        raise PolicyError("invalid_field", "stream_options go with stream: true only")
    if route == "chat" and "top_logprobs" in body and body.get("logprobs") is not True:
        raise PolicyError("invalid_field", "top_logprobs goes with logprobs: true only")
    reading.body["max_tokens"] = max_tokens
    if "max_completion_tokens" in body:
        reading.body["max_completion_tokens"] = max_tokens
    if "n" in body:
        reading.body["n"] = n
    if route == "chat":
        return _chat_work(reading, max_tokens, n)
    return _completions_work(reading, body, max_tokens, n)


def _choices(value: Any, path: str, low: int, limits: Limits) -> int:
    """``n`` or ``best_of``: an integer from ``low``; above the model's ``max_choices`` is refused."""
    if isinstance(value, int) and not isinstance(value, bool) and value > limits.max_choices:
        raise PolicyError(
            "too_many_choices", f"{path}: this model generates at most {limits.max_choices} per call"
        )
    return _int(value, path, low, limits.max_choices)


def _check_context(input_tokens: int, max_tokens: int, limits: Limits) -> None:
    if input_tokens + max_tokens > limits.context_length:
        raise PolicyError(
            "context_length_exceeded",
            f"the input may take up to {input_tokens} tokens and the answer {max_tokens}; "
            f"this model's context holds {limits.context_length}",
        )


def _chat_work(reading: _Reading, max_tokens: int, n: int) -> Work:
    _check_context(reading.input_tokens, max_tokens, reading.limits)
    return Work(reading.input_tokens, max_tokens, n, reading.body)


def _completions_work(reading: _Reading, body: Mapping[str, Any], max_tokens: int, n: int) -> Work:
    limits = reading.limits
    counts, reading.body["prompt"] = _prompts(reading, body["prompt"])
    best_of = _choices(body.get("best_of", n), "best_of", n, limits)
    if "best_of" in body:
        reading.body["best_of"] = best_of
    choices = len(counts) * best_of
    if choices > limits.max_choices:
        raise PolicyError(
            "too_many_choices",
            f"{len(counts)} prompts × {best_of} answers = {choices}; this model generates at most "
            f"{limits.max_choices} per call",
        )
    per_prompt = [count + reading.input_bytes + limits.message_overhead for count in counts]
    for tokens in per_prompt:
        _check_context(tokens, max_tokens, limits)
    return Work(sum(per_prompt), max_tokens, choices, reading.body)
