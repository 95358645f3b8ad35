"""OpenTelemetry spans and metrics for every request, following the GenAI semantic conventions.

Why only ``opentelemetry-api``: the application that embeds tongyi_local brings its own SDK and
exporter (OTLP, Prometheus, in-memory in tests). Without one the API is a no-op and a request
costs a few microseconds more; ``TONGYI_LOCAL_TELEMETRY=0`` bypasses this module altogether.

One span per request, named ``"{gen_ai.operation.name} {gen_ai.request.model}"`` and living from
the call until the answer is complete, the call fails, or the stream is closed or cancelled
(``error.type = "cancelled"``). A role or fallback wrapper gets a span of its own, and the model's
span nests under it (through the OpenTelemetry context, also across the worker thread the async
face pumps a stream on); only the innermost (model) span records metrics, tagged with the role
it served, so nothing is counted twice. Fallback decisions are events on the wrapper's span.

No prompt or output text goes into a span, event or metric unless ``TONGYI_LOCAL_LOG_CONTENT=1``
(the same opt-in as the content log); then ``gen_ai.input.messages`` / ``gen_ai.output.messages``
carry it. Error messages are never recorded (a server may echo the prompt in them): only the
error's type.

Attribute names are the conventions' strings (the ``opentelemetry-semantic-conventions`` package
moved its GenAI names out to an incubating repository, so they are spelled here).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .types import Chunk, Completion, Request

TELEMETRY_ENV = "TONGYI_LOCAL_TELEMETRY"
CONTENT_ENV = "TONGYI_LOCAL_LOG_CONTENT"

# --- GenAI semantic-convention names ----------------------------------------------------------
OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
SYSTEM = "gen_ai.system"  # the older name of the provider, still read by many backends
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
MAX_TOKENS = "gen_ai.request.max_tokens"
TEMPERATURE = "gen_ai.request.temperature"
TOP_P = "gen_ai.request.top_p"
TOP_K = "gen_ai.request.top_k"
SEED = "gen_ai.request.seed"
STOP_SEQUENCES = "gen_ai.request.stop_sequences"
STREAM = "gen_ai.request.stream"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
CACHED_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
TOKEN_TYPE = "gen_ai.token.type"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
ERROR_TYPE = "error.type"
# --- tongyi_local's own -----------------------------------------------------------------------
ROLE = "tongyi_local.role"
BACKEND = "tongyi_local.backend"
MODEL = "tongyi_local.model"
DECODE_RATE_ATTR = "tongyi_local.decode.tokens_per_s"
FALLBACK_EVENT = "tongyi_local.fallback"
CANCELLED = "cancelled"

PROVIDERS = {"llama": "llama.cpp", "dashscope": "dashscope", "openai": "openai"}

_tracer = trace.get_tracer("tongyi_local")
_meter = metrics.get_meter("tongyi_local")
_ROLE_KEY = otel_context.create_key("tongyi_local.role")

_token_usage = _meter.create_histogram(
    "gen_ai.client.token.usage", unit="{token}", description="Tokens used per request",
    explicit_bucket_boundaries_advisory=[1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144,
                                         1048576, 4194304, 16777216, 67108864])
_duration = _meter.create_histogram(
    "gen_ai.client.operation.duration", unit="s", description="Request duration",
    explicit_bucket_boundaries_advisory=[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
                                         5.12, 10.24, 20.48, 40.96, 81.92])
_ttft_local = _meter.create_histogram(
    "gen_ai.server.time_to_first_token", unit="s",
    description="Time to the first output token of an in-process model",
    explicit_bucket_boundaries_advisory=[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25,
                                         0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0])
_ttft_remote = _meter.create_histogram(
    "gen_ai.client.operation.time_to_first_chunk", unit="s",
    description="Time to the first streamed chunk of a remote model",
    explicit_bucket_boundaries_advisory=[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
                                         5.12, 10.24, 20.48, 40.96, 81.92])
_decode_rate = _meter.create_histogram(
    "tongyi_local.decode.rate", unit="{token}/s", description="Decode speed per request",
    explicit_bucket_boundaries_advisory=[1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500,
                                         1000])
_fallbacks = _meter.create_counter(
    "tongyi_local.fallbacks", unit="{decision}",
    description="Routing decisions of fallback roles, by action and reason")


def enabled() -> bool:
    """Whether requests are instrumented (``TONGYI_LOCAL_TELEMETRY=0`` turns it off)."""
    return os.environ.get(TELEMETRY_ENV, "1") not in ("0", "false", "no", "off")


def content_enabled() -> bool:
    return os.environ.get(CONTENT_ENV, "") in ("1", "true", "yes")


# --- a request ----------------------------------------------------------------------------------
class Call:
    """One instrumented request: its span, its start time and what its metrics are tagged with.

    ``leaf`` calls (a model) record metrics; wrapper calls (a role, a fallback) only carry a span
    and put their role into the context for the calls nested in them.
    """

    __slots__ = ("span", "operation", "started", "attrs", "leaf", "local", "generator",
                 "context", "ended", "_token", "__weakref__")

    def __init__(self, generator: Any, operation: str, request: Request | None, *,
                 stream: bool) -> None:
        backend = str(getattr(generator, "backend", "") or "custom")
        provider = PROVIDERS.get(backend, backend)
        model = requested_model(generator)
        role = getattr(generator, "role_name", None) or otel_context.get_value(_ROLE_KEY)
        self.operation = operation
        self.generator = generator
        self.leaf = bool(getattr(generator, "telemetry_leaf", True))
        self.local = backend == "llama"
        self.ended = False
        self.attrs: dict[str, Any] = {OPERATION: operation, PROVIDER: provider,
                                      REQUEST_MODEL: model, BACKEND: backend}
        if role:
            self.attrs[ROLE] = str(role)
        span_attrs = dict(self.attrs)
        span_attrs[SYSTEM] = provider
        span_attrs[STREAM] = stream
        if request is not None:
            span_attrs.update(_sampling_attributes(request))
            if content_enabled():
                span_attrs[INPUT_MESSAGES] = _input_messages(request)
        kind = SpanKind.INTERNAL if self.local or not self.leaf else SpanKind.CLIENT
        self.span = _tracer.start_span(f"{operation} {model}", kind=kind, attributes=span_attrs)
        self.started = time.perf_counter()
        # the context nested calls start in: this span, and the role for their metrics
        if self.span.is_recording() or not self.leaf:
            ctx = trace.set_span_in_context(self.span)
            self.context = otel_context.set_value(_ROLE_KEY, role, ctx) if role else ctx
        else:
            self.context = None

    def attach(self) -> object | None:
        return otel_context.attach(self.context) if self.context is not None else None

    @staticmethod
    def detach(token: object | None) -> None:
        if token is not None:
            otel_context.detach(token)

    def __enter__(self) -> Call:
        """``with start(...) as call:`` makes the span current for the calls nested in the
        block; an exception leaving the block ends the span with it."""
        self._token = self.attach()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: object) -> None:
        self.detach(self._token)
        if error is not None:
            self.fail(error)

    def finish(self, completion: Completion) -> None:
        if self.ended:
            return
        self.ended = True
        span = self.span
        usage, timings = completion.usage, completion.timings
        if span.is_recording():
            span.set_attributes({
                RESPONSE_MODEL: completion.model, FINISH_REASONS: [completion.finish_reason],
                INPUT_TOKENS: usage.prompt_tokens, OUTPUT_TOKENS: usage.completion_tokens,
                CACHED_INPUT_TOKENS: usage.cached_prompt_tokens,
                TIME_TO_FIRST_CHUNK: timings.ttft_ms / 1e3,
                DECODE_RATE_ATTR: timings.decode_tokens_per_s})
            if content_enabled():
                span.set_attribute(OUTPUT_MESSAGES, _output_messages(completion))
        span.end()
        if self.leaf:
            self._record(completion)

    def _record(self, completion: Completion) -> None:
        attrs = dict(self.attrs)
        attrs[RESPONSE_MODEL] = completion.model
        _duration.record(time.perf_counter() - self.started, attrs)
        usage, timings = completion.usage, completion.timings
        _token_usage.record(usage.prompt_tokens, {**attrs, TOKEN_TYPE: "input"})
        _token_usage.record(usage.completion_tokens, {**attrs, TOKEN_TYPE: "output"})
        if timings.ttft_ms > 0:
            (_ttft_local if self.local else _ttft_remote).record(timings.ttft_ms / 1e3, attrs)
        if timings.decode_tokens > 0 and timings.decode_ms > 0:
            _decode_rate.record(timings.decode_tokens_per_s, attrs)
            note_decode(self.generator, timings.decode_tokens, timings.decode_ms / 1e3)

    def fail(self, error: BaseException | str) -> None:
        """End the span with ``error.type`` (the error's type, never its message)."""
        if self.ended:
            return
        self.ended = True
        kind = (error if isinstance(error, str) else
                CANCELLED if isinstance(error, _CANCELLATIONS) else _error_type(error))
        self.span.set_attribute(ERROR_TYPE, kind)
        self.span.set_status(Status(StatusCode.ERROR, kind))
        self.span.end()
        if self.leaf:
            _duration.record(time.perf_counter() - self.started, {**self.attrs, ERROR_TYPE: kind})

    def cancel(self) -> None:
        self.fail(CANCELLED)

    def watch(self, chunks: Iterator[Chunk]) -> TracedStream:
        return TracedStream(chunks, self)


class _Bypassed:
    """What ``start`` returns with telemetry off: every step does nothing."""

    context = None

    def __enter__(self) -> _Bypassed:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def attach(self) -> None:
        return None

    def detach(self, token: object) -> None:
        pass

    def finish(self, completion: Completion) -> None:
        pass

    def fail(self, error: BaseException | str) -> None:
        pass

    def cancel(self) -> None:
        pass

    def watch(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        return chunks


BYPASSED = _Bypassed()
_CANCELLATIONS = (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)


def start(generator: Any, request: Request | None, *, operation: str | None = None,
          stream: bool = False) -> Call | _Bypassed:
    """Begin a request's span (``operation`` defaults from the request: chat or completion)."""
    if not enabled():
        return BYPASSED
    if operation is None:
        operation = "text_completion" if request is not None and request.messages is None \
            else "chat"
    return Call(generator, operation, request, stream=stream)


def operation_of(prompt_or_messages: object) -> str:
    return "text_completion" if isinstance(prompt_or_messages, str) else "chat"


class TracedStream:
    """A request's chunks, with its span ended when the last one (the ``Completion``) passes,
    when the stream fails, or when it is closed or dropped unfinished (cancelled)."""

    def __init__(self, chunks: Iterator[Chunk], call: Call) -> None:
        self._chunks = chunks
        self._call = call
        self._dropped = weakref.finalize(self, Call.cancel, call)

    def __iter__(self) -> TracedStream:
        return self

    def __next__(self) -> Chunk:
        call = self._call
        token = call.attach() if call.context is not None else None
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._end(None)
            raise
        except BaseException as exc:
            self._end(exc)
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
        if chunk.completion is not None:
            self._dropped.detach()
            call.finish(chunk.completion)
        return chunk

    def quiet(self) -> TracedStream:
        """Only the final chunk is wanted (passed on to a local stream that can skip the
        per-token hand-over)."""
        quiet = getattr(self._chunks, "quiet", None)
        if quiet is not None:
            self._chunks = quiet()
        return self

    def close(self) -> None:
        """Close the underlying stream (cancelling the request) and end the span."""
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._end(CANCELLED)

    def _end(self, error: BaseException | str | None) -> None:
        self._dropped.detach()
        if error is None:  # ended without its final result: a local stream closed elsewhere
            self._call.cancel()
        else:
            self._call.fail(error)


async def traced_async(generator: Any, request: Request,
                       chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """A native-async stream with its span, which starts when the request goes out (the first
    read) and ends with the stream. It runs inside the reader task of ``aio_native.in_task``,
    which is cancelled when the consumer closes the stream, so it ends there too."""
    call = start(generator, request, stream=True)
    token = call.attach()
    try:
        async for chunk in chunks:
            if chunk.completion is not None:
                call.finish(chunk.completion)
            yield chunk
        call.cancel()  # no final result (a no-op after one)
    except BaseException as exc:
        call.fail(exc)
        raise
    finally:
        call.detach(token)


# --- fallback decisions ------------------------------------------------------------------------
def fallback_decision(action: str, role: str | None, source: str, target: str | None,
                      reason: str, latency_ms: float) -> None:
    """A routing decision: an event on the current (the role's) span and a counter."""
    if not enabled():
        return
    attrs = {"tongyi_local.fallback.action": action, "tongyi_local.fallback.from": source,
             "tongyi_local.fallback.to": target or "", "tongyi_local.fallback.reason": reason,
             "tongyi_local.fallback.latency_ms": latency_ms}
    if role:
        attrs[ROLE] = role
    trace.get_current_span().add_event(FALLBACK_EVENT, attrs)
    counted = {k: v for k, v in attrs.items() if k != "tongyi_local.fallback.latency_ms"}
    _fallbacks.add(1, counted)


# --- live figures: decode rate over the last minute, queues, slots, memory ----------------------
WINDOW_S = 60


class DecodeWindow:
    """Tokens decoded and seconds spent decoding, in one-second buckets over the last minute."""

    def __init__(self) -> None:
        self._buckets: deque[list[float]] = deque(maxlen=WINDOW_S + 1)
        self._lock = threading.Lock()

    def add(self, tokens: int, seconds: float, now: float | None = None) -> None:
        second = int(now if now is not None else time.time())
        with self._lock:
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += tokens
                self._buckets[-1][2] += seconds
            else:
                self._buckets.append([second, tokens, seconds])

    def buckets(self, now: float | None = None) -> list[list[float]]:
        """``[second, tokens, seconds]`` rows of the last minute (what the status file holds)."""
        since = int(now if now is not None else time.time()) - WINDOW_S
        with self._lock:
            return [list(b) for b in self._buckets if b[0] > since]


def decode_rate(buckets: Iterable[list[float]], now: float | None = None) -> float | None:
    """Decode tokens/s over the last minute from ``DecodeWindow.buckets`` rows, or None."""
    since = int(now if now is not None else time.time()) - WINDOW_S
    rows = [b for b in buckets if b[0] > since]
    seconds = sum(b[2] for b in rows)
    return sum(b[1] for b in rows) / seconds if seconds > 0 else None


_windows: weakref.WeakKeyDictionary[Any, DecodeWindow] = weakref.WeakKeyDictionary()
_windows_lock = threading.Lock()
_engines: weakref.WeakSet[Any] = weakref.WeakSet()  # local generators with slots to report
_pools: weakref.WeakSet[Any] = weakref.WeakSet()


def note_decode(generator: Any, tokens: int, seconds: float) -> None:
    try:
        window = _windows.get(generator)
        if window is None:
            with _windows_lock:
                window = _windows.setdefault(generator, DecodeWindow())
    except TypeError:  # an unhashable generator: no window
        return
    window.add(tokens, seconds)
    if hasattr(generator, "slot_states"):
        _engines.add(generator)


def recent_decode(generator: Any) -> list[list[float]]:
    """The generator's decode buckets of the last minute (empty when it decoded nothing)."""
    try:
        window = _windows.get(generator)
    except TypeError:
        return []
    return window.buckets() if window is not None else []


def track_pool(pool: Any) -> None:
    """Report this pool's loaded models in the memory, queue and slot gauges."""
    _pools.add(pool)


def _live_generators() -> dict[int, Any]:
    found = {id(g): g for g in list(_engines)}
    for pool in list(_pools):
        for generator in pool.loaded_generators():
            if hasattr(generator, "slot_states"):
                found[id(generator)] = generator
    return {k: g for k, g in found.items() if not getattr(g, "_closed", False)}


def _per_model(read: Any) -> Iterator[metrics.Observation]:
    """``read(generator)`` summed per model name (two loads of one file report as one model)."""
    totals: dict[str, int] = {}
    for generator in _live_generators().values():
        try:
            value = read(generator)
        except Exception:  # noqa: BLE001 - closed meanwhile: nothing to report
            continue
        totals[generator.name] = totals.get(generator.name, 0) + value
    for name, value in totals.items():
        yield metrics.Observation(value, {MODEL: name})


def _observe_slots(options: Any) -> Iterator[metrics.Observation]:
    return _per_model(lambda g: sum(1 for s in g.slot_states() if s.busy))


def _observe_queued(options: Any) -> Iterator[metrics.Observation]:
    return _per_model(lambda g: g.queued)


def _observe_memory(options: Any) -> Iterator[metrics.Observation]:
    """Summed per model name: two pools holding one model report it once, as their total."""
    totals: dict[str, int] = {}
    for pool in list(_pools):
        for model in pool.ps():
            totals[model.name] = totals.get(model.name, 0) + model.memory_bytes
    for name, value in totals.items():
        yield metrics.Observation(value, {MODEL: name})


_meter.create_observable_gauge("tongyi_local.slots.busy", callbacks=[_observe_slots],
                               unit="{slot}", description="Slots of a local model decoding now")
_meter.create_observable_gauge("tongyi_local.requests.queued", callbacks=[_observe_queued],
                               unit="{request}",
                               description="Requests waiting for a free slot of a local model")
_meter.create_observable_gauge("tongyi_local.pool.memory", callbacks=[_observe_memory],
                               unit="By", description="Estimated memory of each pooled model")


# --- helpers -------------------------------------------------------------------------------------
def requested_model(generator: Any) -> str:
    """The model a request asks for: a remote backend's model id, a role's model entry, else
    the generator's name (a local model's file stem)."""
    label = getattr(generator, "telemetry_model", None) or getattr(generator, "model", None)
    return label if isinstance(label, str) else str(getattr(generator, "name", "") or "unknown")


def _sampling_attributes(request: Request) -> dict[str, Any]:
    s = request.sampling
    attrs: dict[str, Any] = {MAX_TOKENS: s.max_tokens, TEMPERATURE: float(s.temperature),
                             TOP_P: float(s.top_p), TOP_K: float(s.top_k)}
    if s.seed is not None:
        attrs[SEED] = s.seed
    return attrs


def _error_type(error: BaseException) -> str:
    cls = type(error)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _input_messages(request: Request) -> str:
    if request.messages is None:
        rows = [{"role": "user", "parts": [{"type": "text", "content": request.prompt}]}]
    else:
        rows = []
        for m in request.messages:
            parts: list[dict[str, Any]] = []
            if m.content:
                parts.append({"type": "tool_call_response", "id": m.tool_call_id,
                              "response": m.content} if m.role == "tool"
                             else {"type": "text", "content": m.content})
            parts += [{"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments}
                      for c in m.tool_calls]
            rows.append({"role": m.role, "parts": parts})
    return json.dumps(rows, default=str)


def _output_messages(completion: Completion) -> str:
    parts: list[dict[str, Any]] = []
    if completion.text:
        parts.append({"type": "text", "content": completion.text})
    parts += [{"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments}
              for c in completion.tool_calls]
    return json.dumps([{"role": "assistant", "parts": parts,
                        "finish_reason": completion.finish_reason}], default=str)
