"""OpenTelemetry spans and metrics, read with the real SDK (in-memory span exporter and metric
reader) from real requests: the local llama.cpp models, the real DashScope SDK against the scripted
server on 127.0.0.1, a role from a models.toml, a fallback. No prompt text may appear in anything
exported unless the content opt-in is set.

The SDK's providers can be set once per process, so they are set up once for this module; each
test starts from an empty exporter and a fresh (delta) metric collection.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import (Counter, Histogram, MeterProvider, ObservableCounter,
                                       ObservableGauge, ObservableUpDownCounter, UpDownCounter)
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.servers import scripted
from tests.test_registry import registry  # noqa: F401 - roles "coder" etc. on the starter model
from tests.servers.scripted import ScriptedServer, status
from tongyi_local import telemetry
from tongyi_local.backends.dashscope import DashScopeGenerator
from tongyi_local.backends.llama import LlamaGenerator
from tongyi_local.backends.retry import RetryPolicy
from tongyi_local.errors import ServerError
from tongyi_local.fallback import FallbackGenerator
from tongyi_local.pool import ModelPool, processes_status

PROMPT = "PRIVATE-PROMPT-quarterly-numbers-for-telemetry"
KEY = "sk-test-telemetry-0123456789"
DELTA = AggregationTemporality.DELTA


_installed: list = []  # the providers of this process, once set (OpenTelemetry refuses a second)


@pytest.fixture(scope="module")
def otel():
    """The real SDK, installed as the global providers once per process: a worker may run this
    module's tests in more than one stretch, and each stretch sets the module fixture up again."""
    if not _installed:
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        reader = InMemoryMetricReader(preferred_temporality={
            Counter: DELTA, UpDownCounter: DELTA, Histogram: DELTA, ObservableCounter: DELTA,
            ObservableUpDownCounter: DELTA, ObservableGauge: DELTA})
        meter_provider = MeterProvider(metric_readers=[reader])
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        assert trace.get_tracer_provider() is tracer_provider, "another module set a provider first"
        _installed.append(Exported(exporter, reader))
    exported = _installed[0]
    exported.reset()
    return exported


class Exported:
    def __init__(self, exporter: InMemorySpanExporter, reader: InMemoryMetricReader) -> None:
        self.exporter, self.reader = exporter, reader

    def reset(self) -> None:
        self.exporter.clear()
        self.reader.get_metrics_data()  # delta temporality: the next read starts from here

    def spans(self):
        return self.exporter.get_finished_spans()

    def points(self) -> dict[str, list]:
        """Metric name -> data points collected since the last read."""
        found: dict[str, list] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)
        return found


@pytest.fixture
def exported(otel, monkeypatch):
    monkeypatch.delenv(telemetry.CONTENT_ENV, raising=False)
    monkeypatch.delenv(telemetry.TELEMETRY_ENV, raising=False)
    otel.reset()
    return otel


@pytest.fixture
def server():
    srv = ScriptedServer("dashscope", api_key=KEY)
    yield srv
    srv.close()


def everything_exported(spans, points) -> list[str]:
    """Every string in the spans (names, attributes, events, status) and metric attributes."""
    values: list[str] = []
    for span in spans:
        values += [span.name, span.status.description or ""]
        values += [str(v) for v in span.attributes.values()]
        for event in span.events:
            values += [event.name] + [str(v) for v in event.attributes.values()]
    for rows in points.values():
        for point in rows:
            values += [str(v) for v in point.attributes.values()]
    return values


def one(spans, name):
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def histogram(points, name, **attrs):
    rows = [p for p in points.get(name, ())
            if all(p.attributes.get(k) == v for k, v in attrs.items())]
    return rows


