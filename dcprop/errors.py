"""dcprop's exception types.

Strategy arguments are rejected with Hypothesis' ``InvalidArgument``; everything
else that dcprop raises derives from :class:`DcpropError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "DcpropError",
    "ExampleFailure",
    "ExampleSkipped",
    "HarnessError",
    "InjectedKill",
    "PoolExhausted",
    "PropertyFailure",
    "RankCrashed",
    "RankTimeout",
    "RunnerError",
    "SpecError",
    "UsageError",
    "carry_runner_errors",
    "headline",
    "reraise_carried",
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


class HarnessError(RunnerError):
    """dcprop's own harness failed on a rank (unpickling a task, building meshes, resolving
    the property, importing the user's checkpointer or model factory, a scenario that does
    not meet a property's precondition).  It says nothing about the code under test, so it
    is never shrunk or written as a reproducer."""


class ExampleSkipped(DcpropError):
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

    #: the project of the checkpointer the example ran with (``run_property`` sets it)
    checkpointer_project: str | None = "torch"

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


class InjectedKill(RankCrashed):
    """Every rank that died was killed on purpose by the example itself, a fault it
    injects (see :mod:`dcprop.runner.kills`): what the example meant to happen, not a
    crash of the code under test.  The pool restarts as after any crash."""


class _Carried(BaseException):
    """A RunnerError on its way out of a Hypothesis test (see carry_runner_errors)."""

    def __init__(self, error: RunnerError) -> None:
        super().__init__(str(error))
        self.error = error


@contextmanager
def carry_runner_errors() -> Iterator[None]:
    """Inside a Hypothesis test: let a RunnerError end the search at once.

    Hypothesis shrinks any ``Exception`` a test raises as a failure of the example; a
    RunnerError (the environment, the pool, dcprop's harness) is no such failure, and
    shrinking it would only restart the pool many times over.  Hypothesis lets a
    ``BaseException`` through at once, so the error travels as one until
    :func:`reraise_carried`, around the whole search, raises it again as it was.
    """
    try:
        yield
    except RunnerError as e:
        raise _Carried(e) from None


@contextmanager
def reraise_carried() -> Iterator[None]:
    """Around a Hypothesis search: raise the RunnerError that carry_runner_errors carried."""
    try:
        yield
    except _Carried as carried:
        raise carried.error from None
