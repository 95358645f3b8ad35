"""tongyi_local.schema: schema checks, grammars (judged by llama.cpp's own grammar sampler),
validation, and schemas/values from Python types and functions."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NotRequired, Optional, TypedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tongyi_local.errors import InvalidRequestError, OutputParseError, UnsupportedSchemaError
from tongyi_local.schema import (check_supported, convert, function_schema, grammar_for,
                                 schema_of, tool_call_grammar, validate)

from grammar_check import ByteVocab, grammar_parses

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory):
    loaded = ByteVocab.load(tmp_path_factory.mktemp("vocab"))
    yield loaded
    loaded.close()


def is_valid(value: Any, schema: dict) -> bool:
    try:
        validate(value, schema, what="value")
    except OutputParseError:
        return False
    return True


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def assert_grammar_agrees(vocab: ByteVocab, schema: dict, values: list[Any]) -> None:
    """The grammar accepts json.dumps(value) exactly when jsonschema says the value is valid."""
    grammar = grammar_for(schema)
    assert grammar_parses(vocab, grammar), grammar
    for value in values:
        text = dumps(value)
        assert vocab.accepts(grammar, text) == is_valid(value, schema), (schema, text, grammar)


# ---------------------------------------------------------------------------------------------
# Integer and number bounds
# ---------------------------------------------------------------------------------------------

small_ints = st.integers(-1200, 1200)
any_ints = st.one_of(small_ints, st.integers(-10**15, 10**15),
                     st.integers(-(10**16 - 3), 10**16 - 3))  # exclusive bounds stay in 16 digits


@st.composite
def integer_schemas(draw) -> dict:
    """Integer schemas with any combination of (exclusive) bounds, at least one integer inside."""
    bounds = draw(st.lists(any_ints, min_size=0, max_size=2).map(sorted))
    schema: dict[str, Any] = {"type": "integer"}
    kinds = draw(st.sampled_from(["both", "low", "high"])) if len(bounds) == 2 else (
        draw(st.sampled_from(["low", "high"])) if bounds else "none")
    low = bounds[0] if kinds in ("both", "low") else None
    high = bounds[-1] if kinds in ("both", "high") else None
    if low is not None:
        exclusive = draw(st.booleans()) and (high is None or low < high - 1)
        schema["exclusiveMinimum" if exclusive else "minimum"] = low
    if high is not None:
        exclusive = draw(st.booleans()) and (low is None or low < high - 1)
        schema["exclusiveMaximum" if exclusive else "maximum"] = high
    return schema


def near(schema: dict) -> list[int]:
    points = [0, 1, -1]
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in schema:
            points += [schema[key] + d for d in (-11, -2, -1, 0, 1, 2, 9, 10)]
    limit = 10**16 - 1
    return [p for p in points if -limit <= p <= limit]


@FAST
@given(schema=integer_schemas(), others=st.lists(any_ints, max_size=6), data=st.data())
def test_integer_bounds_grammar_accepts_exactly_the_integers_in_range(vocab, schema, others,
                                                                      data):
    values = near(schema) + others
    grammar = grammar_for(schema)
    assert grammar_parses(vocab, grammar), grammar
    for n in values:
        assert vocab.accepts(grammar, str(n)) == is_valid(n, schema), (schema, n, grammar)
    # never anything JSON itself would reject
    for text in (sign + "0" + str(abs(n)) for n in values if n for sign in ("", "-")):
        assert not vocab.accepts(grammar, text), (schema, text)
    assert not vocab.accepts(grammar, "1.5")


def test_integer_bounds_examples(vocab):
    grammar = grammar_for({"type": "integer", "minimum": -5, "exclusiveMaximum": 120})
    assert [vocab.accepts(grammar, t) for t in ("-5", "-6", "0", "119", "120", "007")] == [
        True, False, True, True, False, False]


@st.composite
def decimal_texts(draw) -> str:
    """Decimals as a model writes them: no exponent, no -0, no trailing zero after a nonzero
    digit (a bounded number grammar asks for the shortest form at an exclusive bound)."""
    integer = draw(st.one_of(st.integers(0, 1100), st.integers(0, 10**9 - 1)))
    decimals = draw(st.one_of(st.just(""), st.sampled_from(["0", "00"]),
                              st.from_regex(r"[0-9]{0,5}[1-9]", fullmatch=True)))
    text = str(integer) + ("." + decimals if decimals else "")
    negative = draw(st.booleans()) and float(text) != 0
    return ("-" if negative else "") + text


@st.composite
def number_schemas(draw) -> dict:
    low, high = sorted(draw(st.lists(st.integers(-1000, 1000), min_size=2, max_size=2)))
    schema: dict[str, Any] = {"type": "number"}
    sides = draw(st.sampled_from(["both", "low", "high"]))
    if sides in ("both", "low"):
        schema["exclusiveMinimum" if draw(st.booleans()) and low < high else "minimum"] = low
    if sides in ("both", "high"):
        schema["exclusiveMaximum" if draw(st.booleans()) and low < high else "maximum"] = high
    return schema


@FAST
@given(schema=number_schemas(), texts=st.lists(decimal_texts(), min_size=4, max_size=8))
def test_number_bounds_grammar_accepts_exactly_the_decimals_in_range(vocab, schema, texts):
    bounds = [schema[k] for k in schema if k != "type"]
    texts += [f"{b + d}{frac}" for b in bounds for d in (-1, 0, 1) for frac in ("", ".0", ".5")]
    texts = [t for t in texts if float(t) != 0 or not t.startswith("-")]
    grammar = grammar_for(schema)
    assert grammar_parses(vocab, grammar), grammar
    for text in texts:
        assert vocab.accepts(grammar, text) == is_valid(json.loads(text), schema), (schema, text)


def test_number_bounds_leave_out_what_they_cannot_decide(vocab):
    grammar = grammar_for({"type": "number", "minimum": 0, "maximum": 1})
    assert vocab.accepts(grammar, "0.25") and vocab.accepts(grammar, "1.0")
    assert not vocab.accepts(grammar, "1.000001")
    assert not vocab.accepts(grammar, "1e-3")  # valid, but bounded numbers have no exponent
    assert not vocab.accepts(grammar, "-0")  # valid too; left out rather than special-cased


# ---------------------------------------------------------------------------------------------
# Generated schemas in the supported subset, and values for them
# ---------------------------------------------------------------------------------------------

TEXT = st.characters(codec="utf-8", exclude_categories=("Cs",))
NAMES = ["a", "b", "name", "a b", "é", 'q"uote', "back\\slash", "", "x/y", "ref"]
PATTERNS = [r"^[a-z]+$", r"^\d{3}-\d{2}$", r"ab", r"^(foo|bar)?baz$", r"^[^a-c]{2,4}$",
            r"^\w+@\w+\.com$", r"^a.c$", r"x\d*y$", r'^"[\\]?$', r"^\S+\s\S+$", r"^a|b$",
            r"^(?:ab){1,3}c?$", r"^[-+]?[0-9]{1,3}(\.[0-9]+)?$", r"^\x41\u00e9[\-\]]$", r"^$"]
PATTERN_ALPHABET = st.sampled_from([chr(c) for c in range(0x20, 0x7F)] + ["\t", "é"])
FORMAT_EXAMPLES = {
    "date": ["2024-02-29", "2023-02-28", "2023-02-29", "1900-02-29", "2000-02-29", "0000-01-01",
             "0001-01-01", "2023-04-31", "2023-12-31", "2023-13-01", "23-01-01", "2023-1-01"],
    "time": ["12:34:56Z", "23:59:60+01:00", "00:00:00.123456789-05:30", "12:34:56z",
             "24:00:00Z", "12:60:00Z", "12:00:00", "12:00:00.Z", "1:00:00Z", "12:00:00+24:00",
             "12:00:00.5+00:00"],
    "date-time": ["2024-02-29T12:00:00Z", "2024-02-29t12:00:00.5+02:00", "2023-02-29T12:00:00Z",
                  "2024-01-01 12:00:00Z", "2024-01-01T25:00:00Z"],
    "uuid": [str(uuid.UUID(int=7)), str(uuid.UUID(int=2**128 - 1)).upper(), "1234",
             "123e4567-e89b-12d3-a456-42661417400", "123e4567e89b12d3a456426614174000"],
}
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-50, 50), st.text(TEXT, max_size=4))


@st.composite
def string_schemas(draw) -> dict:
    kind = draw(st.sampled_from(["plain", "lengths", "pattern", "format"]))
    if kind == "lengths":
        low = draw(st.integers(0, 4))
        schema = {"type": "string", "minLength": low}
        if draw(st.booleans()):
            schema["maxLength"] = low + draw(st.integers(0, 3))
        return schema
    if kind == "pattern":
        return {"type": "string", "pattern": draw(st.sampled_from(PATTERNS))}
    if kind == "format":
        return {"type": "string", "format": draw(st.sampled_from(sorted(FORMAT_EXAMPLES)))}
    return {"type": "string"}


def leaf_schemas() -> st.SearchStrategy[dict]:
    return st.one_of(
        integer_schemas(), number_schemas(), string_schemas(),
        st.just({"type": "number"}), st.just({"type": "boolean"}), st.just({"type": "null"}),
        st.lists(SCALARS, min_size=1, max_size=4, unique_by=dumps).map(lambda v: {"enum": v}),
        SCALARS.map(lambda v: {"const": v}),
        st.integers(0, 3).map(lambda n: {"type": ["string", "null"], "maxLength": n}),
    )


def object_schemas(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    @st.composite
    def build(draw) -> dict:
        names = draw(st.lists(st.sampled_from(NAMES), max_size=4, unique=True))
        properties = {name: draw(children) for name in names}
        required = [n for n in names if draw(st.booleans())]
        extra = draw(st.one_of(st.just(False), children))
        return {"type": "object", "properties": properties, "required": required,
                "additionalProperties": extra}
    return build()


def array_schemas(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    @st.composite
    def build(draw) -> dict:
        schema = {"type": "array", "items": draw(children)}
        low = draw(st.integers(0, 2))
        if low:
            schema["minItems"] = low
        if draw(st.booleans()):
            schema["maxItems"] = low + draw(st.integers(0, 3))
        return schema
    return build()


supported_schemas = st.recursive(
    leaf_schemas(),
    lambda children: st.one_of(
        object_schemas(children), array_schemas(children),
        st.lists(children, min_size=2, max_size=3).map(lambda alts: {"anyOf": alts})),
    max_leaves=6)

def regex_texts(pattern: str) -> st.SearchStrategy[str]:
    """Strings matching ``pattern`` under Python's ``re``, without a final newline (Python's
    ``$`` also matches before one; the grammar follows ECMA-262 there and refuses it)."""
    return st.from_regex(pattern, alphabet=PATTERN_ALPHABET).filter(lambda t: "\n" not in t)


WRONG = st.sampled_from([None, True, 0, 2.5, "", "zz", [], {}])


def floats_that_print_plainly() -> st.SearchStrategy[float]:
    return st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: round(x, 4)).filter(
        lambda x: "e" not in repr(x))


def values_for(schema: dict) -> st.SearchStrategy[Any]:
    """Values near the schema's edges: mostly valid, often just outside."""
    return st.one_of(_values_for(schema), WRONG) if schema else WRONG


