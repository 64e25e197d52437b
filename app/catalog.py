"""The model catalog: what each model costs for a given request body, and where it is served.

``quote`` is a pure function of (model entry, request body), so the 402 and the paid retry of the
same body always name the same amount. It also returns the body to forward, with the ``max_tokens``
that was priced, so nobody receives more than they paid for.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, current_app

from .settings import SettingsError

ROUTE_INPUT_FIELDS = {"chat": "messages", "completions": "prompt"}
BYTES_PER_TOKEN = 3


class CatalogError(ValueError):
    """The catalog file is malformed."""


class QuoteError(ValueError):
    """The request body cannot be priced; ``code`` is a stable reason, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    tee: bool
    pricing: str  # "per_token" or "per_call"
    price: int = 0
    input_per_million: int = 0
    output_per_million: int = 0
    floor: int = 1
    default_max_tokens: int = 512
    max_tokens_cap: int = 4096
    upstream_url: str = ""
    upstream_key: str = ""  # names X402_UPSTREAM_API_KEY_<NAME>: a direct TEE host's own key
    attestation_url: str = ""  # where the host publishes its attestation report
    measurement: str = ""  # the launch measurement the report must show
    attestation_max_age: int = 3600  # seconds: an older report is not trusted

    def public(self) -> dict[str, Any]:
        """The entry as ``/v1/models`` shows it."""
        entry: dict[str, Any] = {"id": self.name, "object": "model", "description": self.description}
        entry["tee"] = self.tee
        entry["attested"] = bool(self.attestation_url)
        entry["pricing"] = {"scheme": self.pricing, "floor": self.floor}
        if self.pricing == "per_call":
            entry["pricing"]["per_call"] = self.price
        else:
            entry["pricing"].update(
                input_per_million=self.input_per_million,
                output_per_million=self.output_per_million,
                default_max_tokens=self.default_max_tokens,
                max_tokens_cap=self.max_tokens_cap,
            )
        return entry


@dataclass(frozen=True)
class Quote:
    model: Model
    amount: int
    body: dict[str, Any]  # what is forwarded upstream: the priced max_tokens filled in


def _positive_int(entry: dict[str, Any], key: str, name: str, default: int | None = None) -> int:
    value = entry.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CatalogError(f"model {name!r}: {key} must be a non-negative integer")
    return value


def load_catalog(path: Path) -> dict[str, Model]:
    """Read and validate a TOML catalog."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"{path}: {exc}") from None
    models: dict[str, Model] = {}
    entries = data.get("models", {})
    if not isinstance(entries, dict):
        raise CatalogError(f"{path}: `models` must be a table of [models.NAME] entries")
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise CatalogError(f"{path}: models.{name} must be a table")
        pricing = entry.get("pricing")
        if pricing not in ("per_token", "per_call"):
            raise CatalogError(f"model {name!r}: pricing must be per_token or per_call")
        model = Model(
            name=name,
            description=str(entry.get("description", "")),
            tee=bool(entry.get("tee", False)),
            pricing=pricing,
            price=_positive_int(entry, "price", name, 0),
            input_per_million=_positive_int(entry, "input_per_million", name, 0),
            output_per_million=_positive_int(entry, "output_per_million", name, 0),
            floor=max(1, _positive_int(entry, "floor", name, 1)),
            default_max_tokens=_positive_int(entry, "default_max_tokens", name, 512),
            max_tokens_cap=_positive_int(entry, "max_tokens_cap", name, 4096),
            upstream_url=str(entry.get("upstream_url", "")).rstrip("/"),
            upstream_key=str(entry.get("upstream_key", "")),
            attestation_url=str(entry.get("attestation_url", "")),
            measurement=str(entry.get("measurement", "")).lower().removeprefix("0x"),
            attestation_max_age=_positive_int(entry, "attestation_max_age", name, 3600),
        )
        if bool(model.attestation_url) != bool(model.measurement):
            raise CatalogError(f"model {name!r}: attestation_url and measurement go together")
        if model.default_max_tokens > model.max_tokens_cap or model.default_max_tokens < 1:
            raise CatalogError(f"model {name!r}: default_max_tokens must be within 1..max_tokens_cap")
        models[name] = model
    if not models:
        raise CatalogError(f"{path}: no [models.*] entries")
    return models


def _input_text_bytes(value: Any) -> int:
    """UTF-8 size of every string in the request's input (messages or prompt), however nested."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, list):
        return sum(_input_text_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_input_text_bytes(item) for item in value.values())
    return 0


