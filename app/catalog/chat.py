"""The request policy for what a chat template prints: messages and content parts, tool calls,
tool and function definitions, tool choice and response formats. Each handler checks a value,
counts what the host reads, and returns the value to forward. Pure: no I/O."""

from __future__ import annotations

from typing import Any

from app.catalog.reading import (
    FUNCTION_NAME,
    IMAGE,
    PART_OVERHEAD,
    PolicyError,
    _bool,
    _invalid,
    _list,
    _object,
    _Reading,
    _rendered_arguments,
    _str,
)

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
