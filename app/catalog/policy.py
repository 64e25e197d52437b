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

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

TEXT, IMAGE = "text", "image"
MODALITIES = frozenset({TEXT, IMAGE})
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for tool and function names (fullmatch)
TOKEN_ID_KEY = re.compile(r"0|[1-9][0-9]{0,9}")  # a token id as a logit_bias key (fullmatch)
PART_OVERHEAD = 2  # tokens: hosts join content parts with a newline


# Every code ``read`` may refuse a body with (all HTTP 400).
POLICY_CODES = frozenset(
    {
        "unknown_field",
        "unsupported_field",
        "invalid_field",
        "invalid_max_tokens",
        "max_tokens_too_large",
        "too_many_choices",
        "modality_not_supported",
        "context_length_exceeded",
        "invalid_request",
    }
)


class Rule(Enum):
    FORWARD = "forward"
    NORMALISE = "normalise"
    INPUT = "input"
    MULTIPLY = "multiply"
    STRIP = "strip"
    REFUSE = "refuse"


class PolicyError(ValueError):
    """The body breaks the policy: ``code`` is a stable reason, ``status`` the HTTP status (400)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one catalog model accepts; token counts are in the model's tokens.

    ``max_choices`` caps the answers one call may generate: ``n`` (chat), or prompts × ``best_of``
    (completions, ``best_of`` defaulting to ``n``).
    """

    context_length: int = 131072
    default_max_tokens: int = 512
    max_tokens_cap: int = 4096
    max_choices: int = 8
    modalities: frozenset[str] = frozenset({TEXT})
    message_overhead: int = 8
    tools_overhead: int = 512
    image_tokens: int = 0
    vocab_size: int = 128256  # token ids are below this (Llama 3's vocabulary)
    tools_factor: int = 3  # times a tool definition's JSON text is printed by the chat template
    schema_key_overhead: int = 32  # template bytes per key of a tool's parameters schema


@dataclass(frozen=True)
class Work:
    """What a body asks of the model host.

    ``input_tokens``: upper bound of the tokens the host reads, summed over every prompt (tokens);
    ``max_tokens``: the output limit of one answer (tokens), forwarded as the body's ``max_tokens``;
    ``choices``: how many answers the host generates; ``body``: exactly what is forwarded.
    """

    input_tokens: int
    max_tokens: int
    choices: int
    body: dict[str, Any]

    @property
    def output_tokens(self) -> int:
        """The most output tokens the call can cost: every answer at its limit."""
        return self.max_tokens * self.choices


# --- value checks: each returns the value to forward, or raises PolicyError ------------------------


def _invalid(path: str, what: str) -> PolicyError:
    return PolicyError("invalid_field", f"{path} must be {what}")


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(path, "true or false (a JSON boolean)")
    return value


def _int(value: Any, path: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _invalid(path, f"an integer from {low} to {high}")
    return value


def _number(value: Any, path: str, low: float, high: float, above: bool = False) -> float | int:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``above``)."""
    what = f"a number {'above' if above else 'from'} {low} {'and at most' if above else 'to'} {high}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(path, what)
    if not (math.isfinite(value) and low <= value <= high) or (above and value == low):
        raise _invalid(path, what)
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _invalid(path, "a string")
    return value


def _object(value: Any, path: str, allowed: frozenset[str], required: frozenset[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise _invalid(path, "an object")
    for key in value:
        if key not in allowed:
            raise PolicyError("unknown_field", f"{path}.{key} is not a field this proxy accepts")
    for key in required:
        if key not in value:
            raise _invalid(f"{path}.{key}", "present")
    return value


def _list(value: Any, path: str, min_items: int = 1) -> list:
    if not isinstance(value, list) or len(value) < min_items:
        raise _invalid(path, f"a list of at least {min_items} item{'s' if min_items > 1 else ''}")
    return value


def _count_keys(value: Any) -> int:
    """Object keys anywhere in a JSON value."""
    if isinstance(value, dict):
        return len(value) + sum(_count_keys(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count_keys(v) for v in value)
    return 0


def _rendered_arguments(arguments: str) -> int:
    """Bytes of tool-call arguments as a host prints them: some hosts parse the JSON and print it
    again (``1e15`` becomes ``1000000000000000.0``), so the larger of the two texts counts."""
    try:
        parsed = json.loads(arguments, parse_constant=_no_constant)
        rendered = utf8_len(_json_text(parsed))
    except (ValueError, RecursionError):
        rendered = 0
    return max(utf8_len(arguments), rendered)


def _no_constant(name: str) -> None:
    raise ValueError(name)


def _json_text(value: Any) -> str:
    """Structured values as chat templates print them (``tojson``: ", " and ": ", raw UTF-8)."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (lone surrogates, which JSON allows, count 3 bytes each)."""
    return len(text.encode("utf-8", "surrogatepass"))


