"""JSON schemas for tool calls and structured output: check, grammar, validate, build.

Why: on the local backend a tool call or a structured answer is decoded under a GBNF grammar made
from its JSON schema, so what the model writes always parses and validates; a schema the grammar
cannot express is refused (``UnsupportedSchemaError``), never silently decoded unconstrained.

How: a schema is first read into a small checked form (``_Node`` classes below; every keyword the
grammar cannot honour raises there, naming its JSON pointer), then written as GBNF by a subclass of
llama-cpp-python's port of llama.cpp's JSON-schema converter. The subclass keeps the port's rule
naming, ``_add_rule`` and output, and replaces what the port gets wrong or leaves out:

- integer ``minimum``/``maximum``/``exclusive*`` (llama.cpp's ``build_min_max_int``, ported);
  integer-valued bounds on ``number`` too (exact, over a plain decimal form);
- string escapes: a grammar ``char`` is one JSON string character (no raw control characters, no
  surrogate escapes), so ``minLength``/``maxLength`` count what a JSON parser counts;
- literals (``const``/``enum``, property names) with backslashes; enum values filtered by the
  keywords beside them; ``type`` lists keep their sibling keywords;
- ``pattern``: our own translation of an ECMA-262/Python-``re`` common subset that never emits a raw
  ``"`` or ``\\`` inside the JSON string (the port copies ``.`` and classes verbatim);
- ``additionalProperties`` schemas: a comma between properties, and extra keys that cannot repeat a
  declared property (llama.cpp's ``_not_strings``);
- repetition counts above llama.cpp's 2000 limit (which it would silently make unbounded);
- ``oneOf`` only when its alternatives provably exclude each other; ``allOf`` by merging.

``llama_cpp`` is imported lazily (only ``grammar_for``/``tool_call_grammar`` need it), so importing
this module loads no native library.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from .errors import InvalidRequestError, OutputParseError, UnsupportedSchemaError

__all__ = ["SUPPORTED_FORMATS", "check_supported", "convert", "function_schema", "grammar_for",
           "schema_of", "tool_call_grammar", "validate"]

SUPPORTED_FORMATS = ("date", "time", "date-time", "uuid")

# Keywords that only describe (or that validators ignore without their siblings).
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "$defs", "definitions", "$anchor", "contentEncoding",
    "contentMediaType", "contentSchema", "$vocabulary"})
# JSON Schema keywords the grammar cannot express, in the order they are reported.
_UNSUPPORTED = ("not", "if", "then", "else", "patternProperties", "dependentRequired",
                "dependentSchemas", "dependencies", "multipleOf", "contains", "minContains",
                "maxContains", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
                "$dynamicRef", "$recursiveRef")
_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties", "minProperties",
                              "maxProperties"})
_ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "minItems", "maxItems", "uniqueItems",
                             "additionalItems"})
_STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
_NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_JSON_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
# llama.cpp's grammar parser turns a repetition bound above this into "unbounded".
_MAX_REPEAT = 2000
# Digits of an unconstrained integer / integer part (llama.cpp's "integral-part").
_MAX_DIGITS = 16
# Bounded numbers: whole numbers below 10**15, decimals below 10**9 with at most 6 places, so at
# most 15 significant digits: a float parse never rounds such a decimal across an integer bound.
_BOUNDED_NUMBER_WHOLE_DIGITS = 15
_BOUNDED_NUMBER_INT_DIGITS = 9
_BOUNDED_NUMBER_DECIMALS = 6


# ----------------------------------------------------------------------------------------------
# Errors and JSON pointers
# ----------------------------------------------------------------------------------------------

def _child(pointer: str, *tokens: str | int) -> str:
    """The RFC 6901 pointer of a child node."""
    for token in tokens:
        pointer += "/" + str(token).replace("~", "~0").replace("/", "~1")
    return pointer


def _pointer_of(path: Iterable[str | int]) -> str:
    return _child("", *path)


def _invalid(pointer: str, reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"invalid JSON schema at {pointer or '/'}: {reason}")


def _unsupported(feature: str, pointer: str, detail: str = "") -> UnsupportedSchemaError:
    error = UnsupportedSchemaError(feature, pointer, detail)
    error.detail = detail  # type: ignore[attr-defined]  # kept for re-raising with context
    return error


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Validity (metaschema) and validation
# ----------------------------------------------------------------------------------------------

def _check_valid(schema: Any) -> None:
    """A schema that is not a mapping, not JSON, or not valid by its metaschema is the caller's
    error, raised with the pointer at fault (jsonschema also checks ``pattern`` regexes)."""
    import jsonschema
    from jsonschema.validators import validator_for

    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"a JSON schema must be a mapping (dict), got "
                                  f"{type(schema).__name__}")
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"a JSON schema must be plain JSON data: {_short(str(exc))}") \
            from exc
    validator = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise _invalid(_pointer_of(exc.path), _short(exc.message)) from exc


@functools.cache
def _format_checker() -> Any:
    """jsonschema's format checker with our own RFC 3339 date/time and uuid checks, so validation
    does not depend on optional packages (jsonschema skips time/date-time without them)."""
    import jsonschema

    checker = jsonschema.FormatChecker()
    checker.checks("date")(_is_date)
    checker.checks("time")(_is_time)
    checker.checks("date-time")(_is_date_time)
    checker.checks("uuid")(_is_uuid)
    return checker


_DATE_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})", re.ASCII)
_TIME_RE = re.compile(r"(\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-](\d{2}):(\d{2}))", re.ASCII)
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                      r"[0-9a-fA-F]{12}")


def _is_date(value: object) -> bool:
    import datetime

    if not isinstance(value, str):
        return True
    match = _DATE_RE.fullmatch(value)
    if not match:
        return False
    try:
        datetime.date(*(int(part) for part in match.groups()))
    except ValueError:
        return False
    return True


def _is_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    match = _TIME_RE.fullmatch(value)
    if not match:
        return False
    hour, minute, second = (int(match.group(i)) for i in (1, 2, 3))
    if hour > 23 or minute > 59 or second > 60:
        return False
    if match.group(6) is not None:
        return int(match.group(6)) <= 23 and int(match.group(7)) <= 59
    return True


def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return len(value) > 11 and value[10] in "Tt" and _is_date(value[:10]) and _is_time(value[11:])


def _is_uuid(value: object) -> bool:
    return not isinstance(value, str) or bool(_UUID_RE.fullmatch(value))


def validate(value: Any, schema: Mapping[str, Any], *, what: str) -> None:
    """Raise ``OutputParseError`` unless ``value`` matches ``schema``: names ``what``, the JSON
    pointer of the failing part and jsonschema's reason, never the value itself (it may be private
    text). Formats date, time, date-time and uuid are checked."""
    import jsonschema
    import referencing.exceptions
    from jsonschema.validators import validator_for

    try:
        cls = validator_for(schema, default=jsonschema.Draft202012Validator)
        error = jsonschema.exceptions.best_match(
            cls(schema, format_checker=_format_checker()).iter_errors(value))
    except (jsonschema.SchemaError, referencing.exceptions.Unresolvable) as exc:
        raise InvalidRequestError(f"the JSON schema for {what} is not usable: "
                                  f"{_short(str(exc).splitlines()[0])}") from exc
    if error is None:
        return
    where = _pointer_of(error.absolute_path) or "/"
    reason = error.message.replace(repr(error.instance), "the value")
    raise OutputParseError(f"{what} does not match its JSON schema at {where}: "
                           f"{_short(reason, 160)} (keyword {error.validator!r})")


# ----------------------------------------------------------------------------------------------
# The checked form of a schema: what the grammar will express
# ----------------------------------------------------------------------------------------------

class _Node:
    """A schema node the grammar can express."""


@dataclass(frozen=True)
class _Never(_Node):
    """The ``false`` schema: no value. Only its parent can drop it."""


@dataclass(frozen=True)
class _AnyValue(_Node):
    pass


@dataclass(frozen=True)
class _AnyObject(_Node):
    pass


@dataclass(frozen=True)
class _Null(_Node):
    pass


@dataclass(frozen=True)
class _Boolean(_Node):
    pass


@dataclass(frozen=True)
class _Integer(_Node):
    low: int | None = None  # inclusive
    high: int | None = None  # inclusive


@dataclass(frozen=True)
class _Bound:
    value: int
    exclusive: bool


@dataclass(frozen=True)
class _Number(_Node):
    low: _Bound | None = None
    high: _Bound | None = None


@dataclass(frozen=True)
class _String(_Node):
    min_length: int = 0
    max_length: int | None = None


@dataclass(frozen=True)
class _Format(_Node):
    name: str


@dataclass(frozen=True)
class _Pattern(_Node):
    regex: _Re


@dataclass(frozen=True)
class _Literals(_Node):
    values: tuple[Any, ...]


@dataclass(frozen=True)
class _Union(_Node):
    options: tuple[_Node, ...]


@dataclass(frozen=True)
class _Ref(_Node):
    key: tuple[int, str]  # (document, JSON pointer of the target)


@dataclass(frozen=True)
class _Array(_Node):
    item: _Node
    min_items: int = 0
    max_items: int | None = None


@dataclass(frozen=True)
class _Tuple(_Node):
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Property:
    name: str
    node: _Node
    required: bool


@dataclass(frozen=True)
class _Object(_Node):
    properties: tuple[_Property, ...]
    additional: _Node | None  # None: no keys beyond ``properties``


@dataclass
class _Document:
    """One schema read into checked form; ``refs`` holds the targets of its ``$ref`` s."""

    root: _Node
    refs: dict[tuple[int, str], _Node]


def _json_type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    return "object"


def _json_equal(a: Any, b: Any) -> bool:
    """JSON Schema equality: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _types_overlap(a: frozenset[str], b: frozenset[str]) -> bool:
    def widen(types_: frozenset[str]) -> set[str]:
        return set(types_) | ({"number", "integer"} if types_ & {"number", "integer"} else set())
    return bool(widen(a) & widen(b))


