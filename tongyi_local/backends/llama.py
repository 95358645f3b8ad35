"""Local backend: a GGUF model in-process through llama.cpp's low-level API.

The only module that imports ``llama_cpp``. Why low-level: the high-level ``Llama.generate`` loses
~12% of decode speed to Python; here the hot loop is one ``llama_decode`` per token, greedy
sampling is a numpy argmax over the logits, and token pieces are cached. Everything a request
owns (tokens, sampler, decoder, stop-string state) lives in ``_Sequence``, so running several
sequences in one batch later means several such objects, not a rewrite.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import (BackendError, BackendUnavailableError, ContextOverflowError,
                      InvalidRequestError, ModelLoadError)
from ..gguf_header import GGUFHeader, read_header
from ..hardware import ThreadPlan, apply_pinning, this_machine_plan
from ..types import Chunk, Completion, Message, Request, Sampling, Timings, Usage
from .base import BaseGenerator

try:
    import llama_cpp as L
except ImportError:  # pragma: no cover - exercised only without the runtime
    L = None

log = logging.getLogger("tongyi_local.llama")
_runtime_lock = threading.Lock()
_runtime_ready = False
_recent_problems: collections.deque[str] = collections.deque(maxlen=12)
# ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line.
_LEVEL = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


def _on_llama_log(level: int, text: bytes, _user: object) -> None:
    py_level = _last_level[0] if level == 5 else _LEVEL.get(level, logging.DEBUG)
    _last_level[0] = py_level
    line = text.decode("utf-8", errors="replace").rstrip()
    if not line:
        return
    if py_level >= logging.WARNING:
        _recent_problems.append(line)
    log.log(py_level, "%s", line)


_log_callback = L.llama_log_callback(_on_llama_log) if L else None


def _ensure_runtime() -> None:
    """Initialise llama.cpp once and route its logging into ``logging`` (not stderr)."""
    global _runtime_ready
    if L is None:
        raise BackendUnavailableError(
            "llama-cpp-python is not installed in this environment; run ./bootstrap.sh run "
            "or `python -m tongyi_local.build` to build it from the CMake preset")
    with _runtime_lock:
        if not _runtime_ready:
            L.llama_log_set(_log_callback, ctypes.c_void_p(0))
            L.llama_backend_init()
            _runtime_ready = True


def system_info() -> str:
    """llama.cpp's own report of the SIMD features this build uses."""
    _ensure_runtime()
    return L.llama_print_system_info().decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    architecture: str
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    n_params: int
    size_bytes: int
    chat_template: str  # the GGUF's own template, or the name of the built-in one used
    threads: ThreadPlan


def _free(ctx: object, model: object) -> None:
    if ctx:
        L.llama_free(ctx)
    if model:
        L.llama_model_free(model)


