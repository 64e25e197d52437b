"""The request policy: every field of a paid body is forwarded, normalised, counted, multiplied,
stripped or refused, and the input count is an upper bound of a real byte-level BPE's count.

The tokenizer used for the bound is a real byte-level BPE (HF ``tokenizers``, the algorithm family of
Llama 3's tokenizer, which Hermes 3 uses), trained here on a small English corpus: on texts unlike
its corpus it falls back to one token per byte, which is what the old ``bytes / 3`` estimate missed.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from app.catalog.policy import ROUTE_FIELDS, Rule, read
from app.catalog.reading import IMAGE, POLICY_CODES, TEXT, Limits, PolicyError, utf8_len

LIMITS = Limits()
M = "hermes-3-8b-tee"
USER = [{"role": "user", "content": "hello"}]


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": M, "messages": USER, **extra}


def refused(route: str, body: dict[str, Any], limits: Limits = LIMITS) -> str:
    with pytest.raises(PolicyError) as info:
        read(route, body, limits)
    assert info.value.status == 400 and info.value.code in POLICY_CODES
    return info.value.code


# --- the table ----------------------------------------------------------------------------------


def test_every_field_has_one_rule_and_a_reason() -> None:
    for fields in ROUTE_FIELDS.values():
        for name, field in fields.items():
            assert isinstance(field.rule, Rule) and field.why, name
            # forwarded kinds build the forwarded value; stripped and refused ones never do
            if field.rule in (Rule.STRIP, Rule.REFUSE):
                assert field.handler is None, name


@pytest.mark.parametrize(
    "field",
    [
        "chat_template",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "guided_json",
        "guided_regex",
        "grammar",
        "use_beam_search",
        "ignore_eos",
        "min_tokens",
        "documents",
        "mm_processor_kwargs",
        "cache_prompt",
        "id_slot",
        "lora",
        "upstream_url",
        "best_of",  # a completions field: unknown on chat
        "prompt",
        "echo",
    ],
)
def test_host_switches_and_unknown_fields_are_refused(field: str) -> None:
    assert refused("chat", chat(**{field: 1})) == "unknown_field"


@pytest.mark.parametrize("field", ["messages", "max_completion_tokens", "tools", "response_format"])
def test_chat_only_fields_are_unknown_on_completions(field: str) -> None:
    assert refused("completions", {"model": M, "prompt": "x", field: 1}) == "unknown_field"


@pytest.mark.parametrize(
    "field", ["prediction", "audio", "modalities", "reasoning_effort", "web_search_options"]
)
def test_unsupported_provider_features_are_refused(field: str) -> None:
    assert refused("chat", chat(**{field: {}})) == "unsupported_field"


def test_store_service_tier_user_and_metadata_are_stripped_or_refused() -> None:
    work = read("chat", chat(store=False, service_tier="auto", user="agent-7", metadata={"a": "b"}), LIMITS)
    assert set(work.body) == {"model", "messages", "max_tokens"}
    assert refused("chat", chat(store=True)) == "unsupported_field"
    assert refused("chat", chat(store="false")) == "invalid_field"
    assert refused("chat", chat(service_tier="priority")) == "unsupported_field"
    assert set(read("chat", chat(store=None, service_tier=None), LIMITS).body) == {
        "model",
        "messages",
        "max_tokens",
    }


# --- every kind of work -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 8])
def test_n_multiplies_the_priced_output(n: int) -> None:
    work = read("chat", chat(n=n, max_tokens=100), LIMITS)
    assert (work.choices, work.output_tokens, work.body["n"]) == (n, 100 * n, n)


@pytest.mark.parametrize("body", [chat(n=9), chat(n=10**9), chat(n=2**31 + 1)])
def test_more_answers_than_the_cap_are_refused(body: dict[str, Any]) -> None:
    assert refused("chat", body) == "too_many_choices"


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_n_must_be_a_positive_integer(bad: Any) -> None:
    assert refused("chat", chat(n=bad)) == "invalid_field"


def test_best_of_and_list_prompts_multiply_the_output() -> None:
    assert read("completions", {"model": M, "prompt": "x", "best_of": 8}, LIMITS).choices == 8
    assert read("completions", {"model": M, "prompt": "x", "n": 2, "best_of": 4}, LIMITS).choices == 4
    assert read("completions", {"model": M, "prompt": ["a", "b", "c"], "n": 2}, LIMITS).choices == 6
    assert read("completions", {"model": M, "prompt": [[1, 2], [3]], "best_of": 4}, LIMITS).choices == 8
    assert refused("completions", {"model": M, "prompt": ["a"] * 20}) == "too_many_choices"
    assert refused("completions", {"model": M, "prompt": ["a", "b"], "best_of": 5}) == "too_many_choices"
    assert refused("completions", {"model": M, "prompt": "x", "n": 4, "best_of": 2}) == "invalid_field"


def test_token_id_prompts_count_one_token_per_id() -> None:
    work = read("completions", {"model": M, "prompt": list(range(4000))}, LIMITS)
    assert work.input_tokens >= 4000
    nested = read("completions", {"model": M, "prompt": [list(range(1000)), list(range(3000))]}, LIMITS)
    assert nested.input_tokens >= 4000 and nested.choices == 2
    for bad in ([-1], [2**31], [1.0], [True], [[]], [["a"]], [], [None]):
        assert refused("completions", {"model": M, "prompt": bad}) == "invalid_field"


def _bound_covers(extra: dict[str, Any], text: str, route: str = "chat") -> None:
    base = {"model": M, "prompt": "x"} if route == "completions" else chat()
    assert read(route, {**base, **extra}, LIMITS).input_tokens >= utf8_len(text), extra


LONG = "界" * 5000  # 15,000 bytes of text the host reads
TOOL = {
    "type": "function",
    "function": {"name": "look_up", "description": LONG, "parameters": {"type": "object"}},
}


@pytest.mark.parametrize(
    ("extra", "route"),
    [
        ({"tools": [TOOL]}, "chat"),
        ({"functions": [TOOL["function"]]}, "chat"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": LONG}}}, "chat"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"d": LONG}}}},
            "chat",
        ),
        ({"stop": [LONG]}, "chat"),
        ({"stop": LONG}, "completions"),
        ({"messages": [{"role": "user", "content": "hi", "name": LONG}]}, "chat"),
        ({"messages": [{"role": "tool", "content": LONG, "tool_call_id": "c1"}]}, "chat"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": LONG}]}]}, "chat"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": LONG}}
                        ],
                    }
                ]
            },
            "chat",
        ),
    ],
)
def test_every_text_the_host_reads_counts_as_input(extra: dict[str, Any], route: str) -> None:
    _bound_covers(extra, LONG, route)


def test_tools_add_the_templates_tool_instructions() -> None:
    tiny = {"type": "function", "function": {"name": "f"}}
    assert read("chat", chat(tools=[tiny]), LIMITS).input_tokens >= LIMITS.tools_overhead


def test_many_empty_messages_cost_their_template_tokens() -> None:
    messages = [{"role": "user", "content": ""}] * 10_000
    work = read("chat", {"model": M, "messages": messages}, LIMITS)
    assert work.input_tokens >= 10_000 * LIMITS.message_overhead


def test_parts_the_model_cannot_take_are_refused() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}}
    assert refused("chat", chat(messages=[{"role": "user", "content": [image]}])) == "modality_not_supported"
    for kind in ("input_audio", "file"):
        part = {"type": kind, kind: {}}
        assert (
            refused("chat", chat(messages=[{"role": "user", "content": [part]}])) == "modality_not_supported"
        )
    seeing = replace(LIMITS, modalities=frozenset({TEXT, IMAGE}), image_tokens=1500)
    work = read("chat", chat(messages=[{"role": "user", "content": [image]}]), seeing)
    assert work.input_tokens >= 1500


def test_context_length_bounds_input_plus_max_tokens() -> None:
    small = replace(LIMITS, context_length=1000, max_tokens_cap=500)
    text = "a" * 400
    read("chat", chat(messages=[{"role": "user", "content": text}], max_tokens=500), small)
    assert (
        refused("chat", chat(messages=[{"role": "user", "content": text * 2}], max_tokens=500), small)
        == "context_length_exceeded"
    )
    assert refused("chat", chat(tools=[TOOL] * 10), LIMITS) == "context_length_exceeded"
    # completions: each prompt is its own sequence
    read("completions", {"model": M, "prompt": [text, text], "max_tokens": 500}, small)
    assert (
        refused("completions", {"model": M, "prompt": [text, text * 2], "max_tokens": 500}, small)
        == "context_length_exceeded"
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": "true"},
        {"stream": 1},
        {"logprobs": "true"},
        {"parallel_tool_calls": 0},
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        {"temperature": "0.5"},
        {"temperature": 3},
        {"top_p": -0.1},
        {"seed": 1.5},
        {"top_logprobs": 21},
        {"logit_bias": {"abc": 1}},
        {"logit_bias": {"5": 101}},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": 5},
        {"stream_options": {"include_usage": True}},  # without stream: true
        {"response_format": {"type": "xml"}},
        {"tool_choice": "always"},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "x", "secret_switch": 1}]},
        {"messages": []},
        {"tools": [{"type": "retrieval"}]},
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
    ],
    ids=repr,
)
def test_malformed_fields_are_refused(extra: dict[str, Any]) -> None:
    assert refused("chat", chat(**extra)) in ("invalid_field", "unknown_field")


def test_completions_echo_and_logprobs_are_checked() -> None:
    assert refused("completions", {"model": M, "prompt": "x", "echo": "yes"}) == "invalid_field"
    assert refused("completions", {"model": M, "prompt": "x", "logprobs": 6}) == "invalid_field"
    body = {"model": M, "prompt": "x", "echo": True, "logprobs": 2}
    assert read("completions", body, LIMITS).body == {**body, "max_tokens": 512}


# --- the forwarded body is built, not copied ----------------------------------------------------


def test_the_forwarded_chat_body_is_exactly_the_accepted_fields() -> None:
    body = chat(
        max_completion_tokens=64,
        n=2,
        temperature=0.2,
        top_p=0.9,
        stream=True,
        stream_options={"include_usage": True},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="auto",
        stop=["\n\n"],
        seed=7,
        user="buyer-1",
        store=False,
    )
    work = read("chat", body, LIMITS)
    expected = set(body) - {"user", "store"} | {"max_tokens"}
    assert set(work.body) == expected
    assert work.body["max_tokens"] == work.body["max_completion_tokens"] == 64
    assert work.body is not body and work.body["messages"] is not body["messages"]


def test_the_forwarded_message_drops_nothing_the_price_saw_and_adds_nothing() -> None:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        "name": "bot",
    }
    assert read("chat", chat(messages=[message]), LIMITS).body["messages"] == [message]


# --- the input bound against a real byte-level BPE --------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "A trusted execution environment keeps the model's memory encrypted while it runs. " * 20,
    "Pay per call in USDC on Base with x402; no account, no API key. " * 20,
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE, as Llama 3's: every byte is in the alphabet, merges learned from a corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


ADVERSARIAL = {
    "digits": "8" + "0123456789" * 300,
    "cjk": "信頼できる実行環境" * 200,
    "emoji": "🦊🔐💸🧠" * 200,
    "whitespace runs": " \t\n  \u3000 " * 300,
    "combining marks": "e\u0301\u0302\u0303" * 300,
    "mixed": "x9 界🦊\n" * 300,
}


@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_the_bound_holds_on_adversarial_texts_where_bytes_over_3_did_not(bpe: Tokenizer, text: str) -> None:
    tokens = len(bpe.encode(text).ids)
    assert tokens > utf8_len(text) / 3, "the old estimate (bytes / 3) undercounts this text"
    work = read("chat", chat(messages=[{"role": "user", "content": text}]), LIMITS)
    assert work.input_tokens >= tokens


def test_english_is_where_the_bound_is_loose(bpe: Tokenizer) -> None:
    """The price of the guarantee: on the corpus's own language the bound is several times the count."""
    text = CORPUS[1]
    assert len(bpe.encode(text).ids) * 3 < utf8_len(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=200), min_size=1, max_size=5))
