"""Shared fixtures: the real starter model and tiny Qwen-architecture GGUFs, all run through the
real llama.cpp build installed by ./bootstrap.sh."""

from __future__ import annotations

import os

import pytest

# Role prefixes are saved to disk by default; the suite's generators (and the CLI subprocesses,
# which inherit this) keep none, so no test sees another's state files or writes to the real
# cache. tests/test_kv_disk.py turns the cache on with a directory of its own.
os.environ["TONGYI_LOCAL_KV_CACHE_BYTES"] = "0"


def _pin_to_a_share_of_the_cores() -> None:
    """Under pytest-xdist each worker runs on its own share of the CPUs, so the library's thread
    plan (which follows the affinity mask) gives each worker's llama.cpp that many threads and
    the workers' spinning thread pools never contend for one core. Subprocesses inherit it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = cpus[int(worker[2:]) % len(cpus)::count] or cpus
    os.sched_setaffinity(0, share)


_pin_to_a_share_of_the_cores()

from tongyi_local.store import starter_model
from tongyi_local.testing import write_tiny_model


@pytest.fixture(scope="session")
def starter_path():
    return starter_model()


@pytest.fixture(scope="session")
def starter(starter_path):
    from tongyi_local.backends.llama import LlamaGenerator

    gen = LlamaGenerator(starter_path, n_ctx=2048)
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2.gguf", "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3moe(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3moe.gguf", "qwen3moe")


@pytest.fixture(scope="session")
def chat_model_path():
    """SmolLM2-135M-Instruct, the packaged chat model (taken out of its PyPI wheel, checked)."""
    from tongyi_local.store import starter_chat_model

    return starter_chat_model()


@pytest.fixture(scope="session")
def chat_model(chat_model_path):
    from tongyi_local.backends.llama import LlamaGenerator

    gen = LlamaGenerator(chat_model_path, n_ctx=2048, sampling=None)
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def tiny_qwen_tools(tmp_path_factory):
    """A tiny random-weight qwen2 GGUF carrying Qwen2.5-Instruct's real (tool-aware) template."""
    from tongyi_local.backends.llama import LlamaGenerator
    from tongyi_local.testing import QWEN25_TEMPLATE

    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen25-tools.gguf", "qwen2",
                            chat_template=QWEN25_TEMPLATE)
    gen = LlamaGenerator(path, n_ctx=2048)
    yield gen
    gen.close()


@pytest.fixture
def outside_any_project(tmp_path_factory, monkeypatch):
    """Run in an empty directory with no models.toml above it: tests start in the repository,
    whose top-level models.toml (the role plan) the project layer would otherwise find."""
    from tongyi_local.config import project_file

    empty = tmp_path_factory.mktemp("no-project")
    monkeypatch.chdir(empty)
    assert project_file() is None, f"a models.toml above {empty} would leak into the test"
    return empty


@pytest.fixture(scope="session")
def chat_role_config(tmp_path_factory, chat_model_path):
    """A models.toml with model ``chat`` (the packaged chat model) and role ``coder`` on it,
    greedy, with a plain system prompt: what the OpenAI API tests ask for by name."""
    path = tmp_path_factory.mktemp("roles") / "models.toml"
    path.write_text(f"""
[models.chat]
source = "path"
path = "{chat_model_path}"
context_length = 1024

[roles.coder]
model = "chat"
system_prompt = "You are a helpful assistant."
sampling = {{ temperature = 0.0 }}
""")
    return path
