"""JSON round trip for specs, kept apart from the spec classes (attrs is no serialiser).

A spec becomes ``{"type": ClassName, field: value, ...}`` with tuples as lists;
:func:`from_json` rebuilds it through the class constructor, so every validator
runs again on the way back in.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from dcprop import specs
from dcprop.errors import SpecError

__all__ = ["dumps", "from_json", "loads", "to_json"]

_CLASSES = {
    name: getattr(specs, name)
    for name in specs.__all__
    if isinstance(getattr(specs, name), type) and attrs.has(getattr(specs, name))
}


def to_json(value: Any) -> Any:
    """A spec (or tuple/list of specs and plain values) as JSON-ready data."""
    if attrs.has(type(value)):
        out: dict[str, Any] = {"type": type(value).__name__}
        for a in attrs.fields(type(value)):
            out[a.name] = to_json(getattr(value, a.name))
        return out
    if isinstance(value, (tuple, list)):
        return [to_json(x) for x in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SpecError(f"cannot serialise {value!r} of type {type(value).__name__}")


def from_json(data: Any) -> Any:
    """Inverse of :func:`to_json`: lists come back as tuples, dicts as specs."""
    if isinstance(data, dict):
        kind = data.get("type")
        if kind not in _CLASSES:
            raise SpecError(f"unknown spec type {kind!r}; expected one of {sorted(_CLASSES)}")
        fields = {k: from_json(x) for k, x in data.items() if k != "type"}
        try:
            return _CLASSES[kind](**fields)
        except TypeError as e:
            raise SpecError(f"bad fields for {kind}: {e}") from None
    if isinstance(data, list):
        return tuple(from_json(x) for x in data)
    return data


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(to_json(value), **kwargs)


def loads(text: str) -> Any:
    return from_json(json.loads(text))
