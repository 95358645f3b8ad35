"""models.toml: validation errors name the file, the key and what is allowed; the layers
(packaged < user < project < $TONGYI_LOCAL_CONFIG < argument), project-file discovery from the
working directory upward, and where each entry comes from."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tongyi_local.config import (
    CONFIG_ENV,
    PROFILE_ENV,
    ROLES,
    LayerKind,
    load_config,
    packaged_file,
    project_file,
)
from tongyi_local.errors import ConfigError

REPOSITORY = Path(__file__).resolve().parents[1]
PLAN_ROLES = ("coordinator", "researcher", "coder", "tester", "reviewer")

GOOD_MODEL = '[models.mine]\nsource = "path"\npath = "/models/mine.gguf"\n'


def write(tmp_path, text, name="models.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, outside_any_project):
    monkeypatch.setenv("TONGYI_LOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(PROFILE_ENV, raising=False)


def test_the_packaged_defaults_are_the_starter_models_for_every_role():
    config = load_config()
    assert [layer.kind for layer in config.layers] == [LayerKind.PACKAGED]
    assert config.files == (str(packaged_file()),)
    assert set(config.models) == {"starter", "starter-chat"}
    assert set(config.roles) == set(ROLES)
    assert config.role("default").model == "starter"
    for role in PLAN_ROLES:
        assert config.role(role).model == "starter-chat"
        assert role in config.role(role).system_prompt
    assert set(config.profiles) == {"starter"}
    assert {config.model_for(r, "starter").name for r in PLAN_ROLES} == {"starter-chat"}
    assert all(o.layer.kind == LayerKind.PACKAGED and o.replaced == () for o in config.origins)


def test_the_repository_models_toml_holds_the_plan(monkeypatch):
    monkeypatch.chdir(REPOSITORY / "tests")  # found from a directory below it
    config = load_config()
    assert [(layer.kind, layer.path) for layer in config.layers] == [
        (LayerKind.PACKAGED, packaged_file()), (LayerKind.PROJECT, REPOSITORY / "models.toml")]
    assert set(config.roles) == set(ROLES)
    assert config.role("default").model == "starter"
    assert config.origin("roles", "default").layer.kind == LayerKind.PACKAGED
    coder = config.model_for("coder")
    assert coder.repo == "bartowski/Qwen2.5-Coder-14B-Instruct-GGUF" and coder.quantization == "Q8_0"
    assert config.model_for("researcher").file.startswith("Alibaba-NLP_Tongyi-DeepResearch-30B-A3B")
    assert config.model_for("tester").quantization == "Q6_K"
    assert config.model_for("coordinator").quantization == "Q6_K"
    assert {config.model_for(r, "shared").name for r in config.roles if r != "default"} == {
        "qwen2_5-32b-instruct-q8_0"}
    assert {config.model_for(r, "starter").name for r in PLAN_ROLES} == {"starter-chat"}
    for role in PLAN_ROLES:
        origin = config.origin("roles", role)
        assert origin.layer.kind == LayerKind.PROJECT
        assert [r.kind for r in origin.replaced] == [LayerKind.PACKAGED]
        assert config.models[config.role(role).model].source == "hub"


@pytest.mark.parametrize("text, fragments", [
    (GOOD_MODEL + "colour = 'red'\n", ["models.mine.colour", "allowed:", "context_length"]),
    ("[roles.wizard]\nmodel = 'starter'\n", ["roles.wizard", "coder"]),
    ("[roles.coder]\nmodel = 'nope'\n", ["roles.coder.model", "'nope'", "starter"]),
    (GOOD_MODEL + "quantization = 'Q9_X'\n", ["models.mine.quantization", "Q4_K_M"]),
    (GOOD_MODEL + "sha256 = 'abc123'\n", ["models.mine.sha256", "64 lowercase hex"]),
    (GOOD_MODEL + "threads = 0\n", ["models.mine.threads", "auto"]),
    (GOOD_MODEL + "kv_cache_type = 'q3'\n", ["kv_cache_type", "q8_0"]),
    (GOOD_MODEL + "speculative = true\n", ["models.mine.speculative", "ngram, off"]),
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


def role_file(directory: Path, model: str, roles: tuple[str, ...], name="models.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write(directory, GOOD_MODEL.replace("mine", model) + "".join(
        f"[roles.{role}]\nmodel = '{model}'\n" for role in roles), name)


def test_each_layer_wins_over_the_one_below(tmp_path, monkeypatch):
    # Each layer names the roles from its own level down, so each role's winner is one layer.
    role_file(tmp_path / "home", "userm", ("coder", "tester", "reviewer", "researcher"))
    project = role_file(tmp_path / "proj", "projm", ("tester", "reviewer", "researcher"))
    env_file = role_file(tmp_path, "envm", ("reviewer", "researcher"), "env.toml")
    arg_file = role_file(tmp_path, "argm", ("researcher",), "arg.toml")
    (tmp_path / "proj" / "src" / "pkg").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "proj" / "src" / "pkg")
    monkeypatch.setenv(CONFIG_ENV, str(env_file))
    config = load_config(arg_file)
    assert config.role("default").model == "starter"       # packaged
    assert config.role("coder").model == "userm"           # user file
    assert config.role("tester").model == "projm"          # project file
    assert config.role("reviewer").model == "envm"         # environment
    assert config.role("researcher").model == "argm"       # argument
    assert [(layer.kind, layer.path) for layer in config.layers] == [
        (LayerKind.PACKAGED, packaged_file()), (LayerKind.USER, tmp_path / "home" / "models.toml"),
        (LayerKind.PROJECT, project), (LayerKind.ENVIRONMENT, env_file),
        (LayerKind.ARGUMENT, arg_file)]
    assert config.files[-1] == str(arg_file)
    researcher = config.origin("roles", "researcher")
    assert researcher.layer.kind == LayerKind.ARGUMENT
    assert [r.kind for r in researcher.replaced] == [LayerKind.ENVIRONMENT, LayerKind.PROJECT,
                                                     LayerKind.USER, LayerKind.PACKAGED]
    assert config.origin("models", "projm").layer.path == project
    with pytest.raises(ConfigError, match="no entry roles.wizard"):
        config.origin("roles", "wizard")


def test_an_entry_is_replaced_whole_not_key_by_key(tmp_path, monkeypatch):
    role_file(tmp_path / "proj", "projm", ())
    write(tmp_path / "proj", (tmp_path / "proj" / "models.toml").read_text()
          + "[roles.coder]\nmodel = 'projm'\n")
    monkeypatch.chdir(tmp_path / "proj")
    coder = load_config().role("coder")
    assert coder.model == "projm" and coder.system_prompt is None  # packaged prompt not mixed in


def test_the_nearest_models_toml_upward_is_the_project_file(tmp_path, monkeypatch):
    outer = role_file(tmp_path / "outer", "outerm", ("coder",))
    inner = role_file(tmp_path / "outer" / "inner", "innerm", ("coder",))
    deep = tmp_path / "outer" / "inner" / "a" / "b"
    deep.mkdir(parents=True)
    (tmp_path / "outer" / "inner" / "a" / "models.toml").mkdir()  # a directory: not a file
    assert project_file(deep) == inner
    assert project_file(tmp_path / "outer" / "sibling") == outer  # need not exist
    assert project_file(tmp_path) is None
    monkeypatch.chdir(deep)
    assert project_file() == inner
    assert load_config().role("coder").model == "innerm"
    monkeypatch.chdir(tmp_path / "outer")
    config = load_config()
    assert config.role("coder").model == "outerm" and "innerm" not in config.models


def test_a_file_in_two_layers_counts_once_in_its_highest_place(tmp_path, monkeypatch):
    project = role_file(tmp_path / "proj", "projm", ("coder",))
    monkeypatch.chdir(tmp_path / "proj")
    monkeypatch.setenv(CONFIG_ENV, str(project))
    config = load_config()
    assert [layer.kind for layer in config.layers] == [LayerKind.PACKAGED,
                                                       LayerKind.ENVIRONMENT]
    assert config.origin("roles", "coder").layer.kind == LayerKind.ENVIRONMENT


@pytest.mark.parametrize("layer", ["user", "project", "environment", "argument"])
def test_a_bad_file_in_any_layer_is_named_with_its_key(tmp_path, monkeypatch, layer):
    bad = GOOD_MODEL + "context_length = 'long'\n"
    where = {"user": tmp_path / "home", "project": tmp_path / "proj",
             "environment": tmp_path / "env", "argument": tmp_path / "arg"}[layer]
    where.mkdir(parents=True)
    path = write(where, bad)
    if layer == "project":
        monkeypatch.chdir(where)
    if layer == "environment":
        monkeypatch.setenv(CONFIG_ENV, str(path))
    with pytest.raises(ConfigError) as info:
        load_config(path if layer == "argument" else None)
    assert str(info.value).startswith(f"{path}: models.mine.context_length = 'long'")


def test_a_role_naming_a_model_of_no_layer_names_the_role_file(tmp_path, monkeypatch):
    project = write(tmp_path, "[roles.coder]\nmodel = 'userm'\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(info.value).startswith(f"{project}: roles.coder.model names model 'userm'")
    role_file(tmp_path / "home", "userm", ())  # a lower layer defines it: fine
    assert load_config().model_for("coder").defined_in == str(tmp_path / "home" / "models.toml")


# --- the merge, as a property -------------------------------------------------------------------

UPPER = (LayerKind.USER, LayerKind.PROJECT, LayerKind.ENVIRONMENT, LayerKind.ARGUMENT)
MODEL_NAMES = ("m0", "m1", "m2", "starter")
PROFILE_NAMES = ("p0", "p1", "starter")
_LAYER_CONTENT = st.none() | st.fixed_dictionaries({
    "models": st.sets(st.sampled_from(MODEL_NAMES)),
    "roles": st.sets(st.sampled_from(ROLES)),
    "profiles": st.sets(st.sampled_from(PROFILE_NAMES)),
})


def layer_text(level: int, content: dict) -> str:
    """Entries whose values say which layer wrote them (a context length, a prompt, a key)."""
    text = "".join(f'[models.{m}]\nsource = "path"\npath = "/m/{m}.gguf"\n'
                   f"context_length = {1000 + level}\n" for m in sorted(content["models"]))
    text += "".join(f"[roles.{r}]\nmodel = 'starter-chat'\nsystem_prompt = 'layer {level}'\n"
                    for r in sorted(content["roles"]))
    text += "".join(f"[profiles.{p}]\n{ROLES[level]} = 'starter-chat'\n"
                    for p in sorted(content["profiles"]))
    return text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.tuples(*[_LAYER_CONTENT] * len(UPPER)))
def test_every_entry_comes_from_the_highest_layer_defining_it(monkeypatch, contents):
    start = Path.cwd()  # the empty directory of outside_any_project
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = {LayerKind.USER: root / "home" / "models.toml",
                 LayerKind.PROJECT: root / "proj" / "models.toml",
                 LayerKind.ENVIRONMENT: root / "env.toml", LayerKind.ARGUMENT: root / "arg.toml"}
        (root / "home").mkdir()
        (root / "proj" / "sub").mkdir(parents=True)
        monkeypatch.setenv("TONGYI_LOCAL_HOME", str(root / "home"))
        monkeypatch.chdir(root / "proj" / "sub")
        monkeypatch.delenv(CONFIG_ENV, raising=False)
        packaged = load_config()  # no file written yet: the packaged layer alone
        levels = {}  # (section, name) -> the levels that define it, lowest first
        for level, (kind, content) in enumerate(zip(UPPER, contents), start=1):
            if content is None:
                continue
            paths[kind].write_text(layer_text(level, content))
            for section, names in content.items():
                for name in names:
                    levels.setdefault((section, name), []).append(level)
        if contents[2] is not None:
            monkeypatch.setenv(CONFIG_ENV, str(paths[LayerKind.ENVIRONMENT]))
        try:
            config = load_config(paths[LayerKind.ARGUMENT] if contents[3] is not None else None)
            assert [layer.kind for layer in config.layers] == [LayerKind.PACKAGED] + [
                kind for kind, content in zip(UPPER, contents) if content is not None]
            for origin in packaged.origins:
                levels.setdefault((origin.section, origin.name), []).insert(0, 0)
            assert {(o.section, o.name) for o in config.origins} == set(levels)
            kinds = (LayerKind.PACKAGED, *UPPER)
            for (section, name), found in levels.items():
                origin, top = config.origin(section, name), found[-1]
                assert origin.layer.kind == kinds[top]
                assert [r.kind for r in origin.replaced] == [kinds[i] for i in found[-2::-1]]
                if section == "models":
                    assert config.models[name].context_length == (
                        packaged.models[name].context_length if top == 0 else 1000 + top)
                elif section == "roles":
                    assert config.roles[name].system_prompt == (
                        packaged.roles[name].system_prompt if top == 0 else f"layer {top}")
                else:
                    assert config.profiles[name] == (
                        packaged.profiles[name] if top == 0 else {ROLES[top]: "starter-chat"})
        finally:
            os.chdir(start)  # leave the temporary directory before it is removed


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
