"""Which slot a request gets, and which prompt prefix it starts from.

Why apart from the engine loop: this is policy, not mechanics. As llama-server does, a request
goes to the idle slot whose cached tokens share the longest prefix with its prompt (when that keeps
more than a tenth of the slot's cache, so a few common words do not evict another role's system
prompt), else to the least recently used slot. On top of that, with a unified KV cache a prefix
held by a running sequence is shared for free (``llama_memory_seq_cp`` adds a sequence id to the
cells), and a request arriving while another still evaluates the same prefix waits for it instead
of evaluating the same tokens in parallel (a coordinator fanning out N agents with one system
prompt pays for that prompt once).
"""

from __future__ import annotations

from ._jobs import Job

from .runtime import L

SIMILARITY = 0.1  # llama-server's slot_prompt_similarity
MIN_FOLLOW = 8  # tokens a request must gain to wait for another's prompt evaluation


class Slot:
    """Sequence id ``id`` of the KV cache; keeps its tokens' KV state between requests."""

    __slots__ = ("id", "tokens", "job", "last_used")

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.tokens: list[int] = []  # tokens whose KV state sequence ``id`` holds
        self.job: Job | None = None
        self.last_used = 0.0


class SlotPolicy:
    """Placement and prefix sharing; mixed into the engine (uses ``_mem``, ``_active``,
    ``reuse_prefix``). Runs on the engine thread only."""

    _mem: object
    _active: list[Slot]
    reuse_prefix: bool

    def _place(self, job: Job, idle: list[Slot]) -> Slot:
        """Pick the slot for ``job`` and the prompt prefix it starts from.

        As llama-server: the idle slot with the longest cached prefix, if that keeps more than a
        tenth of the slot's cache (so a few common tokens do not evict another role's prompt),
        else the least recently used one. Then running sequences: one holding a longer prefix
        shares its cells (``seq_cp``); one still evaluating a longer shared prefix is followed —
        the request waits for it instead of evaluating the same tokens in parallel."""
        tokens = job.tokens
        limit = len(tokens) - 1  # at least one token is evaluated, for the logits

        def similar(slot: Slot) -> int:
            n = self._prefix(slot, tokens, limit) if self.reuse_prefix else 0
            return n if n > SIMILARITY * len(slot.tokens) else 0

        slot = max(idle, key=lambda s: (similar(s), -s.last_used))
        job.cached = self._truncate(slot, similar(slot))
        if not self.reuse_prefix:
            return slot
        donor = max(self._active, key=lambda s: self._prefix(s, tokens, limit), default=None)
        shared = self._prefix(donor, tokens, limit) if donor else 0
        lead = max(((s, _common(s.job.tokens, tokens, limit)) for s in self._active
                    if s.job.pending < 0), key=lambda x: x[1], default=(None, 0))
        if lead[1] > max(shared, job.cached) + MIN_FOLLOW:
            job.follow = (lead[0], lead[0].job, lead[1])
        elif shared > job.cached:
            job.cached = self._share(donor, slot, shared)
        return slot

    def _share(self, donor: Slot, slot: Slot, n: int) -> int:
        """Give ``slot`` the first ``n`` cells of ``donor`` (unified cache: no copy, no compute)."""
        self._truncate(slot, 0)
        L.llama_memory_seq_cp(self._mem, donor.id, slot.id, 0, n)
        slot.tokens = donor.tokens[:n]
        return n

    def _follow_ready(self, slot: Slot) -> bool:
        """A request following another's prompt evaluation: share the prefix once it is there."""
        job = slot.job
        leader, leader_job, want = job.follow
        if leader.job is leader_job and len(leader.tokens) < want:
            return False
        job.follow = None
        n = self._prefix(leader, job.tokens, len(job.tokens) - 1)
        if n > len(slot.tokens):
            job.cached = self._share(leader, slot, n)
        return True

    def _prefix(self, slot: Slot, tokens: list[int], limit: int) -> int:
        n = _common(slot.tokens, tokens, limit)
        if n and L.llama_memory_seq_pos_min(self._mem, slot.id) > 0:
            return 0  # a sliding-window cache dropped early positions: not reusable
        return n

    def _truncate(self, slot: Slot, keep: int) -> int:
        if keep < len(slot.tokens):
            if not keep or not L.llama_memory_seq_rm(self._mem, slot.id, keep, -1):
                L.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
                keep = 0
            del slot.tokens[keep:]
        return keep


def _common(held: list[int], tokens: list[int], limit: int) -> int:
    """Length of the common prefix of two token lists, at most ``limit``."""
    n, end = 0, min(len(held), len(tokens), limit)
    while n < end and held[n] == tokens[n]:
        n += 1
    return n