def test_a_local_chat_has_a_genai_span_and_metrics_and_no_prompt(exported, chat_model):
    done = chat_model.chat([{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0,
                           seed=7)
    (span,) = exported.spans()
    assert span.name == f"chat {chat_model.name}" and span.kind == SpanKind.INTERNAL
    a = span.attributes
    assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"], a["gen_ai.system"]) == (
        "chat", "llama.cpp", "llama.cpp")
    assert a["gen_ai.request.model"] == chat_model.name and a["gen_ai.response.model"] == done.model
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"],
            a["gen_ai.request.seed"]) == (8, 0.0, 7)
    assert a["gen_ai.usage.input_tokens"] == done.usage.prompt_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == done.usage.completion_tokens > 0
    assert a["gen_ai.usage.cache_read.input_tokens"] == done.usage.cached_prompt_tokens
    assert tuple(a["gen_ai.response.finish_reasons"]) == (done.finish_reason,)
    assert a["gen_ai.response.time_to_first_chunk"] == pytest.approx(done.timings.ttft_ms / 1e3)
    assert a["tongyi_local.backend"] == "llama" and a["gen_ai.request.stream"] is False
    assert span.status.status_code == StatusCode.UNSET
    points = exported.points()
    usage = {p.attributes["gen_ai.token.type"]: p.sum
             for p in histogram(points, "gen_ai.client.token.usage")}
    assert usage == {"input": done.usage.prompt_tokens, "output": done.usage.completion_tokens}
    (duration,) = histogram(points, "gen_ai.client.operation.duration")
    assert duration.count == 1 and 0 < duration.sum < 60
    assert duration.attributes["gen_ai.request.model"] == chat_model.name
    (ttft,) = histogram(points, "gen_ai.server.time_to_first_token")
    assert ttft.sum == pytest.approx(done.timings.ttft_ms / 1e3)
    (rate,) = histogram(points, "tongyi_local.decode.rate")
    assert rate.sum == pytest.approx(done.timings.decode_tokens_per_s)
    values = everything_exported(exported.spans(), points)
    assert not [v for v in values if PROMPT in v]
    if len(done.text.strip()) > 3:
        assert not [v for v in values if done.text.strip() in v]


def test_a_stream_span_lives_until_the_stream_ends(exported, starter):
    stream = starter.stream(PROMPT, max_tokens=6, temperature=0, ignore_eos=True)
    first = next(stream)
    assert first.text is not None and exported.spans() == ()  # still open
    chunks = [first, *stream]
    (span,) = exported.spans()
    assert span.name == f"text_completion {starter.name}"
    assert span.attributes["gen_ai.request.stream"] is True
    assert span.attributes["gen_ai.usage.output_tokens"] == 6
    assert chunks[-1].completion.usage.completion_tokens == 6
    assert not [v for v in everything_exported(exported.spans(), exported.points()) if PROMPT in v]