def _requested_max_tokens(body: dict[str, Any], model: Model) -> int:
    requested = [body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    for value in requested:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise QuoteError("invalid_max_tokens", "max_tokens must be a positive integer")
    limit = max(requested) if requested else model.default_max_tokens
    if limit > model.max_tokens_cap:
        raise QuoteError(
            "max_tokens_too_large", f"max_tokens is capped at {model.max_tokens_cap} for {model.name}"
        )
    return limit


def price(model: Model, body: dict[str, Any], input_field: str) -> tuple[int, int]:
    """(amount, max_tokens) for a body: integer atomic units, rounded up, never below the floor."""
    max_tokens = _requested_max_tokens(body, model)
    if model.pricing == "per_call":
        return max(model.price, model.floor), max_tokens
    input_tokens = math.ceil(_input_text_bytes(body.get(input_field)) / BYTES_PER_TOKEN)
    numerator = input_tokens * model.input_per_million + max_tokens * model.output_per_million
    return max(-(-numerator // 1_000_000), model.floor), max_tokens


class Catalog:
    """The loaded catalog, one per app."""

    def __init__(self, models: dict[str, Model], tee_only: bool = True) -> None:
        self.models = models
        self.tee_only = tee_only

    def listed(self) -> list[Model]:
        """The models on sale: only TEE ones when ``X402_TEE_ONLY`` is on."""
        return [m for m in self.models.values() if m.tee or not self.tee_only]

    def model(self, name: Any) -> Model:
        """The model on sale under ``name`` (404 unknown, 403 not a TEE model under TEE-only)."""
        if not isinstance(name, str) or not name:
            raise QuoteError("invalid_request", "model is required")
        model = self.models.get(name)
        if model is None:
            raise QuoteError("model_not_found", f"no model named {name!r}; see GET /v1/models", 404)
        if self.tee_only and not model.tee:
            raise QuoteError(
                "model_not_tee", f"{name} does not run in a TEE and this proxy sells TEE models only", 403
            )
        return model

    def quote_ping(self, name: str) -> Quote:
        """The paid liveness probe of a model costs its floor price."""
        model = self.model(name)
        return Quote(model=model, amount=model.floor, body={})

    def quote(self, route: str, body: Any) -> Quote:
        """Price a request body for a route ("chat" or "completions"); raise ``QuoteError`` if it can't be."""
        input_field = ROUTE_INPUT_FIELDS[route]
        if not isinstance(body, dict):
            raise QuoteError("invalid_request", "the body must be a JSON object")
        model = self.model(body.get("model"))
        if input_field not in body:
            raise QuoteError("invalid_request", f"{input_field} is required")
        amount, max_tokens = price(model, body, input_field)
        forwarded = dict(body)
        forwarded["max_tokens"] = max_tokens
        if "max_completion_tokens" in forwarded:
            forwarded["max_completion_tokens"] = max_tokens
        return Quote(model=model, amount=amount, body=forwarded)


def init_app(app: Flask) -> None:
    settings = app.config["X402_SETTINGS"]
    try:
        models = load_catalog(settings.catalog_path)
    except CatalogError as exc:
        raise SettingsError("X402_CATALOG", str(exc)) from None
    for model in models.values():
        if model.upstream_key and model.upstream_key not in settings.upstream_keys:
            raise SettingsError(
                f"X402_UPSTREAM_API_KEY_{model.upstream_key}",
                f"required by model {model.name!r} in the catalog",
            )
    app.extensions["x402.catalog"] = Catalog(models, settings.tee_only)


def get_catalog() -> Catalog:
    catalog: Catalog = current_app.extensions["x402.catalog"]
    return catalog
