"""Hostile models.toml: only ever a ConfigError naming the file and the key, raised at load.

A hypothesis property over generated documents (random types, unknown keys, huge numbers,
unicode, odd paths and names in ``[models.X]``, ``[roles.Y]``, ``[profiles.Z]``), the reports of
issue 10 as examples, and the CLI run on hostile files in a subprocess. The generator, the TOML
emitter and the verdict live in ``benchmarks/reliability.py``, which runs the full count.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tongyi_local.config import CONFIG_ENV, PROFILE_ENV, load_config
from tongyi_local.errors import ConfigError
from tongyi_local.paths import models_dir
from tongyi_local.registry import model_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reliability as R  # the generator lives beside the full-size program


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("TONGYI_LOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(PROFILE_ENV, raising=False)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refused(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert all(c.isprintable() for c in message), message
    return message.removeprefix(f"{path}: ")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=R.config_documents())
def test_any_document_is_accepted_whole_or_refused_naming_file_and_key(tmp_path, doc):
    path = tmp_path / "fuzz.toml"
    path.write_text(R.toml_document(doc), encoding="utf-8")
    verdict = R.check_config(path, doc)
    assert verdict.outcome != "bug", verdict.detail


def test_the_generator_reaches_both_verdicts(tmp_path):
    """The property above means something: documents are accepted and refused, many ways."""
    report = R.fuzz_configs(120, directory=tmp_path, rng_seed=3)
    assert report.bugs == []
    assert report.accepted >= 20 and sum(report.rejected.values()) >= 20
    assert len(report.rejected) >= 10


# --- the reports of issue 10 ----------------------------------------------------------------------

@pytest.mark.parametrize("name, key, fragment", [
    ("integer path", "models.x.path", "must be a non-empty string"),
    ("integer hub file", "models.x.file", "must be a non-empty string"),
    ("hub file ../../x.gguf", "models.x.file", "relative path"),
    ("system_prompt = [1, 2]", "roles.coder.system_prompt", "must be a string"),
    ("NUL in path", "models.x.path", "control character"),
    ("model name ../evil", 'models."../evil"', "names can become file names"),
    ("absolute repo", "models.x.repo", "owner/name"),
    ("huge threads", "models.x.threads", "1 to 1024"),
    ("stop = 5", "roles.coder.sampling.stop", "a string or a list of strings"),
    ("replies = 5", "models.f.replies", "a list of texts or tables"),
])
def test_reported_configs_are_refused_at_load(tmp_path, name, key, fragment):
    message = refused(tmp_path, R.HOSTILE_CONFIGS[name])
    assert key in message and fragment in message, message


@pytest.mark.parametrize("file", ["../x.gguf", "a/../../x.gguf", "/abs/x.gguf", "a\\\\b.gguf",
                                  "./x.gguf", "a//b.gguf", "x.gguf\\u0000", "x\\n.gguf", ".."])
def test_hub_file_names_cannot_leave_the_model_directory(tmp_path, file):
    message = refused(tmp_path, f'[models.x]\nsource = "hub"\nrepo = "a/b"\nfile = "{file}"\n')
    assert "models.x.file" in message


@pytest.mark.parametrize("repo", ["..", "../a", "a/..", "/a/b", "a/b/c", "a\\\\b", "", "a/b\\u0000"])
def test_hub_repo_ids_cannot_leave_the_model_directory(tmp_path, repo):
    message = refused(tmp_path, f'[models.x]\nsource = "hub"\nrepo = "{repo}"\nfile = "m.gguf"\n')
    assert "models.x.repo" in message


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "a\\\\b", "/abs", ".hidden", "x..y",
                                  "a\\u0000b", "a b", "x" * 129, ""])
def test_model_names_that_could_become_paths_are_refused(tmp_path, name):
    message = refused(tmp_path, f'[models."{name}"]\nsource = "path"\npath = "/m.gguf"\n')
    assert "names can become file names" in message


def test_revision_is_checked_too(tmp_path):
    message = refused(tmp_path, '[models.x]\nsource = "hub"\nrepo = "a/b"\nfile = "m.gguf"\n'
                                'revision = " "\n')
    assert "models.x.revision" in message


def test_control_characters_in_names_are_escaped_in_messages(tmp_path):
    message = refused(tmp_path, '[roles."\\u001b[31mred"]\nmodel = "starter"\n')
    assert '"\\u001b[31mred"' in message and "\x1b" not in message


def test_profile_errors_name_their_file(tmp_path):
    message = refused(tmp_path, '[profiles.p]\ncoder = "ghost"\n')
    assert "profiles.p.coder" in message and "'ghost'" in message


@pytest.mark.parametrize("entry, key", [
    ('context_length = 1e9', "context_length"), ("context_length = 99999999999", "context_length"),
    ("batch_size = true", "batch_size"), ('threads = "many"', "threads"),
    ("mmap = 1", "mmap"), ('quantization = ["Q4_K_M"]', "quantization"),
    ("sha256 = 5", "sha256"), ("sampling = 5", "sampling"),
    ("sampling = { ignore_eos = 1 }", "sampling.ignore_eos"),
    ("sampling = { temperature = nan }", "sampling")])
def test_wrong_types_and_huge_numbers(tmp_path, entry, key):
    message = refused(tmp_path, f'[models.x]\nsource = "path"\npath = "/m.gguf"\n{entry}\n')
    assert f"models.x.{key}" in message, message


@pytest.mark.parametrize("entry, key", [
    ('backend = "openai"\nmodel_id = "m"\nbase_url = "file:///etc"', "base_url"),
    ('backend = "openai"\nmodel_id = "m"\nbase_url = "http://h"\napi_key_env = "A B"',
     "api_key_env"),
    ('backend = "dashscope"\nmodel_id = "m"\ntimeout_s = -1', "timeout_s"),
    ('backend = "dashscope"\nmodel_id = 5', "model_id"),
    ('backend = "fake"\nreplies = [{ colour = "red" }]', "replies"),
])
def test_remote_entries(tmp_path, entry, key):
    assert f"models.x.{key}" in refused(tmp_path, f"[models.x]\n{entry}\n")


def test_good_entries_still_load_and_resolve_inside_the_model_directory(tmp_path):
    path = write(tmp_path, '[models."Qwen2.5-7B_q4+x"]\nsource = "hub"\nrepo = "o/r"\n'
                           'file = "sub/m-Q4_K_M.gguf"\nrevision = "v1/2"\n'
                           '[models.local]\nsource = "path"\npath = "~/m.gguf"\n'
                           '[models.f]\nbackend = "fake"\nreplies = ["hi", { text = "x" }]\n'
                           '[roles.coder]\nmodel = "Qwen2.5-7B_q4+x"\nsystem_prompt = "Be\\nterse"\n'
                           'fallback = "f"\nsampling = { stop = "END" }\n')
    config = load_config(path)
    hub = model_file(config.model_for("coder"))
    assert str(hub).startswith(str(models_dir()) + os.sep) and hub.name == "m-Q4_K_M.gguf"
    assert config.models["f"].replies == ("hi", {"text": "x"})
    assert config.role("coder").system_prompt == "Be\nterse"


def test_explicit_config_path_with_a_nul_byte(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(str(tmp_path / "a\0b.toml"))
    assert str(info.value).isprintable() and "a\\x00b.toml" in str(info.value)


# --- the CLI ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["integer path", "hub file ../../x.gguf", "NUL in path",
                                  "system_prompt = [1, 2]"])
def test_cli_prints_one_error_line_and_exits_1(tmp_path, name):
    path = write(tmp_path, R.HOSTILE_CONFIGS[name])
    assert R.check_cli(path, tmp_path / "home") == ""
