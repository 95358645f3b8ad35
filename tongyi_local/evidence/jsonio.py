"""Dataclasses to JSON and back: the evidence pipeline's one writer and one reader.

Why pydantic: it validates JSON against the very dataclasses the pipeline computes with (nested
rows, tuples, optional figures) and says which field of which row is wrong, where a hand-written
reader would read dicts back by string key.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import cache
from typing import Any, TypeVar

from ..errors import EvidenceError

T = TypeVar("T")


def to_json(value: Any) -> Any:
    """A dataclass as JSON-shaped data (tuples become lists): equal to what is written."""
    return json.loads(json.dumps(asdict(value)))


@cache
def _adapter(cls: type) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def parse(cls: type[T], data: Any, source: str, remedy: str) -> T:
    """``data`` validated into ``cls``; an EvidenceError names ``source``, the field and ``remedy``."""
    from pydantic import ValidationError

    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise EvidenceError(f"{source} has a bad value{' at ' + where if where else ''}: "
                            f"{first['msg']}; {remedy}") from exc
