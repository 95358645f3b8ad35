"""JSON schemas from Python types and functions (``schema_of``, ``function_schema``), and
validated JSON values back into those types (``convert``).

Why: tools are plain typed functions and structured answers are dataclasses, TypedDicts or
pydantic models; their schemas are built here from annotations (classes go to ``$defs``,
``Annotated`` strings and docstrings become descriptions), and a value that validated against
such a schema is built back into the type the caller asked for.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import InvalidRequestError, OutputParseError
from .docstrings import _docstring
from .pointers import _short
from .validation import _check_valid

_NONE_TYPE = type(None)


def _is_pydantic_model(target: Any) -> bool:
    pydantic = sys.modules.get("pydantic")  # a model class exists only once pydantic is imported
    return pydantic is not None and isinstance(target, type) and issubclass(
        target, pydantic.BaseModel)


def _is_typed_dict(target: Any) -> bool:
    return isinstance(target, type) and typing.is_typeddict(target)


def _unwrap(annotation: Any) -> tuple[Any, str | None]:
    """Strip ``Annotated`` (keeping a string note as the description) and Required/NotRequired."""
    description = None
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            notes = [m for m in annotation.__metadata__ if isinstance(m, str)]
            description = description or (notes[0] if notes else None)
            annotation = annotation.__origin__
        elif origin in (typing.Required, typing.NotRequired):
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation, description


class _SchemaBuilder:
    """JSON schemas for Python annotations; classes go to ``$defs`` (the root class is ``#``)."""

    def __init__(self, root: Any = None) -> None:
        self.root = root
        self.defs: dict[str, dict[str, Any]] = {}
        self.def_names: dict[Any, str] = {}

    def document(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self.defs:
            schema = {**schema, "$defs": self.defs}
        return schema

    def of(self, annotation: Any, where: str) -> dict[str, Any]:
        annotation, description = _unwrap(annotation)
        schema = self._of(annotation, where)
        if description:
            schema = {**schema, "description": description}
        return schema

    def _of(self, tp: Any, where: str) -> dict[str, Any]:
        if tp is Any:
            return {}
        if tp is None or tp is _NONE_TYPE:
            return {"type": "null"}
        if tp is bool:
            return {"type": "boolean"}
        if tp is int:
            return {"type": "integer"}
        if tp is float:
            return {"type": "number"}
        if tp is str:
            return {"type": "string"}
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self._enum(tp, where)
        if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or _is_typed_dict(tp)
                                     or _is_pydantic_model(tp)):
            return self._class_ref(tp, where)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Literal:
            return self._literal(args, where)
        if origin in (typing.Union, types.UnionType):
            options = [self.of(arg, where) for arg in args]
            return options[0] if len(options) == 1 else {"anyOf": options}
        if origin in (list, Sequence, typing.Sequence) or tp in (list, Sequence):
            item = self.of(args[0], where) if args else {}
            return {"type": "array", "items": item}
        if origin is tuple or tp is tuple:
            return self._tuple(args or (Any, ...), where)
        if origin in (dict, Mapping) or tp in (dict, Mapping):
            if args and _unwrap(args[0])[0] is not str:
                raise InvalidRequestError(f"{where}: dict keys must be str for a JSON object, "
                                          f"got {args[0]!r}")
            value = self.of(args[1], where) if args else {}
            return {"type": "object", "additionalProperties": value}
        raise InvalidRequestError(f"{where}: type {tp!r} has no JSON schema here; use int, "
                                  "float, str, bool, None, list, dict[str, X], tuple, Literal, "
                                  "an Enum, a dataclass, a TypedDict or a pydantic model")

    def _enum(self, tp: type[enum.Enum], where: str) -> dict[str, Any]:
        values = [member.value for member in tp]
        for value in values:
            if not isinstance(value, (str, int, float, bool, type(None))):
                raise InvalidRequestError(f"{where}: enum {tp.__name__} has a value of type "
                                          f"{type(value).__name__}; JSON needs str/int/float/bool")
        return {"enum": values, "title": tp.__name__}

    def _literal(self, args: tuple[Any, ...], where: str) -> dict[str, Any]:
        values = [a.value if isinstance(a, enum.Enum) else a for a in args]
        for value in values:
            if not isinstance(value, (str, int, float, bool, type(None))):
                raise InvalidRequestError(f"{where}: Literal value {value!r} is not JSON")
        return {"const": values[0]} if len(values) == 1 else {"enum": values}

    def _tuple(self, args: tuple[Any, ...], where: str) -> dict[str, Any]:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": self.of(args[0], where)}
        if not args or args == ((),):
            return {"type": "array", "maxItems": 0}
        return {"type": "array", "prefixItems": [self.of(a, where) for a in args],
                "items": False, "minItems": len(args)}

    def _class_ref(self, cls: type, where: str) -> dict[str, Any]:
        if cls is self.root:
            return {"$ref": "#"}
        if cls not in self.def_names:
            name, n = cls.__name__, 1
            while name in self.defs:
                n += 1
                name = f"{cls.__name__}{n}"
            self.def_names[cls] = name
            self.defs[name] = {}  # reserved (recursive classes)
            self.defs[name] = self.class_schema(cls)
        return {"$ref": f"#/$defs/{self.def_names[cls]}"}

    def class_schema(self, cls: type) -> dict[str, Any]:
        if _is_pydantic_model(cls):
            schema = dict(cls.model_json_schema(ref_template="#/$defs/{model}"))
            for name, sub in schema.pop("$defs", {}).items():
                self.defs.setdefault(name, sub)
            return schema
        hints = _type_hints(cls, f"class {cls.__name__}")
        description, notes = _docstring(_own_doc(cls))
        if dataclasses.is_dataclass(cls):
            fields = [f for f in dataclasses.fields(cls) if f.init]
            names = [f.name for f in fields]
            required = [f.name for f in fields if f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING]
            metadata = {f.name: f.metadata.get("description") for f in fields}
        else:
            names = list(hints)
            required = [n for n in names if _typed_dict_key_required(cls, n, hints[n])]
            metadata = {}
        properties = {}
        for name in names:
            prop = self.of(hints[name], f"field {name!r} of {cls.__name__}")
            note = metadata.get(name) or notes.get(name)
            if note and "description" not in prop:
                prop = {**prop, "description": note}
            properties[name] = prop
        schema: dict[str, Any] = {"type": "object", "title": cls.__name__,
                                  "properties": properties, "required": required,
                                  "additionalProperties": False}
        if description:
            schema["description"] = description
        return schema


def _typed_dict_key_required(cls: type, key: str, hint: Any) -> bool:
    """``Required``/``NotRequired`` from the resolved hint (Python 3.11 cannot see them in string
    annotations, so its ``__required_keys__`` follows ``total`` alone), else the class's own."""
    while typing.get_origin(hint) is typing.Annotated:
        hint = hint.__origin__
    if typing.get_origin(hint) is typing.NotRequired:
        return False
    if typing.get_origin(hint) is typing.Required:
        return True
    return key in cls.__required_keys__


def _type_hints(owner: Any, what: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(owner, include_extras=True)
    except Exception as exc:  # NameError for an unresolvable forward reference, and others
        raise InvalidRequestError(f"{what}: cannot resolve its type hints ({exc})") from exc


def _own_doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    # dataclass writes "Name(a: int, ...)" when the class has no docstring of its own
    if dataclasses.is_dataclass(cls) and doc.startswith(cls.__name__ + "("):
        return ""
    return doc


def schema_of(target: Any) -> dict[str, Any]:
    """A JSON schema for ``target``: a schema dict (checked, returned as plain data), a dataclass,
    TypedDict or pydantic model class, or an annotation (``int``, ``list[X]``, ``X | None``,
    ``Literal[...]``, an Enum, ``Annotated[X, "description"]``...)."""
    if isinstance(target, Mapping):
        _check_valid(target)
        return json.loads(json.dumps(target))
    if _is_pydantic_model(target):
        schema = target.model_json_schema()
        _check_valid(schema)
        return schema
    builder = _SchemaBuilder(root=target if isinstance(target, type) and (
        dataclasses.is_dataclass(target) or _is_typed_dict(target)) else None)
    name = getattr(target, "__name__", repr(target))
    if builder.root is not None:
        schema = builder.class_schema(target)
    else:
        schema = builder.of(target, f"type {name}")
    return builder.document(schema)


def function_schema(fn: Callable[..., Any]) -> tuple[str, str, dict[str, Any]]:
    """(name, description, parameters schema) for a typed Python function: the description is
    the docstring's first paragraph, parameter notes come from Google ``Args:``, Sphinx
    ``:param x:`` or NumPy sections; parameters without a default are required."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not callable(fn):
        raise InvalidRequestError(f"{fn!r} is not a named function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"function {name}: no inspectable signature ({exc})") from exc
    hints = _type_hints(fn, f"function {name}")
    description, notes = _docstring(inspect.getdoc(fn))
    builder = _SchemaBuilder()
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in signature.parameters.values():
        where = f"parameter {param.name!r} of function {name}"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise InvalidRequestError(f"{where}: *args/**kwargs cannot be described by a JSON "
                                      "schema; name each parameter")
        if param.kind is param.POSITIONAL_ONLY:
            raise InvalidRequestError(f"{where}: is positional-only; tool arguments are passed "
                                      "by name")
        if param.name not in hints:
            raise InvalidRequestError(f"{where}: has no type hint; annotate it (e.g. `x: int`)")
        prop = builder.of(hints[param.name], where)
        if notes.get(param.name) and "description" not in prop:
            prop = {**prop, "description": notes[param.name]}
        if param.default is param.empty:
            required.append(param.name)
        elif _is_json(param.default):
            prop = {**prop, "default": param.default}
        properties[param.name] = prop
    schema = builder.document({"type": "object", "properties": properties, "required": required,
                               "additionalProperties": False})
    return name, description, schema


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Values into Python types
# ----------------------------------------------------------------------------------------------

def convert(value: Any, target: Any) -> Any:
    """Build ``target`` from a validated JSON value: dataclass instances (nested dataclasses,
    lists, dicts, enums, tuples too), a pydantic model through ``model_validate``; TypedDicts,
    dicts and schema dicts give the value as is (nested dataclasses inside them are built)."""
    if isinstance(target, Mapping):
        return value
    try:
        return _convert(value, target, getattr(target, "__name__", repr(target)))
    except OutputParseError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        name = getattr(target, "__name__", repr(target))
        raise OutputParseError(f"the value does not build a {name}: "
                               f"{_short(type(exc).__name__ + ': ' + str(exc), 160)}") from exc


def _convert(value: Any, tp: Any, where: str) -> Any:
    tp, _ = _unwrap(tp)
    if tp is Any or tp is None or tp is _NONE_TYPE:
        return value
    if _is_pydantic_model(tp):
        return tp.model_validate(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _type_hints(tp, f"class {tp.__name__}")
        kwargs = {f.name: _convert(value[f.name], hints[f.name], f"{where}.{f.name}")
                  for f in dataclasses.fields(tp) if f.init and f.name in value}
        return tp(**kwargs)
    if _is_typed_dict(tp):
        hints = _type_hints(tp, f"class {tp.__name__}")
        return {k: _convert(v, hints[k], f"{where}.{k}") if k in hints else v
                for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, where)
    if origin in (list, Sequence, typing.Sequence) and args:
        return [_convert(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(item, args[0], where) for item in value)
        return tuple(_convert(item, arg, where) for item, arg in zip(value, args, strict=True))
    if origin in (dict, Mapping) and len(args) == 2:
        return {k: _convert(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    return value


def _convert_union(value: Any, args: tuple[Any, ...], where: str) -> Any:
    """The first arm whose schema the value matches (``X | None`` needs no check)."""
    if value is None and any(a is None or a is _NONE_TYPE for a in args):
        return None
    arms = [a for a in args if a is not None and a is not _NONE_TYPE]
    if len(arms) == 1:
        return _convert(value, arms[0], where)
    import jsonschema

    for arm in arms:
        schema = schema_of(arm)
        if jsonschema.validators.validator_for(schema)(schema).is_valid(value):
            return _convert(value, arm, where)
    return value
