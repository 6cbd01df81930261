"""What every spec class shares: the valid-Python repr, and the validators and
converters its fields are built from.

Every check here raises :class:`~dcprop.errors.SpecError` and names the field and
the value it got (``lr=True: expected a number, got bool``), so a bad corpus file
or recipe fails with dcprop's one error for bad specs, never a bare ``TypeError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from dcprop.errors import SpecError

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


# --------------------------------------------------------------------------- repr


def explicit_fields(spec: Any) -> list[tuple[str | None, Any]]:
    """The fields a constructor call must spell out: mandatory ones as ``(None, value)``
    (positional), then those that differ from their default as ``(name, value)``."""
    out: list[tuple[str | None, Any]] = []
    for a in attrs.fields(type(spec)):
        value = getattr(spec, a.name)
        if a.default is attrs.NOTHING:
            out.append((None, value))
            continue
        default = a.default.factory() if hasattr(a.default, "factory") else a.default
        if value != default:
            out.append((a.name, value))
    return out


class Spec:
    """Base of every spec: a constructor-call repr that omits defaults, so it is short
    and valid Python (attrs' own repr is turned off)."""

    __slots__ = ()

    def __repr__(self) -> str:
        parts = [repr(v) if n is None else f"{n}={v!r}" for n, v in explicit_fields(self)]
        return f"{type(self).__name__}({', '.join(parts)})"


# --------------------------------------------------------------------- validators


def _is(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int to Python, never to a spec: ``steps=True`` is a mistake
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def instance_of(*types: type) -> Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not _is(value, types):
            raise SpecError(
                f"{attribute.name}={value!r}: expected {_type_names(types)}, "
                f"got {type(value).__name__}"
            )

    return check


def one_of(choices: Iterable[Any]) -> Validator:
    allowed = tuple(choices)

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in allowed or isinstance(value, bool) != any(
            isinstance(c, bool) for c in allowed
        ):
            raise SpecError(f"{attribute.name}={value!r}: expected one of {allowed}")

    return check


def _bound(test: Callable[[Any], bool], words: str) -> Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not test(value):
            raise SpecError(f"{attribute.name}={value!r}: must be {words}")

    return check


def at_least(low: float) -> Validator:
    return _bound(lambda x: x >= low, f">= {low}")


def at_most(high: float) -> Validator:
    return _bound(lambda x: x <= high, f"<= {high}")


def above(low: float) -> Validator:
    return _bound(lambda x: x > low, f"> {low}")


def below(high: float) -> Validator:
    return _bound(lambda x: x < high, f"< {high}")


def optional(*checks: Validator) -> Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            for c in checks:
                c(inst, attribute, value)

    return check


def identifier(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        raise SpecError(f"{attribute.name}={value!r} is not a valid name (a Python identifier)")


def non_empty(_inst: Any, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
    if not value:
        raise SpecError(f"{attribute.name} must hold at least one layer, got ()")


flag = instance_of(bool)
positive = [instance_of(int), at_least(1)]
non_negative = [instance_of(int), at_least(0)]


# --------------------------------------------------------------------- converters
# Converters only normalise what is already the right kind (JSON's lists become
# tuples, an int becomes a float); anything else passes through unchanged so that
# the field's validator rejects it by name.


def as_float(value: Any) -> Any:
    return float(value) if _is(value, (int,)) else value


def as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (tuple, list)) else value


def as_pairs(value: Any) -> Any:
    if isinstance(value, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) == 2 for p in value
    ):
        return tuple(tuple(p) for p in value)
    return value


def tuple_of(*types: type) -> Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, tuple) or not all(_is(x, types) for x in value):
            raise SpecError(f"{attribute.name}={value!r}: expected a tuple of {_type_names(types)}")

    return check


def pairs_of(first: type, *second: type) -> Validator:
    """A tuple of ``(first, second)`` pairs (no ``second`` type: anything)."""

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        ok = isinstance(value, tuple) and all(
            isinstance(p, tuple)
            and len(p) == 2
            and _is(p[0], (first,))
            and (not second or _is(p[1], second))
            for p in value
        )
        if not ok:
            want = f"({first.__name__}, {_type_names(second) if second else '...'})"
            raise SpecError(f"{attribute.name}={value!r}: expected a tuple of {want} pairs")

    return check
