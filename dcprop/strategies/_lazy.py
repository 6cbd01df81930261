"""Strategies built on first use, as Hypothesis builds its own.

Hypothesis' ``@defines_strategy`` wraps each public strategy function so that the
call returns at once: arguments are checked (and the real strategy built) when the
strategy is first validated or drawn from, and its repr is the call that made it,
``scenarios('reshard', world_sizes=(2, 4))``.  That decorator also registers the
function among Hypothesis' own strategies, so this module builds the same
``LazyStrategy`` directly; it is the one place dcprop imports Hypothesis internals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from hypothesis.strategies import SearchStrategy
from hypothesis.strategies._internal.lazy import LazyStrategy

P = ParamSpec("P")
T = TypeVar("T")


def defines_strategy(
    definition: Callable[P, SearchStrategy[T]],
) -> Callable[P, SearchStrategy[T]]:
    """``definition``, made lazy: calling it records the arguments; checking them and
    building the strategy wait for ``.validate()`` or the first draw."""

    @functools.wraps(definition)
    def accept(*args: P.args, **kwargs: P.kwargs) -> SearchStrategy[T]:
        return LazyStrategy(definition, args, kwargs, force_repr=_call(definition, args, kwargs))

    return accept


def _call(
    function: Callable[..., object], args: tuple[object, ...], kwargs: dict[str, object]
) -> str:
    """The call as it was written (Hypothesis' own repr drops arguments equal to
    their default, even one passed by position: ``scenarios('roundtrip')``)."""
    words = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{function.__name__}({', '.join(words)})"