class LlamaGenerator(BaseGenerator):
    """A GGUF model loaded in-process. Thread-safe: one lock serialises requests on the model."""

    def __init__(self, model_path: str | Path, *, n_ctx: int | None = 4096, n_batch: int = 512,
                 n_ubatch: int = 512, threads: int | None = None, batch_threads: int | None = None,
                 pin_threads: bool = True, mmap: bool = True, mlock: bool = False,
                 reuse_prompt_prefix: bool = True, sampling: Sampling | None = None,
                 name: str | None = None) -> None:
        started = time.perf_counter()
        header = read_header(model_path)  # rejects bad files before llama.cpp sees them
        _ensure_runtime()
        self.path = header.path
        self.name = name or self.path.stem
        self.default_sampling = sampling or Sampling()
        self.reuse_prompt_prefix = reuse_prompt_prefix
        self._lock = threading.Lock()
        self.thread_plan = this_machine_plan(threads=threads, batch_threads=batch_threads,
                                             pin=pin_threads)
        apply_pinning(self.thread_plan)
        self._model = self._load_model(mmap, mlock)
        self._ctx = self._new_context(header, n_ctx, n_batch, n_ubatch)
        self._finalizer = weakref.finalize(self, _free, self._ctx, self._model)
        self._vocab = L.llama_model_get_vocab(self._model)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._n_ctx = L.llama_n_ctx(self._ctx)
        self._n_batch = L.llama_n_batch(self._ctx)
        self._bos = L.llama_vocab_bos(self._vocab)
        self._pieces: dict[int, bytes] = {}
        self._kv_tokens: list[int] = []  # tokens whose KV state is in sequence 0
        self._one = (L.llama_token * 1)()
        self._one_batch = L.llama_batch_get_one(self._one, 1)
        template = L.llama_model_chat_template(self._model, None)
        self._template = template or _builtin_template_for(header)
        self.load_ms = (time.perf_counter() - started) * 1e3
        self.info = ModelInfo(
            path=self.path, architecture=header.architecture, n_ctx=self._n_ctx,
            n_ctx_train=L.llama_model_n_ctx_train(self._model), n_vocab=self._n_vocab,
            n_params=header.n_params, size_bytes=header.size_bytes,
            chat_template=("gguf" if template else self._template.decode()),
            threads=self.thread_plan)
        log.info("loaded %s (%s, n_ctx=%d, threads=%d) in %.0f ms", self.path.name,
                 header.architecture, self._n_ctx, self.thread_plan.threads, self.load_ms)

    # --- loading ----------------------------------------------------------------------------
    def _load_model(self, mmap: bool, mlock: bool) -> object:
        params = L.llama_model_default_params()
        params.load_mode = {(True, False): 1, (False, False): 0,
                            (True, True): 3, (False, True): 2}[(mmap, mlock)]
        _recent_problems.clear()
        model = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise ModelLoadError(self.path, _llama_reason("llama.cpp could not load the model"))
        return model

    def _new_context(self, header: GGUFHeader, n_ctx: int | None, n_batch: int,
                     n_ubatch: int) -> object:
        trained = L.llama_model_n_ctx_train(self._model)
        if n_ctx is not None and n_ctx < 16:
            L.llama_model_free(self._model)
            raise InvalidRequestError(f"n_ctx must be >= 16 (got {n_ctx})")
        params = L.llama_context_default_params()
        params.n_ctx = min(n_ctx, trained) if n_ctx else trained
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = 1
        params.n_outputs_max = 1  # only the last position's logits are ever read
        params.n_threads = self.thread_plan.threads
        params.n_threads_batch = self.thread_plan.batch_threads
        params.no_perf = True
        ctx = L.llama_init_from_model(self._model, params)
        if not ctx:
            L.llama_model_free(self._model)
            raise ModelLoadError(self.path, _llama_reason(
                f"could not create a context of {params.n_ctx} tokens (out of memory?)"))
        return ctx

    # --- text <-> tokens --------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (L.llama_token * capacity)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, True)
        if n < 0:
            capacity = -n
            buf = (L.llama_token * capacity)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, True)
        return buf[:n]

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

    def render_chat(self, messages: tuple[Message, ...]) -> str:
        """Apply the model's chat template (the GGUF's own, else the architecture's built-in)."""
        keep = [(m.role.encode(), m.content.encode()) for m in messages]
        chat = (L.llama_chat_message * len(keep))(
            *[L.llama_chat_message(role=r, content=c) for r, c in keep])
        size = 2 * sum(len(c) + len(r) for r, c in keep) + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = L.llama_chat_apply_template(self._template, chat, len(keep), True, buf, size)
            if n < 0:
                raise InvalidRequestError(
                    f"{self.name}: llama.cpp does not support this model's chat template; "
                    "use complete() with a formatted prompt")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n
        raise BackendError("chat template output did not fit its buffer")

    def _prompt_tokens(self, request: Request) -> list[int]:
        if request.tools:
            raise InvalidRequestError(f"{self.name}: the local backend does not take tools= yet")
        if request.messages is None:
            tokens = self.tokenize(request.prompt)
        else:
            tokens = self.tokenize(self.render_chat(request.messages))
            if len(tokens) > 1 and tokens[0] == tokens[1] == self._bos:
                tokens = tokens[1:]  # template text already starts with BOS
        if not tokens:
            raise InvalidRequestError("the prompt is empty")
        if len(tokens) >= self._n_ctx:
            raise ContextOverflowError(len(tokens), self._n_ctx,
                                       " (one more is needed for the reply)")
        return tokens

    # --- generation -------------------------------------------------------------------------
    def _decode(self, tokens: list[int]) -> None:
        """Evaluate tokens after the cached ones, in chunks of n_batch."""
        arr = (L.llama_token * len(tokens))(*tokens)
        item = ctypes.sizeof(L.llama_token)
        for start in range(0, len(tokens), self._n_batch):
            n = min(self._n_batch, len(tokens) - start)
            ptr = ctypes.cast(ctypes.addressof(arr) + start * item, ctypes.POINTER(L.llama_token))
            self._check(L.llama_decode(self._ctx, L.llama_batch_get_one(ptr, n)))
            self._kv_tokens.extend(tokens[start:start + n])

    def _check(self, rc: int) -> None:
        if rc == 1:
            raise ContextOverflowError(len(self._kv_tokens) + 1, self._n_ctx,
                                       " (no room left in the KV cache)")
        if rc != 0:
            raise BackendError(_llama_reason(f"llama_decode failed with code {rc}"))

    def _reuse_prefix(self, tokens: list[int]) -> int:
        """Keep the KV state of the longest shared prefix (at least one token is re-evaluated)."""
        mem = L.llama_get_memory(self._ctx)
        keep = 0
        if self.reuse_prompt_prefix:
            limit = min(len(self._kv_tokens), len(tokens) - 1)
            while keep < limit and self._kv_tokens[keep] == tokens[keep]:
                keep += 1
            if keep and L.llama_memory_seq_pos_min(mem, 0) > 0:
                keep = 0  # a sliding-window cache dropped early positions: start over
        if keep < len(self._kv_tokens):
            if not keep or not L.llama_memory_seq_rm(mem, 0, keep, -1):
                L.llama_memory_clear(mem, True)
                keep = 0
            del self._kv_tokens[keep:]
        return keep

    def _generate(self, request: Request) -> Iterator[Chunk]:
        started = time.perf_counter()
        tokens = self._prompt_tokens(request)  # fails before taking the lock
        sampling = request.sampling
        with self._lock:
            if self._closed:
                raise BackendError(f"{self.name} was closed")
            seq = _Sequence(self, sampling)
            try:
                cached = self._reuse_prefix(tokens)
                t_prompt = time.perf_counter()
                self._decode(tokens[cached:])
                prompt_ms = (time.perf_counter() - t_prompt) * 1e3
                seq.accept_prompt(tokens)
                t_first = t_last = None
                finish = "length"
                n_gen = steps = 0
                while True:
                    token = seq.sample()
                    t_last = time.perf_counter()
                    if t_first is None:
                        t_first = t_last
                    if seq.is_end(token):
                        finish = "stop"
                        break
                    n_gen += 1
                    out = seq.push(self._piece(token))
                    if out:
                        yield Chunk(text=out)
                    if seq.stopped:
                        finish = "stop"
                        break
                    if n_gen >= sampling.max_tokens or len(self._kv_tokens) >= self._n_ctx:
                        break
                    self._one[0] = token
                    self._check(L.llama_decode(self._ctx, self._one_batch))
                    self._kv_tokens.append(token)
                    steps += 1
            finally:
                seq.free()
        tail = seq.flush()
        ended = time.perf_counter()
        timings = Timings(
            load_ms=self.load_ms, prompt_eval_ms=prompt_ms,
            prompt_eval_tokens=len(tokens) - cached, ttft_ms=(t_first - started) * 1e3,
            decode_ms=(t_last - t_first) * 1e3, decode_tokens=steps,
            total_ms=(ended - started) * 1e3)
        completion = Completion(
            text=seq.text, finish_reason=finish,
            usage=Usage(prompt_tokens=len(tokens), completion_tokens=n_gen,
                        cached_prompt_tokens=cached),
            timings=timings, model=self.name)
        yield Chunk(text=tail, finish_reason=finish, completion=completion)

    def _release(self) -> None:
        with self._lock:
            self._finalizer()


