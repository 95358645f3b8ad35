"""The evidence file: every figure of a run in one JSON document, mergeable across runs.

Why one document: the report, the recommendation and ``--compare`` all read the same figures,
and a run on a user's server can be sent, merged and compared without re-running anything.
Rows are plain dicts (the dataclasses' ``to_dict``), so old files stay readable as fields grow.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from ..errors import EvidenceError

VERSION = 1
LISTS = ("speed", "quality", "tasks", "roofline", "thread_sweep", "presets", "crosscheck",
         "quantized")


def new_evidence(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for key in LISTS:
        data[key] = []
    data.update({k: _as_dict(v) for k, v in sections.items() if v is not None})
    return data


def _as_dict(row: Any) -> Any:
    """JSON-shaped (tuples become lists): the document in memory equals the one on disk."""
    if hasattr(row, "to_dict"):
        row = row.to_dict()
    elif is_dataclass(row):
        row = asdict(row)
    return json.loads(json.dumps(row, default=str))


def add(data: dict[str, Any], section: str, rows: Any) -> dict[str, Any]:
    """Append rows (dataclasses or dicts) to a list section, or set a dict section."""
    if section in LISTS:
        data.setdefault(section, []).extend(_as_dict(r) for r in rows)
    else:
        data[section] = _as_dict(rows)
    return data


def merge(*documents: dict[str, Any]) -> dict[str, Any]:
    """Lists are concatenated (later runs after earlier ones); other keys: the last one wins."""
    out = new_evidence()
    for doc in documents:
        for key, value in doc.items():
            if key in LISTS:
                out[key].extend(value or [])
            elif key not in ("version", "created"):
                out[key] = value
    return out


def load_evidence(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvidenceError(f"results file not found: {path}")
    except (OSError, ValueError) as exc:
        raise EvidenceError(f"cannot read results file {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise EvidenceError(f"{path} is not a tongyi-local evidence file (version {VERSION}); "
                            "produce one with `tongyi-local bench --json` or benchmarks/evidence.py")
    for key in LISTS:
        data.setdefault(key, [])
    return data


def save_evidence(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Written beside the target and renamed: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
