"""Which slot a request gets, and which prompt prefix it starts from.

Why apart from the engine loop: this is policy, not mechanics. As llama-server does, a request
goes to the idle slot whose cached tokens share the longest prefix with its prompt (when that keeps
more than a tenth of the slot's cache, so a few common words do not evict another role's system
prompt), else to the least recently used slot. On top of that, with a unified KV cache a prefix
held by a running sequence is shared for free (``llama_memory_seq_cp`` adds a sequence id to the
cells), and a request arriving while another still evaluates the same prefix waits for it instead
of evaluating the same tokens in parallel (a coordinator fanning out N agents with one system
prompt pays for that prompt once).

Role prefixes also live on disk (``prefix_store.py``): a request whose role prefix no slot holds
restores it from its state file into the chosen slot; one that must evaluate it stops its prompt
chunk at the prefix boundary once, so the sequence's saved state is exactly the prefix.
"""

from __future__ import annotations

import ctypes
import logging

from ._jobs import Job
from .prefix_store import PrefixStore

from .runtime import L, captured

log = logging.getLogger("tongyi_local.kv_cache")

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

    _ctx: object
    _mem: object
    _active: list[Slot]
    _slots: list[Slot]
    n_ctx: int
    reuse_prefix: bool
    prefix_store: PrefixStore | None = None  # role prefixes on disk; None: off

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
            self._from_disk(job, slot)
            return slot
        donor = max(self._active, key=lambda s: self._prefix(s, tokens, limit), default=None)
        shared = self._prefix(donor, tokens, limit) if donor else 0
        lead = max(((s, _common(s.job.tokens, tokens, limit)) for s in self._active
                    if s.job.pending < 0), key=lambda x: x[1], default=(None, 0))
        if max(job.cached, shared, lead[1]) < job.prefix:
            self._from_disk(job, slot)
        if lead[1] > max(shared, job.cached) + MIN_FOLLOW:
            job.follow = (lead[0], lead[0].job, lead[1])
        elif shared > job.cached:
            job.cached = self._share(donor, slot, shared)
        return slot

    def _from_disk(self, job: Job, slot: Slot) -> None:
        """Restore ``job``'s role prefix into ``slot`` from its state file; without a file, mark
        the job to save the prefix once its evaluation reaches it. A file llama.cpp refuses (or
        that restores other positions) is removed and the prompt is evaluated instead."""
        store = self.prefix_store
        if store is None or not job.prefix or job.cached >= job.prefix:
            return
        prefix = job.tokens[:job.prefix]
        if not self._make_room(job.prefix, slot):
            return  # running requests hold the cache: evaluate, and leave the file be
        payload = store.load(prefix)
        if payload is None:
            job.save_prefix = not store.has(prefix)
            return
        self._truncate(slot, 0)
        with captured() as capture:
            view = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
            n = L.llama_state_seq_set_data(self._ctx, view, len(payload), slot.id)
            del view
        # (a sliding-window model restores only the window's cells: its pos_min may be > 0)
        if not n or L.llama_memory_seq_pos_max(self._mem, slot.id) != job.prefix - 1:
            L.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
            store.discard(prefix, capture.reason("llama.cpp refused the state") if not n
                          else "the state restores other positions")
            job.save_prefix = True
            return
        slot.tokens = prefix
        job.cached = job.prefix
        log.debug("slot %d: %d prefix tokens restored from disk", slot.id, job.prefix)

    def _make_room(self, n: int, slot: Slot) -> bool:
        """At least ``n`` free cells once ``slot`` is emptied, dropping idle slots' caches (least
        recently used first) if needed; False when running requests hold too much."""
        def free() -> int:  # shared cells count once per sequence: an underestimate
            return self.n_ctx - sum(len(s.tokens) for s in self._slots if s is not slot)

        for idle in sorted((s for s in self._slots if s.job is None and s is not slot
                            and s.tokens), key=lambda s: s.last_used):
            if free() >= n:
                break
            self._truncate(idle, 0)
        return free() >= n

    def _prefix_bound(self, job: Job, start: int) -> int:
        """Most prompt tokens the next chunk may take: it ends at the prefix to be saved."""
        return job.prefix - start if job.save_prefix and start < job.prefix else len(job.tokens)

    def _prompt_chunk_done(self, slot: Slot) -> None:
        """After a prompt chunk: when the sequence holds exactly the role prefix, save it."""
        job = slot.job
        if not job.save_prefix or len(slot.tokens) != job.prefix:
            return
        job.save_prefix = False
        size = L.llama_state_seq_get_size(self._ctx, slot.id)
        payload = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(payload)
        n = L.llama_state_seq_get_data(self._ctx, view, size, slot.id)
        del view
        if n:
            del payload[n:]
            self.prefix_store.save(slot.tokens[:job.prefix], payload)

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


common_prefix = _common  # the same measure for the generator's role-prefix length