def _values_for(schema: dict) -> st.SearchStrategy[Any]:
    if "anyOf" in schema:
        return st.one_of([values_for(s) for s in schema["anyOf"]])
    if "const" in schema:
        return st.one_of(st.just(schema["const"]), SCALARS)
    if "enum" in schema:
        return st.one_of(st.sampled_from(schema["enum"]), SCALARS)
    kind = schema["type"]
    if isinstance(kind, list):
        return st.one_of(st.none(), st.text(TEXT, max_size=schema["maxLength"] + 1))
    if kind == "integer":
        return st.one_of(st.sampled_from(near(schema)), small_ints)
    if kind == "number":  # 2.0 is an integer to jsonschema; the grammar writes it as 2
        return st.one_of(st.sampled_from(near(schema)), decimal_texts().map(json.loads),
                         floats_that_print_plainly(), st.integers(-10**15 + 1, 10**15 - 1)).map(
            lambda x: int(x) if float(x).is_integer() else x)
    if kind == "string":
        if "pattern" in schema:
            pattern = schema["pattern"]
            # only texts where Python's re (what jsonschema runs) and ECMA-262 agree
            return st.one_of(regex_texts(pattern), st.text(PATTERN_ALPHABET, max_size=6)).filter(
                lambda t: bool(re.search(pattern, t)) == bool(re.search(pattern, t, re.ASCII)))
        if "format" in schema:
            return st.sampled_from(FORMAT_EXAMPLES[schema["format"]])
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        return st.text(TEXT, min_size=max(0, low - 1), max_size=(high + 1) if high is not None
                       else low + 4)
    if kind == "array":
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        return st.lists(values_for(schema["items"]), min_size=max(0, low - 1),
                        max_size=(high + 1) if high is not None else low + 3)
    if kind == "object":
        return object_values(schema)
    return st.just(None) if kind == "null" else st.booleans()