def test_the_bound_holds_for_any_text(bpe: Tokenizer, texts: list[str]) -> None:
    messages = [{"role": "user", "content": t} for t in texts]
    work = read("chat", {"model": M, "messages": messages}, LIMITS)
    assert (
        work.input_tokens >= sum(len(bpe.encode(t).ids) for t in texts) + len(texts) * LIMITS.message_overhead
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=50), min_size=1, max_size=8), st.integers(1, 3))
def test_completions_bound_holds_for_any_prompt_list(bpe: Tokenizer, prompts: list[str], n: int) -> None:
    body: dict[str, Any] = {"model": M, "prompt": prompts, "n": n}
    if len(prompts) * n > LIMITS.max_choices:
        assert refused("completions", body) == "too_many_choices"
        return
    work = read("completions", body, LIMITS)
    assert work.choices == len(prompts) * n
    assert work.input_tokens >= sum(len(bpe.encode(p).ids) for p in prompts)


# --- the README's rules table is the policy -----------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_rules_table_is_exactly_the_policy() -> None:
    section = README.read_text(encoding="utf-8").split("## Pricing", 1)[1].split("\n## ", 1)[0]
    claimed: set[tuple[str, str, str]] = set()
    for row in re.findall(r"^\| (`.*?) \| (both|chat|completions) \| (\w+) \|", section, re.M):
        names, route, rule = row
        routes = ("chat", "completions") if route == "both" else (route,)
        claimed |= {(r, name, rule) for r in routes for name in re.findall(r"`(\w+)`", names)}
    actual = {
        (route, name, field.rule.value)
        for route, fields in ROUTE_FIELDS.items()
        for name, field in fields.items()
    }
    assert claimed == actual


