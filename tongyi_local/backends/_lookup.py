"""Prompt-lookup (n-gram) drafting for speculative decoding, and when a draft is worth its cost.

Why: an agent mostly re-emits text already in its context (the file it edits, the arguments of a
tool call it repeats). The tokens that followed the latest earlier occurrence of the last few
tokens are a free guess at what comes next; the engine feeds the guess with the next token in one
``llama_decode`` and keeps the prefix the model itself would have picked (``_engine.py``), so
the output is unchanged and every accepted token saves a step.

A draft is not free on a CPU: every draft token is a row of the batch and a row of logits. How
many tokens to draft per sequence is an expected-value choice: the j-th draft token of a sequence
is used with probability ``alpha ** j`` (``alpha``: that sequence's recent per-token acceptance),
and adds ``draft_cost`` to a step costing ``1 + draft_cost * (n - 1)`` for ``n`` batch tokens. Draft
tokens go in, best first, while their expected yield beats the step's average yield per unit of
cost, so a sequence whose drafts keep failing stops drafting (and probes again now and then) and
fresh writing does not get slower.

The cost is a fixed share, not a measurement: draft lengths then depend on the tokens alone, so a
request's greedy text is the same run after run (a timed cost moved the draft lengths with the
machine's load, and with them the rounding of llama.cpp's kernels, which is not batch-invariant).
Measured on a 2-core Zen 3 with the packaged 135M–270M models at 600–3,000 cells of context, a
verified draft token added 0.4–0.65 of a one-row step; a larger model on more cores, whose steps
are dominated by reading the weights once, pays less per row (``draft_cost`` lower).
"""

from __future__ import annotations

from dataclasses import dataclass

DRAFT_COST = 0.45  # see the module docstring: 0.4-0.65 measured; the low end. Edit/fresh speed
# ratios on SmolLM2 (benchmarks/speculative.py, B=1, 2 rounds): 0.2 -> 1.22x/0.93x,
# 0.3 -> 1.09x/1.01x, 0.45 -> 1.06-1.21x/0.97-1.01x (runs differ by 5-10%)


@dataclass(frozen=True)
class SpeculativeConfig:
    """``ngram_size``: tokens that must match to draft (shorter matches are tried down to
    ``min_ngram``); ``max_draft``: draft tokens per sequence and step at most; ``draft_cost``:
    what one draft token adds to a step, as a share of a one-sequence step (0 drafts whenever a
    match exists)."""

    ngram_size: int = 3
    max_draft: int = 8
    min_ngram: int = 2  # a single matching token predicts prose poorly (drafts cost, not pay)
    draft_cost: float = DRAFT_COST


def logits_rows(slots: int, config: SpeculativeConfig | None, n_batch: int) -> int:
    """Logits rows one step may ask for (llama.cpp's n_outputs_max, memory the estimate prices):
    one per slot, and one per draft token when drafting."""
    return min(slots * (1 + config.max_draft), n_batch) if config else slots


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
    PROBE_TOKENS = 2  # a probe verifies this many draft tokens whatever they are expected to pay

    def __init__(self, config: SpeculativeConfig, history: list[int]) -> None:
        self.config = config
        self.index = NgramIndex(range(config.min_ngram, config.ngram_size + 1))
        self.index.extend(history)
        self.accepted = self.PRIOR_ACCEPTED
        self.rejected = self.PRIOR_REJECTED
        self.idle_steps = self.PROBE_EVERY  # steps since a draft was verified: the first probes
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

    @property
    def probing(self) -> bool:
        """Due to verify a short draft to learn its acceptance: at its first match, and every
        ``PROBE_EVERY`` steps without drafts (a sequence may start copying again)."""
        return self.idle_steps >= self.PROBE_EVERY

    def gain(self, j: int) -> float:
        """Probability that the j-th draft token (1-based) is used."""
        return self.alpha ** j

    def record(self, drafted: int, accepted: int) -> None:
        """A draft of ``drafted`` tokens was verified and its first ``accepted`` were right."""
        self.idle_steps = 0
        self.drafted_total += drafted
        self.accepted_total += accepted
        self.accepted = self.accepted * self.DECAY + accepted
        self.rejected = self.rejected * self.DECAY + (accepted < drafted)


def allocate(drafters: list[Drafter], candidates: list[list[int]], n_tokens: int,
             draft_cost: float, room: int) -> list[int]:
    """How many tokens of each candidate draft to put in a step of ``n_tokens`` batch tokens
    (``room`` draft tokens at most in all).

    Greedy on expected yield: the next draft token with the highest chance of being used goes in
    while that chance beats the step's expected tokens per unit of cost times the token's cost
    (adding it raises throughput); per sequence the chances fall with j, so drafts stay prefixes."""
    a, b = 1.0 - draft_cost, draft_cost  # a one-sequence step costs 1
    taken = [0] * len(candidates)
    expected = float(n_tokens)  # every sequence's own next token is certain
    n = n_tokens
    for i, (drafter, cand) in enumerate(zip(drafters, candidates)):
        if drafter.probing:  # acceptance is only learnt from verified drafts
            taken[i] = max(0, min(Drafter.PROBE_TOKENS, len(cand), room - (n - n_tokens)))
            expected += sum(drafter.gain(j) for j in range(1, taken[i] + 1))
            n += taken[i]
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
