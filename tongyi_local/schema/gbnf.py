"""GBNF spelling: literals, character classes, JSON string characters and the shared rules.

Why: every rule the grammar writes spells text and characters the same way, and the primitive
rules (``value``, ``string``, ``integer``, the date/time/uuid formats...) keep llama.cpp's
converter's names and spacing, so grammars stay comparable with the ones llama.cpp writes.
"""

from __future__ import annotations

import json

from .patterns import _EVERY, _RAW_JSON, _intersect, _Ranges, _ranges, _subtract


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
