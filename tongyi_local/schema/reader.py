"""Reading a JSON schema into checked form (``check_supported``).

Why: a schema the grammar cannot express exactly must be refused, never decoded unconstrained.
The reader walks a schema once, resolves local ``$ref`` s, merges ``allOf``, proves ``oneOf``
alternatives exclusive, filters ``enum`` values by the keywords beside them, and yields ``_Node``
trees; every keyword it cannot honour raises ``UnsupportedSchemaError`` naming its JSON pointer,
every schema no value can satisfy raises ``InvalidRequestError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from .nodes import (_AnyObject, _AnyValue, _Array, _Boolean, _Bound, _Document, _Format,
                    _Integer, _Literals, _Never, _Node, _Null, _Number, _Object, _Pattern,
                    _Property, _Ref, _String, _Tuple, _Union)
from .bounds import _BOUNDED_NUMBER_WHOLE_DIGITS, _MAX_DIGITS, _number_range
from .patterns import _parse_regex
from .pointers import _child, _invalid, _short, _unsupported
from .validation import _check_valid, _format_checker

# ``format`` values the grammar writes (``gbnf``) and validation checks (``validation``).
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
