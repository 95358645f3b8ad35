"""Prompt-lookup (n-gram) drafting for speculative decoding, and when a draft is worth its cost.

Why: an agent mostly re-emits text already in its context (the file it edits, the arguments of a
tool call it repeats). The tokens that followed the latest earlier occurrence of the last few
tokens are a free guess at what comes next; the engine feeds the guess with the next token in one
``llama_decode`` and keeps the prefix the model itself would have picked (``_engine.py``), so
the output is unchanged and every accepted token saves a step.

A draft is not free on a CPU: every draft token is a row of the batch and a row of logits. How
many tokens to draft per sequence is an expected-value choice: the j-th draft token of a sequence
is used with probability ``alpha ** j`` (``alpha``: that sequence's recent per-token acceptance),
and adds ``b`` to a step costing ``a + b * n`` for ``n`` batch tokens (``StepCost`` fits ``a`` and
``b`` to the engine's own decode times). Draft tokens go in, best first, while their expected yield
beats the step's average yield per unit of time, so a sequence whose drafts keep failing stops
drafting (and probes again now and then) and fresh writing does not get slower.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpeculativeConfig:
    """``ngram_size``: tokens that must match to draft (shorter matches are tried down to
    ``min_ngram``); ``max_draft``: draft tokens per sequence and step at most."""

    ngram_size: int = 3
    max_draft: int = 8
    min_ngram: int = 2  # a single matching token predicts prose poorly (drafts cost, not pay)


class NgramIndex:
    """A token history with, per n-gram size, the position that followed each n-gram's latest
    occurrence: the next draft is one dict lookup, not a scan of the history."""

    def __init__(self, sizes: range) -> None:
        self.history: list[int] = []
        self._sizes = sorted(sizes, reverse=True)  # longest match first
        self._next: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self._sizes}

    def extend(self, tokens: list[int]) -> None:
        h = self.history
        for token in tokens:
            end = len(h)  # the n-grams ending just before ``token`` now have a continuation
            for n, table in self._next.items():
                if end >= n:
                    table[tuple(h[end - n:end])] = end
            h.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the history's
        last n tokens (the longest n with a match); empty when nothing matches."""
        h = self.history
        if limit <= 0:
            return []
        for n in self._sizes:
            if len(h) < n:
                continue
            start = self._next[n].get(tuple(h[-n:]))
            if start is not None:
                return h[start:start + limit]
        return []


class Drafter:
    """One sequence's drafting state: its history index and its recent acceptance."""

    PRIOR_ACCEPTED, PRIOR_REJECTED = 1.5, 1.0  # a first guess: drafts are right ~60% per token
    DECAY = 0.9  # per verified draft: recent acceptance counts most
    PROBE_EVERY = 64  # steps between probes of a sequence whose drafts stopped paying
    PROBE_MIN_ALPHA = 0.5  # a probe drafts at least as if acceptance were this

    def __init__(self, config: SpeculativeConfig, history: list[int]) -> None:
        self.config = config
        self.index = NgramIndex(range(config.min_ngram, config.ngram_size + 1))
        self.index.extend(history)
        self.accepted = self.PRIOR_ACCEPTED
        self.rejected = self.PRIOR_REJECTED
        self.idle_steps = 0  # steps since this sequence last had a draft verified
        self.drafted_total = 0
        self.accepted_total = 0

    @property
    def alpha(self) -> float:
        """Per-token acceptance: accepted / (accepted + first rejections), decayed."""
        return self.accepted / (self.accepted + self.rejected)

    def push(self, token: int) -> None:
        self.index.extend([token])

    def candidate(self, limit: int) -> list[int]:
        return self.index.draft(min(limit, self.config.max_draft))

    def gain(self, j: int) -> float:
        """Probability that the j-th draft token (1-based) is used; a probe is credited more."""
        alpha = self.alpha
        if self.idle_steps >= self.PROBE_EVERY:
            alpha = max(alpha, self.PROBE_MIN_ALPHA)
        return alpha ** j

    def record(self, drafted: int, accepted: int) -> None:
        """A draft of ``drafted`` tokens was verified and its first ``accepted`` were right."""
        self.idle_steps = 0
        self.drafted_total += drafted
        self.accepted_total += accepted
        self.accepted = self.accepted * self.DECAY + accepted
        self.rejected = self.rejected * self.DECAY + (accepted < drafted)


class StepCost:
    """Decode time per step as ``a + b * n_tokens``, fitted to recent generation steps
    (decayed least squares); until the batch sizes vary enough, ``b = ratio * a``."""

    def __init__(self, ratio: float = 0.25, decay: float = 0.98) -> None:
        self.ratio, self.decay = ratio, decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, n_tokens: int, seconds: float) -> None:
        d = self.decay
        self._w = self._w * d + 1.0
        self._x = self._x * d + n_tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + n_tokens * n_tokens
        self._xy = self._xy * d + n_tokens * seconds

    def line(self) -> tuple[float, float]:
        """(a, b): fixed cost of a step, cost per batch token (any unit; only the ratio counts)."""
        if self._w < 1.0:
            return 1.0, self.ratio
        xbar, ybar = self._x / self._w, self._y / self._w
        var = self._xx / self._w - xbar * xbar
        if var > 0.25:
            b = (self._xy / self._w - xbar * ybar) / var
            a = ybar - b * xbar
            if a > 0.05 * ybar and b > 0:
                return a, b
            if b <= 0:  # extra tokens cost nothing measurable
                return max(ybar, 1e-9), 1e-3 * max(ybar, 1e-9)
        a = ybar / (1.0 + self.ratio * xbar)
        return max(a, 1e-9), self.ratio * max(a, 1e-9)


MARGIN = 1.1  # batch tokens are costed 10% above the fitted line: the fit is noisy, and a draft
# that only breaks even is not worth the risk of a slower step


def allocate(drafters: list[Drafter], candidates: list[list[int]], n_tokens: int,
             cost: StepCost, room: int) -> list[int]:
    """How many tokens of each candidate draft to put in a step of ``n_tokens`` batch tokens
    (``room`` draft tokens at most in all).

    Greedy on expected yield: the next draft token with the highest chance of being used goes in
    while that chance beats the step's expected tokens per unit of cost times the token's cost
    (adding it raises throughput); per sequence the chances fall with j, so drafts stay prefixes."""
    a, b = cost.line()
    b *= MARGIN
    taken = [0] * len(candidates)
    expected = float(n_tokens)  # every sequence's own next token is certain
    n = n_tokens
    while n - n_tokens < room:
        best, best_gain = -1, 0.0
        for i, (drafter, cand) in enumerate(zip(drafters, candidates)):
            if taken[i] < len(cand):
                g = drafter.gain(taken[i] + 1)
                if g > best_gain:
                    best, best_gain = i, g
        if best < 0 or best_gain * (a + b * n) <= b * expected:
            return taken
        taken[best] += 1
        expected += best_gain
        n += 1
    return taken