def object_values(schema: dict) -> st.SearchStrategy[dict]:
    @st.composite
    def build(draw) -> dict:
        value = {}
        for name, sub in schema["properties"].items():
            chance = 0.9 if name in schema["required"] else 0.5
            if draw(st.floats(0, 1)) < chance:
                value[name] = draw(values_for(sub))
        for extra in draw(st.lists(st.sampled_from(["extra", "k1", "é2"]), max_size=2,
                                   unique=True)):
            if extra not in value:
                extra_schema = schema["additionalProperties"]
                value[extra] = draw(values_for(extra_schema) if extra_schema else WRONG)
        return value
    return build()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(schema=supported_schemas, data=st.data())
def test_generated_schema_grammar_accepts_exactly_the_valid_values(vocab, schema, data):
    check_supported(schema)
    values = [data.draw(values_for(schema)) for _ in range(4)]
    assert_grammar_agrees(vocab, schema, values)


# ---------------------------------------------------------------------------------------------
# Keywords one by one (what the port gets wrong, and what it does right)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, accepted, rejected", [
    ({"type": "string", "minLength": 2, "maxLength": 3}, ["ab", "é😀x"], ["a", "abcd"]),
    ({"type": "string", "maxLength": 1}, ['"', "\\", "\n", "\x01"], ["ab"]),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
     [[1], [1, 2]], [[], [1, 2, 3], ["a"]]),
    ({"enum": ["a\\b", 'q"', 1, None, [1, "x"], {"k": True}]},
     ["a\\b", 'q"', 1, None, [1, "x"], {"k": True}], ["a\b", "q", 2, [1]]),
    ({"const": "tab\there"}, ["tab\there"], ["tab here"]),
    ({"type": "string", "enum": ["a", 1]}, ["a"], [1]),
    ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 1}]}, [1, "x"], ["xy"]),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, [1, "x"], [None]),
    ({"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}},
                 "required": ["kind"], "additionalProperties": False},
                {"type": "object", "properties": {"kind": {"const": "b"}}, "required": ["kind"],
                 "additionalProperties": False}]},
     [{"kind": "a", "x": 1}, {"kind": "b"}], [{"kind": "c"}, {"kind": "b", "x": 1}]),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                {"required": ["a"]}]}, [{"a": 1}], [{}, {"a": "x"}]),
    ({"type": ["integer", "null"], "minimum": 1}, [1, None], [0]),
    ({"type": "object", "required": ["a"]}, [{"a": [1, {"b": None}]}], [{}]),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, [{}, {"x": 1, "y": 2}],
     [{"x": "1"}]),
    ({"type": "object", "properties": {"a": {"type": "integer"}},
      "additionalProperties": {"type": "string"}},
     [{"a": 1, "b": "x"}, {"b": "x"}, {"b": "x", "c": "y"}], [{"a": "x"}, {"b": 1}]),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
      "required": ["b"], "additionalProperties": False},
     [{"a": 1, "b": "x"}, {"b": "x"}], [{"a": 1}, {"a": 1, "b": "x", "c": 1}]),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
      "items": False, "minItems": 2}, [[1, "a"]], [[1], ["a", 1], [1, "a", 2]]),
    ({"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array",
                                                   "items": {"$ref": "#/$defs/node"}}},
        "required": ["value"], "additionalProperties": False}},
      "$ref": "#/$defs/node"},
     [{"value": 1, "children": [{"value": 2, "children": []}]}], [{"children": []}]),
    ({"type": "object", "properties": {"node": {"type": "integer"},
                                       "other": {"$ref": "#/$defs/node"}},
      "$defs": {"node": {"type": "string"}}, "additionalProperties": False},
     [{"node": 1, "other": "s"}], [{"node": 1, "other": 1}]),
    ({"type": "string", "format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000"], ["x"]),
    ({"type": "object", "properties": {"d": {"type": "string", "format": "date"},
                                       "t": {"type": "string", "format": "time"},
                                       "dt": {"type": "string", "format": "date-time"}},
      "required": ["d", "t", "dt"], "additionalProperties": False},
     [{"d": "2024-02-29", "t": "08:30:00Z", "dt": "2024-02-29T08:30:00.250+01:00"}],
     [{"d": "2024-02-30", "t": "08:30:00Z", "dt": "2024-02-29T08:30:00Z"}]),
    ({}, [1, "x", None, [True, {"a": 2.5}]], []),
])
def test_keyword_examples(vocab, schema, accepted, rejected):
    assert all(is_valid(v, schema) for v in accepted)
    assert not any(is_valid(v, schema) for v in rejected)
    assert_grammar_agrees(vocab, schema, accepted + rejected)


