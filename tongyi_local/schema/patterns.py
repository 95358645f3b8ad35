"""``pattern``: the common subset of ECMA-262 and Python's ``re`` regular expressions.

Why: a ``pattern`` must mean the same to the grammar, to JSON Schema (ECMA-262) and to jsonschema
(which runs Python's ``re``), so only the subset where they agree is accepted. This module owns
the code-point range sets (``_Ranges``), character sets as both engines see them (``_CharSet``)
and the parser from pattern text to a small regex tree (``_Re``); anything outside the subset
raises ``UnsupportedSchemaError``. ``grammar`` writes the tree as GBNF.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UnsupportedSchemaError
from .pointers import _short, _unsupported

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
