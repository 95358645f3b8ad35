"""The checked form of a schema: what the grammar will express.

Why: ``reader`` turns a JSON schema into these nodes, refusing whatever the grammar cannot honour;
``grammar`` writes them as GBNF without looking at the raw schema again. This module is the
contract between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .patterns import _Re


class _Node:
    """A schema node the grammar can express."""


@dataclass(frozen=True)
class _Never(_Node):
    """The ``false`` schema: no value. Only its parent can drop it."""


@dataclass(frozen=True)
class _AnyValue(_Node):
    """``true`` or ``{}``: any JSON value."""


@dataclass(frozen=True)
class _AnyObject(_Node):
    """``{"type": "object"}`` with no other constraint: any object."""


@dataclass(frozen=True)
class _Null(_Node):
    """``null``."""


@dataclass(frozen=True)
class _Boolean(_Node):
    """``true`` or ``false``."""


@dataclass(frozen=True)
class _Integer(_Node):
    low: int | None = None  # inclusive
    high: int | None = None  # inclusive


@dataclass(frozen=True)
class _Bound:
    value: int
    exclusive: bool


@dataclass(frozen=True)
class _Number(_Node):
    low: _Bound | None = None
    high: _Bound | None = None


@dataclass(frozen=True)
class _String(_Node):
    min_length: int = 0
    max_length: int | None = None


@dataclass(frozen=True)
class _Format(_Node):
    name: str


@dataclass(frozen=True)
class _Pattern(_Node):
    regex: _Re


@dataclass(frozen=True)
class _Literals(_Node):
    values: tuple[Any, ...]


@dataclass(frozen=True)
class _Union(_Node):
    options: tuple[_Node, ...]


@dataclass(frozen=True)
class _Ref(_Node):
    key: tuple[int, str]  # (document, JSON pointer of the target)


@dataclass(frozen=True)
class _Array(_Node):
    item: _Node
    min_items: int = 0
    max_items: int | None = None


@dataclass(frozen=True)
class _Tuple(_Node):
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Property:
    name: str
    node: _Node
    required: bool


@dataclass(frozen=True)
class _Object(_Node):
    properties: tuple[_Property, ...]
    additional: _Node | None  # None: no keys beyond ``properties``


@dataclass
class _Document:
    """One schema read into checked form; ``refs`` holds the targets of its ``$ref`` s."""

    root: _Node
    refs: dict[tuple[int, str], _Node]
