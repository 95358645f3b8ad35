"""Roles -> models -> loaded generators, end to end on real GGUF files."""

from __future__ import annotations

import pytest

import tongyi_local
from tongyi_local import registry as registry_module
from tongyi_local.config import CONFIG_ENV, PROFILE_ENV, load_config
from tongyi_local.errors import ConfigError, ModelNotFoundError
from tongyi_local.pool import ModelPool
from tongyi_local.registry import Registry, estimate_model, load_model


@pytest.fixture
def registry(tmp_path, starter_path, tiny_qwen2):
    config = tmp_path / "models.toml"
    config.write_text(f"""
[models.base]
source = "path"
path = "{starter_path}"
context_length = 512
sampling = {{ temperature = 0.0, max_tokens = 8 }}

[models.tiny]
source = "path"
path = "{tiny_qwen2}"
context_length = 256

[models.absent]
source = "hub"
repo = "someone/Some-GGUF"
file = "Some-Q4_K_M.gguf"

[roles.coder]
model = "base"
system_prompt = "You write Python."
sampling = {{ max_tokens = 6 }}

[roles.reviewer]
model = "base"

[roles.tester]
model = "tiny"

[roles.researcher]
model = "absent"
""")
    loads = []

    def counting_loader(spec):
        loads.append(spec.name)
        return load_model(spec)

    reg = Registry(load_config(config), pool=ModelPool(counting_loader, estimate_model,
                                                       budget_bytes=8 << 30,
                                                       status_dir=tmp_path / "run"))
    reg.loads = loads
    yield reg
    reg.close()


def test_roles_sharing_a_file_share_one_loaded_model(registry):
    coder, reviewer = registry.for_role("coder"), registry.for_role("reviewer")
    a = coder.complete("The capital of France is")
    b = reviewer.complete("The capital of France is", max_tokens=6)
    assert a.text == b.text  # same model, greedy from the model's sampling defaults
    assert registry.loads == ["base"]
    (row,) = registry.pool.ps()
    assert row.roles == ("coder", "reviewer") and row.memory_bytes > 200 << 20


def test_role_system_prompt_and_sampling_apply(registry):
    coder, reviewer = registry.for_role("coder"), registry.for_role("reviewer")
    assert coder.default_sampling.max_tokens == 6 and coder.default_sampling.temperature == 0
    with_system = coder.chat([{"role": "user", "content": "Sort a list."}])
    without = reviewer.chat([{"role": "user", "content": "Sort a list."}])
    assert with_system.usage.prompt_tokens > without.usage.prompt_tokens
    assert with_system.usage.completion_tokens <= 6
    explicit = coder.chat([{"role": "system", "content": "Be terse."},
                           {"role": "user", "content": "Sort a list."}])
    assert explicit.usage.prompt_tokens < with_system.usage.prompt_tokens  # not prepended twice


def test_a_missing_hub_model_says_how_to_pull_it(registry):
    with pytest.raises(ModelNotFoundError, match="tongyi-local models pull absent"):
        registry.for_role("researcher").complete("hi")
    assert registry.pool.ps() == []


def test_unknown_role(registry):
    with pytest.raises(ConfigError, match="unknown role 'wizard'"):
        registry.for_role("wizard")


