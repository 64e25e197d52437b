"""The x402 ``bazaar`` discovery extension: how to call a paid resource, in the 402 itself.

Discovery services index paid endpoints from it: an example input (method, body type, body), an
example output, and a JSON Schema of both. Kept small: it travels in ``PAYMENT-REQUIRED``.
"""

from __future__ import annotations

from typing import Any

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def bazaar_extension(
    method: str,
    body: dict[str, Any] | None,
    body_schema: dict[str, Any] | None,
    output_example: dict[str, Any],
    route: tuple[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """``{"bazaar": {"info": ..., "schema": ...}}`` for one HTTP resource (``body`` None for GET).
    ``route``: (``routeTemplate`` in ``:param`` syntax, this call's path parameters) for a path
    with parameters, so an index files every model's resource under one template."""
    info_input: dict[str, Any] = {"type": "http", "method": method}
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "type": {"type": "string", "const": "http"},
            "method": {"type": "string", "const": method},
        },
        "required": ["type", "method"],
    }
    if body is not None:
        info_input.update(bodyType="json", body=body)
        input_schema["properties"].update(
            bodyType={"type": "string", "const": "json"}, body=body_schema or {"type": "object"}
        )
        input_schema["required"] += ["bodyType", "body"]
    if route is not None:
        info_input["pathParams"] = route[1]
        input_schema["properties"]["pathParams"] = {"type": "object"}
    bazaar: dict[str, Any] = {
        "info": {"input": info_input, "output": {"type": "json", "example": output_example}},
        "schema": {
            "$schema": JSON_SCHEMA_DIALECT,
            "type": "object",
            "properties": {"input": input_schema, "output": {"type": "object"}},
            "required": ["input"],
        },
    }
    if route is not None:
        bazaar["routeTemplate"] = route[0]
    return {"bazaar": bazaar}