class _Reader:
    """Reads one schema document into checked form; raises on anything the grammar cannot
    express (``UnsupportedSchemaError``) or that no value can satisfy (``InvalidRequestError``)."""

    def __init__(self, root: Mapping[str, Any], doc: int = 0) -> None:
        import jsonschema
        from jsonschema.validators import validator_for

        self.root = root
        self.doc = doc
        self.refs: dict[tuple[int, str], _Node] = {}
        cls = validator_for(root, default=jsonschema.Draft202012Validator)
        self._validator = cls(root, format_checker=_format_checker())

    def read(self) -> _Document:
        root = self.node(self.root, "")
        if isinstance(root, _Never):
            raise _invalid("", "no value can match this schema")
        document = _Document(root, self.refs)
        _check_left_recursion(document)
        return document

    # -- dispatch --------------------------------------------------------------------------------

    def node(self, schema: Any, pointer: str) -> _Node:
        if schema is True:
            return _AnyValue()
        if schema is False:
            return _Never()
        if not isinstance(schema, Mapping):
            raise _invalid(pointer, f"a schema must be an object or a boolean, got "
                                    f"{type(schema).__name__}")
        self._screen_keywords(schema, pointer)
        if "$ref" in schema:
            return self._ref(schema, pointer)
        if "allOf" in schema:
            return self._all_of(schema, pointer)
        if "anyOf" in schema or "oneOf" in schema:
            return self._union(schema, pointer)
        if "const" in schema or "enum" in schema:
            return self._literals(schema, pointer)
        return self._typed(schema, pointer)

    def _screen_keywords(self, schema: Mapping[str, Any], pointer: str) -> None:
        for keyword in _UNSUPPORTED:
            if keyword in schema:
                raise _unsupported(keyword, pointer)
        if schema.get("uniqueItems") is True:
            raise _unsupported("uniqueItems", pointer,
                               " (the grammar cannot compare array items)")
        if "$id" in schema and pointer:
            raise _unsupported("$id", pointer, " (a nested $id changes how $ref "
                                               "resolves; keep $id at the root)")
        fmt = schema.get("format")
        if fmt is not None and fmt not in SUPPORTED_FORMATS:
            raise _unsupported("format", pointer, f" ({fmt!r}; supported: "
                                                  f"{', '.join(SUPPORTED_FORMATS)})")
        if "$schema" in schema and "draft-03" in str(schema["$schema"]):
            raise _unsupported("$schema", pointer, " (draft 3)")

    # -- references ------------------------------------------------------------------------------

    def _ref(self, schema: Mapping[str, Any], pointer: str) -> _Node:
        beside = sorted(k for k in schema if k != "$ref" and _is_assertion(k))
        if beside:
            raise _unsupported(beside[0], pointer, " beside $ref (move it into the "
                                                   "referenced schema)")
        ref = schema["$ref"]
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _unsupported("$ref", pointer, f" ({_short(str(ref), 80)!r}: only "
                                                "local refs like '#/$defs/Name')")
        target_pointer = "" if ref == "#" else "/" + unquote(ref[2:])
        key = (self.doc, target_pointer)
        if key not in self.refs:
            target = self._resolve(target_pointer, ref, pointer)
            self.refs[key] = _Never()  # placeholder while reading (recursive schemas)
            node = self.node(target, target_pointer)
            if isinstance(node, _Never):
                raise _invalid(pointer, f"$ref {ref!r} points at a schema no value matches")
            self.refs[key] = node
        return _Ref(key)

    def _resolve(self, target_pointer: str, ref: str, pointer: str) -> Any:
        node: Any = self.root
        if not target_pointer:
            return node
        for token in target_pointer[1:].split("/"):
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise _invalid(pointer, f"$ref {ref!r} points at nothing in this schema")
        return node

    def _deref(self, schema: Any, seen: frozenset[str] = frozenset()) -> Any:
        """The schema itself, or what its (chain of) ``$ref`` points at."""
        while isinstance(schema, Mapping) and isinstance(schema.get("$ref"), str):
            ref = schema["$ref"]
            if ref in seen or not (ref == "#" or ref.startswith("#/")):
                return True
            seen = seen | {ref}
            target = "" if ref == "#" else "/" + unquote(ref[2:])
            schema = self._resolve(target, ref, "")
        return schema

    # -- combinators -----------------------------------------------------------------------------

    def _all_of(self, schema: Mapping[str, Any], pointer: str) -> _Node:
        parts = schema["allOf"]
        siblings = {k: v for k, v in schema.items() if k != "allOf"}
        for i, part in enumerate(parts):
            self.node(part, _child(pointer, "allOf", i))  # report faults where they are
        if any(isinstance(p, Mapping) and "$ref" in p for p in parts):
            if len(parts) == 1 and not any(_is_assertion(k) for k in siblings):
                return self.node(parts[0], _child(pointer, "allOf", 0))
            raise _unsupported("allOf", pointer, " (a $ref inside allOf can only "
                                                 "stand alone)")
        if any(p is False for p in parts):
            raise _invalid(pointer, "allOf contains false: no value can match")
        merged = _merge_schemas([siblings, *(p for p in parts if p is not True)], pointer,
                                "allOf")
        return self.node(merged, pointer)

    def _union(self, schema: Mapping[str, Any], pointer: str) -> _Node:
        if "anyOf" in schema and "oneOf" in schema:
            raise _unsupported("oneOf", pointer, " together with anyOf")
        keyword = "oneOf" if "oneOf" in schema else "anyOf"
        siblings = {k: v for k, v in schema.items() if k != keyword and _is_assertion(k)}
        alternatives: list[Any] = list(schema[keyword])
        if siblings:
            for i, alternative in enumerate(alternatives):
                if isinstance(alternative, Mapping) and "$ref" in alternative:
                    raise _unsupported(
                        sorted(siblings)[0], pointer,
                        f" beside {keyword} whose alternative {i} is a $ref (move it into the "
                        "alternatives)")
            alternatives = [alternative if alternative is False else _merge_schemas(
                [siblings, {} if alternative is True else alternative], pointer, keyword)
                for alternative in alternatives]
        if keyword == "oneOf":
            self._check_exclusive(alternatives, pointer)
        options = []
        for i, alternative in enumerate(alternatives):
            option = self.node(alternative, _child(pointer, keyword, i))
            if not isinstance(option, _Never):
                options.append(option)
        if not options:
            raise _invalid(pointer, f"every alternative of {keyword} is false")
        return options[0] if len(options) == 1 else _Union(tuple(options))

    def _check_exclusive(self, alternatives: list[Any], pointer: str) -> None:
        """``oneOf`` is decoded as ``anyOf``: only right when no value can match two of them."""
        for i in range(len(alternatives)):
            for j in range(i + 1, len(alternatives)):
                if not self._exclusive(alternatives[i], alternatives[j]):
                    raise _unsupported(
                        "oneOf", pointer, f" (alternatives {i} and {j} may both match one "
                        "value; use anyOf, or tell them apart by type or by a required "
                        "property with different const values)")

    def _exclusive(self, a: Any, b: Any) -> bool:
        a, b = self._deref(a), self._deref(b)
        if a is False or b is False:
            return True
        if a is True or b is True:
            return False
        if not _types_overlap(self._schema_types(a), self._schema_types(b)):
            return True
        values_a, values_b = _literal_values(a), _literal_values(b)
        if values_a is not None and values_b is not None:
            return not any(_json_equal(x, y) for x in values_a for y in values_b)
        if self._schema_types(a) == self._schema_types(b) == frozenset({"object"}):
            return self._discriminated(a, b)
        return False

    def _discriminated(self, a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        shared = set(a.get("required", ())) & set(b.get("required", ()))
        for name in shared:
            values_a = _literal_values(self._deref(a.get("properties", {}).get(name, True)))
            values_b = _literal_values(self._deref(b.get("properties", {}).get(name, True)))
            if values_a is not None and values_b is not None and not any(
                    _json_equal(x, y) for x in values_a for y in values_b):
                return True
        return False

    def _schema_types(self, schema: Any, visiting: frozenset[int] = frozenset()) -> frozenset[str]:
        """The JSON types a schema admits (by ``type``, ``const``, ``enum``, ``anyOf``)."""
        schema = self._deref(schema)
        if schema is True or id(schema) in visiting:  # a recursive anyOf: assume anything
            return frozenset(_JSON_TYPES)
        if schema is False:
            return frozenset()
        types_ = set(_JSON_TYPES)
        if "type" in schema:
            declared = schema["type"]
            types_ = {declared} if isinstance(declared, str) else set(declared)
            if "number" in types_:
                types_.add("integer")
        values = _literal_values(schema)
        if values is not None:
            literal_types = {_json_type_of(v) for v in values}
            if "integer" in literal_types:
                literal_types.add("number")  # 1 is also a number
            types_ &= literal_types
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                union: set[str] = set()
                for alternative in schema[keyword]:
                    union |= self._schema_types(alternative, visiting | {id(schema)})
                types_ &= union
        return frozenset(types_)

    # -- literals --------------------------------------------------------------------------------

    def _literals(self, schema: Mapping[str, Any], pointer: str) -> _Node:
        if "const" in schema:
            values = [schema["const"]]
            keyword = "const"
        else:
            values = list(schema["enum"])
            keyword = "enum"
            if not values:
                raise _invalid(pointer, "enum is empty: no value can match")
        rest = {k: v for k, v in schema.items() if k != keyword}
        if any(_is_assertion(k) for k in rest):
            checker = self._validator.evolve(schema=rest)
            values = [v for v in values if checker.is_valid(v)]
            if not values:
                raise _invalid(pointer, f"no value of {keyword} satisfies the keywords beside it")
        unique: list[Any] = []
        for value in values:
            if not any(_json_equal(value, seen) for seen in unique):
                unique.append(value)
        return _Literals(tuple(unique))

    # -- one type at a time ----------------------------------------------------------------------

    def _typed(self, schema: Mapping[str, Any], pointer: str) -> _Node:
        declared = schema.get("type")
        if declared is None:
            families = _keyword_families(schema)
            if not families:
                return _AnyValue()
            type_names = families
        elif isinstance(declared, str):
            type_names = [declared]
        else:
            type_names = list(declared)
        options = [self._one_type(schema, name, pointer) for name in type_names]
        options = [o for o in options if not isinstance(o, _Never)]
        if not options:
            return _Never()
        return options[0] if len(options) == 1 else _Union(tuple(options))

    def _one_type(self, schema: Mapping[str, Any], type_name: str, pointer: str) -> _Node:
        if type_name == "null":
            return _Null()
        if type_name == "boolean":
            return _Boolean()
        if type_name == "integer":
            return self._integer(schema, pointer)
        if type_name == "number":
            return self._number(schema, pointer)
        if type_name == "string":
            return self._string(schema, pointer)
        if type_name == "array":
            return self._array(schema, pointer)
        return self._object(schema, pointer)

    def _integer(self, schema: Mapping[str, Any], pointer: str) -> _Node:
        low, high = _bounds(schema, pointer)
        low_int = None if low is None else (
            math.floor(low.value) + 1 if low.exclusive else math.ceil(low.value))
        high_int = None if high is None else (
            math.ceil(high.value) - 1 if high.exclusive else math.floor(high.value))
        if low_int is not None and high_int is not None and low_int > high_int:
            raise _invalid(pointer, "no integer lies within minimum/maximum")
        limit = 10 ** _MAX_DIGITS - 1
        if (low_int is not None and low_int > limit) or (high_int is not None
                                                          and high_int < -limit):
            keyword = "minimum" if low_int is not None and low_int > limit else "maximum"
            raise _unsupported(keyword, pointer, f" (integers are decoded with at most "
                                                 f"{_MAX_DIGITS} digits)")
        return _Integer(low_int, high_int)

    def _number(self, schema: Mapping[str, Any], pointer: str) -> _Node:
        low, high = _bounds(schema, pointer)
        for bound, keywords in ((low, ("exclusiveMinimum", "minimum")),
                                (high, ("exclusiveMaximum", "maximum"))):
            if bound is not None and not float(bound.value).is_integer():
                keyword = next(k for k in keywords if k in schema)
                raise _unsupported(keyword, pointer, " (a fractional bound on a "
                                                     "number; use an integer bound)")
        low = None if low is None else _Bound(int(low.value), low.exclusive)
        high = None if high is None else _Bound(int(high.value), high.exclusive)
        if low is not None and high is not None and (
                low.value > high.value
                or (low.value == high.value and (low.exclusive or high.exclusive))):
            raise _invalid(pointer, "no number lies within minimum/maximum")
        limit = 10 ** _BOUNDED_NUMBER_WHOLE_DIGITS
        if (low is not None and low.value >= limit) or (high is not None and high.value <= -limit):
            raise _unsupported("minimum" if low is not None and low.value >= limit
                               else "maximum", pointer,
                               " (bounded numbers are decoded below 1e15 in magnitude)")
        if not _number_range(low, high):
            raise _unsupported("minimum" if low is not None else "maximum", pointer,
                               " (no number the grammar can write lies within the bounds)")
        return _Number(low, high)

    def _string(self, schema: Mapping[str, Any], pointer: str) -> _Node:
        min_length, max_length = schema.get("minLength", 0), schema.get("maxLength")
        if max_length is not None and min_length > max_length:
            raise _invalid(pointer, "minLength is greater than maxLength")
        has_lengths = "minLength" in schema or "maxLength" in schema
        if "pattern" in schema:
            for keyword in ("format", "minLength", "maxLength"):
                if keyword in schema:
                    raise _unsupported(keyword, pointer, " together with pattern")
            return _Pattern(_parse_regex(schema["pattern"], _child(pointer, "pattern")))
        if "format" in schema:
            if has_lengths:
                raise _unsupported("minLength" if "minLength" in schema
                                   else "maxLength", pointer, " together with format")
            return _Format(schema["format"])
        return _String(min_length, max_length)

    def _array(self, schema: Mapping[str, Any], pointer: str) -> _Node:
        min_items, max_items = schema.get("minItems", 0), schema.get("maxItems")
        if max_items is not None and min_items > max_items:
            raise _invalid(pointer, "minItems is greater than maxItems")
        items = schema.get("items", True)
        prefix_keyword = "prefixItems" if "prefixItems" in schema else (
            "items" if isinstance(items, list) else None)
        if prefix_keyword is not None:
            prefix = schema[prefix_keyword]
            if not (min_items <= len(prefix) and (max_items is None or len(prefix) <= max_items)):
                raise _unsupported(prefix_keyword, pointer,
                                   " with minItems/maxItems that exclude its length "
                                   "(the grammar writes every listed item)")
            nodes = [self.node(s, _child(pointer, prefix_keyword, i))
                     for i, s in enumerate(prefix)]
            if any(isinstance(n, _Never) for n in nodes):
                raise _unsupported(prefix_keyword, pointer, " with a false item")
            return _Tuple(tuple(nodes))
        item = self.node(items, _child(pointer, "items"))
        if isinstance(item, _Never):
            if min_items > 0:
                raise _invalid(pointer, "items is false but minItems asks for items")
            return _Tuple(())
        if isinstance(item, _AnyValue) and min_items == 0 and max_items is None:
            return _Array(_AnyValue())
        return _Array(item, min_items, max_items)

    def _object(self, schema: Mapping[str, Any], pointer: str) -> _Node:
        declared = schema.get("properties", {})
        required = list(dict.fromkeys(schema.get("required", [])))
        extra = schema.get("additionalProperties", True)
        if not declared and not required and extra is True:
            self._check_property_counts(schema, 0, 0, True, pointer)
            return _AnyObject()
        properties: list[_Property] = []
        for name, sub in declared.items():
            node = self.node(sub, _child(pointer, "properties", name))
            if isinstance(node, _Never):
                if name in required:
                    raise _invalid(_child(pointer, "properties", name),
                                   "a required property whose schema is false")
                continue
            properties.append(_Property(name, node, name in required))
        for name in required:
            if name not in declared:
                if extra is False:
                    raise _invalid(pointer, f"required property {name!r} is not allowed by "
                                            "additionalProperties: false")
                node = self.node(extra, _child(pointer, "additionalProperties"))
                if isinstance(node, _Never):  # pragma: no cover - extra is False, handled above
                    raise _invalid(pointer, f"required property {name!r} cannot have a value")
                properties.append(_Property(name, node, True))
        additional = None
        if isinstance(extra, Mapping):
            node = self.node(extra, _child(pointer, "additionalProperties"))
            additional = None if isinstance(node, _Never) else node
        n_required = sum(p.required for p in properties)
        self._check_property_counts(schema, n_required, len(properties), additional is not None,
                                    pointer)
        return _Object(tuple(properties), additional)

    @staticmethod
    def _check_property_counts(schema: Mapping[str, Any], n_required: int, n_possible: int,
                               open_ended: bool, pointer: str) -> None:
        """min/maxProperties only when every value the grammar allows already satisfies them."""
        if "minProperties" in schema and schema["minProperties"] > n_required:
            raise _unsupported("minProperties", pointer, " (more than the required "
                                                         "properties)")
        if "maxProperties" in schema and (open_ended or n_possible > schema["maxProperties"]):
            raise _unsupported("maxProperties", pointer, " (fewer than the properties "
                                                         "that may appear)")


def _is_assertion(keyword: str) -> bool:
    """Keywords that constrain values (anything else is an annotation or unknown, so ignored)."""
    return keyword not in _ANNOTATIONS and keyword in _KNOWN_KEYWORDS


_KNOWN_KEYWORDS = frozenset({
    "$ref", "allOf", "anyOf", "oneOf", "const", "enum", "type", "additionalItems",
    *_UNSUPPORTED, *_OBJECT_KEYWORDS, *_ARRAY_KEYWORDS, *_STRING_KEYWORDS, *_NUMBER_KEYWORDS})


def _keyword_families(schema: Mapping[str, Any]) -> list[str]:
    """Without ``type``, the types its keywords constrain (other types would pass unchecked; the
    grammar keeps to the constrained ones)."""
    families = []
    for name, keywords in (("object", _OBJECT_KEYWORDS), ("array", _ARRAY_KEYWORDS),
                           ("string", _STRING_KEYWORDS), ("number", _NUMBER_KEYWORDS)):
        if any(k in schema for k in keywords):
            families.append(name)
    return families


def _literal_values(schema: Any) -> list[Any] | None:
    if not isinstance(schema, Mapping):
        return None
    if "const" in schema:
        return [schema["const"]]
    if "enum" in schema:
        return list(schema["enum"])
    return None


def _bounds(schema: Mapping[str, Any], pointer: str) -> tuple[_Bound | None, _Bound | None]:
    """The tightest lower and upper bound (draft 4's boolean exclusive* included)."""
    lows, highs = [], []
    if "minimum" in schema:
        lows.append(_Bound(schema["minimum"], schema.get("exclusiveMinimum") is True))
    if "maximum" in schema:
        highs.append(_Bound(schema["maximum"], schema.get("exclusiveMaximum") is True))
    if not isinstance(schema.get("exclusiveMinimum", True), bool):
        lows.append(_Bound(schema["exclusiveMinimum"], True))
    if not isinstance(schema.get("exclusiveMaximum", True), bool):
        highs.append(_Bound(schema["exclusiveMaximum"], True))
    for bound in (*lows, *highs):
        if not math.isfinite(bound.value):
            raise _invalid(pointer, "a bound is not a finite number")
    low = max(lows, key=lambda b: (b.value, b.exclusive), default=None)
    high = min(highs, key=lambda b: (b.value, not b.exclusive), default=None)
    if low is not None and high is not None and low.value > high.value:
        raise _invalid(pointer, "minimum is greater than maximum")
    return low, high


_COUPLED = ({"properties", "additionalProperties", "required"},
            {"items", "prefixItems", "additionalItems", "minItems", "maxItems"})


def _merge_schemas(parts: list[Mapping[str, Any]], pointer: str, feature: str) -> dict[str, Any]:
    """One schema meaning "all of these": keywords side by side when they do not interact."""
    merged: dict[str, Any] = {}
    owners: dict[str, int] = {}
    for index, part in enumerate(parts):
        for key, value in part.items():
            if key not in merged:
                merged[key], owners[key] = value, index
            elif key in _ANNOTATIONS or _json_equal(merged[key], value):
                continue
            elif key == "required":
                merged[key] = list(dict.fromkeys([*merged[key], *value]))
            elif key == "type":
                merged[key] = _intersect_types(merged[key], value, pointer)
            else:
                raise _unsupported(feature, pointer, f" ({key!r} appears in more "
                                                     "than one part)")
    for group in _COUPLED:
        keys_with_owner = {owners[k] for k in group & merged.keys() if k != "required"}
        if len(keys_with_owner) > 1:
            raise _unsupported(feature, pointer, " (parts constrain the same object "
                                                 "or array differently)")
    return merged


def _intersect_types(a: str | list[str], b: str | list[str], pointer: str) -> list[str]:
    set_a = {a} if isinstance(a, str) else set(a)
    set_b = {b} if isinstance(b, str) else set(b)
    common = set_a & set_b
    if ("integer" in set_a and "number" in set_b) or ("number" in set_a and "integer" in set_b):
        common.add("integer")
    if not common:
        raise _invalid(pointer, "the combined schemas share no type")
    return [t for t in _JSON_TYPES if t in common]


def _check_left_recursion(document: _Document) -> None:
    """A ``$ref`` that reaches itself before any bracket or quote would loop llama.cpp's grammar
    (it rejects left recursion)."""
    def first_refs(node: _Node) -> set[tuple[int, str]]:
        if isinstance(node, _Ref):
            return {node.key}
        if isinstance(node, _Union):
            return set().union(*(first_refs(o) for o in node.options))
        return set()

    for start in document.refs:
        seen, todo = set(), [start]
        while todo:
            for key in first_refs(document.refs[todo.pop()]):
                if key == start:
                    raise _unsupported("$ref", start[1], " (reaches itself again before any "
                                               "object, array or string)")
                if key not in seen:
                    seen.add(key)
                    todo.append(key)


def _read(schema: Mapping[str, Any], doc: int = 0) -> _Document:
    _check_valid(schema)
    return _Reader(schema, doc).read()


def check_supported(schema: Mapping[str, Any]) -> None:
    """Raise unless constrained decoding can express ``schema`` exactly enough that what it
    allows always validates: ``UnsupportedSchemaError(feature, pointer)`` for a keyword the grammar
    cannot express, ``InvalidRequestError`` (naming the pointer) for an invalid schema."""
    _read(schema)


# ----------------------------------------------------------------------------------------------
# Regular expressions (``pattern``): the common subset of ECMA-262 and Python's ``re``
# ----------------------------------------------------------------------------------------------

_Ranges = tuple[tuple[int, int], ...]


def _ranges(*pairs: tuple[int, int]) -> _Ranges:
    ordered = sorted(pairs)
    merged: list[list[int]] = []
    for low, high in ordered:
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return tuple((low, high) for low, high in merged)


def _union_ranges(*sets: _Ranges) -> _Ranges:
    return _ranges(*(pair for s in sets for pair in s))


def _subtract(universe: _Ranges, removed: _Ranges) -> _Ranges:
    out: list[tuple[int, int]] = []
    for low, high in universe:
        start = low
        for r_low, r_high in removed:
            if r_high < start or r_low > high:
                continue
            if r_low > start:
                out.append((start, r_low - 1))
            start = max(start, r_high + 1)
            if start > high:
                break
        if start <= high:
            out.append((start, high))
    return tuple(out)


def _intersect(a: _Ranges, b: _Ranges) -> _Ranges:
    return _subtract(a, _subtract(a, b))


_EVERY = ((0, 0x10FFFF),)
_SCALARS = ((0, 0xD7FF), (0xE000, 0x10FFFF))  # code points a JSON string can hold
_BMP = ((0, 0xD7FF), (0xE000, 0xFFFF))
# Characters a JSON string may hold unescaped.
_RAW_JSON = _subtract(_SCALARS, ((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)))
_ECMA_SPACE = _ranges((9, 13), (32, 32), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                      (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
                      (0xFEFF, 0xFEFF))
_ECMA_SHORTHANDS = {"d": _ranges((48, 57)),
                    "w": _ranges((48, 57), (65, 90), (95, 95), (97, 122)),
                    "s": _ECMA_SPACE}


@functools.cache
def _every_scalar() -> str:
    """Every Unicode scalar value, in order, as one string (UTF-32 decoding is fast)."""
    import array

    code_points = array.array("I", range(0xD800))
    code_points.extend(range(0xE000, 0x110000))
    if sys.byteorder != "little":  # pragma: no cover
        code_points.byteswap()
    return code_points.tobytes().decode("utf-32-le")


@functools.cache
def _python_shorthand(letter: str) -> _Ranges:
    """The code points Python's ``re`` matches with ``\\d``, ``\\w`` or ``\\s`` (Unicode)."""
    text = _every_scalar()
    pairs = []
    for match in re.finditer(f"\\{letter}+", text):
        low, high = ord(match.group()[0]), ord(match.group()[-1])
        pairs.append((low, high))
    return _ranges(*pairs)


@dataclass(frozen=True)
class _CharSet:
    """A character set as both engines see it: ``sure`` matches under ECMA-262 and Python alike
    (what the grammar may emit), ``maybe`` under either (what a negation must leave out)."""

    sure: _Ranges
    maybe: _Ranges

    def negated(self) -> _CharSet:
        # ECMA-262 without the u flag matches one UTF-16 unit: keep negations inside the BMP.
        return _CharSet(_subtract(_BMP, self.maybe), _subtract(_EVERY, self.sure))

    @staticmethod
    def union(sets: Sequence[_CharSet]) -> _CharSet:
        return _CharSet(_union_ranges(*(s.sure for s in sets)),
                        _union_ranges(*(s.maybe for s in sets)))

    @staticmethod
    def of(code_point: int) -> _CharSet:
        return _CharSet(((code_point, code_point),), ((code_point, code_point),))


def _shorthand(letter: str) -> _CharSet:
    lower = letter.lower()
    ecma, python = _ECMA_SHORTHANDS[lower], _python_shorthand(lower)
    positive = _CharSet(_intersect(ecma, python), _union_ranges(ecma, python))
    return positive.negated() if letter.isupper() else positive


_DOT = _CharSet(_subtract(_BMP, _ranges((10, 10), (13, 13), (0x2028, 0x2029))), _EVERY)


class _Re:
    """A parsed pattern node."""


@dataclass(frozen=True)
class _ReChars(_Re):
    ranges: _Ranges


@dataclass(frozen=True)
class _ReSeq(_Re):
    items: tuple[_Re, ...]


@dataclass(frozen=True)
class _ReAlt(_Re):
    options: tuple[_Re, ...]


@dataclass(frozen=True)
class _ReRepeat(_Re):
    item: _Re
    min: int
    max: int | None


@dataclass(frozen=True)
class _ReAnyText(_Re):
    """Any string: what an unanchored pattern allows before or after its match."""


_SIMPLE_ESCAPES = {"t": 9, "n": 10, "v": 11, "f": 12, "r": 13}


class _RegexParser:
    """ECMA-262 patterns in the subset where Python's ``re`` (what jsonschema runs) agrees:
    literals, ``.``, classes, ``\\d\\w\\s`` and negations, groups, ``|``, ``* + ? {n,m}``,
    and ``^``/``$`` at the ends of top-level alternatives. Anything else is refused."""

    def __init__(self, pattern: str, pointer: str) -> None:
        self.pattern = pattern
        self.pointer = pointer
        self.i = 0

    def unsupported(self, what: str) -> UnsupportedSchemaError:
        return _unsupported("pattern", self.pointer,
                            f" ({what} at position {self.i} of {_short(self.pattern, 60)!r})")

    def peek(self, offset: int = 0) -> str:
        index = self.i + offset
        return self.pattern[index] if index < len(self.pattern) else ""

    def parse(self) -> _Re:
        if any(ord(c) > 0xFFFF or 0xD800 <= ord(c) <= 0xDFFF for c in self.pattern):
            raise self.unsupported("a character outside the BMP or a lone surrogate")
        options = []
        while True:
            options.append(self.top_branch())
            if self.peek() == "|":
                self.i += 1
                continue
            if self.i < len(self.pattern):
                raise self.unsupported(f"unbalanced {self.peek()!r}")
            break
        return options[0] if len(options) == 1 else _ReAlt(tuple(options))

    def top_branch(self) -> _Re:
        anchored_start = self.peek() == "^"
        if anchored_start:
            self.i += 1
        body = self.sequence(depth=0)
        anchored_end = self.peek() == "$"
        if anchored_end:
            self.i += 1
            if self.peek() not in ("", "|"):
                raise self.unsupported("'$' inside the pattern")
        items = ([] if anchored_start else [_ReAnyText()]) + [body] + (
            [] if anchored_end else [_ReAnyText()])
        return _ReSeq(tuple(items))

    def alternation(self, depth: int) -> _Re:
        options = [self.sequence(depth)]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence(depth))
        return options[0] if len(options) == 1 else _ReAlt(tuple(options))

    def sequence(self, depth: int) -> _Re:
        items: list[_Re] = []
        while self.i < len(self.pattern):
            c = self.peek()
            if c == "|" or c == ")":
                break
            if c == "$" and depth == 0:
                break
            if c == "^" or c == "$":
                raise self.unsupported(f"{c!r} inside the pattern")
            atom = self.atom(depth)
            items.append(self.quantified(atom))
        return items[0] if len(items) == 1 else _ReSeq(tuple(items))

    def atom(self, depth: int) -> _Re:
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.peek() == "?":
                if self.peek(1) != ":":
                    raise self.unsupported("a lookaround, named group or inline flag")
                self.i += 2
            inner = self.alternation(depth + 1)
            if self.peek() != ")":
                raise self.unsupported("an unclosed group")
            self.i += 1
            return inner
        if c == "[":
            chars = self.char_class().sure
            if not _intersect(chars, _SCALARS):
                raise self.unsupported("a character class that matches nothing")
            return _ReChars(chars)
        if c == ".":
            self.i += 1
            return _ReChars(_DOT.sure)
        if c == "\\":
            return _ReChars(self.escape(in_class=False).sure)
        if c in "*+?":
            raise self.unsupported("a quantifier with nothing to repeat")
        if c == "{":
            raise self.unsupported("a literal '{' (escape it as \\{)")
        self.i += 1
        return _ReChars(((ord(c), ord(c)),))

    def quantified(self, atom: _Re) -> _Re:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            low, high = self.braces()
        else:
            return atom
        if self.peek() == "?":  # lazy: the same language
            self.i += 1
        if self.peek() in ("*", "+", "?", "{"):
            raise self.unsupported("a quantifier after a quantifier (possessive or nested)")
        if high is None and _re_nullable(atom):
            raise self.unsupported("an unbounded repeat of a part that can match nothing")
        return _ReRepeat(atom, low, high)

    def braces(self) -> tuple[int, int | None]:
        match = re.compile(r"\{(\d+)(,(\d*))?\}").match(self.pattern, self.i)
        if not match:
            raise self.unsupported("a '{' that is not a {n}, {n,} or {n,m} quantifier")
        self.i = match.end()
        low = int(match.group(1))
        high = low if match.group(2) is None else (int(match.group(3)) if match.group(3)
                                                   else None)
        if high is not None and high < low:
            raise self.unsupported("a {n,m} quantifier with n > m")
        return low, high

    def char_class(self) -> _CharSet:
        self.i += 1  # [
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        if self.peek() == "]":
            raise self.unsupported("a class starting with ']' (ECMA and Python disagree)")
        members: list[_CharSet] = []
        while self.peek() != "]":
            if not self.peek():
                raise self.unsupported("an unclosed character class")
            start = self.class_atom()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                end = self.class_atom()
                if not (_is_single(start) and _is_single(end)):
                    raise self.unsupported("a range with a class escape at one end")
                low, high = start.sure[0][0], end.sure[0][0]
                if low > high:
                    raise self.unsupported("a range out of order")
                members.append(_CharSet(((low, high),), ((low, high),)))
            else:
                members.append(start)
        self.i += 1  # ]
        union = _CharSet.union(members)
        return union.negated() if negate else union

    def class_atom(self) -> _CharSet:
        c = self.peek()
        if c == "\\":
            return self.escape(in_class=True)
        if c == "[":
            raise self.unsupported("'[' inside a class (escape it as \\[)")
        self.i += 1
        return _CharSet.of(ord(c))

    def escape(self, *, in_class: bool) -> _CharSet:
        letter = self.peek(1)
        self.i += 2
        if letter in ("d", "w", "s", "D", "W", "S"):
            return _shorthand(letter)
        if letter in _SIMPLE_ESCAPES:
            return _CharSet.of(_SIMPLE_ESCAPES[letter])
        if letter == "b" and in_class:
            return _CharSet.of(8)
        if letter == "0" and not self.peek().isdigit():
            return _CharSet.of(0)
        if letter in ("x", "u"):
            digits = 2 if letter == "x" else 4
            text = self.pattern[self.i:self.i + digits]
            if len(text) != digits or not all(c in "0123456789abcdefABCDEF" for c in text):
                raise self.unsupported(f"a malformed \\{letter} escape")
            self.i += digits
            code_point = int(text, 16)
            if 0xD800 <= code_point <= 0xDFFF:
                raise self.unsupported("a surrogate escape")
            return _CharSet.of(code_point)
        if letter and not letter.isalnum() and ord(letter) < 128:
            return _CharSet.of(ord(letter))
        self.i -= 2
        raise self.unsupported(f"the escape \\{letter}")


def _re_nullable(node: _Re) -> bool:
    if isinstance(node, _ReChars):
        return False
    if isinstance(node, _ReSeq):
        return all(_re_nullable(item) for item in node.items)
    if isinstance(node, _ReAlt):
        return any(_re_nullable(option) for option in node.options)
    if isinstance(node, _ReRepeat):
        return node.min == 0 or _re_nullable(node.item)
    return True


def _is_single(charset: _CharSet) -> bool:
    return len(charset.sure) == 1 and charset.sure[0][0] == charset.sure[0][1] \
        and charset.sure == charset.maybe


def _parse_regex(pattern: str, pointer: str) -> _Re:
    return _RegexParser(pattern, pointer).parse()


# ----------------------------------------------------------------------------------------------
# GBNF text
# ----------------------------------------------------------------------------------------------

def _gbnf_literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    out = []
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _class_char(code_point: int) -> str:
    c = chr(code_point)
    if c.isascii() and c.isalnum():
        return c
    if code_point < 0x100:
        return f"\\x{code_point:02X}"
    if code_point < 0x10000:
        return f"\\u{code_point:04X}"
    return f"\\U{code_point:08X}"


def _gbnf_class(ranges: _Ranges) -> str:
    """A GBNF character class for a set of code points (negated when that is shorter)."""
    complement = _subtract(_EVERY, ranges)
    negate = len(complement) < len(ranges)
    body = "".join(_class_char(low) if low == high else f"{_class_char(low)}-{_class_char(high)}"
                   for low, high in (complement if negate else ranges))
    return ("[^" if negate else "[") + body + "]"


def _json_chars(ranges: _Ranges) -> str:
    """GBNF for one JSON string character whose decoded value is in ``ranges``: the raw
    character where JSON allows it, else its escape (as ``json.dumps`` writes it)."""
    alternatives = []
    raw = _intersect(ranges, _RAW_JSON)
    if raw:
        alternatives.append(_gbnf_class(raw))
    for low, high in _intersect(ranges, _ranges((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C))):
        for code_point in range(low, high + 1):
            alternatives.append(_gbnf_literal(json.dumps(chr(code_point))[1:-1]))
    assert alternatives, "empty classes are refused when the pattern is read"
    return alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"


_SPACE = "space"
_CHAR_RULE = (r'[^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} '
              r'| [dD] [0-7] [0-9a-fA-F]{2}))')
# name -> (rule, the rules it needs). Same names and spacing as llama.cpp's converter.
_PRIMITIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolean": ('("true" | "false") space', ()),
    "null": ('"null" space', ()),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", ()),
    "decimal-part": ("[0-9]{1,16}", ()),
    "number": ('("-"? integral-part) ("." decimal-part)? ([eE] [-+]? [0-9]{1,16})? space',
               ("integral-part", "decimal-part")),
    "integer": ('("-"? integral-part) space', ("integral-part",)),
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" space ( string ":" space value ("," space string ":" space value)* )? '
               '"}" space', ("string", "value")),
    "array": ('"[" space ( value ("," space value)* )? "]" space', ("value",)),
    "char": (_CHAR_RULE, ()),
    "string": (r'"\"" char* "\"" space', ("char",)),
    "keychar": (r'[^"\\\x00-\x1F]', ()),
    "uuid": (r'"\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} '
             r'"-" [0-9a-fA-F]{12} "\"" space', ()),
    "date-year": ('"000" [1-9] | "00" [1-9] [0-9] | "0" [1-9] [0-9]{2} | [1-9] [0-9]{3}', ()),
    "date-leap-year": ('[0-9]{2} ("0" [48] | [2468] [048] | [13579] [26]) '
                       '| ("0" [48] | [2468] [048] | [13579] [26]) "00"', ()),
    "date": ('date-year "-" ("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01]) '
             '| date-year "-" ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30") '
             '| date-year "-02-" ("0" [1-9] | "1" [0-9] | "2" [0-8]) '
             '| date-leap-year "-02-29"', ("date-year", "date-leap-year")),
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" ([0-5] [0-9] | "60") '
             '("." [0-9]{1,9})? ([Zz] | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])', ()),
    "date-time": ('date [Tt] time', ("date", "time")),
    "date-string": (r'"\"" date "\"" space', ("date",)),
    "time-string": (r'"\"" time "\"" space', ("time",)),
    "date-time-string": (r'"\"" date-time "\"" space', ("date-time",)),
}
_RESERVED = frozenset({"root", _SPACE, "tool-call", *_PRIMITIVES})
_FORMAT_RULES = {"date": "date-string", "time": "time-string", "date-time": "date-time-string",
                 "uuid": "uuid"}


