"""One request's decoding state: sampler chain, UTF-8 decoder, stop strings, emitted text.

Why a module of its own: the batching engine runs many of these side by side, one per sequence in
the llama.cpp batch; everything here is per request and touches no shared state, so a second
request is a second object. Greedy requests skip the sampler chain: the engine takes the argmax
of the logits row with numpy, which is what keeps the hot loop lean.

A request under a grammar (tool calls, structured output) keeps its grammar sampler apart from
the chain, as llama.cpp's common sampler does: the token the chain (or the argmax) picks is checked
against the grammar alone, and only when the grammar rejects it is the grammar applied to the whole
vocabulary and the pick made again. Most steps pay for one token's check, not the vocabulary's.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Callable

import numpy as np

from ..types import Sampling

from .runtime import L


class GrammarDeadEnd(Exception):
    """No token can continue a grammar-constrained answer; the request ends with an error."""


class Sequence:
    """Per-request sampling and text state; used by the engine thread only (after creation)."""

    def __init__(self, n_vocab: int, sampling: Sampling, grammar: object = None,
                 utf8: Utf8Tables | None = None) -> None:
        self.sampling = sampling
        self._utf8_tables = utf8 if utf8 is not None else Utf8Tables(n_vocab)
        self.ignore_eos = sampling.ignore_eos
        self.grammar = grammar  # a llama_sampler this sequence owns, or None
        self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self._row_ids = np.arange(n_vocab, dtype=np.int32)
        plain_greedy = sampling.greedy and sampling.repeat_penalty == 1.0
        self.fast_greedy = plain_greedy and grammar is None
        self.sampler = None if plain_greedy else _sampler_chain(n_vocab, sampling)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = sampling.stop
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def accept_prompt(self, tokens: list[int]) -> None:
        """Feed the prompt's tail to the repetition penalty (the only sampler with a memory)."""
        s = self.sampling
        if self.sampler is not None and s.repeat_penalty != 1.0 and s.repeat_last_n:
            for token in tokens[-s.repeat_last_n:]:
                L.llama_sampler_accept(self.sampler, token)

    def sample(self, ctx: object, batch_index: int, row: np.ndarray,
               piece: Callable[[int], bytes]) -> int:
        """Pick from the logits of the batch's ``batch_index``-th token, ``row`` (the path
        for everything but plain greedy). ``piece`` gives a token's bytes."""
        if self.grammar is None:
            return L.llama_sampler_sample(self.sampler, ctx, batch_index)
        token = self._pick(row, constrained=False)
        if not (_allows(self.grammar, token) and self._keeps_utf8(piece(token))):
            pending = self._utf8.getstate()[0]
            token = self._pick(row, constrained=True,
                               banned=self._utf8_tables.breaking(pending, piece))
            # accepting a token the grammar rejects would abort inside llama.cpp
            if not (_allows(self.grammar, token) and self._keeps_utf8(piece(token))):
                raise GrammarDeadEnd("no token the grammar allows can follow the answer so far "
                                     "(or none that keeps it valid UTF-8)")
        L.llama_sampler_accept(self.grammar, token)
        if self.sampler is not None:
            L.llama_sampler_accept(self.sampler, token)
        self._utf8.decode(piece(token))
        return token

    def _keeps_utf8(self, data: bytes) -> bool:
        """Whether ``data`` continues the output as valid UTF-8. llama.cpp's grammar reads bytes
        leniently (no check of continuation bytes), so a byte token could satisfy the grammar
        yet decode to replacement characters that break a string's length or pattern."""
        state = self._utf8.getstate()
        try:
            self._utf8.decode(data)
            return True
        except UnicodeDecodeError:
            return False
        finally:
            self._utf8.setstate(state)

    def _pick(self, row: np.ndarray, *, constrained: bool,
              banned: np.ndarray | None = None) -> int:
        if self.sampler is None and not constrained:
            return int(row.argmax())
        if constrained and self._shortlist_exact():
            need = 1 if self.sampler is None else self.sampling.top_k
            for size in _SHORTLISTS:
                if size < len(row) and size >= 2 * need:
                    token = self._pick_from(row, np.argpartition(row, -size)[-size:], banned,
                                            need=need)
                    if token is not None:
                        return token
        picked = self._pick_from(row, None, banned, need=0, constrained=constrained)
        assert picked is not None
        return picked

    def _shortlist_exact(self) -> bool:
        """Whether the grammar may be applied to the highest logits only: exact when the pick
        depends on the best allowed tokens alone (greedy, or a top_k chain) and nothing can
        raise a token from below the shortlist (no repetition penalty)."""
        s = self.sampling
        return s.repeat_penalty == 1.0 and (
            self.sampler is None or s.top_k > 0)

    def _pick_from(self, row: np.ndarray, ids: np.ndarray | None, banned: np.ndarray | None, *,
                   need: int, constrained: bool = True) -> int | None:
        """Apply grammar (and chain) to ``row`` restricted to ``ids`` (None: the vocabulary);
        None when fewer than ``need`` tokens of the shortlist are allowed (go wider)."""
        ids = self._row_ids if ids is None else ids.astype(np.int32)
        data = np.empty(len(ids), _TOKEN_DATA)
        data["id"] = ids
        data["logit"] = row[ids]
        data["p"] = 0.0
        if banned is not None:
            data["logit"][banned[ids]] = -np.inf
        array = L.llama_token_data_array(
            data=data.ctypes.data_as(L.llama_token_data_p), size=len(ids), selected=-1,
            sorted=False)
        if constrained:
            L.llama_sampler_apply(self.grammar, ctypes.byref(array))
            if need and int(np.count_nonzero(data["logit"] != -np.inf)) < need:
                return None
        if self.sampler is None:
            return int(data["id"][data["logit"].argmax()])
        L.llama_sampler_apply(self.sampler, ctypes.byref(array))
        return int(data["id"][array.selected])

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text now safe to emit (never part of a stop string)."""
        self.text += self.decoder.decode(piece)
        if not self.stops:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out
        search_from = max(0, self.emitted - self.max_stop)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out
        safe = len(self.text) - _held_back(self.text, self.stops)
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out

    def free(self) -> None:
        if self.sampler is not None:
            L.llama_sampler_free(self.sampler)
            self.sampler = None
        if self.grammar is not None:
            L.llama_sampler_free(self.grammar)
            self.grammar = None


_SHORTLISTS = (32, 512)  # highest logits the grammar checks first, before the whole vocabulary
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _allows(grammar: object, token: int) -> bool:
    """Whether the grammar accepts ``token`` next: one candidate, checked alone."""
    one = L.llama_token_data(id=token, logit=1.0, p=0.0)
    array = L.llama_token_data_array(data=ctypes.pointer(one), size=1, selected=-1, sorted=False)
    L.llama_sampler_apply(grammar, ctypes.byref(array))
    return one.logit != float("-inf")


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _sampler_chain(n_vocab: int, s: Sampling) -> object:
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if s.repeat_penalty != 1.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
            n_vocab, s.repeat_last_n, s.repeat_penalty, 0.0, 0.0))
    if s.greedy:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        return chain
    if s.top_k:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(s.min_p, 1))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s.temperature))
    seed = L.LLAMA_DEFAULT_SEED if s.seed is None else s.seed
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
    return chain


class Utf8Tables:
    """Which tokens would break the output's UTF-8 after the bytes of a character begun but not
    finished (``pending``): one boolean table per pending byte string, computed once per model.

    Why tables, not repicks: llama.cpp's grammar reads bytes leniently, so after a lead byte
    such as 0xED it allows every continuation byte, and a byte-level BPE vocabulary has hundreds
    of tokens that start with the ones UTF-8 forbids there; banning them one pick at a time
    could run out of tries. At most a few dozen distinct pending strings occur."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self._tables: dict[bytes, np.ndarray] = {}

    def breaking(self, pending: bytes, piece: Callable[[int], bytes]) -> np.ndarray:
        table = self._tables.get(pending)
        if table is None:
            table = np.zeros(self.n_vocab, bool)
            for token in range(self.n_vocab):
                try:
                    codecs.utf_8_decode(pending + piece(token), "strict", False)
                except UnicodeDecodeError:
                    table[token] = True
            self._tables[pending] = table
        return table