class _Sequence:
    """One request's decoding state: sampler, UTF-8 decoder, stop strings, emitted text."""

    def __init__(self, gen: LlamaGenerator, sampling: Sampling) -> None:
        self.gen = gen
        self.sampling = sampling
        self.ignore_eos = sampling.ignore_eos
        self.fast_greedy = sampling.greedy and sampling.repeat_penalty == 1.0
        self.sampler = None if self.fast_greedy else _sampler_chain(gen._n_vocab, sampling)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = sampling.stop
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def accept_prompt(self, tokens: list[int]) -> None:
        if self.sampler is not None and self.sampling.repeat_penalty != 1.0:
            for token in tokens[-self.sampling.repeat_last_n:] if self.sampling.repeat_last_n else ():
                L.llama_sampler_accept(self.sampler, token)

    def sample(self) -> int:
        if self.fast_greedy:
            logits = L.llama_get_logits_ith(self.gen._ctx, -1)
            view = np.ctypeslib.as_array(logits, shape=(self.gen._n_vocab,))
            return int(view.argmax())
        return L.llama_sampler_sample(self.sampler, self.gen._ctx, -1)

    def is_end(self, token: int) -> bool:
        return not self.ignore_eos and L.llama_vocab_is_eog(self.gen._vocab, token)

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


def _builtin_template_for(header: GGUFHeader) -> bytes:
    """A GGUF without a template gets its family's built-in one (llama.cpp's own names)."""
    arch = header.architecture
    if arch.startswith("gemma"):
        return b"gemma"
    return b"chatml"  # Qwen and Tongyi models speak ChatML


def _llama_reason(default: str) -> str:
    problems = [line for line in _recent_problems if line]
    return "; ".join(problems[-3:]) if problems else default