def _build_min_max_int(min_value: int | None, max_value: int | None, out: list[str]) -> None:
    """GBNF for the decimal integers in [min_value, max_value] (``None``: unbounded on that side,
    then at most 16 digits, like the plain ``integer`` rule).

    Two-sided ranges are llama.cpp's ``build_min_max_int`` (common/json-schema-to-grammar.cpp),
    ported. Its one-sided branches are not: they recurse on ``stoll(min_s.substr(1))``, which
    drops leading zeros (``minimum: 1000`` accepts ``10``), and write a negative ``maximum`` with
    leading zeros allowed (``maximum: -5`` accepts ``-05``); ``_at_least`` keeps the width.
    """
    if min_value is not None and max_value is not None:
        _min_max_both(min_value, max_value, out)
    elif min_value is not None:
        if min_value < 0:
            out.append('"-" (')
            _min_max_both(0, -min_value, out)
            out.append(") | [0] | [1-9] " + _digits(0, _MAX_DIGITS - 1))
        elif min_value == 0:
            out.append("[0] | [1-9] " + _digits(0, _MAX_DIGITS - 1))
        else:
            out.append(_at_least(str(min_value), True, _MAX_DIGITS))
    elif max_value is not None:
        if max_value >= 0:
            out.append('"-" [1-9] ' + _digits(0, _MAX_DIGITS - 1) + " | ")
            _min_max_both(0, max_value, out)
        else:
            out.append('"-" (' + _at_least(str(-max_value), True, _MAX_DIGITS) + ")")
    else:
        raise ValueError("at least one of min_value or max_value must be set")


