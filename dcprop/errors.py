"""dcprop's exception types.

Strategy arguments are rejected with Hypothesis' ``InvalidArgument``; everything
else that dcprop raises derives from :class:`DcpropError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "DcpropError",
    "ExampleFailure",
    "PoolExhausted",
    "PropertyFailure",
    "RankCrashed",
    "RankTimeout",
    "RunnerError",
    "SpecError",
    "UsageError",
    "headline",
]


def headline(message: str) -> str:
    """The first line of an error message, joined with the next when the first only
    introduces it (ends in a colon, as in "Error(s) in loading state_dict for M:")."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else ""


class DcpropError(Exception):
    """Base class of every error dcprop raises itself."""


class SpecError(DcpropError, ValueError):
    """A spec that cannot describe a real run (bad value, or fields that contradict)."""


class UsageError(DcpropError):
    """Bad command-line or configuration input; the message says what to change."""


class PropertyFailure(AssertionError):
    """A property does not hold.  The message names key, rank, shard and difference.

    An ``AssertionError`` so that Hypothesis and pytest treat it as a test failure.
    ``keys`` are the state-dict entries it is about, every one (the message shows the
    first few): what a known bug's matcher checks the failure against.
    """

    def __init__(self, message: str = "", *, keys: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self),), {"keys": self.keys})


class RunnerError(DcpropError):
    """The runner itself could not do its job (start-up, transport, configuration)."""


class ExampleSkipped(RunnerError):
    """The runner cannot run this example as its scenario describes it (under torchrun,
    a job of another size than torchrun's world); the message says why."""


class PoolExhausted(RunnerError):
    """The pool was restarted more often than its restart budget allows."""


class ExampleFailure(AssertionError):
    """One example failed on one or more ranks.

    ``outcomes`` maps each rank to its outcome (see ``dcprop.runner.messages``);
    ``signature`` is a short, stable string that identifies the failure kind (used
    to match known upstream bugs and to tell Hypothesis which failures are distinct).
    """

    def __init__(
        self, message: str, *, outcomes: dict[int, Any] | None = None, signature: str = ""
    ) -> None:
        super().__init__(message)
        self.outcomes = outcomes or {}
        self.signature = signature

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), self.outcomes, self.signature))


def _rebuild(cls: type, message: str, outcomes: dict, signature: str) -> ExampleFailure:
    return cls(message, outcomes=outcomes, signature=signature)


class RankTimeout(ExampleFailure):
    """Some ranks did not finish within the example's timeout (a hang)."""


class RankCrashed(ExampleFailure):
    """A rank process died mid-example (signal, ``os._exit``, killed)."""
