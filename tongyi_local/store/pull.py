"""Hub pulls: one file of a Hugging Face repo at a revision, into the model store, sha256-checked.

huggingface_hub does the talking: ``get_hf_file_metadata`` resolves the revision to a commit and
reads the file's ETag (its LFS sha256) and size, ``hf_hub_download`` fetches that commit's file
(token, ``HF_ENDPOINT``, redirects, Xet storage, progress bar, reconnecting with a Range request
when a transfer breaks off). What this module adds is what the hub does not do: a sha256 pin
checked before anything is downloaded and again on the bytes received, and placement into the
project's store, the one place the rest of the library reads model files from.

Why ``hf_hub_download(local_dir=<store>/.pulls/<key>)`` and not the hub cache (``HF_HOME``) with
a hard link or a move out of it: the store keeps the only copy (``models rm`` frees the disk, a
file moved out of the hub cache would leave it a dangling symlink, a hard link would keep the
bytes alive there), the download lands on the store's filesystem so placing it is a rename, and
the file gets its store name only after its sha256 matched. A file the hub cache already holds
for that commit is copied from there instead of downloaded (``local_dir`` mode does that).

Failures leave nothing behind: huggingface_hub deletes a partial download when a pull fails
(it resumes a broken transfer within the pull, not across pulls), and the staging folder is
removed when the pull ends, whatever the outcome; what a killed process left there is hidden
and goes when the next pull of that file ends.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..errors import ChecksumError, DownloadError, TongyiError
from ..paths import models_dir
from .local import (SHA256_HEX, PullRecord, have_verified_copy, hub_file_path, is_verified, locked,
                    normalize_sha256, place, read_record, sha256_file, staging_dir, write_record)

DEFAULT_ENDPOINT = "https://huggingface.co"
_LIBRARY = "tongyi-local"  # in the User-Agent the hub sees
_TRUE = {"1", "on", "yes", "true"}
log = logging.getLogger("tongyi_local.store")


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, or as huggingface_hub read it
    at import: either way no request leaves the machine."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.strip().lower() in _TRUE:
        return True
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def _have_copy(target: Path, sha: str | None, repo: str, filename: str, revision: str,
               etag: str | None = None) -> bool:
    """The store already holds what was asked for: by content when a sha256 is known, else by
    the pull record (the same ETag when the hub was asked, else the same revision or commit)."""
    if not target.is_file():
        return False
    if sha is not None:
        return have_verified_copy(target, sha)
    record = read_record(target)
    if record is None or record.repo != repo or record.filename != filename:
        return False
    if etag is not None:
        return record.etag == etag
    return revision in (record.revision, record.commit)


def pull(repo: str, filename: str, *, revision: str = "main", sha256: str | None = None,
         directory: Path | None = None, progress: bool = True) -> Path:
    """Download ``filename`` from hub repo ``repo`` at ``revision`` into the store; its path.

    Verified against ``sha256`` when given, else against the hub's own LFS sha256 (the ETag)
    when it has one; placed only after the check. ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are
    read now. A copy already in the store is returned without downloading (with a sha256,
    without any network request). Raises DownloadError, ChecksumError or ConfigError.
    """
    sha = normalize_sha256(sha256)
    root = directory or models_dir()
    target = hub_file_path(repo, filename, revision, directory=root)
    source = f"{repo}/{filename}@{revision}"
    if sha is not None and target.is_file() and is_verified(target, sha):
        return target
    if offline_mode():
        if _have_copy(target, sha, repo, filename, revision):
            log.info("offline: using %s from the store without checking the hub", target)
            return target
        raise DownloadError(source, f"offline mode is on (HF_HUB_OFFLINE) and the model store "
                            f"has no copy at {target}; unset HF_HUB_OFFLINE to download it, or "
                            "place the file there and give its sha256", offline=True)
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    with locked(root, target):
        if sha is not None and _have_copy(target, sha, repo, filename, revision):
            return target
        with _hub_errors(source, endpoint):
            return _fetch(repo, filename, revision, sha, root, target, endpoint, progress)


def _fetch(repo: str, filename: str, revision: str, sha: str | None, root: Path, target: Path,
           endpoint: str, progress: bool) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import silent_tqdm

    from .. import __version__

    meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision, endpoint=endpoint),
                                endpoint=endpoint, library_name=_LIBRARY,
                                library_version=__version__)
    if not meta.commit_hash or not meta.etag:
        raise DownloadError(f"{repo}/{filename}@{revision}", f"{endpoint} did not answer like a "
                            "hub (no X-Repo-Commit/ETag header); check HF_ENDPOINT")
    hub_sha = meta.etag.lower() if SHA256_HEX.fullmatch(meta.etag.lower()) else None
    what = f"{repo}/{filename}@{revision} (commit {meta.commit_hash})"
    if sha is not None and hub_sha is not None and sha != hub_sha:
        raise ChecksumError(what, sha, hub_sha, "the hub has other content than the sha256 "
                            "expected; nothing was downloaded: check the sha256 or the revision")
    expected = sha or hub_sha
    record = PullRecord(repo, filename, revision, meta.commit_hash, meta.etag, endpoint)
    if _have_copy(target, expected, repo, filename, revision, None if expected else meta.etag):
        write_record(target, record)
        return target

    staging = staging_dir(root, target)
    try:
        # The commit just resolved, not the revision again: what was checked is what arrives.
        got = Path(hf_hub_download(repo, filename, revision=meta.commit_hash, local_dir=staging,
                                   endpoint=endpoint, library_name=_LIBRARY,
                                   library_version=__version__,
                                   tqdm_class=None if progress else silent_tqdm))
        actual = sha256_file(got)
        if expected is not None and actual != expected:
            raise ChecksumError(what, expected, actual, "the download was deleted; check the "
                                "sha256, or pull again if the transfer was corrupted")
        place(got, target, expected)
        write_record(target, replace(record, sha256=actual))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("pulled %s to %s (%s)", what, target, "verified" if expected else "no sha256 known")
    return target


@contextmanager
def _hub_errors(source: str, endpoint: str) -> Iterator[None]:
    """Map huggingface_hub / HTTP / OS errors of one pull onto DownloadError, once."""
    from huggingface_hub import errors as hf
    from huggingface_hub.utils import httpx as hub_http  # the hub's own HTTP client module

    again = "nothing was kept; pull again"
    try:
        yield
    except TongyiError:
        raise
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
        raise DownloadError(source, f"HTTP {status} from {endpoint}; {again}") from exc
    except hf.FileMetadataError as exc:
        raise DownloadError(source, f"{endpoint} did not answer like a hub ({exc}); check "
                            "HF_ENDPOINT") from exc
    except (hub_http.HTTPError, hf.LocalEntryNotFoundError) as exc:
        cause = exc.__cause__ or exc  # the hub wraps a failed metadata request
        raise DownloadError(source, f"network error talking to {endpoint} ({type(cause).__name__}"
                            f": {cause}); check the connection or HF_ENDPOINT; {again}, or set "
                            "HF_HUB_OFFLINE=1 to use only stored files") from exc
    except OSError as exc:  # the disk (full, read-only), or a transfer cut short
        raise DownloadError(source, f"{exc}; {again}") from exc
