"""Checked schemas written as GBNF (``grammar_for``, ``tool_call_grammar``).

Why: constrained decoding runs llama.cpp's grammar sampler, and llama-cpp-python ships a port of
llama.cpp's JSON-schema converter. Our subclass keeps the port's rule naming, ``_add_rule`` and
output, and replaces what the port gets wrong or leaves out:

- integer ``minimum``/``maximum``/``exclusive*`` (llama.cpp's ``build_min_max_int``, ported);
  integer-valued bounds on ``number`` too (exact, over a plain decimal form; see ``bounds``);
- string escapes: a grammar ``char`` is one JSON string character (no raw control characters, no
  surrogate escapes), so ``minLength``/``maxLength`` count what a JSON parser counts;
- literals (``const``/``enum``, property names) with backslashes; enum values filtered by the
  keywords beside them; ``type`` lists keep their sibling keywords;
- ``pattern``: our own translation of an ECMA-262/Python-``re`` common subset (see ``patterns``)
  that never emits a raw ``"`` or ``\\`` inside the JSON string (the port copies ``.`` and
  classes verbatim);
- ``additionalProperties`` schemas: a comma between properties, and extra keys that cannot repeat a
  declared property (llama.cpp's ``_not_strings``);
- repetition counts above llama.cpp's 2000 limit (which it would silently make unbounded);
- ``oneOf`` only when its alternatives provably exclude each other; ``allOf`` by merging (both in
  ``reader``).

``llama_cpp`` is imported on first use (``_converter``), not when this module is.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..errors import InvalidRequestError, UnsupportedSchemaError
from .gbnf import _FORMAT_RULES, _PRIMITIVES, _RESERVED, _class_char, _gbnf_literal, _json_chars
from .nodes import (_AnyObject, _AnyValue, _Array, _Boolean, _Document, _Format, _Integer,
                    _Literals, _Node, _Null, _Number, _Object, _Pattern, _Ref, _String, _Tuple,
                    _Union)
from .bounds import _integer_range, _number_range
from .patterns import (_RAW_JSON, _intersect, _Ranges, _Re, _ReAlt, _ReAnyText, _ReChars,
                       _ReRepeat, _ReSeq)
from .pointers import _unsupported
from .reader import _read

# llama.cpp's grammar parser turns a repetition bound above this into "unbounded".
_MAX_REPEAT = 2000


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
        from ..build import BUILD_HINT
        from ..errors import BackendUnavailableError
        raise BackendUnavailableError("llama-cpp-python is not installed; constrained decoding "
                                      f"needs it: {BUILD_HINT}") from exc

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
