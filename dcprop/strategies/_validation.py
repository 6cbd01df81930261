"""Argument checks for the public strategies, raised on a strategy's first use.

Every message names the argument and its value, as Hypothesis' own do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypothesis.errors import InvalidArgument


def check_int(
    name: str, value: Any, *, min_value: int | None = None, max_value: int | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be an int, not {type(value).__name__}")
    if min_value is not None and value < min_value:
        raise InvalidArgument(f"{name}={value!r} must be at least {min_value}")
    if max_value is not None and value > max_value:
        raise InvalidArgument(f"{name}={value!r} must be at most {max_value}")


def check_interval(low_name: str, low: int, high_name: str, high: int) -> None:
    if low > high:
        raise InvalidArgument(f"Cannot have {high_name}={high!r} < {low_name}={low!r}")


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InvalidArgument(f"{name}={value!r} must be a number between 0 and 1")


def check_choices(
    name: str, values: Any, allowed: Iterable[str], *, allow_empty: bool = False
) -> tuple[str, ...]:
    allowed = tuple(allowed)
    if isinstance(values, str):
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise InvalidArgument(f"{name}={values!r} must be a sequence of {allowed}") from None
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise InvalidArgument(
            f"{name}={values!r} has unknown entries {unknown}; choose from {allowed}"
        )
    if not values and not allow_empty:
        raise InvalidArgument(f"{name}=() must name at least one of {allowed}")
    return values


def check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    if not isinstance(value, types):
        expected = (
            types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        )
        raise InvalidArgument(f"{name}={value!r} must be a {expected}, not {type(value).__name__}")