class _Reading:
    """The state of reading one body: the input bound so far and the forwarded body."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.input_bytes = 0
        self.overhead_tokens = 0
        self.tools = False
        self.body: dict[str, Any] = {}

    def text(self, value: Any, path: str) -> str:
        self.input_bytes += utf8_len(_str(value, path))
        return value

    def structure(self, value: Any, factor: int = 1) -> Any:
        self.input_bytes += factor * utf8_len(_json_text(value))
        return value

    def tool_definitions(self, value: Any) -> Any:
        """Tools as the chat template prints them: a template such as Hermes 3's prints a
        definition's JSON and, again, its names and descriptions in a signature and an argument
        list (``tools_factor`` times in all), plus text around every key of a parameters schema."""
        self.tools = True
        self.input_bytes += self.limits.schema_key_overhead * _count_keys(value)
        return self.structure(value, self.limits.tools_factor)

    @property
    def input_tokens(self) -> int:
        tools = self.limits.tools_overhead if self.tools else 0
        return self.input_bytes + self.overhead_tokens + tools


# --- chat messages -----------------------------------------------------------------------------

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MESSAGE_FIELDS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal"}
)
IMAGE_DETAIL = frozenset({"auto", "low", "high"})


def _content_part(reading: _Reading, part: Any, path: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise _invalid(path, "an object")
    kind = part.get("type")
    if kind == "text":
        _object(part, path, frozenset({"type", "text"}), frozenset({"text"}))
        return {"type": "text", "text": reading.text(part["text"], f"{path}.text")}
    if kind == "refusal":
        _object(part, path, frozenset({"type", "refusal"}), frozenset({"refusal"}))
        return {"type": "refusal", "refusal": reading.text(part["refusal"], f"{path}.refusal")}
    if kind == "image_url":
        if IMAGE not in reading.limits.modalities:
            raise PolicyError("modality_not_supported", f"{path}: this model takes no images")
        _object(part, path, frozenset({"type", "image_url"}), frozenset({"image_url"}))
        image = _object(
            part["image_url"], f"{path}.image_url", frozenset({"url", "detail"}), frozenset({"url"})
        )
        forwarded = {"url": _str(image["url"], f"{path}.image_url.url")}
        if "detail" in image:
            if not isinstance(image["detail"], str) or image["detail"] not in IMAGE_DETAIL:
                raise _invalid(f"{path}.image_url.detail", "auto, low or high")
            forwarded["detail"] = image["detail"]
        reading.overhead_tokens += reading.limits.image_tokens
        return {"type": "image_url", "image_url": forwarded}
    if kind in ("input_audio", "file"):
        raise PolicyError("modality_not_supported", f"{path}: this proxy sells no {kind} input")
    raise _invalid(f"{path}.type", "text, refusal or image_url")


def _tool_call(reading: _Reading, call: Any, path: str) -> dict[str, Any]:
    _object(call, path, frozenset({"id", "type", "function"}), frozenset({"id", "type", "function"}))
    if call["type"] != "function":
        raise _invalid(f"{path}.type", '"function"')
    _str(call["id"], f"{path}.id")
    _function_call(call["function"], f"{path}.function")
    reading.input_bytes += _rendered_arguments(call["function"]["arguments"])
    return reading.structure(call)


def _function_call(value: Any, path: str) -> None:
    _object(value, path, frozenset({"name", "arguments"}), frozenset({"name", "arguments"}))
    _str(value["name"], f"{path}.name")
    _str(value["arguments"], f"{path}.arguments")


def _message(reading: _Reading, message: Any, path: str) -> dict[str, Any]:
    _object(message, path, MESSAGE_FIELDS, frozenset({"role"}))
    role = message["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise _invalid(f"{path}.role", "one of " + ", ".join(sorted(ROLES)))
    reading.text(role, f"{path}.role")
    reading.overhead_tokens += reading.limits.message_overhead
    forwarded: dict[str, Any] = {"role": role}
    content = message.get("content")
    if isinstance(content, list):
        reading.overhead_tokens += PART_OVERHEAD * len(content)
        forwarded["content"] = [
            _content_part(reading, p, f"{path}.content[{i}]") for i, p in enumerate(content)
        ]
    elif content is None:  # only an assistant turn that called tools may have no content
        if role != "assistant":
            raise _invalid(f"{path}.content", "a string or a list of content parts")
        if "content" in message:
            forwarded["content"] = None
    else:
        forwarded["content"] = reading.text(content, f"{path}.content")
    for field in ("name", "tool_call_id", "refusal"):
        if field in message:
            forwarded[field] = reading.text(message[field], f"{path}.{field}")
    if "tool_calls" in message:
        calls = _list(message["tool_calls"], f"{path}.tool_calls")
        forwarded["tool_calls"] = [
            _tool_call(reading, c, f"{path}.tool_calls[{i}]") for i, c in enumerate(calls)
        ]
    if "function_call" in message:
        _function_call(message["function_call"], f"{path}.function_call")
        forwarded["function_call"] = reading.structure(message["function_call"])
    return forwarded


def _messages(reading: _Reading, value: Any, path: str) -> list[dict[str, Any]]:
    messages = _list(value, path)
    forwarded = [_message(reading, m, f"{path}[{i}]") for i, m in enumerate(messages)]
    reading.overhead_tokens += reading.limits.message_overhead  # the assistant turn the template opens
    return forwarded


# --- tools, functions, response formats --------------------------------------------------------


EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def _function_definition(value: Any, path: str) -> dict[str, Any]:
    """A function definition, with ``description`` ("") and ``parameters`` (an empty object schema)
    filled in when absent: chat templates such as Hermes 3's fail on a tool without them."""
    _object(value, path, frozenset({"name", "description", "parameters", "strict"}), frozenset({"name"}))
    if not isinstance(value["name"], str) or not FUNCTION_NAME.fullmatch(value["name"]):
        raise _invalid(f"{path}.name", "1 to 64 letters, digits, _ or -")
    definition = {
        "name": value["name"],
        "description": _str(value.get("description", ""), f"{path}.description"),
    }
    parameters = value.get("parameters", EMPTY_PARAMETERS)
    if not isinstance(parameters, dict):
        raise _invalid(f"{path}.parameters", "a JSON Schema object")
    definition["parameters"] = parameters
    if "strict" in value:
        definition["strict"] = _bool(value["strict"], f"{path}.strict")
    return definition


