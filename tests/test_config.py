"""models.toml: validation errors name the file, the key and what is allowed; precedence."""

from __future__ import annotations

import pytest

from tongyi_local.config import CONFIG_ENV, PROFILE_ENV, load_config
from tongyi_local.errors import ConfigError

GOOD_MODEL = '[models.mine]\nsource = "path"\npath = "/models/mine.gguf"\n'


def write(tmp_path, text, name="models.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("TONGYI_LOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(PROFILE_ENV, raising=False)


def test_the_packaged_file_validates_and_has_the_plan():
    config = load_config()
    assert set(config.roles) == {"default", "coordinator", "researcher", "coder", "tester",
                                 "reviewer"}
    assert config.role("default").model == "starter"
    coder = config.model_for("coder")
    assert coder.repo == "bartowski/Qwen2.5-Coder-14B-Instruct-GGUF" and coder.quantization == "Q8_0"
    assert config.model_for("researcher").file.startswith("Alibaba-NLP_Tongyi-DeepResearch-30B-A3B")
    assert config.model_for("tester").quantization == "Q6_K"
    assert config.model_for("coordinator").quantization == "Q6_K"
    assert {config.model_for(r, "shared").name for r in config.roles if r != "default"} == {
        "qwen2_5-32b-instruct-q8_0"}


@pytest.mark.parametrize("text, fragments", [
    (GOOD_MODEL + "colour = 'red'\n", ["models.mine.colour", "allowed:", "context_length"]),
    ("[roles.wizard]\nmodel = 'starter'\n", ["roles.wizard", "coder"]),
    ("[roles.coder]\nmodel = 'nope'\n", ["roles.coder.model", "'nope'", "starter"]),
    (GOOD_MODEL + "quantization = 'Q9_X'\n", ["models.mine.quantization", "Q4_K_M"]),
    (GOOD_MODEL + "sha256 = 'abc123'\n", ["models.mine.sha256", "64 lowercase hex"]),
    (GOOD_MODEL + "threads = 0\n", ["models.mine.threads", "auto"]),
    (GOOD_MODEL + "kv_cache_type = 'q3'\n", ["kv_cache_type", "q8_0"]),
    (GOOD_MODEL + "[models.mine.sampling]\ntemperature = -1\n", ["models.mine.sampling",
                                                                  "temperature"]),
    ("[models.hubby]\nsource = 'hub'\nrepo = 'a/b'\n", ["models.hubby.file", "required"]),
    ("[roles.coder]\nmodel = 'starter'\nprivacy = 'secret'\n", ["privacy", "local-only"]),
    ("top = 1\n", ["unknown key top", "models, roles, profiles"]),
    ("[models.x\n", ["not valid TOML"]),
    ("[profiles.p]\ncoder = 'ghost'\n", ["profiles.p.coder", "ghost"]),
])
def test_bad_files_name_file_key_and_allowed(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message or "profiles.p" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_precedence_argument_over_env_over_user_over_packaged(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    write(home, GOOD_MODEL + "[roles.coder]\nmodel = 'mine'\n[roles.tester]\nmodel = 'mine'\n"
                             "[roles.reviewer]\nmodel = 'mine'\n")
    env_file = write(tmp_path, GOOD_MODEL.replace("mine", "envm") +
                     "[roles.tester]\nmodel = 'envm'\n[roles.reviewer]\nmodel = 'envm'\n",
                     "env.toml")
    arg_file = write(tmp_path, GOOD_MODEL.replace("mine", "argm") +
                     "[roles.reviewer]\nmodel = 'argm'\n", "arg.toml")
    monkeypatch.setenv(CONFIG_ENV, str(env_file))
    config = load_config(arg_file)
    assert config.role("default").model == "starter"       # packaged
    assert config.role("coder").model == "mine"            # user file
    assert config.role("tester").model == "envm"           # environment
    assert config.role("reviewer").model == "argm"         # argument
    assert config.files[-1] == str(arg_file)


def test_profiles_from_argument_and_environment(monkeypatch):
    config = load_config()
    assert config.role("coder", "starter").model == "starter-chat"
    monkeypatch.setenv(PROFILE_ENV, "starter")
    assert config.role("reviewer").model == "starter-chat"
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        config.role("coder", "nope")
    with pytest.raises(ConfigError, match="unknown role 'wizard'"):
        config.role("wizard")


def test_missing_explicit_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
