"""Is a schema valid (its metaschema), and does a value match it (``validate``).

Why: the grammar makes the model's output parse, but the answer is still checked against the
schema before anyone gets it, and schemas from callers are checked before they are used. Both go
through jsonschema, with our own RFC 3339 date/time and uuid format checks so that the formats
the grammar writes are the formats validation accepts, without optional packages.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidRequestError, OutputParseError
from .pointers import _invalid, _pointer_of, _short


def _check_valid(schema: Any) -> None:
    """A schema that is not a mapping, not JSON, or not valid by its metaschema is the caller's
    error, raised with the pointer at fault (jsonschema also checks ``pattern`` regexes)."""
    import jsonschema
    from jsonschema.validators import validator_for

    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"a JSON schema must be a mapping (dict), got "
                                  f"{type(schema).__name__}")
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"a JSON schema must be plain JSON data: {_short(str(exc))}") \
            from exc
    validator = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise _invalid(_pointer_of(exc.path), _short(exc.message)) from exc


@functools.cache
def _format_checker() -> Any:
    """jsonschema's format checker with our own RFC 3339 date/time and uuid checks, so validation
    does not depend on optional packages (jsonschema skips time/date-time without them)."""
    import jsonschema

    checker = jsonschema.FormatChecker()
    for name, check in (("date", _is_date), ("time", _is_time), ("date-time", _is_date_time),
                        ("uuid", _is_uuid)):
        # a format constrains strings only; any other value passes it (JSON Schema's rule)
        checker.checks(name)(lambda value, check=check: not isinstance(value, str) or check(value))
    return checker


_DATE_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})", re.ASCII)
_TIME_RE = re.compile(r"(\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-](\d{2}):(\d{2}))", re.ASCII)
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                      r"[0-9a-fA-F]{12}")


def _is_date(value: str) -> bool:
    import datetime

    match = _DATE_RE.fullmatch(value)
    if not match:
        return False
    try:
        datetime.date(*(int(part) for part in match.groups()))
    except ValueError:
        return False
    return True


def _is_time(value: str) -> bool:
    match = _TIME_RE.fullmatch(value)
    if not match:
        return False
    hour, minute, second = (int(match.group(i)) for i in (1, 2, 3))
    if hour > 23 or minute > 59 or second > 60:
        return False
    if match.group(6) is not None:
        return int(match.group(6)) <= 23 and int(match.group(7)) <= 59
    return True


def _is_date_time(value: str) -> bool:
    return len(value) > 11 and value[10] in "Tt" and _is_date(value[:10]) and _is_time(value[11:])


def _is_uuid(value: str) -> bool:
    return bool(_UUID_RE.fullmatch(value))


def validate(value: Any, schema: Mapping[str, Any], *, what: str) -> None:
    """Raise ``OutputParseError`` unless ``value`` matches ``schema``: names ``what``, the JSON
    pointer of the failing part and jsonschema's reason, never the value itself (it may be private
    text). Formats date, time, date-time and uuid are checked."""
    import jsonschema
    import referencing.exceptions
    from jsonschema.validators import validator_for

    try:
        cls = validator_for(schema, default=jsonschema.Draft202012Validator)
        error = jsonschema.exceptions.best_match(
            cls(schema, format_checker=_format_checker()).iter_errors(value))
    except (jsonschema.SchemaError, referencing.exceptions.Unresolvable) as exc:
        raise InvalidRequestError(f"the JSON schema for {what} is not usable: "
                                  f"{_short(str(exc).splitlines()[0])}") from exc
    if error is None:
        return
    where = _pointer_of(error.absolute_path) or "/"
    reason = error.message.replace(repr(error.instance), "the value")
    raise OutputParseError(f"{what} does not match its JSON schema at {where}: "
                           f"{_short(reason, 160)} (keyword {error.validator!r})")
