"""Turn a saved copy of LibertAI's pricing/capabilities aggregate into our TOML catalog.

The operator reprices from the host's published list instead of retyping numbers: dollars per
million tokens become atomic USDC units per million, with the operator's margin on top. Every amount
is exact ``Decimal`` arithmetic (JSON numbers are parsed as ``Decimal``, never ``float``: as floats,
2.007 × 10**6 is 2007000.0000000002 and Decimal(0.2) is 0.2000000000000000111, each one unit too
many once rounded up) and is rounded up once, at the end, so the proxy never sells below the host's
price. Anything unexpected in the input is an error naming the model and field: a catalog is what
buyers are charged from, so nothing is guessed.

The expected shape (a stand-in for LibertAI's aggregate; only these fields are read)::

    {"models": [{"id": "hermes-3-8b-tee", "name": "Hermes 3 8B",
                 "capabilities": {"tee": true, "context_window": 16384},
                 "pricing": {"text": {"price_per_million_input_tokens": 0.2,
                                      "price_per_million_output_tokens": 0.6}}}]}
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_CEILING, Decimal, Inexact, InvalidOperation, localcontext
from pathlib import Path
from typing import Any

from app.amounts import USDC_UNIT
from app.catalog import CatalogError, Model, load_catalog

DEFAULT_FLOOR = 1000  # atomic units: $0.001, so a tiny call still pays for its settlement gas
DEFAULT_MAX_TOKENS = 512
MAX_TOKENS_CAP = 4096
MAX_USD_PER_MILLION = Decimal(10_000)  # far above any real price: a bigger number is a typo
MAX_MARGIN = Decimal(1000)
# Names end up in URLs (/v1/models/NAME/ping) and TOML keys: keep them plain.
MODEL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


class CatalogImportError(ValueError):
    """The aggregate (or an option) cannot be turned into a catalog; the message says where."""


def _reject_constant(name: str) -> Any:
    raise CatalogImportError(f"not a usable number in the JSON: {name}")


def parse_aggregate(text: str) -> Any:
    """JSON with exact decimals; NaN and Infinity are refused."""
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise CatalogImportError(f"not JSON: {exc}") from None


def parse_margin(text: str) -> Decimal:
    """A percentage such as ``20`` or ``12.5``; a discount (negative) is refused."""
    try:
        margin = Decimal(text)
    except InvalidOperation:
        raise CatalogImportError(f"--margin: not a number: {text!r}") from None
    if not margin.is_finite() or not Decimal(0) <= margin <= MAX_MARGIN:
        raise CatalogImportError(f"--margin: must be a percentage between 0 and {MAX_MARGIN}")
    return margin


def atomic_per_million(usd_per_million: Decimal, margin: Decimal) -> int:
    """USD per million tokens plus ``margin`` percent, as atomic USDC units, rounded up once."""
    with localcontext() as ctx:
        ctx.prec = 100
        ctx.traps[Inexact] = True  # with these bounds every step is exact; make sure of it
        exact = usd_per_million * USDC_UNIT * (100 + margin) / 100
        return int(exact.to_integral_value(rounding=ROUND_CEILING))


def _field(entry: Any, path: str, where: str) -> Any:
    """``entry["a"]["b"]`` for ``path`` "a.b", with an error naming what is missing."""
    value = entry
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise CatalogImportError(f"{where}: missing {path}")
        value = value[key]
    return value


def _usd(entry: Any, path: str, where: str) -> Decimal:
    value = _field(entry, path, where)
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise CatalogImportError(f"{where}: {path} must be a number (USD per million tokens)")
    value = Decimal(value)
    if value < 0:
        raise CatalogImportError(f"{where}: {path} is negative ({value})")
    if value > MAX_USD_PER_MILLION:
        raise CatalogImportError(f"{where}: {path} = {value} USD per million tokens is implausible")
    return value


def _model(entry: Any, index: int, margin: Decimal, floor: int) -> Model:
    where = f"models[{index}]"
    if not isinstance(entry, dict):
        raise CatalogImportError(f"{where}: must be an object")
    name = entry.get("id")
    if not isinstance(name, str) or not MODEL_ID_RE.fullmatch(name):
        raise CatalogImportError(f"{where}: id must be a plain model name (letters, digits, . _ : -)")
    where = f"model {name!r}"
    capabilities = entry.get("capabilities")
    if not isinstance(capabilities, dict):
        raise CatalogImportError(f"{where}: missing capabilities")
    tee = capabilities.get("tee", False)  # not flagged is not a TEE
    if not isinstance(tee, bool):
        raise CatalogImportError(f"{where}: capabilities.tee must be true or false")
    context = _field(entry, "capabilities.context_window", where)
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise CatalogImportError(f"{where}: capabilities.context_window must be an integer of at least 2")
    cap = min(MAX_TOKENS_CAP, context // 2)
    if not isinstance(entry.get("pricing"), dict):
        raise CatalogImportError(f"{where}: missing pricing")
    input_usd = _usd(entry, "pricing.text.price_per_million_input_tokens", where)
    output_usd = _usd(entry, "pricing.text.price_per_million_output_tokens", where)
    label = entry.get("name")
    return Model(
        name=name,
        description=label.strip() if isinstance(label, str) and label.strip() else name,
        tee=tee,
        pricing="per_token",
        input_per_million=atomic_per_million(input_usd, margin),
        output_per_million=atomic_per_million(output_usd, margin),
        floor=floor,
        default_max_tokens=min(DEFAULT_MAX_TOKENS, cap),
        max_tokens_cap=cap,
        context_length=context,
    )


def _check_options(margin: Decimal, floor: int) -> None:
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 1:
        raise CatalogImportError("--floor: must be at least 0.000001 USDC (one atomic unit)")
    if not isinstance(margin, Decimal) or not margin.is_finite() or not 0 <= margin <= MAX_MARGIN:
        raise CatalogImportError(f"--margin: must be a percentage between 0 and {MAX_MARGIN}")


def import_aggregate(data: Any, margin: Decimal = Decimal(0), floor: int = DEFAULT_FLOOR) -> dict[str, Model]:
    """The catalog entries for every model of a parsed aggregate, TEE or not (``X402_TEE_ONLY``
    decides what is sold; the catalog records what each model is)."""
    _check_options(margin, floor)
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise CatalogImportError('the aggregate must be an object with a non-empty "models" list')
    models: dict[str, Model] = {}
    for index, entry in enumerate(entries):
        model = _model(entry, index, margin, floor)
        if model.name in models:
            raise CatalogImportError(f"model {model.name!r} appears twice")
        models[model.name] = model
    return models


def import_file(path: Path, margin: Decimal = Decimal(0), floor: int = DEFAULT_FLOOR) -> dict[str, Model]:
    """Read, parse and convert a saved aggregate."""
    _check_options(margin, floor)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogImportError(f"{path}: cannot read: {exc}") from None
    try:
        return import_aggregate(parse_aggregate(text), margin, floor)
    except CatalogImportError as exc:
        raise CatalogImportError(f"{path}: {exc}") from None


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: bool | int | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return toml_string(value)


def _comment(text: str) -> str:
    """One comment line; control characters (a newline in a file name, say) cannot end it early."""
    return "# " + "".join(c if c.isprintable() else "?" for c in text)


def render_toml(models: dict[str, Model], source: str = "", margin: Decimal = Decimal(0)) -> str:
    """The catalog file ``load_catalog`` reads back into the same ``Model`` values."""
    lines = [
        _comment(
            f"Generated by `x402-proxy catalog import` from {source or 'an aggregate'}, margin {margin}%."
        ),
        _comment("Prices in atomic USDC units (1000000 = $1.00); see app/catalog.toml for the rules."),
    ]
    for model in models.values():
        fields: dict[str, bool | int | str] = {
            "description": model.description,
            "tee": model.tee,
            "pricing": model.pricing,
            "input_per_million": model.input_per_million,
            "output_per_million": model.output_per_million,
            "floor": model.floor,
            "default_max_tokens": model.default_max_tokens,
            "max_tokens_cap": model.max_tokens_cap,
            "context_length": model.context_length,
        }
        lines += ["", f"[models.{toml_string(model.name)}]"]
        lines += [f"{toml_string(key)} = {_toml_value(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def write_catalog(output: Path, text: str, models: dict[str, Model]) -> None:
    """Write ``text`` to ``output`` only once it reads back as ``models``: a catalog that would not
    load (or would load differently) never replaces the old one."""
    partial = output.with_name(f".{output.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        if load_catalog(partial) != models:
            raise CatalogError("the written catalog does not read back as imported")
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