# --- what a hostile tester found ------------------------------------------------------------------


@pytest.mark.parametrize("role", [["user"], {"a": 1}, 5, None])
def test_a_role_that_is_not_a_string_is_a_400_not_a_crash(role: Any) -> None:
    assert refused("chat", chat(messages=[{"role": role, "content": "x"}])) == "invalid_field"


def test_an_image_detail_that_is_not_a_string_is_a_400_not_a_crash() -> None:
    seeing = replace(LIMITS, modalities=frozenset({TEXT, IMAGE}), image_tokens=1)
    part = {"type": "image_url", "image_url": {"url": "u", "detail": ["low"]}}
    assert refused("chat", chat(messages=[{"role": "user", "content": [part]}]), seeing) == "invalid_field"


HUGE_CONTEXT = replace(LIMITS, context_length=10**8)  # to measure bodies a real context would refuse


def hermes_rendered_tool_bytes(tool: dict[str, Any]) -> int:
    """A lower bound of what Hermes 3's tool template prints for one function: a Python-like
    signature naming every parameter, an ``Args:`` line per parameter with its description, and the
    whole definition as JSON."""
    function = tool["function"]
    properties = function["parameters"].get("properties", {})
    signature = function["name"] + "(" + ", ".join(f"{p}: Any" for p in properties) + ")"
    args = "".join(
        f"    {p}({v.get('type', 'Any')}): {v.get('description', '')}\n" for p, v in properties.items()
    )
    definition = json.dumps(tool, ensure_ascii=False, separators=(", ", ": "))
    return utf8_len(signature + function["description"] + args + definition)


