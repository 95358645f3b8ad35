"""Hub pulls with the real huggingface_hub over real HTTP against a hub on 127.0.0.1, and the
store's listing, verification and removal."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time

import huggingface_hub
import huggingface_hub.constants
import pytest
from servers.hub import FakeHub

from tongyi_local import store
from tongyi_local.errors import ChecksumError, ConfigError, DownloadError, ModelNotFoundError
from tongyi_local.gguf_header import read_header
from tongyi_local.testing import write_tiny_model

REPO, FILE = "Qwen/Tiny-GGUF", "tiny-qwen2-f16.gguf"


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    a = write_tiny_model(folder / "a.gguf", "qwen2", dtype="f16", seed=1).read_bytes()
    b = write_tiny_model(folder / "b.gguf", "qwen2", dtype="f16", seed=2).read_bytes()
    assert a != b
    return a, b


CHUNK = 16 << 10


@pytest.fixture
def hub(monkeypatch, model_bytes):
    # huggingface_hub writes what it streams in DOWNLOAD_CHUNK_SIZE (10 MB) pieces; a dropped
    # connection loses the unwritten remainder. Smaller pieces make this 300 KB file behave like
    # a multi-GB one (many pieces), so resume offsets are observable.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    with FakeHub(lifetime_s=120) as hub:
        hub.add(REPO, FILE, model_bytes[0])
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_sent_anywhere_else")
        yield hub
    assert hub.errors == []  # the test hub itself did not fail


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TONGYI_LOCAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def visible_files(root):
    """Everything in the store that could be taken for a model (hidden .part files are not)."""
    rels = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    return sorted(r.as_posix() for r in rels if not any(x.startswith(".") for x in r.parts))


def files_besides_locks(root):
    """Every file under the store, hidden ones too, except the lock files."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.parent.name != ".locks")


def placed(path, root):
    """A pulled model file and its two records, as ``files_besides_locks`` lists them."""
    rel = path.relative_to(root).as_posix()
    return sorted([rel, f"{rel}.sha256", f"{rel}.source.json"])


def test_pull_places_a_verified_file_in_the_model_dir(hub, home, model_bytes):
    path = store.pull(REPO, FILE, sha256=sha(model_bytes[0]), progress=False)
    assert path == home / "Qwen" / "Tiny-GGUF" / FILE
    assert path.read_bytes() == model_bytes[0]
    assert read_header(path).architecture == "qwen2"
    (entry,) = store.list_store()
    assert entry.name == f"Qwen/Tiny-GGUF/{FILE}" and entry.verified
    assert entry.size_bytes == len(model_bytes[0]) and entry.sha256 == sha(model_bytes[0])
    assert entry.repo == REPO and entry.revision == "main" and entry.commit == hub.repos[REPO].refs["main"]
    heads = [q for q in hub.requests if q.method == "HEAD"]
    assert heads and heads[0].path == f"/{REPO}/resolve/main/{FILE}"
    assert heads[0].headers.get("authorization") == "Bearer hf_test_token_not_sent_anywhere_else"
    assert "tongyi-local" in heads[0].headers.get("user-agent", "")
    # A verified copy is returned again without any request to the hub.
    before = len(hub.requests)
    assert store.pull(REPO, FILE, sha256=sha(model_bytes[0]).upper(), progress=False) == path
    assert len(hub.requests) == before


def test_pull_without_sha256_checks_the_hubs_lfs_sha_and_reuses_by_etag(hub, home, model_bytes):
    path = store.pull(REPO, FILE, progress=False)
    assert path.read_bytes() == model_bytes[0]
    assert store.list_store()[0].verified  # checked against the hub's X-Linked-Etag
    store.pull(REPO, FILE, progress=False)
    assert len(hub.gets()) == 1  # second pull: HEAD only, same etag, no body
    assert files_besides_locks(home) == placed(path, home)  # the download folder is gone


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_is_drawn_only_when_asked(hub, home, capfd, monkeypatch, progress):
    monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub draws bars off a terminal too
    store.pull(REPO, FILE, progress=progress)
    err = capfd.readouterr().err
    assert (FILE in err and "100%" in err) == progress, err


def test_the_hub_cache_is_read_never_written(hub, home, model_bytes, tmp_path, monkeypatch):
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    store.pull(REPO, FILE, progress=False)
    assert not cache.exists()  # the store holds the only copy
    store.remove(FILE)
    # A file the hub cache already holds at that commit is copied from there, not downloaded.
    huggingface_hub.hf_hub_download(REPO, FILE, endpoint=hub.url)
    downloads = len(hub.gets())
    path = store.pull(REPO, FILE, progress=False)
    assert path.read_bytes() == model_bytes[0] and len(hub.gets()) == downloads
    assert store.list_store()[0].verified


