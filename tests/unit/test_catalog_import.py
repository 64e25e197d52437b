"""``x402-proxy catalog import``: LibertAI's pricing aggregate → our TOML catalog, exactly.

``tests/data/libertai_aggregate_sample.json`` is invented for these tests (its ``_comment`` says so):
a plausible shape for LibertAI's published pricing/capabilities aggregate, not a copy of the real
document. Four models: two TEE (hermes-3-8b-tee, qwen3-8b-tee with a 4096-token context), one
flagged ``tee: false`` and one with no ``tee`` flag at all.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from app.catalog import Catalog, Model, load_catalog
from app.catalog.importer import (
    CatalogImportError,
    atomic_per_million,
    import_aggregate,
    import_file,
    parse_aggregate,
    render_toml,
    toml_string,
)
from app.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "libertai_aggregate_sample.json"
HERMES = "hermes-3-8b-tee"


def sample() -> dict[str, Any]:
    data = parse_aggregate(SAMPLE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def hermes_text(**changes: Any) -> str:
    """JSON text of an aggregate holding only hermes, some fields replaced (None deletes one).
    Built from plain ``json`` floats, whose repr (0.2) is the literal the file had."""
    entry = next(m for m in json.loads(SAMPLE.read_text(encoding="utf-8"))["models"] if m["id"] == HERMES)
    for key, value in changes.items():
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    return json.dumps({"models": [entry]})


def hermes(**changes: Any) -> Any:
    return parse_aggregate(hermes_text(**changes))


def prices_text(input_literal: str, output_literal: str = "0.6") -> str:
    """hermes with its two prices written as raw JSON literals (so NaN or -0.2 appear as such)."""
    text = hermes_text(pricing={"text": {"price_per_million_input_tokens": "@IN@", "pm_out": "@OUT@"}})
    text = text.replace('"@IN@"', input_literal)
    return text.replace('"pm_out": "@OUT@"', f'"price_per_million_output_tokens": {output_literal}')


# --- exact numbers ---------------------------------------------------------------------------------


def test_hermes_without_margin_is_the_hosts_price_in_atomic_units() -> None:
    models = import_aggregate(sample())

    assert models[HERMES] == Model(
        name=HERMES,
        description="Hermes 3 8B (TEE)",
        tee=True,
        pricing="per_token",
        input_per_million=200_000,  # $0.20 per million input tokens
        output_per_million=600_000,  # $0.60 per million output tokens
        floor=1000,
        default_max_tokens=512,
        max_tokens_cap=4096,  # min(4096, 16384 // 2)
        context_length=16384,  # the aggregate's context_window
    )


def test_hermes_with_a_20_percent_margin() -> None:
    model = import_aggregate(sample(), margin=Decimal(20))[HERMES]

    assert (model.input_per_million, model.output_per_million) == (240_000, 720_000)
    assert (model.floor, model.default_max_tokens, model.max_tokens_cap) == (1000, 512, 4096)


def test_floor_is_configurable() -> None:
    assert import_aggregate(sample(), floor=2500)[HERMES].floor == 2500


def test_json_prices_are_exact_decimals_not_floats() -> None:
    """As floats, 2.007 × 10**6 rounds up to 2007001 and Decimal(0.2) × 10**6 to 200001."""
    assert math.ceil(2.007 * 10**6) == 2_007_001 and math.ceil(Decimal.from_float(0.2) * 10**6) == 200_001
    price = sample()["models"][0]["pricing"]["text"]["price_per_million_input_tokens"]
    assert price == Decimal("0.2") and isinstance(price, Decimal)

    model = import_aggregate(parse_aggregate(prices_text("2.007", "0.2")))[HERMES]
    assert (model.input_per_million, model.output_per_million) == (2_007_000, 200_000)


# --- rounding --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usd", "margin", "atomic"),
    [
        ("0.0000015", "0", 2),  # 1.5 units → 2
        ("0.000001", "0", 1),  # exactly one unit stays one
        ("0.0000001", "0", 1),  # any positive price costs at least one unit per million
        ("0", "50", 0),
        ("0.2", "12.34567", 224_692),  # 224691.34 → 224692
        ("0.0000015", "20", 2),  # 1.8 → 2: rounded once, not ceil(ceil(1.5) × 1.2) = 3
        ("0.1234565", "0", 123_457),  # 123456.5 → up, not to even
        ("3", "0", 3_000_000),
    ],
)
def test_amounts_are_rounded_up_once(usd: str, margin: str, atomic: int) -> None:
    assert atomic_per_million(Decimal(usd), Decimal(margin)) == atomic


def test_rounding_up_through_the_whole_import() -> None:
    model = import_aggregate(parse_aggregate(prices_text("0.0000015", "0.1234565")))[HERMES]

    assert (model.input_per_million, model.output_per_million) == (2, 123_457)


# --- capabilities ----------------------------------------------------------------------------------


def test_non_tee_models_are_kept_with_tee_false() -> None:
    models = import_aggregate(sample())

    assert list(models) == [HERMES, "qwen3-8b-tee", "gemma-3-27b", "llama-3.3-70b"]
    assert models["gemma-3-27b"].tee is False  # flagged false
    assert models["llama-3.3-70b"].tee is False  # not flagged at all
    assert models["qwen3-8b-tee"].tee is True
    # ...and under X402_TEE_ONLY (the default) only the TEE ones are sold.
    assert [m.name for m in Catalog(models, tee_only=True).listed()] == [HERMES, "qwen3-8b-tee"]


def test_cap_is_half_the_context_window_at_most_4096() -> None:
    models = import_aggregate(sample())
    assert models["qwen3-8b-tee"].max_tokens_cap == 2048  # context 4096
    assert models["gemma-3-27b"].max_tokens_cap == 4096  # context 131072

    small = import_aggregate(hermes(capabilities={"tee": True, "context_window": 801}))[HERMES]
    assert (small.max_tokens_cap, small.default_max_tokens) == (400, 400)  # the default fits the cap


# --- malformed input -------------------------------------------------------------------------------

MALFORMED: dict[str, tuple[str, str]] = {
    "missing pricing": (hermes_text(pricing=None), "missing pricing"),
    "missing text pricing": (
        hermes_text(pricing={"image": {"price_per_image": 0.002}}),
        "missing pricing.text.price_per_million_input_tokens",
    ),
    "negative price": (prices_text("-0.2"), "price_per_million_input_tokens is negative"),
    "not JSON": ("models: [hermes-3-8b-tee]", "not JSON"),
    "price as a string": (prices_text('"0.2"'), "must be a number"),
    "NaN price": (prices_text("NaN"), "not a usable number"),
    "absurd price": (prices_text("1e40"), "implausible"),
    "tee not a boolean": (hermes_text(capabilities={"tee": "yes", "context_window": 8}), "tee"),
    "no context window": (hermes_text(capabilities={"tee": True}), "context_window"),
    "id with a slash": (hermes_text(id="org/model"), "id must be a plain model name"),
    "no models": ('{"models": []}', 'non-empty "models" list'),
    "a list at the top": ("[]", 'non-empty "models" list'),
    "duplicate id": (
        json.dumps({"models": json.loads(hermes_text())["models"] * 2}),
        "appears twice",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_a_clear_error(case: str, tmp_path: Path) -> None:
    text, message = MALFORMED[case]
    source = tmp_path / "aggregate.json"
    source.write_text(text, encoding="utf-8")

    with pytest.raises(CatalogImportError, match=re.escape(message)):
        import_file(source)


@pytest.mark.parametrize("case", ["missing pricing", "negative price", "not JSON"])
def test_cli_exits_2_on_malformed_input_and_writes_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, message = MALFORMED[case]
    source, output = tmp_path / "aggregate.json", tmp_path / "out" / "catalog.toml"
    output.parent.mkdir()
    source.write_text(text, encoding="utf-8")

    assert main(["catalog", "import", str(source), "--output", str(output)]) == 2

    err = capsys.readouterr().err
    assert err.startswith("x402-proxy catalog import: ") and message in err
    assert list(output.parent.iterdir()) == []


def test_cli_keeps_an_existing_catalog_when_the_input_is_bad(tmp_path: Path) -> None:
    source, output = tmp_path / "aggregate.json", tmp_path / "catalog.toml"
    source.write_text(MALFORMED["negative price"][0], encoding="utf-8")
    output.write_text("# the operator's catalog\n", encoding="utf-8")

    assert main(["catalog", "import", str(source), "--output", str(output)]) == 2
    assert output.read_text(encoding="utf-8") == "# the operator's catalog\n"


@pytest.mark.parametrize("option", [["--margin", "-5"], ["--margin", "lots"], ["--floor", "0"]])
def test_cli_exits_2_on_a_bad_option(option: list[str], tmp_path: Path) -> None:
    output = tmp_path / "catalog.toml"
    assert main(["catalog", "import", str(SAMPLE), *option, "--output", str(output)]) == 2
    assert not output.exists()


# --- the written file ------------------------------------------------------------------------------


def test_cli_writes_a_catalog_that_loads_back_equal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "catalog.toml"

    code = main(
        ["catalog", "import", str(SAMPLE), "--margin", "20", "--floor", "0.002", "--output", str(output)]
    )

    assert code == 0
    assert "wrote 4 models" in capsys.readouterr().err
    expected = import_file(SAMPLE, Decimal(20), 2000)
    assert load_catalog(output) == expected
    assert expected[HERMES].input_per_million == 240_000 and expected[HERMES].floor == 2000
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.toml"]  # no partial file left behind


def test_cli_prints_the_catalog_without_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog", "import", str(SAMPLE)]) == 0

    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out, encoding="utf-8")
    assert load_catalog(printed) == import_file(SAMPLE)


def test_toml_strings_survive_quotes_backslashes_and_control_characters(tmp_path: Path) -> None:
    awkward = 'Hermes "3" \\ 8B\n\ttab\x01\x7f é 🔒'
    assert tomllib.loads(f"k = {toml_string(awkward)}") == {"k": awkward}

    models = import_aggregate(hermes(name=awkward))
    path = tmp_path / "catalog.toml"
    path.write_text(render_toml(models, 'odd\nname"'), encoding="utf-8")
    assert load_catalog(path) == models