@pytest.mark.parametrize("pattern", [*PATTERNS, r"[\s\S]", r"^a?b+$", r"^[\D]{2}\W$",
                                     r"^.{0,3}$", r"^\.\*\?$"])
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(PATTERN_ALPHABET, max_size=6), min_size=3, max_size=6),
       data=st.data())
def test_pattern_grammar_matches_ecma_and_python_search(vocab, pattern, texts, data):
    texts.append(data.draw(regex_texts(pattern)))
    schema = {"type": "string", "pattern": pattern}
    grammar = grammar_for(schema)
    for text in texts:
        # JSON Schema patterns are ECMA-262; jsonschema runs Python's re. The grammar keeps to
        # what both accept; on this alphabet re.ASCII gives ECMA's \d \w \s.
        expected = all(re.search(pattern, text, flags) for flags in (0, re.ASCII))
        assert vocab.accepts(grammar, dumps(text)) == expected, (pattern, text, grammar)


def test_string_characters_are_json_characters(vocab):
    grammar = grammar_for({"type": "string", "minLength": 2, "maxLength": 2})
    assert vocab.accepts(grammar, '"\\u00e9\\n"') and vocab.accepts(grammar, '"é😀"')
    assert not vocab.accepts(grammar, '"a\n"')  # a raw newline: JSON must escape it
    # one code point written as a surrogate pair would count twice: the grammar refuses it
    assert not vocab.accepts(grammar, '"\\ud83d\\ude00"')
    assert not is_valid(json.loads('"\\ud83d\\ude00"'), {"minLength": 2})