def test_checksum_mismatch_leaves_nothing_in_the_store(hub, home, model_bytes):
    wrong = sha(b"something else")
    with pytest.raises(ChecksumError) as info:
        store.pull(REPO, FILE, sha256=wrong, progress=False)
    assert wrong in str(info.value) and FILE in str(info.value)
    assert hub.gets() == []  # the hub's sha256 already disagreed: nothing was downloaded
    assert visible_files(home) == [] and store.list_store() == []


def test_corrupt_transfer_is_deleted_not_placed(hub, home, model_bytes):
    hub.faults.corrupt = True  # bytes differ from the ETag the hub advertises
    with pytest.raises(ChecksumError, match="deleted"):
        store.pull(REPO, FILE, progress=False)
    assert len(hub.gets()) == 1
    assert files_besides_locks(home) == []
    hub.faults.corrupt = False
    assert store.pull(REPO, FILE, progress=False).read_bytes() == model_bytes[0]


def test_a_transfer_broken_beyond_repair_leaves_nothing_and_the_next_pull_starts_clean(
        hub, home, model_bytes):
    data = model_bytes[0]
    # The first GET hangs up a third of the way; huggingface_hub asks at once for the rest with a
    # Range request, which fails (500): the pull fails and huggingface_hub deletes what it had.
    hub.faults.drop_after, hub.faults.fail_next = len(data) // 3, 1
    with pytest.raises(DownloadError, match="HTTP 500.*nothing was kept") as info:
        store.pull(REPO, FILE, sha256=sha(data), progress=False)
    assert REPO in str(info.value) and not info.value.offline
    assert [q.headers.get("range") is None for q in hub.gets()] == [True, False]
    assert files_besides_locks(home) == [] and store.list_store() == []
    path = store.pull(REPO, FILE, sha256=sha(data), progress=False)
    assert path.read_bytes() == data and store.list_store()[0].verified
    last = hub.gets()[-1]
    assert last.headers.get("range") is None and last.status == 200  # from the start
    assert files_besides_locks(home) == placed(path, home)


def test_a_dropped_connection_alone_is_resumed_within_the_pull(hub, home, model_bytes):
    hub.faults.drop_after = 5 * CHUNK + 100
    path = store.pull(REPO, FILE, progress=False)
    assert path.read_bytes() == model_bytes[0]
    assert [q.headers.get("range") for q in hub.gets()] == [None, f"bytes={5 * CHUNK}-"]