def test_a_closed_stream_ends_its_span_as_cancelled(exported, starter):
    stream = starter.stream(PROMPT, max_tokens=400, temperature=0, ignore_eos=True)
    next(stream)
    stream.close()
    (span,) = exported.spans()
    assert span.attributes["error.type"] == "cancelled"
    assert span.status.status_code == StatusCode.ERROR
    (duration,) = histogram(exported.points(), "gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == "cancelled"


def test_a_cancelled_async_request_ends_its_span_as_cancelled(exported, starter):
    async def main():
        task = asyncio.create_task(starter.acomplete(PROMPT, max_tokens=2000, ignore_eos=True,
                                                     temperature=0))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    (span,) = exported.spans()
    assert span.attributes["error.type"] == "cancelled"
    assert wait_for(lambda: not any(s.busy for s in starter.slot_states()))  # the request stopped


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_dropped_stream_ends_its_span(exported, starter):
    stream = starter.stream(PROMPT, max_tokens=400, temperature=0, ignore_eos=True)
    next(stream)
    del stream
    (span,) = exported.spans()
    assert span.attributes["error.type"] == "cancelled"


def test_dashscope_sync_async_and_failed_requests(exported, server):
    gen = DashScopeGenerator("qwen-test", api_key=KEY, base_url=server.url,
                             retry=RetryPolicy.none())
    done = gen.chat([{"role": "user", "content": PROMPT}], temperature=0, max_tokens=16, seed=3)
    (span,) = exported.spans()
    assert span.name == "chat qwen-test" and span.kind == SpanKind.CLIENT
    a = span.attributes
    assert (a["gen_ai.provider.name"], a["gen_ai.request.model"], a["gen_ai.response.model"]) == (
        "dashscope", "qwen-test", "dashscope:qwen-test")
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"],
            a["gen_ai.usage.cache_read.input_tokens"]) == (7, 2, 3)
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",) and done.text == "Hello world"
    points = exported.points()
    assert histogram(points, "gen_ai.client.operation.time_to_first_chunk",
                     **{"gen_ai.provider.name": "dashscope"})
    assert not histogram(points, "gen_ai.server.time_to_first_token")
    assert not [v for v in everything_exported(exported.spans(), points) if PROMPT in v]

    async def native():
        await gen.achat([{"role": "user", "content": PROMPT}])
        return [c async for c in gen.astream(PROMPT)]

    exported.reset()
    chunks = asyncio.run(native())
    assert chunks[-1].completion.text == "Hello world"
    spans = exported.spans()
    assert [s.name for s in spans] == ["chat qwen-test", "text_completion qwen-test"]
    assert spans[1].attributes["gen_ai.request.stream"] is True
    assert all(s.attributes["gen_ai.usage.output_tokens"] == 2 for s in spans)

    exported.reset()
    server.script(status(500, "InternalError", f"server echoes {PROMPT}"))
    with pytest.raises(ServerError):
        gen.chat([{"role": "user", "content": PROMPT}])
    (failed,) = exported.spans()
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["error.type"] == "tongyi_local.errors.ServerError"
    assert not [v for v in everything_exported(exported.spans(), exported.points()) if PROMPT in v]
    gen.close()


def test_a_fallback_is_an_event_on_the_routers_span_with_both_routes_nested(exported, starter):
    offline = DashScopeGenerator("qwen-test", api_key=KEY, retry=RetryPolicy.none(),
                                 base_url=f"http://127.0.0.1:{scripted.free_port()}/api/v1")
    router = FallbackGenerator(offline, starter, role="tester")
    done = router.complete(PROMPT, max_tokens=4, temperature=0)
    spans = exported.spans()
    outer = one(spans, f"text_completion {router.name}")
    failed, served = one(spans, "text_completion qwen-test"), one(spans, f"text_completion {starter.name}")
    assert failed.parent.span_id == served.parent.span_id == outer.context.span_id
    assert failed.attributes["error.type"] == "tongyi_local.errors.RemoteConnectionError"
    assert outer.attributes["tongyi_local.role"] == served.attributes["tongyi_local.role"] == "tester"
    assert outer.attributes["gen_ai.usage.output_tokens"] == done.usage.completion_tokens
    (event,) = outer.events
    assert event.name == "tongyi_local.fallback"
    assert (event.attributes["tongyi_local.fallback.action"], event.attributes["tongyi_local.fallback.from"],
            event.attributes["tongyi_local.fallback.to"], event.attributes["tongyi_local.fallback.reason"]) == (
        "fallback", "dashscope:qwen-test", starter.name, "RemoteConnectionError")
    points = exported.points()
    (count,) = points["tongyi_local.fallbacks"]
    assert count.value == 1 and count.attributes["tongyi_local.fallback.reason"] == "RemoteConnectionError"
    # metrics come from the model calls only: one output figure, for the model that answered
    outputs = histogram(points, "gen_ai.client.token.usage", **{"gen_ai.token.type": "output"})
    assert [(p.attributes["gen_ai.request.model"], p.sum) for p in outputs] == [
        (starter.name, done.usage.completion_tokens)]
    assert outputs[0].attributes["tongyi_local.role"] == "tester"
    assert not [v for v in everything_exported(spans, points) if PROMPT in v]


