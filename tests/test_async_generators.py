"""acomplete / achat / astream on every in-process generator: local, role, fallback, fake (the
remote backends' native asyncio is in test_async_remote.py), and cancellation freeing the slot."""

from __future__ import annotations

import asyncio

import pytest

import tongyi_local
from tongyi_local.backends.fake import FakeGenerator, FakeReply
from tongyi_local.config import load_config
from tongyi_local.errors import OutputParseError, RemoteConnectionError
from tongyi_local.fallback import FallbackGenerator
from tongyi_local.pool import ModelPool
from tongyi_local.registry import Registry, estimate_model, load_model
from tongyi_local.types import Generator

ASK = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def role_registry(tmp_path, chat_model_path):
    config = tmp_path / "models.toml"
    config.write_text(f"""
[models.chat]
source = "path"
path = "{chat_model_path}"
context_length = 1024
sampling = {{ temperature = 0.0 }}

[models.cloud]
backend = "fake"
replies = []

[roles.coder]
model = "chat"
system_prompt = "You write Python."
sampling = {{ max_tokens = 12 }}
""")
    reg = Registry(load_config(config), pool=ModelPool(load_model, estimate_model,
                                                       budget_bytes=8 << 30,
                                                       status_dir=tmp_path / "run"))
    yield reg
    reg.close()


def _generators(chat_model, role_registry):
    yield "local", chat_model
    yield "role", role_registry.for_role("coder")
    yield "fallback", FallbackGenerator(FakeGenerator(default=RemoteConnectionError("down")),
                                        chat_model, role="coder")
    yield "fake", FakeGenerator(default="Hello there, friend.")


def test_every_generator_speaks_asyncio(chat_model, role_registry):
    for name, gen in _generators(chat_model, role_registry):
        assert isinstance(gen, Generator), name

        async def use(gen=gen):
            done = await gen.achat(ASK, max_tokens=8, temperature=0)
            pieces = [c async for c in gen.astream(ASK, max_tokens=8, temperature=0)]
            again = await gen.acomplete("Hello", max_tokens=4, temperature=0)
            return done, pieces, again

        done, pieces, again = asyncio.run(use())
        assert done.text and done.finish_reason in ("stop", "length"), name
        assert pieces[-1].completion is not None, name
        assert again.usage.completion_tokens >= 1, name
        if name != "fake" and name != "fallback":  # greedy: the stream says what chat said
            assert "".join(c.text for c in pieces) == done.text, name


def test_a_role_answers_asyncio_with_its_system_prompt_and_sampling(role_registry):
    coder = role_registry.for_role("coder")
    done = asyncio.run(coder.achat(ASK))
    assert done.usage.completion_tokens <= 12  # the role's max_tokens, not the default 256
    assert done.usage.prompt_tokens > len("Say hello.".split()) + 5  # system prompt went in


def test_async_tool_calls_and_structured_output_on_the_fake(chat_model):
    fake = FakeGenerator([FakeReply(tool_calls=[{"name": "add", "arguments": {"a": 1}}]),
                          "not json", '{"ok": true}'])
    done = asyncio.run(fake.achat(ASK, tools=[{"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}]))
    assert done.finish_reason == "tool_calls" and done.tool_calls[0].arguments == {"a": 1}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    parsed = asyncio.run(fake.achat(ASK, response_schema=schema))  # first answer fails: retried
    assert parsed.parsed == {"ok": True} and len(fake.calls) == 3
    fake.add("still not json", "nor this")
    with pytest.raises(OutputParseError):
        asyncio.run(fake.achat(ASK, response_schema=schema))


def test_cancelling_a_role_request_frees_the_slot(role_registry):
    coder = role_registry.for_role("coder")

    async def cancel_one():
        task = asyncio.create_task(coder.achat(ASK, max_tokens=400, ignore_eos=True))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_one())
    with role_registry.pool.checkout(*_pool_args(role_registry, "coder")) as model:
        deadline = asyncio.run(_wait_idle(model))
        assert deadline, "the slot stayed busy after the task was cancelled"


def _pool_args(registry, role):
    from tongyi_local.registry import pool_key

    spec = registry.config.role(role, None)
    model = registry.config.models[spec.model]
    return pool_key(model), model, model.name, role


async def _wait_idle(model, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if not any(s.busy for s in model.slot_states()):
            return True
        await asyncio.sleep(0.05)
    return False


def test_async_works_inside_a_running_loop_and_concurrently(tiny_qwen2):
    with tongyi_local.load(tiny_qwen2, n_ctx=512) as model:
        async def many():
            return await asyncio.gather(*(model.acomplete(f"hello {i}", max_tokens=6,
                                                          temperature=0) for i in range(6)))

        results = asyncio.run(many())
    assert all(r.usage.completion_tokens >= 1 for r in results)


def test_a_backend_that_ignores_a_required_call_is_asked_once_more():
    add = {"name": "add", "parameters": {"type": "object",
                                         "properties": {"a": {"type": "integer"}}}}
    call = FakeReply(tool_calls=[{"name": "add", "arguments": {"a": 2}}])
    fake = FakeGenerator(["I would rather talk.", call])
    done = fake.chat(ASK, tools=[add], tool_choice="required")
    assert done.tool_calls[0].arguments == {"a": 2} and len(fake.calls) == 2
    fake.add("no", "still no")
    with pytest.raises(OutputParseError, match="tool_choice requires"):
        asyncio.run(fake.achat(ASK, tools=[add], tool_choice={"name": "add"}))
    assert len(fake.calls) == 4