@pytest.mark.parametrize(
    "properties",
    [
        {"1.1." * 10_000: {}},  # one long parameter name
        {"p": {"type": "string", "description": "d" * 40_000}},  # one long description
        {f"p{i}": {} for i in range(6_000)},  # many tiny parameters
    ],
    ids=["long name", "long description", "many parameters"],
)
def test_tool_definitions_count_what_the_template_prints(properties: dict[str, Any]) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "description": "d",
            "parameters": {"type": "object", "properties": properties},
        },
    }
    work = read("chat", chat(tools=[tool], max_tokens=16), HUGE_CONTEXT)
    assert work.input_tokens >= hermes_rendered_tool_bytes(tool) + LIMITS.tools_overhead


def test_tool_call_arguments_count_as_a_host_prints_them_again() -> None:
    arguments = "[" + ",".join(["1e15"] * 12_000) + "]"
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    work = read("chat", chat(messages=[message]), HUGE_CONTEXT)
    reprinted = json.dumps(json.loads(arguments), separators=(", ", ": "))
    assert work.input_tokens >= utf8_len(reprinted) > 3 * utf8_len(arguments)


def test_content_parts_count_the_newline_a_host_joins_them_with() -> None:
    parts = [{"type": "text", "text": "1"}] * 30_000
    work = read("chat", chat(messages=[{"role": "user", "content": parts}]), LIMITS)
    assert work.input_tokens >= utf8_len("\n".join("1" for _ in parts))