def test_a_roles_span_holds_its_models_span_also_across_the_async_worker_thread(exported,
                                                                               registry):
    coder = registry.for_role("coder")
    tracer = trace.get_tracer("agent")

    async def main():
        with tracer.start_as_current_span("agent step"):
            return [c async for c in coder.astream(PROMPT)]

    chunks = asyncio.run(main())
    spans = exported.spans()
    step = one(spans, "agent step")
    (role_span,) = [s for s in spans if s.parent and s.parent.span_id == step.context.span_id]
    (model_span,) = [s for s in spans if s.parent and s.parent.span_id == role_span.context.span_id]
    assert role_span.name == model_span.name == "text_completion base"  # the model entry's name
    assert role_span.attributes["tongyi_local.role"] == model_span.attributes["tongyi_local.role"]
    assert model_span.context.trace_id == step.context.trace_id
    assert model_span.attributes["gen_ai.provider.name"] == "llama.cpp"
    assert role_span.attributes["gen_ai.usage.output_tokens"] == (
        chunks[-1].completion.usage.completion_tokens)
    outputs = histogram(exported.points(), "gen_ai.client.token.usage",
                        **{"gen_ai.token.type": "output"})
    assert len(outputs) == 1 and outputs[0].attributes["tongyi_local.role"] == "coder"