def _digits(low: int, high: int) -> str:
    """``low`` to ``high`` digits ("" for none)."""
    if high <= 0:
        return ""
    if low == high:
        return "[0-9]" if low == 1 else f"[0-9]{{{low}}}"
    return f"[0-9]{{{low},{high}}}"


def _digit_range(low: str, high: str) -> str:
    return "[" + (low if low == high else f"{low}-{high}") + "]"


def _at_least(minimum: str, top_level: bool, max_len: int) -> str:
    """Digit strings of ``len(minimum)`` to ``max_len`` digits that are longer than ``minimum`` or
    as long and not smaller; no leading zero at the top level (``minimum`` has none there)."""
    first, rest = minimum[0], minimum[1:]
    smallest = "1" if top_level else "0"
    alternatives = []
    if first > smallest and len(minimum) < max_len:
        alternatives.append(_digit_range(smallest, chr(ord(first) - 1)) + " "
                            + _digits(len(minimum), max_len - 1))
    if rest:
        alternatives.append(f"[{first}] (" + _at_least(rest, False, max_len - 1) + ")")
    else:
        alternatives.append(f"[{first}] " + _digits(0, max_len - 1))
    if first < "9":
        alternatives.append(_digit_range(chr(ord(first) + 1), "9") + " "
                            + _digits(len(minimum) - 1, max_len - 1))
    return " | ".join(a.strip() for a in alternatives)


