"""The remote backends' asyncio face: ``achat``/``acomplete``/``astream`` on the event loop.

Real SDK (``dashscope.AioGeneration`` over aiohttp) and real ``httpx.AsyncClient`` over real
sockets to tests/servers/scripted.py on 127.0.0.1; the scripted server is the only stand-in (no
model server can be told to answer 401, 500 or slowly on request). Going away mid-answer is
proved from the server's side: it counts the clients that closed their connection before the
end of a slow (``trickle``) answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from random import Random

import pytest

from tests.servers import scripted
from tests.servers.scripted import (ScriptedServer, Step, drop, slow, status, text, tool_call,
                                    trickle)
from tongyi_local.backends.aio_native import PerLoop
from tongyi_local.backends.dashscope import DashScopeGenerator
from tongyi_local.backends.openai import OpenAIGenerator
from tongyi_local.backends.retry import RetryPolicy, aretrying_stream, retrying_stream
from tongyi_local.errors import (AuthenticationError, ConfigError, GeneratorClosedError,
                                 OutputParseError, RateLimitError, RemoteConnectionError,
                                 RemoteError, RemoteTimeoutError, ResponseFormatError, ServerError,
                                 TongyiError)
from tongyi_local.types import ToolCall

KEY = "sk-async-5ecret-never-shown-0042"
PROMPT = "PRIVATE-PROMPT-async-heron"
PROTOCOLS = ["openai", "dashscope"]
MESSAGES = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "integer"}},
          "required": ["answer"], "additionalProperties": False}
PUMP_THREAD = "tongyi-local-astream"  # what aio.AsyncMixin names its per-request threads


def fast(seed: int = 7, attempts: int = 3) -> RetryPolicy:
    return RetryPolicy(max_attempts=attempts, base_delay_s=0.01, max_delay_s=0.05,
                       max_total_s=5.0, seed=seed)


def make(protocol: str, url: str, *, key: str = KEY, **options):
    options.setdefault("retry", fast())
    if protocol == "openai":
        return OpenAIGenerator("test-model", base_url=url, api_key=key, **options)
    return DashScopeGenerator("qwen-test", api_key=key, base_url=url, **options)


@pytest.fixture(params=PROTOCOLS)
def protocol(request):
    return request.param


@pytest.fixture
def server(protocol):
    srv = ScriptedServer(protocol, api_key=KEY)
    yield srv
    srv.close()


@pytest.fixture
def gen(protocol, server):
    g = make(protocol, server.url)
    yield g
    g.close()


def posts(server) -> int:
    return len(server.generation_requests())


def pump_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == PUMP_THREAD]


def client_threads() -> set[str]:
    """Threads of this process that are not the scripted server's."""
    return {t.name for t in threading.enumerate()
            if "process_request_thread" not in t.name and "serve_forever" not in t.name}