@pytest.mark.parametrize("fmt", sorted(FORMAT_EXAMPLES))
def test_format_grammars_accept_exactly_the_valid_examples(vocab, fmt):
    examples = FORMAT_EXAMPLES[fmt]
    schema = {"type": "string", "format": fmt}
    assert any(is_valid(e, schema) for e in examples) and not all(
        is_valid(e, schema) for e in examples)
    assert_grammar_agrees(vocab, schema, examples)


@pytest.mark.parametrize("pattern, text", [
    (r"^\w$", "é"),          # Python: a word character; ECMA-262: not
    (r"^\W$", "é"),          # and so not a non-word character for Python
    (r"^[^\d]$", "٣"),       # an Arabic-Indic digit is \d to Python
    (r"^\S$", "\x1c"),       # Python counts \x1c-\x1f as whitespace
    (r"^\s$", "\ufeff"),     # ECMA-262 counts U+FEFF as whitespace, Python does not
    (r"^.$", "😀"),           # ECMA-262 without the u flag: two code units
    (r"^.$", "\u2028"),       # a line terminator to ECMA-262
])
def test_pattern_refuses_what_one_engine_rejects(vocab, pattern, text):
    assert not vocab.accepts(grammar_for({"type": "string", "pattern": pattern}), dumps(text))


def test_pattern_never_lets_a_raw_quote_or_backslash_end_the_string(vocab):
    grammar = grammar_for({"type": "string", "pattern": "^.*$"})
    assert vocab.accepts(grammar, '"a\\"b\\\\c\\t"')
    for broken in ('"a"b"', '"a\\x"', '"a\\"', '"a\nb"', '"a\\nb"'):
        assert not vocab.accepts(grammar, broken), broken  # the last: "." excludes newlines


def test_repetition_beyond_llama_cpp_limit_stays_bounded(vocab):
    grammar = grammar_for({"type": "string", "minLength": 2001, "maxLength": 4500})
    assert grammar_parses(vocab, grammar)
    for length, expected in ((2000, False), (2001, True), (4500, True), (4501, False)):
        assert vocab.accepts(grammar, dumps("x" * length)) == expected, length


def test_rule_names_do_not_collide_across_tools_and_defs(vocab):
    first = {"type": "object", "properties": {"x": {"$ref": "#/$defs/Item"}}, "required": ["x"],
             "$defs": {"Item": {"type": "integer"}}}
    second = {"type": "object", "properties": {"x": {"$ref": "#/$defs/Item"}},
              "required": ["x"], "$defs": {"Item": {"type": "string"}}}
    grammar = tool_call_grammar([("one", first), ("two", second)], parallel=False)
    assert vocab.accepts(grammar, call("one", {"x": 1}))
    assert vocab.accepts(grammar, call("two", {"x": "s"}))
    assert not vocab.accepts(grammar, call("one", {"x": "s"}))
    assert not vocab.accepts(grammar, call("two", {"x": 1}))


