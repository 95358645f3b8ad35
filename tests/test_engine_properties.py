"""Properties of the engine's pure parts: stop-string hold-back, prefix matching for slot
choice, sampling validation (hypothesis; no model needed)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tongyi_local.backends._sequence import Sequence
from tongyi_local.backends._slots import _common
from tongyi_local.errors import InvalidRequestError
from tongyi_local.types import Sampling

ALPHABET = "ab\n é€😀"  # multi-byte UTF-8 pieces split across tokens too


def _pieces(text: str, cuts: list[int]) -> list[bytes]:
    data = text.encode()
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=400, deadline=None)
@given(text=st.text(ALPHABET, max_size=40), cuts=st.lists(st.integers(0, 200), max_size=12),
       stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3))
def test_stop_strings_never_drop_duplicate_or_leak(text, cuts, stops):
    seq = Sequence(32, Sampling(temperature=0, stop=tuple(stops)))
    emitted = ""
    for piece in _pieces(text, cuts):
        emitted += seq.push(piece)
        if seq.stopped:
            break
    emitted += seq.flush()
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[:min(hits)] if hits else text
    assert emitted == expected == seq.text  # nothing dropped, nothing twice
    assert not any(s in emitted for s in stops)  # a stop string never reaches the caller
    assert seq.stopped == bool(hits)


@given(held=st.lists(st.integers(0, 5), max_size=30), tokens=st.lists(st.integers(0, 5),
                                                                     max_size=30),
       limit=st.integers(0, 40))
def test_common_prefix_is_the_longest_shared_start_within_the_limit(held, tokens, limit):
    n = _common(held, tokens, limit)
    assert 0 <= n <= min(len(held), len(tokens), limit)
    assert held[:n] == tokens[:n]
    if n < min(len(held), len(tokens), limit):
        assert held[n] != tokens[n]


_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                    st.booleans(), st.none(), st.text(max_size=2))


@settings(max_examples=400)
@given(temperature=_FLOATS, top_p=_FLOATS, min_p=_FLOATS, repeat_penalty=_FLOATS,
       max_tokens=st.one_of(st.integers(-3, 10), st.booleans(), st.floats(), st.text(max_size=2)),
       top_k=st.one_of(st.integers(-3, 50), st.booleans(), st.floats(0, 3)))
def test_sampling_is_valid_exactly_when_each_value_is_in_its_range(temperature, top_p, min_p,
                                                                   repeat_penalty, max_tokens,
                                                                   top_k):
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def integer(x):
        return isinstance(x, int) and not isinstance(x, bool)

    valid = (number(temperature) and temperature >= 0 and number(top_p) and 0 < top_p <= 1
             and number(min_p) and 0 <= min_p < 1 and number(repeat_penalty)
             and repeat_penalty > 0 and integer(max_tokens) and max_tokens >= 1
             and integer(top_k) and top_k >= 0)
    values = dict(temperature=temperature, top_p=top_p, min_p=min_p,
                  repeat_penalty=repeat_penalty, max_tokens=max_tokens, top_k=top_k)
    if valid:
        assert Sampling(**values).max_tokens == max_tokens
    else:
        with pytest.raises(InvalidRequestError, match="invalid sampling"):
            Sampling(**values)
