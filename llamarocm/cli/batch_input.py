"""``llamarocm batch``'s input file: JSON lines read and checked as batch items, each
with its own settings over the command line's."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Tuple

from ..batch import BatchItem
from ..config import GenerateConfig
from ..messages import check_messages
from .arguments import refuse_constant

# What an input line of ``batch`` may hold besides the GenerateConfig fields.
_ITEM_KEYS = frozenset({"id", "prompt", "messages"})
_SETTING_KEYS = frozenset(f.name for f in dataclasses.fields(GenerateConfig))


def _batch_item(raw: bytes, options: Dict[str, Any]) -> BatchItem:
    """One input line of ``batch`` as an item; its own settings override ``options``."""
    obj = json.loads(raw, parse_constant=refuse_constant)
    if not isinstance(obj, dict):
        raise ValueError('expected a JSON object such as {"id": 1, "prompt": "..."}')
    unknown = sorted(set(obj) - _ITEM_KEYS - _SETTING_KEYS)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)}; a line has an id, a prompt or messages, "
            f"and any of {', '.join(sorted(_SETTING_KEYS))}"
        )
    if "id" not in obj:
        raise ValueError("no id: every line needs an id, a string or an integer")
    item_id = obj["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise ValueError(f"the id must be a string or an integer, not {json.dumps(item_id)}")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError("give either a prompt or messages")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise ValueError("the prompt must be a string (a chat goes in messages)")
    else:
        prompt = check_messages(obj["messages"])
    settings = {key: value for key, value in obj.items() if key in _SETTING_KEYS}
    if not settings:
        return BatchItem(prompt, options, item_id)  # the shared options: hashed once
    merged = {**options, **settings}
    GenerateConfig.from_kwargs(merged)
    return BatchItem(prompt, merged, item_id)


def read_batch_input(path: str, options: Dict[str, Any]) -> List[BatchItem]:
    """The items of a ``batch`` input file (JSON lines; blank lines are skipped), or a
    ``ValueError`` naming the file and line: a bad line, a missing or repeated id."""
    try:
        with open(os.path.expanduser(path), "rb") as file:
            lines = file.read().split(b"\n")
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    items: List[BatchItem] = []
    seen: Dict[Tuple[bool, Any], int] = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            item = _batch_item(raw, options)
        except (TypeError, ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8 and bad values
            raise ValueError(f"{path} line {number}: {exc}") from None
        key = (isinstance(item.id, str), item.id)  # the id 1 and the id "1" differ
        if key in seen:
            raise ValueError(f"{path} line {number}: the id {json.dumps(item.id)} is already on line {seen[key]}")
        seen[key] = number
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items