# ---------------------------------------------------------------------------------------------
# Unsupported and invalid schemas
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, feature, pointer", [
    ({"not": {"type": "string"}}, "not", ""),
    ({"type": "object", "properties": {"a": {"if": {"type": "string"}, "then": {}}}}, "if",
     "/properties/a"),
    ({"else": {}}, "else", ""),
    ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties", ""),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired", ""),
    ({"type": "object", "dependentSchemas": {"a": {}}}, "dependentSchemas", ""),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems", ""),
    ({"type": "integer", "multipleOf": 2}, "multipleOf", ""),
    ({"type": "array", "contains": {"type": "integer"}}, "contains", ""),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "minItems": 2}, "prefixItems", ""),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames", ""),
    ({"type": "object", "minProperties": 1}, "minProperties", ""),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties", ""),
    ({"$ref": "https://example.com/schema.json"}, "$ref", ""),
    ({"type": "object", "properties": {"a": {"$ref": "other.json#/a"}}}, "$ref", "/properties/a"),
    ({"type": "string", "format": "email"}, "format", ""),
    ({"type": "number", "minimum": 0.5}, "minimum", ""),
    ({"type": "number", "exclusiveMaximum": 2.5}, "exclusiveMaximum", ""),
    ({"type": "string", "pattern": "^(?=a)"}, "pattern", "/pattern"),
    ({"type": "string", "pattern": r"(a)\1"}, "pattern", "/pattern"),
    ({"type": "string", "pattern": r"\bword"}, "pattern", "/pattern"),
    ({"type": "string", "pattern": r"^(a*)*$"}, "pattern", "/pattern"),
    ({"type": "string", "pattern": "^a$", "maxLength": 3}, "maxLength", ""),
    ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 2}]}, "oneOf", ""),
    ({"type": "object", "properties": {"a/b": {"$ref": "#/$defs/x", "type": "string"}},
      "$defs": {"x": {}}}, "type", "/properties/a~1b"),
    ({"type": "object", "properties": {"l": {"type": "array", "items": {"not": {}}}}}, "not",
     "/properties/l/items"),
    ({"$ref": "#"}, "$ref", ""),
    ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
      "$ref": "#/$defs/a"}, "$ref", "/$defs/a"),
    ({"allOf": [{"type": "object", "properties": {"a": {}}, "additionalProperties": False},
                {"properties": {"b": {}}}]}, "allOf", ""),
    ({"type": "integer", "minimum": 10**17}, "minimum", ""),
])
def test_unsupported_features_are_refused_with_keyword_and_pointer(schema, feature, pointer):
    with pytest.raises(UnsupportedSchemaError) as caught:
        check_supported(schema)
    assert (caught.value.feature, caught.value.pointer) == (feature, pointer)
    assert isinstance(caught.value, InvalidRequestError)
    with pytest.raises(UnsupportedSchemaError):
        grammar_for(schema)


@pytest.mark.parametrize("schema, pointer", [
    ("not a schema", None),
    ([{"type": "string"}], None),
    ({"type": "strin"}, "/type"),
    ({"required": "a"}, "/required"),
    ({"type": "object", "required": [1]}, "/required/0"),
    ({"type": "string", "pattern": "a("}, "/pattern"),
    ({"properties": {"x": {"type": "foo"}}}, "/properties/x/type"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "/"),
    ({"enum": []}, "/"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "/"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "/"),
    ({"$ref": "#/$defs/missing"}, "/"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "/properties/a"),
    ({"type": "number", "maximum": float("nan")}, None),
])
def test_invalid_schemas_name_the_pointer(schema, pointer):
    with pytest.raises(InvalidRequestError) as caught:
        check_supported(schema)
    assert not isinstance(caught.value, UnsupportedSchemaError)
    if pointer is not None:
        assert f"at {pointer}:" in str(caught.value)


def test_annotations_are_fine():
    check_supported({"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "x",
                     "title": "T", "description": "d", "$comment": "c", "type": "object",
                     "properties": {"a": {"type": "string", "default": "x", "examples": ["y"],
                                          "deprecated": True, "readOnly": True,
                                          "writeOnly": False, "x-vendor": 1}}})


def test_importing_schema_loads_no_native_library():
    code = "import sys, tongyi_local.schema; print('llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Tool calls
# ---------------------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}, "required": ["city"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [("get_weather", WEATHER), ("add", ADD)]


def call(name: str, arguments: Any) -> str:
    return f"<tool_call>\n{dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.mark.parametrize("parallel", [False, True])
def test_tool_call_grammar_accepts_one_correct_call(vocab, parallel):
    grammar = tool_call_grammar(TOOLS, parallel=parallel)
    assert grammar_parses(vocab, grammar)
    assert vocab.accepts(grammar, call("get_weather", {"city": "Paris"}))
    assert vocab.accepts(grammar, call("get_weather", {"city": "Oslo", "unit": "C"}))
    assert vocab.accepts(grammar, call("add", {"a": 1, "b": -2}))


@pytest.mark.parametrize("text", [
    call("get_time", {}),                                   # unknown tool
    call("get_weather", {"city": 3}),                       # bad argument type
    call("get_weather", {"unit": "C"}),                     # missing required argument
    call("add", {"a": 1, "b": 2, "c": 3}),                  # argument not in the schema
    call("get_weather", {"city": "Paris", "unit": "K"}),    # enum
    '<tool_call>\n{"arguments": {"a": 1, "b": 2}, "name": "add"}\n</tool_call>',  # order
    '{"name": "add", "arguments": {"a": 1, "b": 2}}',       # no tags
])
def test_tool_call_grammar_rejects_wrong_calls(vocab, text):
    assert not vocab.accepts(tool_call_grammar(TOOLS, parallel=True), text)


def test_parallel_tool_calls(vocab):
    two = call("add", {"a": 1, "b": 2}) + "\n" + call("get_weather", {"city": "Rome"})
    assert vocab.accepts(tool_call_grammar(TOOLS, parallel=True), two)
    assert not vocab.accepts(tool_call_grammar(TOOLS, parallel=False), two)


