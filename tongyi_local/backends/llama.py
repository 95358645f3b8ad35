"""Local backend: a GGUF model in-process through llama.cpp's low-level API.

The only module that loads models for generation. Why low-level: the high-level ``Llama.generate``
loses ~12% of decode speed to Python and handles one sequence at a time. Here a ``BatchEngine``
(``_engine.py``) owns the context and decodes every running request in one ``llama_decode`` per
step (continuous batching over ``slots`` sequences, prompt prefixes shared through the KV cache);
this module loads the model, makes the context, turns requests into token lists and hands back a
``Stream`` per request. Each request's sampling state is a ``Sequence`` (``_sequence.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path

from .. import chat_format
from ..errors import BackendError, ContextOverflowError, InvalidRequestError, ModelLoadError
from ..gguf_header import GGUFHeader, read_header
from ..hardware import ThreadPlan, apply_pinning, this_machine_plan
from ..kv_types import KV_CACHE_TYPES, ggml_type
from ..tool_calls import OPEN, AnswerShaper
from ..types import Chunk, Completion, Message, Request, Sampling
from .base import BaseGenerator
from ._engine import BatchEngine
from ._jobs import Job, Stream
from ._lookup import DRAFT_COST, SpeculativeConfig, logits_rows
from ._slots import common_prefix
from .prefix_store import PrefixCacheSettings, PrefixKey, PrefixStore
from ._sequence import Sequence, Utf8Tables
from .runtime import L, captured, ensure_runtime

log = logging.getLogger("tongyi_local.llama")


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
    slots: int = 1  # requests decoded together; n_ctx is what ONE of them can use (see below)


@dataclass(frozen=True)
class SlotState:
    id: int
    busy: bool
    cached_tokens: int  # tokens whose KV state the slot holds (kept after a request for reuse)


def _free(ctx: object, model: object) -> None:
    """Free the context and model; the engine thread calls it as it stops (or the loader)."""
    if ctx:
        L.llama_free(ctx)
    if model:
        L.llama_model_free(model)


DEFAULT_SLOTS = 4  # concurrent requests one loaded model serves (sequences of its KV cache)


class LlamaGenerator(BaseGenerator):
    """A GGUF model loaded in-process, serving up to ``slots`` requests at once.

    Thread-safe: requests from any thread join the running batch at the next step; beyond
    ``slots`` they wait in a FIFO queue. KV choice: one *unified* cache of ``n_ctx`` cells shared
    by the slots (llama-server's default with parallel slots): a request alone can use the whole
    context, so ``info.n_ctx`` is what one request can use, and memory stays that of one
    ``n_ctx`` (split per-slot caches would give each request only ``n_ctx / slots``). Idle slots
    keep their prompts for reuse; those cells widen every running sequence's attention span
    (measured: 1500 idle cells cost the 270M starter model ~4% decode, ~6% prompt speed), so
    ``clear_cache()`` drops them and ``reuse_prompt_prefix=False`` never keeps them.
    llama.cpp's quantized kernels are not batch-invariant: a greedy request decoded alongside
    others may take another path at a near-tie; ``slots=1`` gives run-to-run identical text.
    ``close()`` ends running and queued requests with ``GeneratorClosedError``; every method
    used after it raises ``GeneratorClosedError`` (the model's memory is gone).

    Tools and ``response_schema`` are decoded under a grammar (``schema/``), so a required or
    named tool call, and a structured answer, always parse and validate; in ``auto`` mode the
    grammar wakes up when the model writes ``<tool_call>`` (llama.cpp's lazy grammar).

    ``speculative="ngram"`` (the default) drafts, per running request, the tokens that followed
    the latest earlier occurrence of its last ``ngram_size`` tokens (prompt-lookup decoding; up
    to ``max_draft`` per step) and verifies them in the same batch: each kept token is the one
    the request's own pick (argmax, its sampler chain, its grammar) makes, so greedy text is
    unchanged and sampled text keeps its distribution (with a seed, the same draws). Draft
    lengths follow each request's acceptance and a fixed ``draft_cost`` per batch token (so
    they depend on the tokens alone and greedy text repeats run after run); a request whose
    drafts keep failing stops drafting. ``deterministic`` requests never draft. Verifying
    several tokens in one batch can change a greedy pick at a near-tie (llama.cpp's CPU kernels
    are not batch-invariant), as batching with other requests can. ``None`` turns it off.
    """

    guarantees_schema = True
    backend = "llama"

    def __init__(self, model_path: str | Path, *, n_ctx: int | None = 4096, n_batch: int = 512,
                 n_ubatch: int = 512, threads: int | None = None, batch_threads: int | None = None,
                 pin_threads: bool = True, mmap: bool = True, mlock: bool = False,
                 reuse_prompt_prefix: bool = True, sampling: Sampling | None = None,
                 name: str | None = None, slots: int = DEFAULT_SLOTS, kv_cache_type: str = "f16",
                 disk_prefix_cache: bool | PrefixCacheSettings = True,
                 speculative: str | None = "ngram", ngram_size: int = 3,
                 max_draft: int = 8, draft_cost: float = DRAFT_COST) -> None:
        started = time.perf_counter()
        spec = _speculative_config(speculative, ngram_size, max_draft, draft_cost)
        if not isinstance(slots, int) or not 1 <= slots <= min(n_batch, 256):
            raise InvalidRequestError(f"slots must be an integer in [1, {min(n_batch, 256)}] "
                                      f"(got {slots!r})")
        if kv_cache_type not in KV_CACHE_TYPES:
            raise InvalidRequestError(f"kv_cache_type must be one of "
                                      f"{', '.join(KV_CACHE_TYPES)} (got {kv_cache_type!r})")
        header = read_header(model_path)  # rejects bad files before llama.cpp sees them
        ensure_runtime()
        self._use_lock = threading.RLock()  # close() waits for users of the model's memory
        self.path = header.path
        self.name = name or self.path.stem
        self.default_sampling = sampling or Sampling()
        self.thread_plan = this_machine_plan(threads=threads, batch_threads=batch_threads,
                                             pin=pin_threads)
        apply_pinning(self.thread_plan)
        self._model = self._load_model(mmap, mlock)
        if spec is not None and (L.llama_model_is_recurrent(self._model)
                                 or L.llama_model_is_hybrid(self._model)):
            log.info("%s: recurrent state cannot drop rejected draft tokens; no speculation",
                     self.path.name)
            spec = None
        self._spec = spec
        n_outputs = logits_rows(slots, spec, n_batch)
        self._ctx = self._new_context(n_ctx, n_batch, n_ubatch, slots,
                                      ggml_type(kv_cache_type).value, n_outputs)
        self._vocab = L.llama_model_get_vocab(self._model)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._utf8_tables = Utf8Tables(self._n_vocab)  # shared by its requests (engine thread)
        self._n_ctx = L.llama_n_ctx_seq(self._ctx)  # unified: the whole cache, for one request
        self._bos = L.llama_vocab_bos(self._vocab)
        try:
            self._engine = BatchEngine(
                self._ctx, self._vocab, n_vocab=self._n_vocab, n_ctx=self._n_ctx,
                n_batch=L.llama_n_batch(self._ctx), n_slots=slots,
                reuse_prefix=reuse_prompt_prefix, name=self.name,
                on_exit=functools.partial(_free, self._ctx, self._model),
                speculative=spec, n_outputs=n_outputs)
        except BaseException:
            _free(self._ctx, self._model)
            raise
        self._prefix_store = self._engine.prefix_store = _prefix_store(
            disk_prefix_cache, self.path, self._n_ctx, kv_cache_type)
        # the engine frees the context on its own thread, never under a running step
        self._finalizer = weakref.finalize(self, self._engine.close)
        template = L.llama_model_chat_template(self._model, None)
        self._template = template or _builtin_template_for(header)
        self._jinja_template = template.decode("utf-8", "replace") if template else None
        self._bos_text = self._special_text(L.llama_vocab_bos(self._vocab))
        self._eos_text = self._special_text(L.llama_vocab_eos(self._vocab))
        self.load_ms = self._engine.load_ms = (time.perf_counter() - started) * 1e3
        self.info = ModelInfo(
            path=self.path, architecture=header.architecture, n_ctx=self._n_ctx,
            n_ctx_train=L.llama_model_n_ctx_train(self._model), n_vocab=self._n_vocab,
            n_params=header.n_params, size_bytes=header.size_bytes,
            chat_template=("gguf" if template else self._template.decode()),
            threads=self.thread_plan, slots=slots)
        log.info("loaded %s (%s, n_ctx=%d, slots=%d, threads=%d) in %.0f ms", self.path.name,
                 header.architecture, self._n_ctx, slots, self.thread_plan.threads, self.load_ms)

    @property
    def reuse_prompt_prefix(self) -> bool:
        return self._engine.reuse_prefix

    @reuse_prompt_prefix.setter
    def reuse_prompt_prefix(self, value: bool) -> None:
        self._engine.reuse_prefix = bool(value)  # read by the engine at each admission

    @property
    def speculative(self) -> str | None:
        """"ngram" while prompt-lookup drafting is on, else None (settable between requests)."""
        return "ngram" if self._engine.speculative is not None else None

    @speculative.setter
    def speculative(self, value: str | None) -> None:
        if value is not None and self._spec is None:
            raise InvalidRequestError(f"{self.name} was loaded without speculative decoding; "
                                      "load it with speculative='ngram' to switch it on")
        _speculative_config(value, 1, 1)  # validates the name
        self._engine.speculative = self._spec if value else None  # read at each step

    # --- loading ----------------------------------------------------------------------------
    def _load_model(self, mmap: bool, mlock: bool) -> object:
        params = L.llama_model_default_params()
        params.load_mode = {(True, False): 1, (False, False): 0,
                            (True, True): 3, (False, True): 2}[(mmap, mlock)]
        with captured() as capture:
            model = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise ModelLoadError(self.path, capture.reason("llama.cpp could not load the model"))
        return model

    def _new_context(self, n_ctx: int | None, n_batch: int, n_ubatch: int, slots: int,
                     kv_type: int, n_outputs: int) -> object:
        trained = L.llama_model_n_ctx_train(self._model)
        if n_ctx is not None and n_ctx < 16:
            L.llama_model_free(self._model)
            raise InvalidRequestError(f"n_ctx must be >= 16 (got {n_ctx})")
        params = L.llama_context_default_params()
        params.n_ctx = min(n_ctx, trained) if n_ctx else trained
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = slots
        params.kv_unified = True
        params.n_outputs_max = n_outputs  # per step: a row per running sequence and draft token
        params.type_k = params.type_v = kv_type
        params.n_threads = self.thread_plan.threads
        params.n_threads_batch = self.thread_plan.batch_threads
        params.no_perf = True
        with captured() as capture:
            ctx = L.llama_init_from_model(self._model, params)
        if not ctx:
            L.llama_model_free(self._model)
            raise ModelLoadError(self.path, capture.reason(
                f"could not create a context of {params.n_ctx} tokens (out of memory?)"))
        return ctx

    # --- text <-> tokens --------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        with self._in_use():
            return tokenize(self._vocab, text, add_special=add_special, parse_special=True)

    def render_chat(self, messages: tuple[Message, ...], tools: tuple = ()) -> str:
        """The prompt text of a chat: the GGUF's own Jinja template (sandboxed; with ``tools``),
        else the architecture's built-in template through llama.cpp."""
        self._check_open()
        if self._jinja_template is not None:
            return chat_format.render(self._jinja_template, messages, tools,
                                      bos_token=self._bos_text, eos_token=self._eos_text,
                                      model=self.name)
        if tools:
            messages = chat_format.with_tool_prompt(messages, tools)
        return self._builtin_render(chat_format.tools_as_text(messages))

    def _builtin_render(self, messages: tuple[Message, ...]) -> str:
        keep = [(m.role.encode(), m.content.encode("utf-8", "surrogatepass")) for m in messages]
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

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self._vocab, token, buf, 64, 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", "replace")

    def _chat_tokens(self, messages: tuple[Message, ...], tools: tuple) -> list[int]:
        tokens = self.tokenize(self.render_chat(messages, tools))
        if len(tokens) > 1 and tokens[0] == tokens[1] == self._bos:
            tokens = tokens[1:]  # template text already starts with BOS
        return tokens

    def _chat_parts(self, request: Request) -> tuple[tuple[Message, ...], tuple]:
        """The messages and tools a chat request's prompt is rendered from."""
        messages = request.messages
        if request.response_schema is not None:
            messages = chat_format.with_schema_instruction(messages,
                                                           request.response_schema.schema)
        return messages, (request.tools if request.calls_tools else ())

    def _role_prefix(self, request: Request, tokens: list[int]) -> int:
        """How many leading prompt tokens a later request of the same role shares: the system
        turn(s) and tool definitions, as far as the template renders them the same whatever
        the user asks (two probe conversations that differ only in the user's text). 0 when
        shorter than the disk cache's minimum, or without a disk cache or a system message."""
        store = self._prefix_store
        if store is None or request.messages is None:
            return 0
        messages, tools = self._chat_parts(request)
        n_system = next((i for i, m in enumerate(messages) if m.role != "system"),
                        len(messages))
        if not n_system or (not tools and sum(len(m.content) for m in messages[:n_system])
                            < store.min_tokens):  # a token spans at least one character
            return 0
        system = messages[:n_system]
        try:
            probes = [self._chat_tokens(system + (Message("user", text),), tools)
                      for text in ("0", "1")]
        except InvalidRequestError:  # a template that refuses this shape: no prefix
            return 0
        shared = probes[0][:common_prefix(probes[0], probes[1], len(probes[0]))]
        n = common_prefix(tokens, shared, len(tokens) - 1)
        return n if n >= store.min_tokens else 0

    def _prompt_tokens(self, request: Request) -> list[int]:
        if request.messages is None:
            tokens = self.tokenize(request.prompt)
        else:
            tokens = self._chat_tokens(*self._chat_parts(request))
        if not tokens or (request.prompt is not None and not request.prompt.strip()):
            raise InvalidRequestError("the prompt is empty")
        if len(tokens) >= self._n_ctx:
            raise ContextOverflowError(len(tokens), self._n_ctx,
                                       " (one more is needed for the reply)")
        return tokens

    def _grammar(self, request: Request) -> object:
        """The grammar sampler a request decodes under, or None (plain text)."""
        from .. import schema

        if request.response_schema is not None:
            return self._grammar_sampler(schema.grammar_for(request.response_schema.schema))
        if not request.calls_tools:
            return None
        choice = request.tool_choice
        tools = [t for t in request.tools if choice.mode != "named" or t.name == choice.name]
        text = schema.tool_call_grammar([(t.name, t.parameters) for t in tools],
                                        parallel=request.parallel_tool_calls
                                        and choice.mode != "named")
        return self._grammar_sampler(text, lazy=choice.mode == "auto")

    def _grammar_sampler(self, grammar: str, *, lazy: bool = False) -> object:
        with captured() as capture:
            if lazy:  # constrain from the first "<tool_call>" on; free text before it
                patterns = (ctypes.c_char_p * 1)(f"[\\s\\S]*?({OPEN}[\\s\\S]*)".encode())
                sampler = L.llama_sampler_init_grammar_lazy_patterns(
                    self._vocab, grammar.encode(), b"root", patterns, 1, None, 0)
            else:
                sampler = L.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            raise InvalidRequestError(capture.reason(
                f"{self.name}: llama.cpp rejected the grammar built for this request"))
        return sampler

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        """Hold the model's memory for the caller: close() waits, a closed model refuses."""
        with self._use_lock:
            self._check_open()
            yield

    # --- generation -------------------------------------------------------------------------
    def _generate(self, request: Request) -> Stream:
        """Queue the request with the engine; the returned stream yields its chunks."""
        started = time.perf_counter()
        with self._in_use():
            tokens = self._prompt_tokens(request)  # fails before any work is queued
            sequence = Sequence(self._n_vocab, request.sampling, self._grammar(request),
                                self._utf8_tables)
            try:
                sequence.accept_prompt(tokens)
                job = Job(tokens, sequence, request.sampling.max_tokens, started)
                job.prefix = self._role_prefix(request, tokens)
                self._engine.submit(job)
            except BaseException:
                sequence.free()
                raise
        shaper = (AnswerShaper(request, self.name)
                  if request.calls_tools or request.response_schema is not None else None)
        return Stream(job, self._engine.cancel, self._engine.alive, self, shaper)

    def _drain(self, chunks: Iterator[Chunk]) -> Completion:
        """complete/chat: the text arrives whole with the final chunk, not token by token
        (unless the stream is wrapped, e.g. for content logging)."""
        return super()._drain(chunks.quiet() if isinstance(chunks, Stream) else chunks)

    def slot_states(self) -> tuple[SlotState, ...]:
        """What each slot is doing and how much KV it holds (a snapshot, for reports/tests)."""
        return tuple(SlotState(*row) for row in self._engine.slot_states())

    @property
    def queued(self) -> int:
        """Requests waiting for a free slot."""
        return self._engine.waiting()

    def clear_cache(self) -> None:
        """Forget the prompts idle slots keep for reuse (frees their KV cells)."""
        self._engine.clear_cache()

    @property
    def prefix_store(self) -> PrefixStore | None:
        """Where role prefixes' KV state is kept across processes (None: the disk cache is off)."""
        return self._prefix_store

    def _release(self) -> None:
        with self._use_lock:
            self._finalizer()
        if self._prefix_store is not None:
            self._prefix_store.wait()  # state files are complete once close() returns


def _prefix_store(option: bool | PrefixCacheSettings, path: Path, n_ctx: int,
                  kv_type: str) -> PrefixStore | None:
    if option is False:
        return None
    if not isinstance(option, (bool, PrefixCacheSettings)):
        raise InvalidRequestError(f"disk_prefix_cache must be True, False or a "
                                  f"PrefixCacheSettings (got {option!r})")
    settings = option if isinstance(option, PrefixCacheSettings) else PrefixCacheSettings()
    if settings.resolved_max_bytes() == 0:
        return None  # a cap of 0 bytes turns the disk cache off
    return PrefixStore(PrefixKey.for_model(path, n_ctx=n_ctx, kv_type=kv_type), settings)


def _speculative_config(kind: object, ngram_size: object, max_draft: object,
                        draft_cost: object = DRAFT_COST) -> SpeculativeConfig | None:
    if kind is not None and kind != "ngram":
        raise InvalidRequestError(f"speculative must be 'ngram' or None (got {kind!r})")
    for name, value, top in (("ngram_size", ngram_size, 16), ("max_draft", max_draft, 64)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise InvalidRequestError(f"{name} must be an integer in [1, {top}] (got {value!r})")
    if (not isinstance(draft_cost, (int, float)) or isinstance(draft_cost, bool)
            or not 0 <= draft_cost <= 1):
        raise InvalidRequestError(f"draft_cost must be a number in [0, 1], the share of a "
                                  f"one-request step one draft token adds (got {draft_cost!r})")
    if kind is None:
        return None
    return SpeculativeConfig(ngram_size=ngram_size, max_draft=max_draft,
                             min_ngram=min(ngram_size, SpeculativeConfig.min_ngram),
                             draft_cost=float(draft_cost))


def _builtin_template_for(header: GGUFHeader) -> bytes:
    """A GGUF without a template gets its family's built-in one (llama.cpp's own names)."""
    arch = header.architecture
    if arch.startswith("gemma"):
        return b"gemma"
    return b"chatml"  # Qwen and Tongyi models speak ChatML


def tokenize(vocab: object, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    """llama.cpp's tokenizer, retried once with the exact size it asks for."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"the text has a character UTF-8 cannot encode at position "
                                  f"{exc.start} ({exc.reason}: a lone surrogate?); pass valid "
                                  "Unicode text") from exc
    capacity = len(data) + 16
    for _ in range(2):
        buf = (L.llama_token * capacity)()
        n = L.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n >= 0:
            return list(buf[:n])
        capacity = -n
    raise BackendError("llama.cpp's tokenizer did not settle on a token count")
