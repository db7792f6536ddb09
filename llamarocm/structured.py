"""Structured output: ``response_format`` as OpenAI takes it, and parsing the reply.

``response_format`` is ``{"type": "text"}``, ``{"type": "json_object"}``,
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``, or a
pydantic model class (as openai's ``.parse()`` takes it). Each becomes the JSON Schema
llama-server constrains the output with, and the parser :meth:`TokenStream.parsed
<llamarocm.TokenStream.parsed>` applies to the reply.

pydantic is optional: a model class is recognised by its methods, never by importing
pydantic, so ``import llamarocm`` works without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from .config import _check_json
from .errors import OutputParseError

__all__ = ["StructuredOutput", "structured_output", "is_pydantic_model"]

#: ``parse(text, cut_short)``: the reply as a value, or :class:`OutputParseError`.
Parser = Callable[[str, bool], Any]

# What "json_object" means: any JSON object (OpenAI's JSON mode).
_ANY_OBJECT: Dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class StructuredOutput:
    """The schema a request is constrained with, and how its reply is parsed
    (``None``: the reply is free text)."""

    json_schema: Optional[Dict[str, Any]]
    parse: Optional[Parser]


def is_pydantic_model(value: Any) -> bool:
    """Whether ``value`` is a pydantic (v2) model class, told by its methods."""
    return isinstance(value, type) and all(
        callable(getattr(value, name, None)) for name in ("model_json_schema", "model_validate_json")
    )


def structured_output(
    response_format: Any, json_schema: Optional[Mapping[str, Any]], grammar: Optional[str] = None
) -> StructuredOutput:
    """Check ``response_format`` (and that it comes with neither ``json_schema`` nor,
    for a JSON format, ``grammar``) and say what the request and its parser are.

    >>> structured_output({"type": "json_object"}, None).json_schema
    {'type': 'object'}
    >>> structured_output(None, None)
    StructuredOutput(json_schema=None, parse=None)
    """
    if response_format is None:
        if json_schema is None:
            return StructuredOutput(None, None)
        return StructuredOutput(None, _parse_json)  # the schema goes as json_schema= already
    if json_schema is not None:
        raise ValueError("pass response_format or json_schema, not both")
    output = _from_format(response_format)
    if output.json_schema is not None and grammar is not None:
        raise ValueError("pass a JSON response_format or grammar, not both")
    return output


def _from_format(response_format: Any) -> StructuredOutput:
    if is_pydantic_model(response_format):
        return StructuredOutput(_schema_of_model(response_format), _model_parser(response_format))
    if isinstance(response_format, type):
        raise TypeError(
            f"response_format got the class {response_format.__name__}, which is not a pydantic (v2) model"
        )
    if not isinstance(response_format, Mapping):
        kind = type(response_format).__name__
        raise TypeError(f"response_format must be a dict or a pydantic model class, not {kind}")
    return _from_dict(response_format)


def _from_dict(response_format: Mapping[str, Any]) -> StructuredOutput:
    kind = response_format.get("type")
    if kind == "text":
        return StructuredOutput(None, None)
    if kind == "json_object":
        return StructuredOutput(dict(_ANY_OBJECT), _parse_object)
    if kind != "json_schema":
        raise ValueError(
            f"response_format['type'] must be 'text', 'json_object' or 'json_schema', got {kind!r}"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise TypeError(
            "response_format['json_schema'] must be a dict like {'name': ..., 'schema': {...}}"
        )
    schema = spec.get("schema")
    if not isinstance(schema, Mapping):
        raise TypeError("response_format['json_schema']['schema'] must be a dict (a JSON Schema)")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise TypeError("response_format['json_schema']['name'] must be a str")
    _check_json("response_format's schema", schema)
    return StructuredOutput(dict(schema), _parse_json)


def _schema_of_model(model: Any) -> Dict[str, Any]:
    schema = model.model_json_schema()
    if not isinstance(schema, dict):
        raise TypeError(f"{model.__name__}.model_json_schema() did not return a dict")
    _check_json(f"{model.__name__}'s schema", schema)
    return schema


def _hint(cut_short: bool) -> str:
    return " (the output was cut short by max_tokens)" if cut_short else ""


def _parse_json(text: str, cut_short: bool) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise OutputParseError(
            f"the output is not valid JSON{_hint(cut_short)}: {exc}; output: {text[:500]!r}"
        ) from exc


def _parse_object(text: str, cut_short: bool) -> Any:
    value = _parse_json(text, cut_short)
    if not isinstance(value, dict):
        raise OutputParseError(f"the output is JSON but not an object: {text[:500]!r}")
    return value


def _model_parser(model: Any) -> Parser:
    def parse(text: str, cut_short: bool) -> Any:
        try:
            return model.model_validate_json(text)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise OutputParseError(
                f"the output does not match {model.__name__}{_hint(cut_short)}: {exc}; output: {text[:500]!r}"
            ) from exc

    return parse