def test_tool_call_root_starts_with_the_trigger_text(vocab):
    grammar = tool_call_grammar(TOOLS, parallel=False)
    assert re.search(r'^root ::= "<tool_call>', grammar, re.M)
    with vocab.sampler(grammar) as sampler:
        assert sampler.feed(b"<tool_call>\n{") and not sampler.can_end()


def test_tool_call_grammar_errors_name_the_tool():
    with pytest.raises(UnsupportedSchemaError, match="'bad'") as caught:
        tool_call_grammar([("ok", ADD), ("bad", {"type": "object", "properties": {
            "n": {"type": "integer", "multipleOf": 3}}})], parallel=False)
    assert (caught.value.feature, caught.value.pointer) == ("multipleOf", "/properties/n")
    with pytest.raises(InvalidRequestError, match="twice"):
        tool_call_grammar([("add", ADD), ("add", ADD)], parallel=False)
    with pytest.raises(InvalidRequestError):
        tool_call_grammar([], parallel=False)


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------

def test_validate_names_what_and_where_but_not_the_value():
    secret = "my private diary entry " * 5
    schema = {"type": "object", "properties": {"notes": {"type": "array",
                                                         "items": {"type": "integer"}}}}
    with pytest.raises(OutputParseError) as caught:
        validate({"notes": [1, secret]}, schema, what="the answer for Diary")
    message = str(caught.value)
    assert "the answer for Diary" in message and "/notes/1" in message
    assert "private" not in message and "integer" in message
    with pytest.raises(OutputParseError, match="date"):
        validate("2023-02-30", {"type": "string", "format": "date"}, what="d")
    with pytest.raises(OutputParseError, match="required"):
        validate({}, {"type": "object", "required": ["city"]}, what="args")
    validate({"notes": [1, 2]}, schema, what="ok")


# ---------------------------------------------------------------------------------------------
# Schemas from Python types and functions; values back into them
# ---------------------------------------------------------------------------------------------

class Unit(enum.Enum):
    CELSIUS = "C"
    FAHRENHEIT = "F"


@dataclass
class Point:
    x: int
    y: float = 0.0


@dataclass
class Reading:
    """One weather reading.

    Attributes:
        place: Where it was taken.
    """

    place: str
    unit: Unit
    points: list[Point]
    origin: Point | None = None
    kind: Literal["live", "forecast"] = "live"
    tags: dict[str, int] = field(default_factory=dict)
    note: Annotated[str, "free text"] = ""


class Job(TypedDict):
    title: str
    where: NotRequired[Point]


def to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def test_schema_of_dataclass_round_trips_through_grammar_and_convert(vocab):
    schema = schema_of(Reading)
    assert schema["required"] == ["place", "unit", "points"]
    assert schema["additionalProperties"] is False
    assert schema["description"] == "One weather reading."
    assert schema["properties"]["place"]["description"] == "Where it was taken."
    assert schema["properties"]["note"]["description"] == "free text"
    assert schema["properties"]["kind"] == {"enum": ["live", "forecast"]}
    assert schema["properties"]["unit"]["enum"] == ["C", "F"]
    reading = Reading("Oslo", Unit.CELSIUS, [Point(1, 2.5), Point(3)], origin=Point(0, 0.5),
                      tags={"a": 1})
    value = to_json(reading)
    assert_grammar_agrees(vocab, schema, [value, {**value, "unit": "K"}])
    rebuilt = convert(value, Reading)
    assert rebuilt == reading and isinstance(rebuilt.points[0], Point)
    assert isinstance(convert({"x": 1, "y": 2}, Point).y, float)


def test_schema_of_annotations_and_typed_dicts(vocab):
    assert schema_of(int) == {"type": "integer"}
    assert schema_of(Optional[str]) == {"anyOf": [{"type": "string"}, {"type": "null"}]}  # noqa: UP045
    assert schema_of(list[bool]) == {"type": "array", "items": {"type": "boolean"}}
    assert schema_of(dict[str, float]) == {"type": "object",
                                           "additionalProperties": {"type": "number"}}
    assert schema_of(Literal["a"]) == {"const": "a"}
    job = schema_of(Job)
    assert job["required"] == ["title"] and "$defs" in job
    assert_grammar_agrees(vocab, job, [{"title": "t"}, {"title": "t", "where": {"x": 1}}, {}])
    assert convert({"title": "t", "where": {"x": 1}}, Job) == {"title": "t", "where": Point(1)}
    plain = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert schema_of(plain) == plain and schema_of(plain) is not plain
    assert convert({"a": 1}, plain) == {"a": 1}