@pytest.fixture
def fresh_default_registry(monkeypatch, tmp_path):
    """The process-wide registry starts empty here and is closed afterwards; no user file."""
    monkeypatch.setenv("TONGYI_LOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    monkeypatch.setattr(registry_module, "_default", None)
    yield
    if registry_module._default is not None:
        registry_module._default.close()


def project(directory, model_name, model_path, system_prompt):
    """A project directory with its own models.toml putting the coder on ``model_name``."""
    (directory / "src").mkdir(parents=True)
    (directory / "models.toml").write_text(
        f'[models.{model_name}]\nsource = "path"\npath = "{model_path}"\ncontext_length = 256\n'
        'sampling = { temperature = 0.0, max_tokens = 3 }\n'
        f'[roles.coder]\nmodel = "{model_name}"\nsystem_prompt = "{system_prompt}"\n')
    return directory / "src"


def test_for_role_takes_the_roles_of_the_project_in_the_working_directory(
        fresh_default_registry, monkeypatch, tmp_path, starter_path, tiny_qwen2):
    monkeypatch.chdir(project(tmp_path / "alpha", "alpha-model", starter_path, "You are Alpha."))
    coder = tongyi_local.for_role("coder")
    assert coder.name == "coder:alpha-model" and coder.role.system_prompt == "You are Alpha."
    done = coder.complete("Hello")
    assert done.usage.completion_tokens >= 1 and done.model == "alpha-model"
    assert registry_module.for_role("reviewer").name == "reviewer:starter-chat"  # packaged
    pool = registry_module.default_registry().pool
    # Another project in the same process: its roles, over the same pool.
    monkeypatch.chdir(project(tmp_path / "beta", "beta-model", tiny_qwen2, "You are Beta."))
    assert tongyi_local.for_role("coder").name == "coder:beta-model"
    assert registry_module.default_registry().pool is pool
    assert tongyi_local.for_role("coder", profile="starter").name == "coder:starter-chat"


def test_for_role_refuses_a_mistyped_keyword(fresh_default_registry):
    with pytest.raises(TypeError, match="profle"):
        registry_module.for_role("coder", profle="starter")
    with pytest.raises(TypeError, match="config"):
        tongyi_local.for_role("coder", config="models.toml")
    assert registry_module._default is None  # refused before any config was read


def test_public_for_role_uses_the_packaged_default(monkeypatch, tmp_path, starter_path):
    config = tmp_path / "models.toml"
    config.write_text(f'[models.starter]\nsource = "path"\npath = "{starter_path}"\n'
                      'context_length = 256\n')
    gen = tongyi_local.for_role("default", config_path=config)
    done = gen.complete("Hello", temperature=0, max_tokens=3)
    assert done.usage.completion_tokens >= 1 and gen.name == "default:starter"


@pytest.fixture
def routed(tmp_path, starter_path):
    config = tmp_path / "routes.toml"
    config.write_text(f"""
[models.absent]
source = "hub"
repo = "someone/Not-Pulled-GGUF"
file = "Not-Pulled-Q8_0.gguf"

[models.cloud]
backend = "fake"          # a scripted stand-in for a cloud model: counts as remote
remote = true
replies = ["answer from the scripted cloud"]

[roles.coder]
model = "absent"
fallback = "cloud"

[roles.reviewer]
model = "absent"
fallback = "cloud"
privacy = "local-only"

[roles.tester]
model = "cloud"
privacy = "local-only"
""")
    reg = Registry(load_config(config), pool=ModelPool(load_model, estimate_model,
                                                       budget_bytes=8 << 30,
                                                       status_dir=tmp_path / "run"))
    yield reg
    reg.close()


def test_a_role_falls_back_when_its_local_model_cannot_load(routed):
    done = routed.for_role("coder").chat([{"role": "user", "content": "hi"}])
    assert done.text == "answer from the scripted cloud"


def test_local_only_roles_never_reach_a_remote_backend(routed):
    from tongyi_local.errors import PrivacyError

    with pytest.raises((ModelNotFoundError, PrivacyError)):
        routed.for_role("reviewer").chat([{"role": "user", "content": "secret code"}])
    with pytest.raises(PrivacyError):
        routed.for_role("tester").chat([{"role": "user", "content": "secret code"}])
    # the scripted cloud model was never asked: its reply is still unused
    assert routed.for_role("coder").chat([{"role": "user", "content": "x"}]).text == (
        "answer from the scripted cloud")


def test_speculative_drafting_is_a_model_setting(tmp_path, tiny_qwen2):
    config = tmp_path / "models.toml"
    config.write_text(f"""
[models.drafting]
source = "path"
path = "{tiny_qwen2}"
context_length = 256

[models.plain]
source = "path"
path = "{tiny_qwen2}"
context_length = 256
speculative = "off"
""")
    specs = load_config(config).models
    drafting, plain = load_model(specs["drafting"]), load_model(specs["plain"])
    try:
        assert (drafting.speculative, plain.speculative) == ("ngram", None)  # on unless "off"
    finally:
        drafting.close()
        plain.close()