def _tools(reading: _Reading, value: Any, path: str) -> list[Any]:
    tools = []
    for i, tool in enumerate(_list(value, path)):
        _object(tool, f"{path}[{i}]", frozenset({"type", "function"}), frozenset({"type", "function"}))
        if tool["type"] != "function":
            raise _invalid(f"{path}[{i}].type", '"function"')
        tools.append(
            {"type": "function", "function": _function_definition(tool["function"], f"{path}[{i}].function")}
        )
    return reading.tool_definitions(tools)


def _functions(reading: _Reading, value: Any, path: str) -> list[Any]:
    functions = [_function_definition(f, f"{path}[{i}]") for i, f in enumerate(_list(value, path))]
    return reading.tool_definitions(functions)


def _named_choice(reading: _Reading, value: Any, path: str, words: frozenset[str], nested: bool) -> Any:
    """``tool_choice`` / ``function_call``: a word, or the function to call by name."""
    if isinstance(value, str):
        if value not in words:
            raise _invalid(path, " or ".join(sorted(words)) + " or an object naming a function")
        return reading.text(value, path)
    if nested:
        _object(value, path, frozenset({"type", "function"}), frozenset({"type", "function"}))
        if value["type"] != "function":
            raise _invalid(f"{path}.type", '"function"')
        _object(value["function"], f"{path}.function", frozenset({"name"}), frozenset({"name"}))
        _str(value["function"]["name"], f"{path}.function.name")
    else:
        _object(value, path, frozenset({"name"}), frozenset({"name"}))
        _str(value["name"], f"{path}.name")
    return reading.structure(value)


def _tool_choice(reading: _Reading, value: Any, path: str) -> Any:
    return _named_choice(reading, value, path, frozenset({"none", "auto", "required"}), nested=True)


def _function_call_choice(reading: _Reading, value: Any, path: str) -> Any:
    return _named_choice(reading, value, path, frozenset({"none", "auto"}), nested=False)


def _response_format(reading: _Reading, value: Any, path: str) -> dict[str, Any]:
    _object(value, path, frozenset({"type", "json_schema"}), frozenset({"type"}))
    kind = value["type"]
    if kind in ("text", "json_object"):
        if "json_schema" in value:
            raise PolicyError("unknown_field", f"{path}.json_schema goes with type json_schema only")
        return {"type": kind}
    if kind != "json_schema":
        raise _invalid(f"{path}.type", "text, json_object or json_schema")
    schema = _object(
        value.get("json_schema"),
        f"{path}.json_schema",
        frozenset({"name", "description", "schema", "strict"}),
        frozenset({"name"}),
    )
    _str(schema["name"], f"{path}.json_schema.name")
    if "description" in schema:
        _str(schema["description"], f"{path}.json_schema.description")
    if "schema" in schema and not isinstance(schema["schema"], dict):
        raise _invalid(f"{path}.json_schema.schema", "a JSON Schema object")
    if "strict" in schema:
        _bool(schema["strict"], f"{path}.json_schema.strict")
    return {"type": kind, "json_schema": reading.structure(schema)}


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