def test_schema_of_recursive_dataclass(vocab):
    schema = schema_of(Tree)
    assert schema["properties"]["children"]["items"] == {"$ref": "#"}
    value = {"label": "root", "children": [{"label": "leaf", "children": []}]}
    assert_grammar_agrees(vocab, schema, [value, {"label": 1, "children": []}])
    assert convert(value, Tree).children[0].label == "leaf"


@dataclass
class Tree:
    label: str
    children: list[Tree]


def test_schema_of_pydantic_model(vocab):
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        name: str
        population: int | None = None

    schema = schema_of(City)
    assert schema["required"] == ["name"]
    check_supported(schema)
    value = {"name": "Oslo", "population": 700000}
    assert_grammar_agrees(vocab, schema, [value, {"population": 1}])
    assert convert(value, City) == City(name="Oslo", population=700000)


@pytest.mark.parametrize("target, words", [
    (set[int], ["set"]),
    (dict[int, str], ["dict keys"]),
    (object, ["object"]),
])
def test_schema_of_unsupported_types_name_the_type(target, words):
    with pytest.raises(InvalidRequestError) as caught:
        schema_of(target)
    assert all(w in str(caught.value) for w in words)


def test_schema_of_names_the_field_at_fault():
    @dataclass
    class Bad:
        ok: int
        wrong: set[str]

    with pytest.raises(InvalidRequestError, match="field 'wrong' of Bad"):
        schema_of(Bad)


def search(query: str, limit: int = 10, lang: Literal["en", "zh"] = "en",
           site: str | None = None, unit: Unit = Unit.CELSIUS, near: Point | None = None) -> list:
    """Search the web for pages.

    Longer text that is not part of the description.

    Args:
        query: What to look for.
        limit: How many results
            to return at most.
        lang (str): Result language.

    Returns:
        The page titles.
    """
    return []


def sphinx_style(path: str, recursive: bool = False) -> None:
    """List a directory.

    :param path: The directory,
        relative to the project.
    :param bool recursive: Also list subdirectories.
    """


def test_function_schema_from_google_docstring(vocab):
    name, description, parameters = function_schema(search)
    assert (name, description) == ("search", "Search the web for pages.")
    properties = parameters["properties"]
    assert parameters["required"] == ["query"] and parameters["additionalProperties"] is False
    assert properties["query"] == {"type": "string", "description": "What to look for."}
    assert properties["limit"] == {"type": "integer", "default": 10,
                                   "description": "How many results to return at most."}
    assert properties["lang"] == {"enum": ["en", "zh"], "default": "en",
                                  "description": "Result language."}
    assert properties["site"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert properties["unit"]["enum"] == ["C", "F"]
    assert properties["near"]["anyOf"][0] == {"$ref": "#/$defs/Point"}
    arguments = {"query": "llama", "lang": "zh", "near": {"x": 1, "y": 2.5}}
    assert_grammar_agrees(vocab, parameters, [arguments, {"query": "q", "lang": "fr"}])
    assert convert(arguments["near"], Point) == Point(1, 2.5)


def test_function_schema_from_sphinx_docstring():
    _, description, parameters = function_schema(sphinx_style)
    assert description == "List a directory."
    assert parameters["properties"]["path"]["description"] == \
        "The directory, relative to the project."
    assert parameters["properties"]["recursive"]["description"] == "Also list subdirectories."


def numpy_style(name: str, count: int = 1) -> None:
    """Greet someone.

    Parameters
    ----------
    name : str
        Who to greet.
    count : int
        How many times.
    """


def test_function_schema_from_numpy_docstring():
    _, description, parameters = function_schema(numpy_style)
    assert description == "Greet someone."
    assert [parameters["properties"][p]["description"] for p in ("name", "count")] == [
        "Who to greet.", "How many times."]


def test_convert_tuples_and_unions(vocab):
    schema = schema_of(tuple[int, str])
    assert_grammar_agrees(vocab, schema, [[1, "a"], [1], ["a", 1], [1, "a", 2]])
    assert convert([1, "a"], tuple[int, str]) == (1, "a")
    assert convert({"label": "x", "children": []}, Point | Tree) == Tree("x", [])
    assert convert({"x": 2}, Point | Tree) == Point(2)
    assert convert(None, Optional[Point]) is None  # noqa: UP045


def untyped(query, limit: int = 3):
    return query


def variadic(query: str, *rest: str):
    return query


def keywords(query: str, **options: Any):
    return query


@pytest.mark.parametrize("fn, words", [
    (untyped, ["untyped", "'query'", "type hint"]),
    (variadic, ["variadic", "'rest'"]),
    (keywords, ["keywords", "'options'"]),
])
def test_function_schema_errors_name_function_and_parameter(fn, words):
    with pytest.raises(InvalidRequestError) as caught:
        function_schema(fn)
    assert all(w in str(caught.value) for w in words)