def _min_max_both(min_value: int, max_value: int, out: list[str]) -> None:
    """llama.cpp's two-sided ``build_min_max_int``, ported line by line."""

    def digit_range(low: str, high: str) -> None:
        out.append(_digit_range(low, high))

    def more_digits(min_digits: int, max_digits: int) -> None:
        out.append("[0-9]")
        if min_digits == max_digits == 1:
            return
        out.append("{" + str(min_digits))
        if max_digits != min_digits:
            out.append("," + str(max_digits))
        out.append("}")

    def uniform_range(start: str, end: str) -> None:
        i = 0
        while i < len(start) and i < len(end) and start[i] == end[i]:
            i += 1
        if i > 0:
            out.append('"' + start[:i] + '"')
        if i < len(start) and i < len(end):
            if i > 0:
                out.append(" ")
            sub_len = len(start) - i - 1
            if sub_len > 0:
                from_sub, to_sub = start[i + 1:], end[i + 1:]
                sub_zeros, sub_nines = "0" * sub_len, "9" * sub_len
                to_reached = False
                out.append("(")
                if from_sub == sub_zeros:
                    digit_range(start[i], chr(ord(end[i]) - 1))
                    out.append(" ")
                    more_digits(sub_len, sub_len)
                else:
                    out.append(f"[{start[i]}] (")
                    uniform_range(from_sub, sub_nines)
                    out.append(")")
                    if ord(start[i]) < ord(end[i]) - 1:
                        out.append(" | ")
                        if to_sub == sub_nines:
                            digit_range(chr(ord(start[i]) + 1), end[i])
                            to_reached = True
                        else:
                            digit_range(chr(ord(start[i]) + 1), chr(ord(end[i]) - 1))
                        out.append(" ")
                        more_digits(sub_len, sub_len)
                if not to_reached:
                    out.append(" | ")
                    digit_range(end[i], end[i])
                    out.append(" ")
                    uniform_range(sub_zeros, to_sub)
                out.append(")")
            else:
                out.append(f"[{start[i]}-{end[i]}]")

    if min_value < 0 and max_value < 0:
        out.append('"-" (')
        _min_max_both(-max_value, -min_value, out)
        out.append(")")
        return
    if min_value < 0:
        out.append('"-" (')
        _min_max_both(0, -min_value, out)
        out.append(") | ")
        min_value = 0
    min_s, max_s = str(min_value), str(max_value)
    for digits in range(len(min_s), len(max_s)):
        uniform_range(min_s, "9" * digits)
        min_s = "1" + "0" * digits
        out.append(" | ")
    uniform_range(min_s, max_s)


def _integer_range(low: int | None, high: int | None) -> str:
    """GBNF for the integers in [low, high]; an open side stops at 16 digits."""
    out: list[str] = []
    _build_min_max_int(low, high, out)
    return "".join(out)


_ANY_DECIMALS = f'("." [0-9]{{1,{_BOUNDED_NUMBER_DECIMALS}}})?'
_ZERO_DECIMALS = f'("." [0]{{1,{_BOUNDED_NUMBER_DECIMALS}}})?'
_NONZERO_DECIMALS = f'"." [0-9]{{0,{_BOUNDED_NUMBER_DECIMALS - 1}}} [1-9]'