def test_live_figures_in_gauges_the_status_file_and_ps(exported, tmp_path, starter_path):
    pool = ModelPool(lambda path: LlamaGenerator(path, n_ctx=512, slots=2), lambda path: 50 << 20,
                     budget_bytes=1 << 30, keep_alive_s=None, status_dir=tmp_path / "run")
    try:
        # a name no other pool of the test process holds: the gauge sums pools per model name
        with pool.checkout("m", starter_path, "gauge-starter", "coder") as gen:
            gen.complete("Hello", max_tokens=8, ignore_eos=True, temperature=0)
            stream = gen.stream("Once upon a time", max_tokens=400, ignore_eos=True)
            next(stream)
            gauges = exported.points()
            busy = [p.value for p in gauges["tongyi_local.slots.busy"]
                    if p.attributes["tongyi_local.model"] == gen.name]
            assert busy == [1]
            assert [p.value for p in gauges["tongyi_local.requests.queued"]
                    if p.attributes["tongyi_local.model"] == gen.name] == [0]
            assert [p.value for p in gauges["tongyi_local.pool.memory"]
                    if p.attributes["tongyi_local.model"] == "gauge-starter"] == [50 << 20]
            pool._activity()
            pool._write_status()  # what the once-a-second refresh writes, now
            (model,) = processes_status(tmp_path / "run")[0]["models"]
            assert (model["in_flight"], model["slots_busy"], model["slots"], model["queued"]) == (
                1, 1, 2, 0)
            assert model["decode_tps"] > 0
            stream.close()
        env = {**os.environ, "TONGYI_LOCAL_HOME": str(tmp_path), "COLUMNS": "200"}
        shown = subprocess.run([sys.executable, "-m", "tongyi_local", "ps", "--json"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        (proc,) = json.loads(shown.stdout)
        (row,) = proc["models"]
        assert row["name"] == "gauge-starter" and row["decode_tps"] > 0 and row["slots"] == 2
        table = subprocess.run([sys.executable, "-m", "tongyi_local", "ps"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert "decode t/s" in table.stdout and "gauge-starter" in table.stdout
    finally:
        pool.close()


def test_the_status_file_follows_requests_within_a_second(exported, tmp_path, tiny_qwen2):
    pool = ModelPool(lambda path: LlamaGenerator(path, n_ctx=256), lambda path: 10 << 20,
                     budget_bytes=1 << 30, keep_alive_s=None, status_dir=tmp_path / "run")
    try:
        def in_flight() -> int:
            return processes_status(tmp_path / "run")[0]["models"][0]["in_flight"]

        with pool.checkout("m", tiny_qwen2, "tiny"):
            # the load wrote the file just now: the lease is written when the second is up
            assert in_flight() == 0 and wait_for(lambda: in_flight() == 1, 3.0)
        assert in_flight() == 1  # released within a second of the last write: deferred
        assert wait_for(lambda: in_flight() == 0, 3.0)
        with pool.checkout("m", tiny_qwen2, "tiny") as gen:
            gen.complete(PROMPT, max_tokens=2, ignore_eos=True)
        assert wait_for(lambda: processes_status(tmp_path / "run")[0]["models"][0]["decode"])
        assert PROMPT not in (tmp_path / "run").joinpath(f"{os.getpid()}.json").read_text()
    finally:
        pool.close()


def test_with_the_opt_in_content_is_recorded(exported, starter, monkeypatch):
    monkeypatch.setenv(telemetry.CONTENT_ENV, "1")
    done = starter.complete(PROMPT, max_tokens=4, temperature=0)
    (span,) = exported.spans()
    asked = json.loads(span.attributes["gen_ai.input.messages"])
    assert asked == [{"role": "user", "parts": [{"type": "text", "content": PROMPT}]}]
    answered = json.loads(span.attributes["gen_ai.output.messages"])
    assert answered[0]["parts"][0]["content"] == done.text
    assert answered[0]["finish_reason"] == done.finish_reason


def test_telemetry_off_records_nothing(exported, starter, monkeypatch):
    monkeypatch.setenv(telemetry.TELEMETRY_ENV, "0")
    assert starter.complete(PROMPT, max_tokens=2).usage.completion_tokens == 2
    assert list(starter.stream(PROMPT, max_tokens=2))[-1].completion is not None
    assert exported.spans() == ()
    assert not exported.points().get("gen_ai.client.token.usage")


def test_without_an_sdk_everything_works(starter_path):
    """A fresh process with only the API (no provider set): requests of every kind still work."""
    script = textwrap.dedent(f"""
        import asyncio
        from opentelemetry import trace
        from tongyi_local.backends.llama import LlamaGenerator
        from tongyi_local.backends.fake import FakeGenerator
        from tongyi_local.fallback import FallbackGenerator
        from tongyi_local.errors import BackendUnavailableError

        assert not trace.get_current_span().is_recording()
        with LlamaGenerator({str(starter_path)!r}, n_ctx=256) as gen:
            assert gen.complete("Hello", max_tokens=3, ignore_eos=True).usage.completion_tokens == 3
            assert list(gen.stream("Hello", max_tokens=3))[-1].completion is not None
            assert asyncio.run(gen.acomplete("Hello", max_tokens=2)).usage.completion_tokens >= 1
            s = gen.stream("Hello", max_tokens=200, ignore_eos=True); next(s); s.close()
            router = FallbackGenerator(FakeGenerator([BackendUnavailableError("down")]), gen)
            assert router.complete("Hello", max_tokens=2).text is not None
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_the_async_pump_thread_runs_in_the_callers_context(exported):
    """A stream whose spans start lazily, on the pump thread, still nests under the caller's."""
    from tongyi_local.backends.aio import AsyncStream

    def lazy():
        with trace.get_tracer("test").start_as_current_span("inside the stream"):
            yield "chunk"

    async def main():
        with trace.get_tracer("agent").start_as_current_span("agent step"):
            return [c async for c in AsyncStream(lazy())]

    assert asyncio.run(main()) == ["chunk"]
    spans = exported.spans()
    inner, step = one(spans, "inside the stream"), one(spans, "agent step")
    assert inner.parent is not None and inner.parent.span_id == step.context.span_id


def test_the_memory_gauge_sums_pools_that_hold_one_model(exported, tmp_path, tiny_qwen2):
    pools = [ModelPool(lambda path: LlamaGenerator(path, n_ctx=256), lambda path, size=size: size,
                       budget_bytes=1 << 30, keep_alive_s=None, status_dir=tmp_path / f"run{size}")
             for size in (10 << 20, 20 << 20)]
    try:
        with pools[0].checkout("m", tiny_qwen2, "held-twice"), \
                pools[1].checkout("m", tiny_qwen2, "held-twice"):
            values = [p.value for p in exported.points()["tongyi_local.pool.memory"]
                      if p.attributes["tongyi_local.model"] == "held-twice"]
            assert values == [30 << 20]
    finally:
        for pool in pools:
            pool.close()
