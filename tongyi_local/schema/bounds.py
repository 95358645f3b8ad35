"""Integer and number bounds as GBNF (``minimum``/``maximum``/``exclusive*``).

Why: llama-cpp-python's port of the converter ignores integer bounds, and llama.cpp's own
``build_min_max_int`` gets one-sided ranges wrong. Integers within bounds are written exactly (the two-sided case ported line by line);
``number`` bounds must be integers and are written over a plain decimal form whose precision keeps
a float parse from rounding across a bound. ``reader`` also asks here whether any number the
grammar can write lies within the bounds.
"""

from __future__ import annotations

from .nodes import _Bound

# Digits of an unconstrained integer / integer part (llama.cpp's "integral-part").
_MAX_DIGITS = 16
# Bounded numbers: whole numbers below 10**15, decimals below 10**9 with at most 6 places, so at
# most 15 significant digits: a float parse never rounds such a decimal across an integer bound.
_BOUNDED_NUMBER_WHOLE_DIGITS = 15
_BOUNDED_NUMBER_INT_DIGITS = 9
_BOUNDED_NUMBER_DECIMALS = 6


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
