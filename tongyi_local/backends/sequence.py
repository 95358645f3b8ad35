"""One request's decoding state: sampler chain, UTF-8 decoder, stop strings, emitted text.

Why a module of its own: the batching engine runs many of these side by side, one per sequence in
the llama.cpp batch; everything here is per request and touches no shared state, so a second
request is a second object. Greedy requests skip the sampler chain: the engine takes the argmax
of the logits row with numpy, which is what keeps the hot loop lean.
"""

from __future__ import annotations

import codecs

from ..types import Sampling

try:
    import llama_cpp as L
except ImportError:  # pragma: no cover - exercised only without the runtime
    L = None


class Sequence:
    """Per-request sampling and text state; used by the engine thread only (after creation)."""

    def __init__(self, n_vocab: int, sampling: Sampling) -> None:
        self.sampling = sampling
        self.ignore_eos = sampling.ignore_eos
        self.fast_greedy = sampling.greedy and sampling.repeat_penalty == 1.0
        self.sampler = None if self.fast_greedy else _sampler_chain(n_vocab, sampling)
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

    def sample(self, ctx: object, batch_index: int) -> int:
        """Draw from the logits of the batch's ``batch_index``-th token (non-greedy path)."""
        return L.llama_sampler_sample(self.sampler, ctx, batch_index)

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
