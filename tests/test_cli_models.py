"""`models list|info|pull|verify|rm`, `generate --role` and `ps` through real subprocesses, pulling
from a real HTTP server on 127.0.0.1 that serves the hub's URL layout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from servers.hub import FakeHub
from tongyi_local.testing import write_tiny_model

REPO, FILE = "acme/Tiny-Qwen-GGUF", "tiny-qwen2-f16.gguf"


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("m") / FILE, "qwen2", dtype="f16").read_bytes()


@pytest.fixture
def env(tmp_path, tiny_bytes):
    config = tmp_path / "models.toml"
    config.write_text(f"""
[models.tiny]
source = "hub"
repo = "{REPO}"
file = "{FILE}"
sha256 = "{hashlib.sha256(tiny_bytes).hexdigest()}"
context_length = 256
quantization = "F16"

[roles.coder]
model = "tiny"
""")
    with FakeHub(lifetime_s=120) as hub:
        hub.add(REPO, FILE, tiny_bytes)
        environ = {**os.environ, "HF_ENDPOINT": hub.url, "TONGYI_LOCAL_HOME": str(tmp_path / "home"),
                   "TONGYI_LOCAL_CONFIG": str(config), "COLUMNS": "200"}
        environ.pop("HF_HUB_OFFLINE", None)
        yield environ


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "tongyi_local", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_pull_list_info_generate_verify_rm(env, tiny_bytes):
    listed = json.loads(cli(env, "models", "list", "--json").stdout)
    coder = next(r for r in listed if r["role"] == "coder")
    assert coder["model"] == "tiny" and coder["present"] is False

    missing = cli(env, "models", "info", "coder")
    assert missing.returncode == 1 and "tongyi-local models pull coder" in missing.stderr

    pulled = cli(env, "models", "pull", "coder")
    assert pulled.returncode == 0, pulled.stderr
    path = pulled.stdout.strip().splitlines()[-1]
    assert path.endswith(FILE) and open(path, "rb").read() == tiny_bytes

    listed = json.loads(cli(env, "models", "list", "--json").stdout)
    coder = next(r for r in listed if r["role"] == "coder")
    assert coder["present"] is True and coder["size_bytes"] == len(tiny_bytes)

    info = json.loads(cli(env, "models", "info", "coder", "--json").stdout)
    assert info["architecture"] == "qwen2" and info["file_type"] == "F16"
    assert info["estimate_n_ctx"] == 256 and info["estimate_total_bytes"] > info["tensor_bytes"]

    done = cli(env, "generate", "--role", "coder", "hello", "-n", "3", "-t", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == "tiny"

    assert cli(env, "models", "verify", "coder").returncode == 0
    with open(path, "r+b") as fh:  # corrupt one byte: verify must now fail
        fh.seek(100)
        fh.write(b"\xff" if tiny_bytes[100:101] != b"\xff" else b"\x00")
    bad = cli(env, "models", "verify", "coder")
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr

    assert cli(env, "models", "rm", "tiny").returncode == 0
    assert not os.path.exists(path)


def test_ps_shows_models_loaded_by_a_live_process(env, tmp_path, starter_path):
    config = tmp_path / "starter.toml"
    config.write_text(f'[models.starter]\nsource = "path"\npath = "{starter_path}"\n'
                      'context_length = 256\n')
    env = {**env, "TONGYI_LOCAL_CONFIG": str(config)}
    script = ("import sys\n"
              "from tongyi_local.registry import default_registry\n"
              "default_registry().for_role('default').complete('hi', max_tokens=1)\n"
              "print('loaded', flush=True)\n"
              "sys.stdin.readline()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "loaded"
        shown = json.loads(cli(env, "ps", "--json").stdout)
        assert [p["pid"] for p in shown] == [proc.pid]
        assert shown[0]["models"][0]["name"] == "starter"
        assert shown[0]["models"][0]["roles"] == ["default"]
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert json.loads(cli(env, "ps", "--json").stdout) == []


def test_models_config_shows_the_layers_and_where_each_entry_comes_from(tmp_path):
    home, proj = tmp_path / "home", tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    home.mkdir()
    (home / "models.toml").write_text('[models.mine]\nsource = "path"\npath = "/m/mine.gguf"\n'
                                      '[roles.tester]\nmodel = "mine"\n')
    (proj / "models.toml").write_text('[roles.coder]\nmodel = "mine"\n'
                                      '[profiles.fast]\ncoder = "starter-chat"\n')
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TONGYI_LOCAL_CONFIG", "TONGYI_LOCAL_PROFILE")}
    environ.update(TONGYI_LOCAL_HOME=str(home), COLUMNS="200")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "tongyi_local", "models", "config", *args],
                              capture_output=True, text=True, timeout=120, env=environ,
                              cwd=proj / "src")

    shown = json.loads(run("--json").stdout)
    assert [(layer["kind"], layer["path"]) for layer in shown["layers"]] == [
        ("project", str(proj / "models.toml")), ("user", str(home / "models.toml")),
        ("packaged", shown["layers"][-1]["path"])]
    assert shown["layers"][-1]["path"].endswith("defaults.toml")
    origin = {(e["section"], e["name"]): e for e in shown["entries"]}
    assert origin["roles", "coder"]["layer"]["kind"] == "project"
    assert [r["kind"] for r in origin["roles", "coder"]["replaced"]] == ["packaged"]
    assert origin["roles", "tester"]["layer"]["kind"] == "user"
    assert origin["models", "mine"]["layer"]["path"] == str(home / "models.toml")
    assert origin["roles", "default"]["layer"]["kind"] == "packaged"
    assert origin["profiles", "fast"]["layer"]["kind"] == "project"

    text = run()
    assert text.returncode == 0, text.stderr
    assert str(proj / "models.toml") in text.stdout
    coder_row = next(line for line in text.stdout.splitlines() if "roles.coder " in line)
    assert "project" in coder_row and "packaged" in coder_row

    (proj / "models.toml").write_text('[roles.coder]\nmodel = "mine"\nprivacy = "secret"\n')
    bad = run()
    assert bad.returncode == 1
    assert f"error: {proj / 'models.toml'}: roles.coder.privacy" in bad.stderr
