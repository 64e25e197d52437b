"""JSON text the way a hostile client can write it: duplicate keys, literal tokens (NaN, 1e400, a
5000-digit integer) and nesting that ``json.dumps`` would never produce, plus hypothesis strategies
for such documents."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st


@dataclass(frozen=True)
class Raw:
    """Text put into the document verbatim."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """An object written from (key, value) pairs, which may repeat a key."""

    pairs: tuple[tuple[str, Any], ...]


def dumps(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return (
            "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + dumps(v) for k, v in value.pairs) + "}"
        )
    if isinstance(value, dict):
        return dumps(Pairs(tuple(value.items())))
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


# Numbers Python's json module turns into something surprising: inf, or a ValueError past
# 4300 digits (sys.int_info.default_max_str_digits).
ODD_NUMBERS = st.one_of(
    st.sampled_from(["1e400", "-1e400", "1E+999", "-0", "0.0e-999", "1e-400", "123456789e309"]),
    st.sampled_from([4300, 4301, 5000]).map(lambda n: "9" * n),
    st.sampled_from([4300, 4301, 5000]).map(lambda n: "-1" + "0" * n),
)
CONSTANTS = st.sampled_from(["NaN", "Infinity", "-Infinity"])
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Values as text, sometimes with a hostile number literal in them.
HOSTILE_VALUES = st.recursive(
    st.one_of(JSON_LEAVES, ODD_NUMBERS.map(Raw)),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)

# Decimal strings a lenient parser (int(), str.isdigit()) would accept as 1000 or similar.
ODD_UINTS = st.one_of(
    st.sampled_from(
        [
            " 1000",
            "1000 ",
            "1_000",
            "+1000",
            "-1000",
            "１０００",  # full-width digits
            "١٠٠٠",  # Arabic-Indic digits
            "0x3e8",
            "0x 3e8",
            "3e8",
            "1e3",
            "1000.0",
            "1,000",
            "1000\n",
            "\t1000",
            "",
            "0" * 79,
            str(2**256),
            str(2**256 + 1000),
        ]
    ),
    st.text(min_size=1, max_size=12).filter(lambda t: not (t.isascii() and t.isdigit())),
)
ODD_HEX = st.one_of(
    st.sampled_from(
        ["", "0x", "0X" + "ab" * 32, "ab" * 32, "0x" + "zz" * 32, "0x" + "a" * 63, "0x " + "ab" * 32]
    ),
    st.text(max_size=70),
)