async def until(condition, timeout: float = 1.0) -> bool:
    """Poll ``condition`` while the loop keeps running (finalizers, closes), at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def summary(c):
    return (c.text, c.usage, c.finish_reason, c.model, c.tool_calls, c.parsed)


# --- the same answers as the sync calls -----------------------------------------------------
def test_async_calls_give_what_the_sync_calls_give(gen, server):
    server.default = text("Hel", "lo", " there", usage=(5, 3))
    sync = (gen.chat(MESSAGES), gen.complete("hi"), list(gen.stream(MESSAGES)))

    async def main():
        return (await gen.achat(MESSAGES), await gen.acomplete("hi"),
                [chunk async for chunk in gen.astream(MESSAGES)])

    achat, acomplete, achunks = asyncio.run(main())
    assert summary(achat) == summary(sync[0]) and achat.text == "Hello there"
    assert summary(acomplete) == summary(sync[1])
    assert summary(achunks[-1].completion) == summary(sync[2][-1].completion)
    assert [c.text for c in achunks] == [c.text for c in sync[2]] == ["Hel", "lo", " there", ""]
    assert achunks[-1].finish_reason == "stop" and achat.usage.completion_tokens == 3
    assert 0 < achat.timings.ttft_ms <= achat.timings.total_ms
    bodies = [r.body for r in server.generation_requests()]
    assert bodies[:3] == bodies[3:]  # the same requests on the wire


def test_tool_calls_come_back_typed_with_dict_arguments(gen, server):
    server.script(tool_call("get_weather", '{"city"', ': "Paris"}'),
                  tool_call("get_weather", '{"city": ', '"Oslo"}'))

    async def main():
        chat = await gen.achat(MESSAGES, tools=[WEATHER])
        streamed = [c async for c in gen.astream(MESSAGES, tools=[WEATHER])]
        return chat, streamed[-1].completion

    chat, streamed = asyncio.run(main())
    assert chat.finish_reason == streamed.finish_reason == "tool_calls"
    assert chat.tool_calls == (ToolCall("call_abc", "get_weather", {"city": "Paris"}),)
    assert isinstance(chat.tool_calls[0].arguments, dict)
    assert streamed.tool_calls[0].arguments == {"city": "Oslo"}


def test_a_structured_answer_is_parsed(gen, server):
    server.script(text('{"answer"', ": 4}"), text('{"answer": 5}'))

    async def main():
        chat = await gen.achat(MESSAGES, response_schema=ANSWER)
        streamed = [c async for c in gen.astream(MESSAGES, response_schema=ANSWER)]
        return chat, streamed[-1].completion

    chat, streamed = asyncio.run(main())
    assert chat.parsed == {"answer": 4} and streamed.parsed == {"answer": 5}
    assert posts(server) == 2


def test_an_invalid_structured_answer_is_asked_for_once_more(gen, server, caplog):
    caplog.set_level(logging.INFO, logger="tongyi_local")
    server.script(text("four"), text('{"answer": 4}'))
    assert asyncio.run(gen.achat(MESSAGES, response_schema=ANSWER)).parsed == {"answer": 4}
    assert posts(server) == 2 and "asking once more" in caplog.text
    server.script(text("four"), text('{"answer": "four"}'))
    with pytest.raises(OutputParseError):
        asyncio.run(gen.achat(MESSAGES, response_schema=ANSWER))
    assert posts(server) == 4  # once more, not again and again

    async def stream():  # a stream is the caller's to repeat: it is not asked for again
        return [c async for c in gen.astream(MESSAGES, response_schema=ANSWER)]

    server.script(text("four"))
    with pytest.raises(OutputParseError):
        asyncio.run(stream())
    assert posts(server) == 5


# --- errors: the same classes as sync -------------------------------------------------------
@pytest.mark.parametrize("steps, error, tries", [
    ((status(500, "InternalError", "boom"),) * 3, ServerError, 3),
    ((status(429, "Throttling", "slow down"),) * 3, RateLimitError, 3),
    ((status(500, "InternalError", "boom"), text("ok")), None, 2),
], ids=["500", "429", "500-then-ok"])
def test_status_errors_are_retried_and_mapped_as_sync(gen, server, steps, error, tries):
    outcomes = []
    for call in (lambda: gen.complete("hi"), lambda: asyncio.run(gen.acomplete("hi"))):
        server.script(*steps)
        before = posts(server)
        try:
            outcomes.append((call().text, None))
        except TongyiError as e:
            outcomes.append((type(e), e.attempts))
        assert posts(server) - before == tries
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == ((error, tries) if error else ("ok", None))


@pytest.mark.parametrize("kind", ["malformed_stream", "malformed_json"])
def test_an_answer_that_is_not_the_protocol_is_a_format_error(gen, server, kind):
    errors = []
    for call in (lambda: gen.complete("hi"), lambda: asyncio.run(gen.acomplete("hi"))):
        server.script(Step(kind))
        with pytest.raises(ResponseFormatError, match="base_url") as info:
            call()
        errors.append(info.value)
    assert posts(server) == 2 and "Traceback" not in str(errors[1])
    assert str(errors[0]).split("(")[0] == str(errors[1]).split("(")[0]


def test_a_rejected_key_is_an_authentication_error_and_not_retried(protocol, server, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-async-0123456789abcdef"
    g = make(protocol, server.url, key=wrong)
    with pytest.raises(AuthenticationError) as info:
        asyncio.run(g.achat([{"role": "user", "content": PROMPT}]))
    assert posts(server) == 1 and info.value.status == 401
    shown = caplog.text + str(info.value) + repr(info.value) + repr(g)
    assert wrong not in shown and KEY not in shown and PROMPT not in shown
    with pytest.raises(AuthenticationError):
        g.complete("hi")  # the sync call says the same


def test_a_missing_key_raises_when_the_stream_is_asked_for(protocol, server, monkeypatch):
    monkeypatch.delenv("TONGYI_TEST_UNSET_KEY", raising=False)
    cls, model = ((OpenAIGenerator, "test-model") if protocol == "openai"
                  else (DashScopeGenerator, "qwen-test"))
    g = cls(model, base_url=server.url, api_key_env="TONGYI_TEST_UNSET_KEY")
    with pytest.raises(AuthenticationError, match="TONGYI_TEST_UNSET_KEY"):
        g.astream("hi")  # at once, not on the first chunk
    with pytest.raises(AuthenticationError):
        asyncio.run(g.acomplete("hi"))
    assert posts(server) == 0


def test_connection_refused_is_a_connection_error(protocol):
    path = "/v1" if protocol == "openai" else "/api/v1"
    g = make(protocol, f"http://127.0.0.1:{scripted.free_port()}{path}", retry=fast(attempts=2))
    with pytest.raises(RemoteConnectionError) as info:
        asyncio.run(g.acomplete("hi"))
    assert info.value.attempts == 2 and isinstance(info.value, ConnectionError)
    with pytest.raises(RemoteConnectionError):
        g.complete("hi")


def test_a_silent_server_hits_the_timeout(protocol, server):
    server.default = slow(5)
    g = make(protocol, server.url, timeout_s=0.3, retry=fast(attempts=2))
    start = time.monotonic()
    with pytest.raises(RemoteTimeoutError, match="within 0.3 s") as info:
        asyncio.run(g.acomplete("hi"))
    assert time.monotonic() - start < 4 and info.value.attempts == 2


def test_a_stream_cut_after_text_surfaces_without_a_retry(gen, server):
    server.script(drop("Hel", "lo"))
    seen = []

    async def main():
        async for chunk in gen.astream("hi"):
            seen.append(chunk.text)

    with pytest.raises(RemoteConnectionError, match="dropped mid-answer|ended before"):
        asyncio.run(main())
    assert seen == ["Hel", "lo"] and posts(server) == 1


# --- going away closes the connection, without a thread -------------------------------------
async def _cancel_the_task(gen):
    started = asyncio.Event()

    async def consume():
        async for _ in gen.astream("hi"):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _aclose_the_stream(gen):
    stream = gen.astream("hi")
    await anext(stream)
    await stream.aclose()


async def _break_out(gen):
    async for _ in gen.astream("hi"):
        break


async def _cancel_achat(gen):
    task = asyncio.create_task(gen.achat(MESSAGES))
    await asyncio.sleep(0.35)  # the first piece is in, the next one 2 s away
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("go_away", [_cancel_the_task, _aclose_the_stream, _break_out,
                                     _cancel_achat], ids=lambda f: f.__name__.strip("_"))
def test_going_away_mid_answer_closes_the_connection_at_once(gen, server, go_away):
    # the first piece at once, then one every 2 s: a reader blocked in a socket read (a pump
    # thread) would notice the caller left only when the next piece comes, a second too late
    server.script(trickle(every_s=2.0))

    async def main():
        before = client_threads()
        await go_away(gen)
        gone = time.monotonic()
        left = await until(lambda: server.disconnects >= 1, timeout=1.0)
        return left, time.monotonic() - gone, client_threads() - before

    left, after_s, new_threads = asyncio.run(main())
    assert left, "the server still had the client connected 1 s after it went away"
    assert after_s < 1.0 and posts(server) == 1
    assert PUMP_THREAD not in new_threads


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_streams_run_on_the_event_loop_not_on_threads(protocol, server, gen):
    """OpenAI: no thread at all. DashScope: no pump thread; aiohttp (trust_env, as the SDK sets
    it) looks up netrc and proxies on the loop's default executor, a small bounded pool."""
    server.default = trickle("a", "b", "c", "d", every_s=0.1)

    async def main():
        before = client_threads()
        streams = [gen.astream(f"q{i}") for i in range(8)]
        firsts = await asyncio.gather(*(anext(s) for s in streams))
        during = client_threads()  # eight answers in flight
        pumps = pump_threads()
        for s in streams:
            await s.aclose()
        return firsts, during - before, pumps

    firsts, new_threads, pumps = asyncio.run(main())
    assert [c.text for c in firsts] == ["a"] * 8 and pumps == []
    if protocol == "openai":
        assert new_threads == set()
    else:
        assert len(new_threads) < 8 and all(n.startswith("asyncio_") for n in new_threads)
    assert asyncio.run(until(lambda: server.disconnects >= 8, timeout=2.0))


