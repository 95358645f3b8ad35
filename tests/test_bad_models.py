"""Bad model files are rejected with ModelLoadError naming the path, before llama.cpp sees them."""

from __future__ import annotations

import shutil
import struct

import pytest

from tongyi_local import ModelLoadError, ModelNotFoundError, load
from tongyi_local.gguf_header import read_header


def _expect_load_error(path, reason_fragment):
    with pytest.raises(ModelLoadError) as info:
        load(path, n_ctx=256)
    assert str(path) in str(info.value)
    assert reason_fragment in info.value.reason
    return info.value


def test_missing_path(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(ModelNotFoundError, match="absent.gguf"):
        load(path)
    with pytest.raises(FileNotFoundError):  # also the builtin, like huggingface_hub's errors
        load(path)


def test_directory(tmp_path):
    _expect_load_error(tmp_path, "directory")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.touch()
    _expect_load_error(path, "empty")


def test_wrong_magic(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is a text file, not a model\n" * 10)
    _expect_load_error(path, "not a GGUF file")


@pytest.mark.parametrize("version", [1, 99])
def test_unsupported_version(tmp_path, tiny_qwen2, version):
    path = tmp_path / f"v{version}.gguf"
    data = bytearray(tiny_qwen2.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(data)
    _expect_load_error(path, f"version {version}")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(tmp_path, tiny_qwen2, keep):
    data = tiny_qwen2.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    _expect_load_error(path, "truncated")


def test_truncated_header(tmp_path, tiny_qwen2):
    path = tmp_path / "head.gguf"
    path.write_bytes(tiny_qwen2.read_bytes()[:200])
    _expect_load_error(path, "truncated")


def test_corrupt_tensor_type_is_reported_not_crashed(tmp_path, tiny_qwen2):
    header = read_header(tiny_qwen2)
    path = tmp_path / "badtype.gguf"
    shutil.copyfile(tiny_qwen2, path)
    data = bytearray(path.read_bytes())
    # find the first tensor-info record by its name and corrupt its ggml type field
    name = header.tensors[0].name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = struct.pack("<I", 250)
    path.write_bytes(data)
    _expect_load_error(path, "unknown type")


def test_header_of_the_starter_model(starter_path):
    header = read_header(starter_path)
    assert header.architecture == "gemma3"
    assert header.file_type == "Q4_K_M"
    assert header.context_length == 32768
    assert header.array_lengths["tokenizer.ggml.tokens"] == 262144
    assert 250e6 < header.n_params < 300e6


def _with_architecture(tiny_qwen2, path, arch: str):
    """The tiny model relabelled as an architecture llama.cpp does not know (the header is fine)."""
    data = bytearray(tiny_qwen2.read_bytes())
    key = b"general.architecture"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 8
    assert data[at:at + 5] == b"qwen2"
    data[at:at + 5] = arch.encode()
    path.write_bytes(data)
    return path


def test_concurrent_loads_each_report_their_own_llama_cpp_reason(tmp_path, tiny_qwen2):
    # llama.cpp gives its reasons only through one process-wide log callback; loads in other
    # threads, failing for other reasons at the same moment, must not lend theirs.
    import threading

    files = {arch: _with_architecture(tiny_qwen2, tmp_path / f"{arch}.gguf", arch)
             for arch in ("qwenx", "qweny")}
    reasons: dict[str, list[str]] = {arch: [] for arch in files}
    loaded: list[str] = []
    start = threading.Barrier(len(files) + 1)

    def refused(arch):
        start.wait()
        for _ in range(25):
            with pytest.raises(ModelLoadError) as info:
                load(files[arch], n_ctx=256, slots=1)
            reasons[arch].append(info.value.reason)

    def good():
        start.wait()
        for _ in range(3):
            with load(tiny_qwen2, n_ctx=256, slots=1) as model:
                loaded.append(model.info.architecture)

    threads = [threading.Thread(target=refused, args=(a,)) for a in files]
    threads.append(threading.Thread(target=good))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loaded == ["qwen2"] * 3
    for arch, other in (("qwenx", "qweny"), ("qweny", "qwenx")):
        assert len(reasons[arch]) == 25
        for reason in reasons[arch]:
            assert f"unknown model architecture: '{arch}'" in reason and other not in reason
