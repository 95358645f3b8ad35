"""JSON pointers, and the errors that name one.

Why: every refusal (``UnsupportedSchemaError``) and every invalid-schema error
(``InvalidRequestError``) says where in the schema it is, as an RFC 6901 pointer; the reader, the
pattern parser, the grammar writer and validation all build them the same way from here.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import InvalidRequestError, UnsupportedSchemaError


def _child(pointer: str, *tokens: str | int) -> str:
    """The RFC 6901 pointer of a child node."""
    for token in tokens:
        pointer += "/" + str(token).replace("~", "~0").replace("/", "~1")
    return pointer


def _pointer_of(path: Iterable[str | int]) -> str:
    return _child("", *path)


def _invalid(pointer: str, reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"invalid JSON schema at {pointer or '/'}: {reason}")


def _unsupported(feature: str, pointer: str, detail: str = "") -> UnsupportedSchemaError:
    error = UnsupportedSchemaError(feature, pointer, detail)
    error.detail = detail  # type: ignore[attr-defined]  # kept for re-raising with context
    return error


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