def _magnitudes(low: int, low_exclusive: bool, high: int | None, high_exclusive: bool) -> list[str]:
    """GBNF alternatives for unsigned decimals ``n[.f]`` in the interval from ``low`` to ``high``
    (integers, ``low >= 0``): m >= a iff n >= a; m > a iff n > a or (n == a and f != 0);
    m <= b iff n < b or (n == b and f == 0). Decimals need n < 10**9, whole numbers n < 10**15."""
    decimal_cap = 10 ** _BOUNDED_NUMBER_INT_DIGITS - 1
    whole_cap = 10 ** _BOUNDED_NUMBER_WHOLE_DIGITS - 1
    alternatives = []
    first_free = low + 1 if low_exclusive else low
    last_free = whole_cap if high is None else min(high - 1, whole_cap)
    if first_free <= min(last_free, decimal_cap):
        alternatives.append(f"({_integer_range(first_free, min(last_free, decimal_cap))}) "
                            f"{_ANY_DECIMALS}")
    if max(first_free, decimal_cap + 1) <= last_free:
        alternatives.append(f"({_integer_range(max(first_free, decimal_cap + 1), last_free)})")
    if low_exclusive and (high is None or low < high) and low <= decimal_cap:
        alternatives.append(f'"{low}" {_NONZERO_DECIMALS}')
    if high is not None and not high_exclusive and high <= whole_cap and (
            high > low or (high == low and not low_exclusive)):
        alternatives.append(f'"{high}"' + (f" {_ZERO_DECIMALS}" if high <= decimal_cap else ""))
    return alternatives


def _number_range(low: _Bound | None, high: _Bound | None) -> str:
    """GBNF for decimal numbers (no exponent) within integer-valued bounds; ``-0`` is left out."""
    alternatives = []
    # x >= 0: magnitude bounded by the bounds themselves.
    if high is None or high.value > 0 or (high.value == 0 and not high.exclusive):
        nonneg_low = (0, False) if low is None or low.value < 0 else (low.value, low.exclusive)
        nonneg_high = None if high is None else high.value
        alternatives += _magnitudes(nonneg_low[0], nonneg_low[1], nonneg_high,
                                    high.exclusive if high is not None else False)
    # x < 0: x = -m with m > 0; x >= lo iff m <= -lo; x <= hi iff m >= -hi.
    if low is None or low.value < 0:
        if high is None or high.value >= 0:
            neg_low, neg_low_exclusive = 0, True
        else:
            neg_low, neg_low_exclusive = -high.value, high.exclusive
        neg_high = None if low is None else -low.value
        magnitudes = _magnitudes(neg_low, neg_low_exclusive, neg_high,
                                 low.exclusive if low is not None else False)
        if magnitudes:
            alternatives.append('"-" (' + " | ".join(magnitudes) + ")")
    return " | ".join(alternatives)


class _TrieNode:
    def __init__(self) -> None:
        self.children: dict[str, _TrieNode] = {}
        self.terminal = False


def _not_strings_body(words: Iterable[str]) -> str:
    """GBNF (inside the quotes) for every key made of raw JSON characters except ``words``
    (llama.cpp's ``_not_strings`` over ``keychar``; a key written with escapes could alias a
    declared name, so extra keys use raw characters only)."""
    root = _TrieNode()
    for word in words:
        node = root
        for c in word:
            if not _intersect(((ord(c), ord(c)),), _RAW_JSON):
                break  # no raw key can follow this path
            node = node.children.setdefault(c, _TrieNode())
        else:
            node.terminal = True

    def suffixes(node: _TrieNode) -> str:
        alternatives = []
        for c, child in node.children.items():
            if child.children:
                alternatives.append(f"[{_class_char(ord(c))}] {suffixes(child)}")
            else:
                alternatives.append(f"[{_class_char(ord(c))}] keychar" +
                                    ("+" if child.terminal else "*"))
        excluded = "".join(_class_char(ord(c)) for c in node.children)
        alternatives.append(f'[^"\\\\\\x00-\\x1F{excluded}] keychar*')
        return "(" + " | ".join(alternatives) + ")" + ("" if node.terminal else "?")

    return suffixes(root)


def _rule_name(name: str) -> str:
    if not name:
        return "root"
    return name + "-" if name in _RESERVED else name


def _child_name(parent: str, part: str) -> str:
    part = re.sub(r"[^a-zA-Z0-9-]+", "-", part) or "empty"
    return f"{parent}-{part}" if parent else part


class _GrammarWriter:
    """Writes checked schema nodes as GBNF rules. Mixed into llama-cpp-python's
    ``SchemaConverter`` (see ``_converter``), whose ``_add_rule`` and ``format_grammar`` it uses;
    its ``visit`` is replaced (the port's ignores sibling keywords and integer bounds)."""

    _rules: dict[str, str]
    _add_rule: Callable[[str, str], str]

    def _init_writer(self) -> None:
        self._documents: dict[int, _Document] = {}
        self._ref_rules: dict[tuple[int, str], str] = {}
        self._char_rules: dict[_Ranges, str] = {}

    # -- entry points ----------------------------------------------------------------------------

    def visit(self, schema: Mapping[str, Any], name: str) -> str:
        """The port's entry point: a rule for ``schema`` named after ``name`` ("" = root)."""
        return self.add_document(_read(schema, len(self._documents)), name)

    def add_document(self, document: _Document, name: str) -> str:
        doc = len(self._documents)
        self._documents[doc] = document
        for key in document.refs:
            self._documents.setdefault(key[0], document)
        return self.node_rule(document.root, name)

    def _format_literal(self, literal: str) -> str:  # port hook: it forgets backslashes
        return _gbnf_literal(literal)

    # -- nodes -----------------------------------------------------------------------------------

    def primitive(self, name: str) -> str:
        if self._rules.get(name) != _PRIMITIVES[name][0]:
            rule, needs = _PRIMITIVES[name]
            self._rules[name] = rule
            for dependency in needs:
                self.primitive(dependency)
        return name

    def node_rule(self, node: _Node, name: str) -> str:
        """The name of a rule matching ``node`` (a shared primitive when one fits)."""
        primitive = self._primitive_for(node)
        if primitive is not None:
            name_ = _rule_name(name)
            if name_ == "root":
                return self._add_rule("root", self.primitive(primitive))
            return self.primitive(primitive)
        return self._add_rule(_rule_name(name), self.node_body(node, name))

    @staticmethod
    def _primitive_for(node: _Node) -> str | None:
        if isinstance(node, _AnyValue):
            return "value"
        if isinstance(node, _AnyObject):
            return "object"
        if isinstance(node, _Null):
            return "null"
        if isinstance(node, _Boolean):
            return "boolean"
        if isinstance(node, _Integer) and node.low is None and node.high is None:
            return "integer"
        if isinstance(node, _Number) and node.low is None and node.high is None:
            return "number"
        if isinstance(node, _String) and node.min_length == 0 and node.max_length is None:
            return "string"
        if isinstance(node, _Array) and isinstance(node.item, _AnyValue) \
                and node.min_items == 0 and node.max_items is None:
            return "array"
        if isinstance(node, _Format):
            return _FORMAT_RULES[node.name]
        return None

    def node_body(self, node: _Node, name: str) -> str:
        if isinstance(node, _Integer):
            return f"({_integer_range(node.low, node.high)}) space"
        if isinstance(node, _Number):
            return f"({_number_range(node.low, node.high)}) space"
        if isinstance(node, _String):
            char = self.primitive("char")
            return (r'"\"" ' + self.repetition(char, node.min_length, node.max_length, name)
                    + r' "\"" space')
        if isinstance(node, _Pattern):
            return r'"\"" ' + (self.regex(node.regex, name) or "") + r' "\"" space'
        if isinstance(node, _Literals):
            literals = [_gbnf_literal(json.dumps(v, ensure_ascii=False)) for v in node.values]
            return "(" + " | ".join(literals) + ") space"
        if isinstance(node, _Union):
            return " | ".join(self.node_rule(option, _child_name(name, str(i)) if name
                                             else f"alternative-{i}")
                              for i, option in enumerate(node.options))
        if isinstance(node, _Ref):
            return self.ref_rule(node.key)
        if isinstance(node, _Array):
            item = self.node_rule(node.item, _child_name(name, "item"))
            return ('"[" space ' + self.repetition(item, node.min_items, node.max_items, name,
                                                   separator='"," space') + ' "]" space')
        if isinstance(node, _Tuple):
            items = [self.node_rule(item, _child_name(name, f"tuple-{i}"))
                     for i, item in enumerate(node.items)]
            return '"[" space ' + ' "," space '.join(items) + (" " if items else "") + '"]" space'
        if isinstance(node, _Object):
            return self.object_body(node, name)
        raise AssertionError(f"no grammar for {node!r}")  # pragma: no cover

    def ref_rule(self, key: tuple[int, str]) -> str:
        if key not in self._ref_rules:
            base = "ref" + re.sub(r"[^a-zA-Z0-9-]+", "-", key[1]) if key[1] else "ref-root"
            name, n = base, 0
            while name in self._rules or name in _RESERVED:
                n += 1
                name = f"{base}{n}"
            self._ref_rules[key] = name
            self._rules[name] = ""  # reserved while the target is written (recursion)
            self._rules[name] = self.node_body_or_alias(self._document_of(key).refs[key], name)
        return self._ref_rules[key]

    def node_body_or_alias(self, node: _Node, name: str) -> str:
        primitive = self._primitive_for(node)
        return self.primitive(primitive) if primitive is not None else self.node_body(node, name)

    def _document_of(self, key: tuple[int, str]) -> _Document:
        return self._documents[key[0]]

    # -- objects ---------------------------------------------------------------------------------

    def object_body(self, node: _Object, name: str) -> str:
        """Properties in the schema's order, each optional one may be left out, then extra keys
        (which cannot repeat a declared name). llama.cpp writes required properties first;
        here the order is the schema's, as the model reads it in the prompt."""
        kvs: list[tuple[str, bool]] = []
        for prop in node.properties:
            value = self.node_rule(prop.node, _child_name(name, prop.name))
            kvs.append((self._add_rule(
                _child_name(name, prop.name) + "-kv",
                f'{_gbnf_literal(json.dumps(prop.name, ensure_ascii=False))} space ":" space '
                f"{value}"), prop.required))
        extra = None
        if node.additional is not None:
            sub = _child_name(name, "additional")
            value = self.node_rule(node.additional, sub + "-value")
            if node.properties:
                self.primitive("keychar")
                key = self._add_rule(sub + "-k", r'"\"" ' + _not_strings_body(
                    p.name for p in node.properties) + r' "\"" space')
            else:
                key = self.primitive("string")
            extra = self._add_rule(sub + "-kv", f'{key} ":" space {value}')
        firsts = []  # what may come first: each optional property up to the first required one
        for index, (kv, required) in enumerate(kvs):
            firsts.append(f"{kv} {self._after(kvs, index + 1, extra, name)}".strip())
            if required:
                break
        else:
            if extra is not None:
                firsts.append(f'{extra} ( "," space {extra} )*')
        if not firsts:
            return '"{" space "}" space'
        body = firsts[0] if len(firsts) == 1 else "( " + " | ".join(firsts) + " )"
        if not any(required for _, required in kvs):
            body = f"( {body} )?"
        return '"{" space ' + body + ' "}" space'

    def _after(self, kvs: list[tuple[str, bool]], start: int, extra: str | None,
               name: str) -> str:
        """What may follow once a property was written: the rest, each behind a comma."""
        parts = [f'"," space {kv}' if required else f'( "," space {kv} )?'
                 for kv, required in kvs[start:]]
        if extra is not None:
            parts.append(f'( "," space {extra} )*')
        if len(parts) <= 1:
            return " ".join(parts)
        return self._add_rule(_child_name(name, f"after-{start}"), " ".join(parts))

    # -- repetition ------------------------------------------------------------------------------

    def repetition(self, unit: str, low: int, high: int | None, name: str,
                   separator: str | None = None) -> str:
        """``unit`` repeated low..high times (optionally separated), exact for any counts:
        llama.cpp turns a bound above 2000 into "unbounded", so longer runs are chained."""
        if high == 0:
            return ""
        if separator is None:
            return self._repeat(unit, low, high, name)
        following = self._add_rule(_child_name(name, "next"), f"{separator} {unit}")
        rest = self._repeat(following, max(low - 1, 0), None if high is None else high - 1, name)
        result = f"{unit} {rest}".strip()
        return result if low > 0 else f"( {result} )?"

    def _repeat(self, unit: str, low: int, high: int | None, name: str) -> str:
        parts = []
        remaining = low
        while remaining > 0:
            count = min(remaining, _MAX_REPEAT)
            parts.append(unit if count == 1 else f"{unit}{{{count}}}")
            remaining -= count
        if high is None:
            parts.append(f"{unit}*")
        elif high > low:
            parts.append(self._up_to(unit, high - low, name))
        return " ".join(parts)

    def _up_to(self, unit: str, count: int, name: str) -> str:
        """0..count units; past the limit a chain ``upto(n) ::= u{0,1999} | u{2000} upto(n-2000)``
        (each length has one parse: under 2000 the first branch, else the second)."""
        if count == 1:
            return f"{unit}?"
        steps = []
        while count > _MAX_REPEAT:
            steps.append(count)
            count -= _MAX_REPEAT
        tail = f"{unit}{{0,{count}}}"
        for step in reversed(steps):
            tail = self._add_rule(_child_name(name, f"upto-{step}"),
                                  f"{unit}{{0,{_MAX_REPEAT - 1}}} | {unit}{{{_MAX_REPEAT}}} {tail}")
        return tail

    # -- patterns --------------------------------------------------------------------------------

    def regex(self, node: _Re, name: str) -> str:
        """GBNF over the JSON-encoded characters of a string matching the pattern; "" = empty."""
        if isinstance(node, _ReAnyText):
            return f"{self.primitive('char')}*"
        if isinstance(node, _ReChars):
            expression = _json_chars(node.ranges)
            if " | " not in expression:
                return expression
            if node.ranges not in self._char_rules:  # one rule per class (a dot is ~30 escapes)
                self._char_rules[node.ranges] = self._add_rule(
                    f"chars-{len(self._char_rules)}", expression)
            return self._char_rules[node.ranges]
        if isinstance(node, _ReSeq):
            return " ".join(part for part in (self.regex(item, name) for item in node.items)
                            if part)
        if isinstance(node, _ReAlt):
            options = [self.regex(option, name) for option in node.options]
            present = [f"( {option} )" for option in options if option]
            if not present:
                return ""
            group = "(" + " | ".join(present) + ")"
            return group + "?" if len(present) < len(options) else group
        if isinstance(node, _ReRepeat):
            item = self.regex(node.item, name)
            if not item or node.max == 0:
                return ""
            unit = self._add_rule(_child_name(name, "part"), item)
            return self._repeat(unit, node.min, node.max, name)
        raise AssertionError(f"no grammar for {node!r}")  # pragma: no cover


