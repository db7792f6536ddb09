"""The JSON schema of a Python function's parameters, for offering it to a model as a tool.

Built from the signature, the type hints and the docstring: ``str``, ``int``,
``float``, ``bool``, ``None``, ``Optional[...]`` / ``X | None``, unions, ``list[...]``,
``tuple[...]``, ``dict[str, ...]``, ``Literal[...]``, ``Enum`` subclasses and ``Any``.
A parameter with a default is not required. A type that JSON cannot express (a class, a
callable, ``dict[int, ...]``, a missing hint) raises ``TypeError`` naming the
parameter: a schema the model could not satisfy is worse than no tool at all.

Parameter descriptions come from the docstring's ``Args:`` / ``Parameters`` section
(Google or NumPy style) or ``:param name:`` lines (Sphinx style).
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["function_schema", "type_schema"]

_PRIMITIVES: Dict[Any, Dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    Any: {},
}
_LISTS = (list, typing.List, typing.Sequence, typing.Iterable)  # noqa: UP006 - the typing forms too


def type_schema(hint: Any) -> Dict[str, Any]:
    """The JSON schema of values of type ``hint``; ``TypeError`` if JSON cannot express it.

    >>> type_schema(typing.Optional[int])
    {'anyOf': [{'type': 'integer'}, {'type': 'null'}]}
    >>> type_schema(dict[str, float])
    {'type': 'object', 'additionalProperties': {'type': 'number'}}
    """
    if hint in _PRIMITIVES:
        return dict(_PRIMITIVES[hint])
    if hint is None:
        return {"type": "null"}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_schema(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return _literal_schema(args)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return {"anyOf": [type_schema(arg) for arg in args]}
    if hint in _LISTS or origin in (list, *_abc_sequences()):
        return {"type": "array", "items": type_schema(args[0])} if args else {"type": "array"}
    if hint in (tuple, typing.Tuple) or origin is tuple:  # noqa: UP006
        return _tuple_schema(args)
    if hint in (dict, typing.Dict) or origin in (dict, *_abc_mappings()):  # noqa: UP006
        return _dict_schema(args)
    raise TypeError(f"{_name(hint)} has no JSON form")


def _abc_sequences() -> Tuple[Any, ...]:
    import collections.abc as abc

    return (abc.Sequence, abc.Iterable, abc.Collection)


def _abc_mappings() -> Tuple[Any, ...]:
    import collections.abc as abc

    return (abc.Mapping,)


def _enum_schema(cls: "type[enum.Enum]") -> Dict[str, Any]:
    values = [member.value for member in cls]
    for value in values:
        if not isinstance(value, (str, int, float, bool)) or value is None:
            raise TypeError(f"enum {cls.__name__} has a value JSON cannot carry: {value!r}")
    return {"enum": values}


def _literal_schema(args: Tuple[Any, ...]) -> Dict[str, Any]:
    for value in args:
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"Literal value {value!r} has no JSON form")
    return {"enum": list(args)}


def _tuple_schema(args: Tuple[Any, ...]) -> Dict[str, Any]:
    if not args:
        return {"type": "array"}
    if len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": type_schema(args[0])}
    items = [type_schema(arg) for arg in args]
    return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}


def _dict_schema(args: Tuple[Any, ...]) -> Dict[str, Any]:
    if not args:
        return {"type": "object"}
    if args[0] is not str:
        raise TypeError(f"dict keys must be str to be JSON, not {_name(args[0])}")
    return {"type": "object", "additionalProperties": type_schema(args[1])}


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or repr(hint)


def function_schema(fn: Callable[..., Any]) -> Tuple[str, str, Dict[str, Any]]:
    """``(name, description, parameters schema)`` of ``fn`` as a tool.

    >>> def add(a: int, b: int = 1) -> int:
    ...     '''Add two numbers.'''
    ...     return a + b
    >>> function_schema(add)[2]["required"]
    ['a']
    """
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or name == "<lambda>":
        raise TypeError(f"a tool function needs a name (a def, not a lambda): {fn!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tool {name}: its signature cannot be read: {exc}") from None
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # a NameError in a string annotation, for one
        raise TypeError(f"tool {name}: its type hints cannot be resolved: {exc}") from None
    summary, described = _parse_docstring(inspect.getdoc(fn) or "")
    properties: Dict[str, Any] = {}
    required: List[str] = []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            stars = "*" if param.kind is param.VAR_POSITIONAL else "**"
            raise TypeError(f"tool {name}: {stars}{param.name} has no JSON schema; name every parameter")
        if param.kind is param.POSITIONAL_ONLY:
            raise TypeError(f"tool {name}: parameter {param.name!r} is positional-only; a tool is called by name")
        if param.name not in hints:
            raise TypeError(f"tool {name}: parameter {param.name!r} needs a type hint (the model must know its type)")
        try:
            schema = type_schema(hints[param.name])
        except TypeError as exc:
            raise TypeError(f"tool {name}: parameter {param.name!r}: {exc}") from None
        if described.get(param.name):
            schema["description"] = described[param.name]
        if param.default is param.empty:
            required.append(param.name)
        elif _is_json(param.default):
            schema["default"] = param.default.value if isinstance(param.default, enum.Enum) else param.default
        properties[param.name] = schema
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return name, summary, parameters


def _is_json(value: Any) -> bool:
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params)\s*:?\s*$", re.IGNORECASE)
_DASHES = re.compile(r"^-{3,}\s*$")
_SPHINX_PARAM = re.compile(r"^:param\s+(?:\S+\s+)?(\w+)\s*:\s*(.*)$")
_GOOGLE_PARAM = re.compile(r"^(\w+)(?:\s*\([^)]*\))?:\s*(.*)$")
_NUMPY_PARAM = re.compile(r"^(\w+)(?:\s+:.*)?$")


def _parse_docstring(doc: str) -> Tuple[str, Dict[str, str]]:
    """The summary (first paragraph) and each parameter's description."""
    lines = doc.splitlines()
    summary_lines: List[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line.strip()) or line.strip().startswith(":"):
            break
        summary_lines.append(line.strip())
    described: Dict[str, str] = {}
    _sphinx_params(lines, described)
    _section_params(lines, described)
    return " ".join(summary_lines), described


def _sphinx_params(lines: List[str], described: Dict[str, str]) -> None:
    for line in lines:
        match = _SPHINX_PARAM.match(line.strip())
        if match:
            described[match.group(1)] = match.group(2).strip()


def _section_params(lines: List[str], described: Dict[str, str]) -> None:
    """Google (``name (type): text``) and NumPy (``name : type`` then indented text)."""
    in_section, base_indent = False, 0
    current_name: Optional[str] = None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if _SECTION.match(stripped):
            in_section, base_indent, current_name = True, -1, None
            continue
        if not in_section or _DASHES.match(stripped):
            continue
        if not stripped:
            continue
        if base_indent < 0:
            base_indent = indent
        if indent < base_indent or (indent == base_indent and stripped.endswith(":") and " " not in stripped):
            in_section = False  # the next section began
            continue
        if indent == base_indent:
            google = _GOOGLE_PARAM.match(stripped)
            numpy = _NUMPY_PARAM.match(stripped)
            if google:
                current_name = google.group(1)
                described[current_name] = google.group(2).strip()
            elif numpy:
                current_name = numpy.group(1)
                described[current_name] = ""
        elif current_name is not None:
            described[current_name] = (described[current_name] + " " + stripped).strip()