def test_many_concurrent_requests_on_one_generator_all_complete(gen, server):
    server.default = trickle("a", "b", "c", every_s=0.1)  # about 0.5 s each, 10 s in a row

    async def main():
        start = time.monotonic()
        results = await asyncio.gather(*(gen.achat([{"role": "user", "content": f"q{i}"}])
                                         for i in range(20)))
        return results, time.monotonic() - start

    results, elapsed = asyncio.run(main())
    assert [r.text for r in results] == ["abc"] * 20 and posts(server) == 20
    assert elapsed < 5, "the requests did not run at the same time"


# --- one client per loop, closed with its loop or by close()/aclose() -----------------------
def test_one_generator_serves_loop_after_loop_and_aclose_ends_it(gen, server):
    for _ in range(3):  # each asyncio.run is a new loop: a new client, the old one closed
        assert asyncio.run(gen.achat(MESSAGES)).text == "Hello world"

    async def last():
        async with gen:
            return await gen.acomplete("hi")

    assert asyncio.run(last()).text == "Hello world"
    with pytest.raises(GeneratorClosedError):
        asyncio.run(gen.achat(MESSAGES))


class _Client:
    """Stands in for an httpx/aiohttp client to watch PerLoop's bookkeeping: which loop made
    it, and on which loop it was closed."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closed_on = None

    async def aclose(self) -> None:
        self.closed_on = asyncio.get_running_loop()


def test_per_loop_clients_are_closed_on_their_own_loop():
    made: list[_Client] = []

    def make_client():
        made.append(_Client())
        return made[-1]

    clients = PerLoop(make_client, lambda c: c.aclose())

    async def use():
        first, again = await clients.get(), await clients.get()
        assert first is again
        return first

    a, b = asyncio.run(use()), asyncio.run(use())
    assert a is not b and a.closed_on is a.loop and b.closed_on is b.loop

    async def closed_early():
        c = await clients.get()
        await clients.aclose_current()
        return c, c.closed_on is c.loop

    assert asyncio.run(closed_early())[1]

    loop = asyncio.new_event_loop()  # a loop running in another thread: close_all asks it
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        c = asyncio.run_coroutine_threadsafe(clients.get(), loop).result(5)
        clients.close_all()
        deadline = time.monotonic() + 5
        while c.closed_on is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.closed_on is loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# --- retries: one policy, sync and async; seeded jitter -------------------------------------
def _opener(script):
    """``open_stream`` for the retry wrappers: each call takes the next step of ``script``:
    an exception to raise, or a list of items (a ``RemoteError`` inside it is raised there)."""
    steps = iter(script)

    def open_stream():
        step = next(steps)
        if isinstance(step, BaseException):
            raise step
        return iter(step)

    return open_stream


def _items_or_raise(items):
    for item in items:
        if isinstance(item, BaseException):
            raise item
        yield item


def _run_sync(policy, script, clock=time.monotonic):
    waits, got = [], []
    opener = _opener(script)
    try:
        for item in retrying_stream(policy, lambda: _items_or_raise(opener()), backend="t",
                                    sleep=waits.append, clock=clock):
            got.append(item)
    except RemoteError as e:
        got.append(e)
    return got, waits


def _run_async(policy, script, clock=time.monotonic):
    waits, got = [], []
    opener = _opener(script)

    async def record(seconds):
        waits.append(seconds)

    async def open_stream():
        for item in _items_or_raise(opener()):
            yield item

    async def main():
        try:
            async for item in aretrying_stream(policy, open_stream, backend="t", sleep=record,
                                               clock=clock):
                got.append(item)
        except RemoteError as e:
            got.append(e)

    asyncio.run(main())
    return got, waits


def _policy():
    return RetryPolicy(max_attempts=4, base_delay_s=0.1, max_delay_s=0.4, max_total_s=10,
                       seed=42)


@pytest.mark.parametrize("run", [_run_sync, _run_async], ids=["sync", "async"])
def test_retry_waits_follow_the_seeded_jitter(run):
    script = [ServerError("boom", status=500), RateLimitError("slow", retry_after_s=0.3),
              ["ok"]]
    got, waits = run(_policy(), script)
    rng = Random(42)
    first = rng.uniform(0, 0.1)
    second = max(rng.uniform(0, 0.2), 0.3)  # Retry-After raises the floor
    assert got == ["ok"] and waits == [first, second]


@pytest.mark.parametrize("run", [_run_sync, _run_async], ids=["sync", "async"])
def test_retry_decisions_are_the_same_sync_and_async(run):
    unauthorised = AuthenticationError("no", status=401)
    got, waits = run(_policy(), [unauthorised])
    assert got == [unauthorised] and waits == [] and unauthorised.attempts == 1

    after_text = ServerError("cut", status=500)
    got, waits = run(_policy(), [["Hel", after_text], ["never"]])
    assert got == ["Hel", after_text] and waits == []  # text was out: no retry

    errors = [ServerError(f"boom {i}", status=500) for i in range(4)]
    got, waits = run(_policy(), errors)
    assert got == [errors[-1]] and errors[-1].attempts == 4 and len(waits) == 3

    readings = iter([0.0])  # then 9.95 s for ever: the 10 s budget has no room for a wait

    def clock():
        return next(readings, 9.95)

    budget = [ServerError("late", status=503), ["never"]]
    got, waits = run(RetryPolicy(max_attempts=4, base_delay_s=1, max_total_s=10, seed=1),
                     budget, clock)
    assert got == [budget[0]] and waits == []


def test_the_jitter_is_random_unless_seeded():
    err = ServerError("x")
    seeded = [[RetryPolicy(seed=5).delay_s(a, err) for a in range(1, 6)] for _ in range(2)]
    assert seeded[0] == seeded[1]
    unseeded = [[RetryPolicy().delay_s(a, err) for a in range(1, 6)] for _ in range(2)]
    assert unseeded[0] != unseeded[1]
    assert RetryPolicy.coerce({"seed": 3}) == RetryPolicy(seed=3)
    with pytest.raises(ConfigError, match="seed"):
        RetryPolicy(seed="3")


def test_a_backend_retry_logs_the_seeded_delays(protocol, server, caplog):
    caplog.set_level(logging.INFO, logger="tongyi_local.retry")
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.02, max_delay_s=0.05, seed=11)
    g = make(protocol, server.url, retry=policy)
    server.script(status(500, "InternalError", "boom"), status(503, "Unavailable", "busy"),
                  text("ok"))
    assert asyncio.run(g.acomplete("hi")).text == "ok" and posts(server) == 3
    rng = Random(11)
    expected = [round(rng.uniform(0, 0.02), 3), round(rng.uniform(0, 0.04), 3)]
    assert [r.retry["delay_s"] for r in caplog.records if hasattr(r, "retry")] == expected