@functools.cache
def _converter() -> type:
    """``SchemaConverter`` from llama-cpp-python with our writer mixed in (imported on first
    use: it loads the native library)."""
    try:
        from llama_cpp.llama_grammar import SchemaConverter
    except ImportError as exc:  # pragma: no cover - exercised only without the runtime
        from .errors import BackendUnavailableError
        raise BackendUnavailableError("llama-cpp-python is not installed; constrained decoding "
                                      "needs it (./bootstrap.sh builds it)") from exc

    class SchemaGrammarConverter(_GrammarWriter, SchemaConverter):
        """llama.cpp's converter with integer bounds and the fixes listed in the module doc."""

        def __init__(self) -> None:
            super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            self._init_writer()

    return SchemaGrammarConverter


def grammar_for(schema: Mapping[str, Any]) -> str:
    """GBNF whose ``root`` is one JSON value matching ``schema`` (checked first: unsupported or
    invalid schemas raise, never fall back to unconstrained JSON)."""
    document = _read(schema)
    converter = _converter()()
    converter.add_document(document, "")
    return converter.format_grammar()


def tool_call_grammar(tools: Sequence[tuple[str, Mapping[str, Any]]], *, parallel: bool) -> str:
    """GBNF for Qwen2.5/Hermes tool calls: ``<tool_call>\\n{"name": ..., "arguments": ...}\\n
    </tool_call>``, the name one of ``tools`` and the arguments matching that tool's parameters
    schema; one block, or with ``parallel`` one or more separated by a newline. ``root`` starts
    with the literal ``<tool_call>`` so it also serves as a lazy grammar from that trigger."""
    if not tools:
        raise InvalidRequestError("a tool-call grammar needs at least one tool")
    names = [name for name, _ in tools]
    for name in names:
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"tool name {name!r} must be a non-empty string")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidRequestError(f"tool name(s) offered twice: {', '.join(duplicates)}")
    converter = _converter()()
    calls = []
    for index, (name, parameters) in enumerate(tools):
        try:
            document = _read(parameters, index)
        except UnsupportedSchemaError as exc:
            detail = getattr(exc, "detail", "")
            raise _unsupported(exc.feature, exc.pointer,
                               f"{detail} in the parameters of tool {name!r}") from exc
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"tool {name!r} parameters: {exc}") from exc
        rule_base = _child_name("", f"tool-{index}-{name}")
        arguments = converter.add_document(document, rule_base + "-arguments")
        calls.append(converter._add_rule(
            rule_base + "-call",
            '"{" space "\\"name\\"" space ":" space '
            f'{_gbnf_literal(json.dumps(name, ensure_ascii=False))} space "," space '
            f'"\\"arguments\\"" space ":" space {arguments} "}}"'))
    call = converter._add_rule("tool-call", " | ".join(calls))
    block = f'"<tool_call>\\n" {call} "\\n</tool_call>"'
    converter._rules["root"] = block + (' ( "\\n" ' + block + " )*" if parallel else "")
    return converter.format_grammar()


# ----------------------------------------------------------------------------------------------
# Schemas from Python types and functions
# ----------------------------------------------------------------------------------------------

_NONE_TYPE = type(None)


def _is_pydantic_model(target: Any) -> bool:
    pydantic = sys.modules.get("pydantic")  # a model class exists only once pydantic is imported
    return pydantic is not None and isinstance(target, type) and issubclass(
        target, pydantic.BaseModel)


def _is_typed_dict(target: Any) -> bool:
    return isinstance(target, type) and typing.is_typeddict(target)


def _unwrap(annotation: Any) -> tuple[Any, str | None]:
    """Strip ``Annotated`` (keeping a string note as the description) and Required/NotRequired."""
    description = None
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            notes = [m for m in annotation.__metadata__ if isinstance(m, str)]
            description = description or (notes[0] if notes else None)
            annotation = annotation.__origin__
        elif origin in (typing.Required, typing.NotRequired):
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation, description


class _SchemaBuilder:
    """JSON schemas for Python annotations; classes go to ``$defs`` (the root class is ``#``)."""

    def __init__(self, root: Any = None) -> None:
        self.root = root
        self.defs: dict[str, dict[str, Any]] = {}
        self.def_names: dict[Any, str] = {}

    def document(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self.defs:
            schema = {**schema, "$defs": self.defs}
        return schema

    def of(self, annotation: Any, where: str) -> dict[str, Any]:
        annotation, description = _unwrap(annotation)
        schema = self._of(annotation, where)
        if description:
            schema = {**schema, "description": description}
        return schema

    def _of(self, tp: Any, where: str) -> dict[str, Any]:
        if tp is Any:
            return {}
        if tp is None or tp is _NONE_TYPE:
            return {"type": "null"}
        if tp is bool:
            return {"type": "boolean"}
        if tp is int:
            return {"type": "integer"}
        if tp is float:
            return {"type": "number"}
        if tp is str:
            return {"type": "string"}
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self._enum(tp, where)
        if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or _is_typed_dict(tp)
                                     or _is_pydantic_model(tp)):
            return self._class_ref(tp, where)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Literal:
            return self._literal(args, where)
        if origin in (typing.Union, types.UnionType):
            options = [self.of(arg, where) for arg in args]
            return options[0] if len(options) == 1 else {"anyOf": options}
        if origin in (list, Sequence, typing.Sequence) or tp in (list, Sequence):
            item = self.of(args[0], where) if args else {}
            return {"type": "array", "items": item}
        if origin is tuple or tp is tuple:
            return self._tuple(args or (Any, ...), where)
        if origin in (dict, Mapping) or tp in (dict, Mapping):
            if args and _unwrap(args[0])[0] is not str:
                raise InvalidRequestError(f"{where}: dict keys must be str for a JSON object, "
                                          f"got {args[0]!r}")
            value = self.of(args[1], where) if args else {}
            return {"type": "object", "additionalProperties": value}
        raise InvalidRequestError(f"{where}: type {tp!r} has no JSON schema here; use int, "
                                  "float, str, bool, None, list, dict[str, X], tuple, Literal, "
                                  "an Enum, a dataclass, a TypedDict or a pydantic model")

    def _enum(self, tp: type[enum.Enum], where: str) -> dict[str, Any]:
        values = [member.value for member in tp]
        for value in values:
            if not isinstance(value, (str, int, float, bool, type(None))):
                raise InvalidRequestError(f"{where}: enum {tp.__name__} has a value of type "
                                          f"{type(value).__name__}; JSON needs str/int/float/bool")
        return {"enum": values, "title": tp.__name__}

    def _literal(self, args: tuple[Any, ...], where: str) -> dict[str, Any]:
        values = [a.value if isinstance(a, enum.Enum) else a for a in args]
        for value in values:
            if not isinstance(value, (str, int, float, bool, type(None))):
                raise InvalidRequestError(f"{where}: Literal value {value!r} is not JSON")
        return {"const": values[0]} if len(values) == 1 else {"enum": values}

    def _tuple(self, args: tuple[Any, ...], where: str) -> dict[str, Any]:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": self.of(args[0], where)}
        if not args or args == ((),):
            return {"type": "array", "maxItems": 0}
        return {"type": "array", "prefixItems": [self.of(a, where) for a in args],
                "items": False, "minItems": len(args)}

    def _class_ref(self, cls: type, where: str) -> dict[str, Any]:
        if cls is self.root:
            return {"$ref": "#"}
        if cls not in self.def_names:
            name, n = cls.__name__, 1
            while name in self.defs:
                n += 1
                name = f"{cls.__name__}{n}"
            self.def_names[cls] = name
            self.defs[name] = {}  # reserved (recursive classes)
            self.defs[name] = self.class_schema(cls)
        return {"$ref": f"#/$defs/{self.def_names[cls]}"}

    def class_schema(self, cls: type) -> dict[str, Any]:
        if _is_pydantic_model(cls):
            schema = dict(cls.model_json_schema(ref_template="#/$defs/{model}"))
            for name, sub in schema.pop("$defs", {}).items():
                self.defs.setdefault(name, sub)
            return schema
        hints = _type_hints(cls, f"class {cls.__name__}")
        description, notes = _docstring(_own_doc(cls))
        if dataclasses.is_dataclass(cls):
            fields = [f for f in dataclasses.fields(cls) if f.init]
            names = [f.name for f in fields]
            required = [f.name for f in fields if f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING]
            metadata = {f.name: f.metadata.get("description") for f in fields}
        else:
            names = list(hints)
            required = [n for n in names if _typed_dict_key_required(cls, n, hints[n])]
            metadata = {}
        properties = {}
        for name in names:
            prop = self.of(hints[name], f"field {name!r} of {cls.__name__}")
            note = metadata.get(name) or notes.get(name)
            if note and "description" not in prop:
                prop = {**prop, "description": note}
            properties[name] = prop
        schema: dict[str, Any] = {"type": "object", "title": cls.__name__,
                                  "properties": properties, "required": required,
                                  "additionalProperties": False}
        if description:
            schema["description"] = description
        return schema