def test_a_stalled_transfer_times_out_and_resumes_within_the_pull(hub, home, model_bytes,
                                                                  monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    hub.faults.stall_after = 5 * CHUNK + 100
    path = store.pull(REPO, FILE, progress=False)
    assert hub.wait_stalled(0) and path.read_bytes() == model_bytes[0]
    assert [q.headers.get("range") for q in hub.gets()] == [None, f"bytes={5 * CHUNK}-"]


PULL_IN_CHILD = f"""
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background runner may ignore it
from tongyi_local import store
try:
    store.pull({REPO!r}, {FILE!r}, progress=False)
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_pull_leaves_nothing_that_lasts(hub, home, model_bytes, sig):
    hub.faults.stall_after = len(model_bytes[0]) // 2
    child = subprocess.Popen([sys.executable, "-c", PULL_IN_CHILD], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert hub.wait_stalled(60), child.communicate(timeout=5)
        deadline = time.monotonic() + 30
        while not list(home.rglob("*.incomplete")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(home.rglob("*.incomplete"))  # a partial download exists, out of sight
        assert visible_files(home) == []
        child.send_signal(sig)
        _, err = child.communicate(timeout=30)
    finally:
        child.kill()
    if sig == signal.SIGINT:  # Ctrl-C: the pull cleans up after itself at once
        assert child.returncode == 130, err
        assert files_besides_locks(home) == []
    else:  # killed: what it left is hidden, and the next pull of the file clears it
        assert child.returncode == -signal.SIGKILL
        assert visible_files(home) == [] and store.list_store() == []
        path = store.pull(REPO, FILE, progress=False)
        assert path.read_bytes() == model_bytes[0]
        assert files_besides_locks(home) == placed(path, home)


def test_revision_pinning(hub, home, model_bytes):
    a, b = model_bytes
    commit_a = hub.repos[REPO].refs["main"]
    commit_b = hub.add(REPO, FILE, b)  # main moves on to b
    hub.add(REPO, FILE, a, revision="v1.0", commit=commit_a)  # tag v1.0 stays on a
    pinned = store.pull(REPO, FILE, revision=commit_a, progress=False)
    tagged = store.pull(REPO, FILE, revision="v1.0", progress=False)
    latest = store.pull(REPO, FILE, progress=False)
    assert pinned.read_bytes() == a and tagged.read_bytes() == a and latest.read_bytes() == b
    assert len({pinned, tagged, latest}) == 3  # each revision has its own place
    assert pinned == store.hub_file_path(REPO, FILE, commit_a)
    # Each revision is resolved once (HEAD), and the commit it resolved to is what is fetched.
    assert {q.path for q in hub.requests if q.method == "HEAD"} >= {
        f"/{REPO}/resolve/{r}/{FILE}" for r in (commit_a, "v1.0", "main")}
    assert [q.path for q in hub.gets()] == [f"/{REPO}/resolve/{c}/{FILE}"
                                            for c in (commit_a, commit_a, commit_b)]
    by_name = {f.revision: f for f in store.list_store()}
    assert by_name[commit_a].commit == commit_a and by_name["main"].commit == commit_b
    with pytest.raises(ChecksumError):  # the pinned revision really is a, not b
        store.pull(REPO, FILE, revision="v1.0", sha256=sha(b), progress=False)


def test_offline_mode_errors_clearly_and_uses_stored_copies(hub, home, model_bytes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time, not at import
    with pytest.raises(DownloadError) as info:
        store.pull(REPO, FILE, progress=False)
    assert info.value.offline and "HF_HUB_OFFLINE" in str(info.value)
    assert hub.requests == [] and visible_files(home) == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    path = store.pull(REPO, FILE, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.requests)
    assert store.pull(REPO, FILE, progress=False) == path
    assert store.pull(REPO, FILE, sha256=sha(model_bytes[0]), progress=False) == path
    assert len(hub.requests) == seen


@pytest.mark.parametrize("repo, file, revision, fragment", [
    ("Qwen/Missing-GGUF", FILE, "main", "repo not found"),
    (REPO, FILE, "no-such-branch", "revision not found"),
    (REPO, "absent.gguf", "main", "no such file"),
])
def test_hub_errors_map_to_download_error(hub, home, repo, file, revision, fragment):
    with pytest.raises(DownloadError, match=fragment) as info:
        store.pull(repo, file, revision=revision, progress=False)
    assert repo in str(info.value) and not info.value.offline
    assert [p.name for p in home.iterdir()] == [".locks"]  # no folders, no partial files


def test_unreachable_endpoint(home, monkeypatch):
    with FakeHub() as hub:
        url = hub.url  # a port that is closed once the server is gone
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DownloadError, match="network error"):
        store.pull(REPO, FILE, progress=False)


@pytest.mark.parametrize("repo, file", [("../etc", FILE), (REPO, "../escape.gguf"),
                                        (REPO, "/abs.gguf"), ("a/b/c", FILE)])
def test_bad_names_are_rejected_before_any_request(home, repo, file):
    with pytest.raises(ConfigError):
        store.pull(repo, file, progress=False)


def test_bad_sha256_is_a_config_error(home):
    with pytest.raises(ConfigError, match="64 hex"):
        store.pull(REPO, FILE, sha256="abc", progress=False)


def test_verify_records_and_rejects(tmp_path, tiny_qwen2):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_qwen2.read_bytes())
    digest = sha(copy.read_bytes())
    assert store.verify(copy, digest) == copy
    assert store.recorded_sha256(copy) == digest
    with pytest.raises(ChecksumError):
        store.verify(copy, sha(b"x"))
    assert copy.exists() and store.recorded_sha256(copy) is None
    with pytest.raises(ModelNotFoundError):
        store.verify(tmp_path / "absent.gguf", digest)


def test_list_and_remove(hub, home, model_bytes):
    path = store.pull(REPO, FILE, progress=False)
    (home / "loose.gguf").write_bytes(b"GGUF")
    assert [f.name for f in store.list_store()] == [f"Qwen/Tiny-GGUF/{FILE}", "loose.gguf"]
    assert not store.list_store()[1].verified
    assert store.remove(FILE) == path  # a unique file name is enough
    assert not path.exists() and not (home / "Qwen").exists()
    assert store.remove("loose.gguf") == home / "loose.gguf"
    assert files_besides_locks(home) == []
    with pytest.raises(ModelNotFoundError):
        store.remove("loose.gguf")
    with pytest.raises(ModelNotFoundError):
        store.remove("../../outside")


def test_starter_model_keeps_its_marker(starter_path):
    assert store.recorded_sha256(starter_path) is not None
    assert store.starter_model() == starter_path
