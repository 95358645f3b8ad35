"""Continuous batching over one llama.cpp context: llama-server's slots, in-process.

Why: parallel agents on one loaded model must not queue behind each other, and llama.cpp decodes
several sequences in one batch far faster than one after another. One engine thread owns the
context. Each step it admits waiting requests (FIFO) into free slots, builds ONE batch holding the
next token of every generating sequence plus prompt chunks of newly admitted ones, calls
``llama_decode`` once, samples per sequence and hands text to each request's queue.

KV layout: one unified cache (``kv_unified``) shared by the slots, slot i = sequence id i. A
request alone may use the whole context; any mix of sequences fits one ubatch (split caches need
consecutive sequence ids per ubatch, so a finished slot in the middle splits every step); a
prefix held by another sequence is shared with ``llama_memory_seq_cp`` for free (cells gain a
sequence id; nothing is copied or evaluated again). A slot keeps its KV when its request ends, so
the next request with the same prefix (e.g. the same role's system prompt) resumes from it. When
the shared cache runs out of cells: idle slots' caches go first (least recently used), then
prompt chunks shrink, and only then does the running request holding the most cells end with
``ContextOverflowError``.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from ..errors import BackendError, ContextOverflowError, GeneratorClosedError, OutputParseError
from ..types import Chunk, Completion, Timings, Usage
from ._jobs import CLOSED, Job
from ._lookup import Drafter, SpeculativeConfig, allocate
from ._sequence import GrammarDeadEnd
from ._slots import Slot, SlotPolicy

from .runtime import L, captured

log = logging.getLogger("tongyi_local.llama")


class _Batch:
    """A llama_batch whose arrays are numpy buffers: prompt chunks are written as slices."""

    def __init__(self, capacity: int) -> None:
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq = np.zeros(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        p_seq = ctypes.POINTER(L.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ptrs = (p_seq * capacity)(*[ctypes.cast(base + 4 * i, p_seq)
                                              for i in range(capacity)])
        self.struct = L.llama_batch(
            n_tokens=0, token=self.token.ctypes.data_as(ctypes.POINTER(L.llama_token)),
            embd=None, pos=self.pos.ctypes.data_as(ctypes.POINTER(L.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_ptrs, logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))


class BatchEngine(SlotPolicy):
    """Owns one llama.cpp context; every llama call on it runs on the engine thread."""

    def __init__(self, ctx: object, vocab: object, *, n_vocab: int, n_ctx: int, n_batch: int,
                 n_slots: int, reuse_prefix: bool, name: str,
                 on_exit: Callable[[], None], speculative: SpeculativeConfig | None = None,
                 n_outputs: int | None = None) -> None:
        self._ctx, self._vocab, self._mem = ctx, vocab, L.llama_get_memory(ctx)
        self.n_vocab, self.n_ctx, self.n_batch = n_vocab, n_ctx, n_batch
        self.reuse_prefix = reuse_prefix
        self.speculative = speculative  # read at each step; None: no drafts
        self.n_outputs = n_outputs or n_slots  # logits rows one step may ask for
        self.model_name, self.load_ms = name, 0.0
        self._on_exit = on_exit
        self._slots = [Slot(i) for i in range(n_slots)]
        self._active: list[Slot] = []  # engine thread only, in admission order
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._dirty = False  # set under the lock by other threads; read lock-free each step
        self._closing = False
        self._clear_requested = False
        self._batch = _Batch(n_batch)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._views: dict[tuple[int, int], np.ndarray] = {}
        self._thread = threading.Thread(target=self._run, name=f"tongyi-local-engine-{name}",
                                        daemon=True)
        self._thread.start()

    # --- called from any thread -------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise GeneratorClosedError(f"{self.model_name} is closed; create a new generator")
            self._waiting.append(job)
            self._dirty = True
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop a request at the next step boundary; its slot is free for the next one."""
        with self._cv:
            if job.done or job.cancelled:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                job.done = True
            self._dirty = True
            self._cv.notify()
        job.out.put(CLOSED)

    def clear_cache(self) -> None:
        """Drop the KV state idle slots keep for prefix reuse (applied at the next step)."""
        with self._cv:
            self._clear_requested = self._dirty = True
            self._cv.notify()

    def slot_states(self) -> list[tuple[int, bool, int]]:
        """(sequence id, busy, tokens held in the KV cache) per slot; a snapshot for reports."""
        return [(s.id, s.job is not None, len(s.tokens)) for s in self._slots]

    def alive(self) -> bool:
        return self._thread.is_alive()

    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cv:
            self._closing = self._dirty = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cv.notify()
        for job in waiting:
            self._fail(job, GeneratorClosedError(f"{self.model_name} was closed"))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # --- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._on_exit()

    def _loop(self) -> None:
        while True:
            try:
                if self._dirty or not self._active:
                    with self._cv:
                        while not self._boundary():
                            self._cv.wait()
                    if self._closing:
                        self._fail_active(GeneratorClosedError(
                            f"{self.model_name} was closed while the request was running"))
                        return
                self._step()
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the engine
                log.exception("engine step failed; the running requests end with an error")
                self._fail_active(exc if isinstance(exc, BackendError)
                                  else BackendError(f"local generation failed: {exc}"))
                L.llama_memory_clear(self._mem, True)
                for slot in self._slots:
                    slot.tokens = []

    def _boundary(self) -> bool:
        """Between steps, under the lock: apply cancellations, admit; False = nothing to do."""
        self._dirty = False
        self._reap()
        if self._closing:
            return True
        self._admit()
        return bool(self._active)

    def _reap(self) -> None:
        now = time.perf_counter()
        for slot in [s for s in self._active if s.job.cancelled]:
            self._release(slot, now)
        if self._clear_requested:
            self._clear_requested = False
            for slot in self._slots:
                if slot.job is None:
                    self._truncate(slot, 0)

    def _admit(self) -> None:
        while self._waiting:
            idle = [s for s in self._slots if s.job is None]
            if not idle or (self._active and (self._waiting[0].exclusive
                                              or self._active[0].job.exclusive)):
                return  # an exclusive request runs alone; FIFO order holds around it
            job = self._waiting.popleft()
            try:
                slot = self._isolate(idle) if job.exclusive else self._place(job, idle)
            except Exception as exc:  # noqa: BLE001 - that request fails, not the engine
                log.exception("could not place a request; it ends with an error")
                self._fail(job, BackendError(f"local generation failed: {exc}"))
                continue
            slot.job = job
            self._active.append(slot)
            log.debug("slot %d: request admitted, %d of %d prompt tokens cached%s", slot.id,
                      job.cached, len(job.tokens), " (follows a shared prefix)" * bool(job.follow))

    def _isolate(self, idle: list[Slot]) -> Slot:
        """A slot for a reproducible request: the whole KV cache emptied (idle cells change the
        attention kernels' shapes, and so their rounding), the prompt evaluated from scratch."""
        for slot in self._slots:
            self._truncate(slot, 0)
        return idle[0]

    def _plan(self, prefill_budget: int, drafts: bool = True) -> list[tuple[Slot, int, int]]:
        """Fill the batch: (slot, tokens added, batch index of its output or -1) per sequence.

        Generating sequences first (their next token, then its draft, all with logits), then
        prompt chunks in admission order."""
        b, n, entries = self._batch, 0, []
        generating = [s for s in self._active if s.job.pending >= 0]
        self._draft(generating, drafts)
        for slot in generating:
            job = slot.job
            pos = len(slot.tokens)
            b.token[n], b.pos[n], b.seq[n] = job.pending, pos, slot.id
            b.logits[n] = 1
            entries.append((slot, 0, n))
            n += 1
            if job.draft:
                end = n + len(job.draft)
                b.token[n:end] = job.draft
                b.pos[n:end] = np.arange(pos + 1, pos + 1 + len(job.draft), dtype=np.int32)
                b.seq[n:end] = slot.id
                b.logits[n:end] = 1
                n = end
        budget = min(prefill_budget, self.n_batch - n)
        for slot in self._active:
            job = slot.job
            if job.pending >= 0 or budget <= 0 or (job.follow and not self._follow_ready(slot)):
                continue
            start = len(slot.tokens)
            take = min(len(job.tokens) - start, budget, self._prefix_bound(job, start))
            end = n + take
            b.token[n:end] = job.tokens[start:start + take]
            b.pos[n:end] = np.arange(start, start + take, dtype=np.int32)
            b.seq[n:end] = slot.id
            b.logits[n:end] = 0
            last = start + take == len(job.tokens)
            if last:
                b.logits[end - 1] = 1
            entries.append((slot, take, end - 1 if last else -1))
            n, budget = end, budget - take
        b.struct.n_tokens = n
        return entries

    def _draft(self, generating: list[Slot], allowed: bool) -> None:
        """Choose each generating sequence's draft for this step (``job.draft``): the tokens
        that followed the latest earlier occurrence of its last n-gram, as many as are expected
        to pay (``_lookup.allocate``), never past max_tokens, the context or the batch."""
        config = self.speculative
        drafters, candidates, jobs = [], [], []
        for slot in generating:
            job = slot.job
            job.draft = []
            if config is None or not allowed or job.exclusive:
                continue
            if job.drafter is None:
                job.drafter = Drafter(config, slot.tokens + [job.pending])
            limit = min(job.max_tokens - job.n_gen - 1, self.n_ctx - len(slot.tokens) - 1)
            candidate = job.drafter.candidate(limit)
            if candidate:
                drafters.append(job.drafter)
                candidates.append(candidate)
                jobs.append(job)
            else:
                job.drafter.idle_steps += 1
        if not candidates:
            return
        room = min(self.n_outputs, self.n_batch) - len(self._active)
        taken = allocate(drafters, candidates, len(generating), config.draft_cost, room)
        for job, candidate, k in zip(jobs, candidates, taken):
            if k:
                job.draft = candidate[:k]
            else:
                job.drafter.idle_steps += 1

    def _step(self) -> None:
        """One batch: plan, decode, pick."""
        self._advance(self._plan(self.n_batch))

    def _advance(self, entries: list[tuple[Slot, int, int]]) -> None:
        t0 = time.perf_counter()
        for slot, take, _ in entries:
            if take and not slot.job.t_prompt:
                slot.job.t_prompt = t0
        entries = self._decode(entries)
        now = time.perf_counter()
        outputs, n_rows = [], 0
        for slot, take, index in entries:
            job = slot.job
            if take:
                start = len(slot.tokens)
                slot.tokens.extend(job.tokens[start:start + take])
                self._prompt_chunk_done(slot)
                if index >= 0:
                    job.prompt_ms = (now - job.t_prompt) * 1e3
            else:
                slot.tokens.append(job.pending)
                job.steps += 1
            if index >= 0:
                outputs.append((slot, index, n_rows))
                n_rows += 1 + (0 if take else len(job.draft))
        if not outputs:
            return
        rows = self._rows(n_rows)
        if all(slot.job.sequence.fast_greedy for slot, _, _ in outputs):
            picks = rows.argmax(axis=1).tolist()
            for slot, index, row in outputs:
                if slot.job.draft:
                    self._verify(slot, index, rows, row, now, picks)
                else:
                    self._on_token(slot, picks[row], now)
            return
        for slot, index, row in outputs:
            if slot.job.draft:
                self._verify(slot, index, rows, row, now, None)
                continue
            token = self._sample(slot, index, rows[row])
            if token is not None:  # None: that request failed alone; its slot is free
                self._on_token(slot, token, now)

    def _verify(self, slot: Slot, index: int, rows: np.ndarray, row: int, now: float,
                picks: list[int] | None) -> None:
        """Pick the token after the pending one and after each draft token, in order, as the
        sequence picks (argmax or its own sampler); keep the draft while the picks match it.
        The first pick that differs is still this sequence's next token. Each kept token goes
        through ``_on_token`` (stop strings, EOS, max_tokens), so a request ends exactly where
        it would without the draft; the KV of the draft tokens not kept is removed."""
        job = slot.job
        draft, job.draft = job.draft, []
        accepted = 0
        for j in range(len(draft) + 1):
            token = picks[row + j] if picks is not None else self._sample(
                slot, index + j, rows[row + j])
            if token is None:  # the request failed alone; its slot is free
                break
            self._on_token(slot, token, now)
            if slot.job is not job or j == len(draft) or token != draft[j]:
                break
            slot.tokens.append(token)  # its KV is already there: it was fed as a draft token
            job.steps += 1
            accepted += 1
        job.drafter.record(len(draft), accepted)
        if accepted < len(draft) and slot.tokens:
            L.llama_memory_seq_rm(self._mem, slot.id, len(slot.tokens), -1)

    def _sample(self, slot: Slot, index: int, row: np.ndarray) -> int | None:
        sequence = slot.job.sequence
        if sequence.fast_greedy:
            return int(row.argmax())
        try:
            return sequence.sample(self._ctx, index, row, self._piece)
        except GrammarDeadEnd as exc:
            job = slot.job
            self._release(slot, time.perf_counter())
            job.out.put(OutputParseError(f"{self.model_name}: {exc}"))
            return None

    def _decode(self, entries: list[tuple[Slot, int, int]]) -> list[tuple[Slot, int, int]]:
        """One llama_decode; when the cache is full, free cells and try again with less."""
        while entries:
            with captured() as capture:
                rc = L.llama_decode(self._ctx, self._batch.struct)
            if rc == 0:
                return entries
            if rc != 1:
                raise BackendError(capture.reason(f"llama_decode failed with code {rc}"))
            idle = [s for s in self._slots if s.job is None and s.tokens]
            if idle:
                self._truncate(min(idle, key=lambda s: s.last_used), 0)
                continue
            if any(slot.job.draft for slot, take, _ in entries if not take):
                entries = self._plan(self.n_batch, drafts=False)  # drafts go first
                continue
            prefill = sum(take for _, take, _ in entries)
            if prefill > 1 or (prefill and len(entries) > 1):
                entries = self._plan(prefill // 2, drafts=False)  # a smaller chunk may fit
                continue
            victim = max(self._active, key=lambda s: len(s.tokens))
            job = victim.job
            held = len(victim.tokens) + 1 if job.pending >= 0 else len(job.tokens)
            self._release(victim, time.perf_counter())
            self._truncate(victim, 0)
            job.out.put(ContextOverflowError(
                held, self.n_ctx, f" (the KV cache is shared with {len(self._active)} other "
                "running request(s) and is full)"))
            entries = self._plan(self.n_batch, drafts=False)
        return entries

    def _rows(self, n: int) -> np.ndarray:
        """The logits of this step's outputs, one row each in batch order (a cached view)."""
        addr = ctypes.cast(L.llama_get_logits(self._ctx), ctypes.c_void_p).value
        view = self._views.get((addr, n))
        if view is None:
            if len(self._views) > 64:
                self._views.clear()
            raw = (ctypes.c_float * (n * self.n_vocab)).from_address(addr)
            view = self._views[(addr, n)] = np.ctypeslib.as_array(raw).reshape(n, self.n_vocab)
        return view

    def _on_token(self, slot: Slot, token: int, now: float) -> None:
        job = slot.job
        if job.t_first is None:
            job.t_first = now
        job.t_last = now
        seq = job.sequence
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(L.llama_vocab_is_eog(self._vocab, token))
        if eog and not seq.ignore_eos:
            return self._finish(slot, "stop", now)
        job.n_gen += 1
        out = seq.push(self._piece(token))
        if out and job.stream:
            job.out.put(Chunk(text=out))
        if seq.stopped:
            return self._finish(slot, "stop", now)
        if job.n_gen >= job.max_tokens or len(slot.tokens) >= self.n_ctx:
            return self._finish(slot, "length", now)
        job.pending = token
        if job.drafter is not None:
            job.drafter.push(token)
        return None

    def _finish(self, slot: Slot, reason: str, now: float) -> None:
        job = slot.job
        self._release(slot, now)
        if job.cancelled:
            return
        seq = job.sequence
        tail = seq.flush()
        ended = time.perf_counter()
        timings = Timings(
            load_ms=self.load_ms, prompt_eval_ms=job.prompt_ms,
            prompt_eval_tokens=len(job.tokens) - job.cached,
            ttft_ms=(job.t_first - job.started) * 1e3, decode_ms=(job.t_last - job.t_first) * 1e3,
            decode_tokens=job.steps, total_ms=(ended - job.started) * 1e3,
            draft_tokens=job.drafter.drafted_total if job.drafter else 0,
            accepted_tokens=job.drafter.accepted_total if job.drafter else 0)
        completion = Completion(
            text=seq.text, finish_reason=reason,
            usage=Usage(prompt_tokens=len(job.tokens), completion_tokens=job.n_gen,
                        cached_prompt_tokens=job.cached),
            timings=timings, model=self.model_name)
        job.out.put(Chunk(text=tail, finish_reason=reason, completion=completion))

    def _release(self, slot: Slot, now: float) -> None:
        """The request leaves its slot; the slot keeps its KV state for prefix reuse (without
        reuse it is dropped at once: idle cells widen every other sequence's attention span)."""
        job = slot.job
        job.done = True
        job.sequence.free()
        slot.job, slot.last_used = None, now
        self._active.remove(slot)
        if not self.reuse_prefix:
            self._truncate(slot, 0)

    def _fail(self, job: Job, error: BaseException) -> None:
        job.done = True
        job.sequence.free()
        job.out.put(error)

    def _fail_active(self, error: BaseException) -> None:
        for slot in list(self._active):
            job = slot.job
            self._release(slot, time.perf_counter())
            job.out.put(error)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