def _typed_dict_key_required(cls: type, key: str, hint: Any) -> bool:
    """``Required``/``NotRequired`` from the resolved hint (Python 3.11 cannot see them in string
    annotations, so its ``__required_keys__`` follows ``total`` alone), else the class's own."""
    while typing.get_origin(hint) is typing.Annotated:
        hint = hint.__origin__
    if typing.get_origin(hint) is typing.NotRequired:
        return False
    if typing.get_origin(hint) is typing.Required:
        return True
    return key in cls.__required_keys__


def _type_hints(owner: Any, what: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(owner, include_extras=True)
    except Exception as exc:  # NameError for an unresolvable forward reference, and others
        raise InvalidRequestError(f"{what}: cannot resolve its type hints ({exc})") from exc


def _own_doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    # dataclass writes "Name(a: int, ...)" when the class has no docstring of its own
    if dataclasses.is_dataclass(cls) and doc.startswith(cls.__name__ + "("):
        return ""
    return doc


_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Attributes|Keyword Args|"
                      r"Keyword Arguments|Other Parameters):\s*$")
_OTHER_SECTION = re.compile(r"^(Returns?|Yields?|Raises|Examples?|Notes?|See Also|Warnings?|"
                            r"Todo|References):\s*$")
_SPHINX_PARAM = re.compile(r"^:param\s+(?:[^:]*\s)?(\*{0,2}\w+)\s*:\s*(.*)$")
_GOOGLE_ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_NUMPY_ENTRY = re.compile(r"^(\w+)\s*(?::.*)?$")


def _docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(first paragraph, {parameter: description}) from a Google, Sphinx or NumPy docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    for line in lines:
        stripped = line.strip()
        if not stripped or _SECTION.match(stripped) or _OTHER_SECTION.match(stripped) \
                or stripped.startswith(":"):
            break
        summary.append(stripped)
    notes: dict[str, str] = {}
    _google_notes(lines, notes)
    _sphinx_notes(lines, notes)
    _numpy_notes(lines, notes)
    return " ".join(summary), notes


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _google_notes(lines: list[str], notes: dict[str, str]) -> None:
    i = 0
    while i < len(lines):
        if not _SECTION.match(lines[i].strip()):
            i += 1
            continue
        header_indent = _indent(lines[i])
        i += 1
        entry_indent, current = None, None
        while i < len(lines):
            line = lines[i]
            if line.strip() and _indent(line) <= header_indent:
                break
            if line.strip():
                if entry_indent is None:
                    entry_indent = _indent(line)
                match = _GOOGLE_ENTRY.match(line.strip())
                if _indent(line) == entry_indent and match:
                    current = match.group(1).lstrip("*")
                    notes[current] = match.group(2).strip()
                elif current is not None:
                    notes[current] = (notes[current] + " " + line.strip()).strip()
            i += 1


def _sphinx_notes(lines: list[str], notes: dict[str, str]) -> None:
    current = None
    for line in lines:
        stripped = line.strip()
        match = _SPHINX_PARAM.match(stripped)
        if match:
            current = match.group(1).lstrip("*")
            notes[current] = match.group(2).strip()
        elif stripped.startswith(":") or not stripped:
            current = None
        elif current is not None and line.startswith((" ", "\t")):
            notes[current] = (notes[current] + " " + stripped).strip()


def _numpy_notes(lines: list[str], notes: dict[str, str]) -> None:
    for i in range(len(lines) - 1):
        if lines[i].strip() in ("Parameters", "Attributes") and \
                set(lines[i + 1].strip()) == {"-"}:
            base = _indent(lines[i])
            current = None
            for line in lines[i + 2:]:
                if not line.strip():
                    continue
                if _indent(line) == base:
                    match = _NUMPY_ENTRY.match(line.strip())
                    if not match:
                        break
                    current = match.group(1)
                    notes.setdefault(current, "")
                elif current is not None and _indent(line) > base:
                    notes[current] = (notes[current] + " " + line.strip()).strip()


def schema_of(target: Any) -> dict[str, Any]:
    """A JSON schema for ``target``: a schema dict (checked, returned as plain data), a dataclass,
    TypedDict or pydantic model class, or an annotation (``int``, ``list[X]``, ``X | None``,
    ``Literal[...]``, an Enum, ``Annotated[X, "description"]``...)."""
    if isinstance(target, Mapping):
        _check_valid(target)
        return json.loads(json.dumps(target))
    if _is_pydantic_model(target):
        schema = target.model_json_schema()
        _check_valid(schema)
        return schema
    builder = _SchemaBuilder(root=target if isinstance(target, type) and (
        dataclasses.is_dataclass(target) or _is_typed_dict(target)) else None)
    name = getattr(target, "__name__", repr(target))
    if builder.root is not None:
        schema = builder.class_schema(target)
    else:
        schema = builder.of(target, f"type {name}")
    return builder.document(schema)


def function_schema(fn: Callable[..., Any]) -> tuple[str, str, dict[str, Any]]:
    """(name, description, parameters schema) for a typed Python function: the description is
    the docstring's first paragraph, parameter notes come from Google ``Args:``, Sphinx
    ``:param x:`` or NumPy sections; parameters without a default are required."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not callable(fn):
        raise InvalidRequestError(f"{fn!r} is not a named function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"function {name}: no inspectable signature ({exc})") from exc
    hints = _type_hints(fn, f"function {name}")
    description, notes = _docstring(inspect.getdoc(fn))
    builder = _SchemaBuilder()
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in signature.parameters.values():
        where = f"parameter {param.name!r} of function {name}"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise InvalidRequestError(f"{where}: *args/**kwargs cannot be described by a JSON "
                                      "schema; name each parameter")
        if param.kind is param.POSITIONAL_ONLY:
            raise InvalidRequestError(f"{where}: is positional-only; tool arguments are passed "
                                      "by name")
        if param.name not in hints:
            raise InvalidRequestError(f"{where}: has no type hint; annotate it (e.g. `x: int`)")
        prop = builder.of(hints[param.name], where)
        if notes.get(param.name) and "description" not in prop:
            prop = {**prop, "description": notes[param.name]}
        if param.default is param.empty:
            required.append(param.name)
        elif _is_json(param.default):
            prop = {**prop, "default": param.default}
        properties[param.name] = prop
    schema = builder.document({"type": "object", "properties": properties, "required": required,
                               "additionalProperties": False})
    return name, description, schema


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Values into Python types
# ----------------------------------------------------------------------------------------------

def convert(value: Any, target: Any) -> Any:
    """Build ``target`` from a validated JSON value: dataclass instances (nested dataclasses,
    lists, dicts, enums, tuples too), a pydantic model through ``model_validate``; TypedDicts,
    dicts and schema dicts give the value as is (nested dataclasses inside them are built)."""
    if isinstance(target, Mapping):
        return value
    try:
        return _convert(value, target, getattr(target, "__name__", repr(target)))
    except OutputParseError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        name = getattr(target, "__name__", repr(target))
        raise OutputParseError(f"the value does not build a {name}: "
                               f"{_short(type(exc).__name__ + ': ' + str(exc), 160)}") from exc


def _convert(value: Any, tp: Any, where: str) -> Any:
    tp, _ = _unwrap(tp)
    if tp is Any or tp is None or tp is _NONE_TYPE:
        return value
    if _is_pydantic_model(tp):
        return tp.model_validate(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _type_hints(tp, f"class {tp.__name__}")
        kwargs = {f.name: _convert(value[f.name], hints[f.name], f"{where}.{f.name}")
                  for f in dataclasses.fields(tp) if f.init and f.name in value}
        return tp(**kwargs)
    if _is_typed_dict(tp):
        hints = _type_hints(tp, f"class {tp.__name__}")
        return {k: _convert(v, hints[k], f"{where}.{k}") if k in hints else v
                for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, where)
    if origin in (list, Sequence, typing.Sequence) and args:
        return [_convert(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(item, args[0], where) for item in value)
        return tuple(_convert(item, arg, where) for item, arg in zip(value, args, strict=True))
    if origin in (dict, Mapping) and len(args) == 2:
        return {k: _convert(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    return value


def _convert_union(value: Any, args: tuple[Any, ...], where: str) -> Any:
    """The first arm whose schema the value matches (``X | None`` needs no check)."""
    if value is None and any(a is None or a is _NONE_TYPE for a in args):
        return None
    arms = [a for a in args if a is not None and a is not _NONE_TYPE]
    if len(arms) == 1:
        return _convert(value, arms[0], where)
    import jsonschema

    for arm in arms:
        schema = schema_of(arm)
        if jsonschema.validators.validator_for(schema)(schema).is_valid(value):
            return _convert(value, arm, where)
    return value
