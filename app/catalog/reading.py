"""The request policy's vocabulary: its limits and result (``Limits``, ``Work``), its error
(``PolicyError`` with a stable code), the value checks every rule uses, and the running count of
what the model host will read (``_Reading``). Pure: no I/O."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
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