def test_a_tool_without_description_or_parameters_is_completed_for_the_template() -> None:
    work = read("chat", chat(tools=[{"type": "function", "function": {"name": "f"}}]), LIMITS)
    assert work.body["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "description": "", "parameters": {"type": "object", "properties": {}}},
        }
    ]


@pytest.mark.parametrize(
    "extra",
    [
        {"seed": 2**63},
        {"top_p": 0},
        {"repetition_penalty": 0},
        {"top_k": 0},
        {"top_logprobs": 2},
        {"logprobs": False, "top_logprobs": 2},
        {"logit_bias": {"128256": 1}},
        {"logit_bias": {"5\n": 1, "5": -1}},
        {"tools": [{"type": "function", "function": {"name": "f\n"}}]},
    ],
    ids=repr,
)
def test_values_the_host_would_refuse_are_refused_before_any_402(extra: dict[str, Any]) -> None:
    assert refused("chat", chat(**extra)) == "invalid_field"


def test_token_ids_beyond_the_vocabulary_and_suffix_are_refused() -> None:
    assert refused("completions", {"model": M, "prompt": [LIMITS.vocab_size]}) == "invalid_field"
    assert refused("completions", {"model": M, "prompt": [[1], [LIMITS.vocab_size]]}) == "invalid_field"
    assert refused("completions", {"model": M, "prompt": "x", "suffix": "y"}) == "unsupported_field"
    read("completions", {"model": M, "prompt": [LIMITS.vocab_size - 1]}, LIMITS)


BODY_PARTS = {
    "temperature": 9,
    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}],
    "n": 99,
    "prediction": {},
    "mystery": 1,
    "stream": "yes",
}


@settings(max_examples=100, deadline=None)
@given(st.permutations(list(BODY_PARTS)), st.integers(2, len(BODY_PARTS)))
def test_one_body_gets_one_answer_whatever_the_order_of_its_keys(order: list[str], size: int) -> None:
    chosen = sorted(order[:size])
    answers = set()
    for keys in (chosen, list(reversed(chosen)), order[:size]):
        body = {"model": M, "messages": USER, **{k: BODY_PARTS[k] for k in keys}}
        answers.add(refused("chat", body) if keys else "")
    assert len(answers) == 1
