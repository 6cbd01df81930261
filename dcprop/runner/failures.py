"""What the runners share: the checks of an example's world and job, and the one way
per-rank outcomes become an exception.

:class:`~dcprop.runner.pool.Pool`, :class:`~dcprop.runner.pools.Pools` and
:class:`~dcprop.runner.spmd.SPMDRunner` check an example's sizes here and build its
failure here, so a failure reads and is matched the same way whichever ran it.
Imports no torch: the pool's controller uses it.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Sequence

from dcprop.errors import (
    ExampleFailure,
    HarnessError,
    InjectedKill,
    RankCrashed,
    RankTimeout,
    RunnerError,
    headline,
)
from dcprop.runner.messages import Outcome
from dcprop.specs import MeshSpec

__all__ = [
    "blamed_outcomes",
    "crash_signature",
    "example_sizes",
    "failure_from_outcomes",
    "failure_signature",
    "hang_signature",
    "innermost_first",
    "waited_out",
]


# -- an example's sizes ------------------------------------------------------------


def example_sizes(
    world_size: int | None,
    meshes: tuple[MeshSpec, ...],
    job_world_size: int | None,
    available: int,
    where: str,
) -> tuple[int, int]:
    """(the ranks an example uses, the ranks of its job), checked against ``available``.

    The example's world defaults to all ``available`` ranks; its job (its default process
    group) to the smallest that holds its world and its meshes."""
    k = available if world_size is None else world_size
    if not 1 <= k <= available:
        raise RunnerError(f"world_size={k} does not fit in {where} of {available} ranks")
    for m in meshes:
        if m.size > available:
            raise RunnerError(f"mesh {m.shape} needs {m.size} ranks but {where} has {available}")
    needed = max([k, *(m.size for m in meshes)])
    job = needed if job_world_size is None else job_world_size
    if job < needed:
        raise RunnerError(
            f"job_world_size={job} cannot hold an example of {needed} ranks; "
            f"use None or at least {needed}"
        )
    return k, job


# -- signatures --------------------------------------------------------------------

_NUMBER = re.compile(r"\d+(\.\d+)?")
_PATH = re.compile(r"(/[^\s:'\"]+)+")
_ADDRESS = re.compile(r"0x[0-9a-f]+")


def failure_signature(error_type: str, message: str, where: str = "") -> str:
    """A stable, short identity for a failure: type, the first line of the message with
    numbers, paths and addresses blanked (those vary between shrink steps), and the
    function that raised it.  A first line that ends in a colon only introduces what
    follows ("Error(s) in loading state_dict for M:"), so the next line is kept too,
    except in dcprop's own PropertyFailure, whose first line is written to be its
    identity (the lines after it list keys, which change as an example shrinks)."""
    if error_type == "PropertyFailure":
        first = message.strip().splitlines()[0] if message.strip() else ""
    else:
        first = headline(message)
    first = _NUMBER.sub("N", _ADDRESS.sub("0x?", _PATH.sub("<path>", first)))[:240]
    return f"{error_type}: {first}" + (f" @ {where}" if where else "")


def crash_signature(exit_code: int) -> str:
    return f"RankCrashed: {_describe_exit(exit_code)}"


def hang_signature(stacks: dict[int, str]) -> str:
    return f"RankTimeout: ranks did not finish, waiting in {_hung_in(stacks)}"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


_PLUMBING = (
    "distributed_c10d.py",
    "c10d_logger.py",
    "_contextlib.py",
    "threading.py",
    "_compile.py",
    "eval_frame.py",
)


def _hung_in(stacks: dict[int, str]) -> str:
    """The innermost frame of the first hung rank that is not collective plumbing, as
    ``function (file)``: where a hang happened, stable across shrink steps."""
    for _, text in sorted(stacks.items()):
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("File ") and not any(p in line for p in _PLUMBING):
                path, _, func = line.partition(" in ")
                filename = os.path.basename(path.split('"')[1]) if '"' in path else path
                return f"{func} ({filename})"
    return "an unknown place"


# gloo's transport error when a collective outlives its process group's timeout
_COLLECTIVE_TIMEOUT = re.compile(r"Timed out waiting \d+ms for \w+ operation to complete")


def waited_out(outcome: Outcome) -> bool:
    """The rank failed only because a collective outlived the process-group timeout:
    it waited for a peer that never came (a hang), whatever code it was in."""
    return outcome.failed and bool(_COLLECTIVE_TIMEOUT.search(outcome.message))


def innermost_first(formatted_traceback: str) -> str:
    """A traceback's frame lines, innermost first, as faulthandler writes stacks (so
    the hang's signature names the same place whichever way the stack was taken)."""
    return "\n".join(
        line
        for line in reversed(formatted_traceback.splitlines())
        if line.strip().startswith("File ")
    )


# -- the failure -------------------------------------------------------------------


def blamed_outcomes(outcomes: dict[int, Outcome]) -> dict[int, Outcome]:
    """The failed ranks a failure is about, by rank: not those that stopped only because
    a peer failed (``PeerFailed``), unless no other rank failed."""
    errors = {r: o for r, o in sorted(outcomes.items()) if o.failed}
    return {r: o for r, o in errors.items() if o.error_type != "PeerFailed"} or errors


def failure_from_outcomes(
    outcomes: dict[int, Outcome],
    *,
    hung: Sequence[int] = (),
    crashed: dict[int, int] | None = None,
    stacks: dict[int, str] | None = None,
    timeout: float = 0.0,
    certain: str = "",
    injected: dict[int, str] | None = None,
) -> ExampleFailure | HarnessError | None:
    """The exception that describes a set of per-rank outcomes, or None if all passed.

    A failure of dcprop's own harness on any rank is a :class:`~dcprop.errors.HarnessError`
    whatever else happened: the example did not run as meant, so it has no verdict.
    Ranks that stopped only because a peer failed (``PeerFailed``) are listed but not
    blamed.  ``hung`` ranks did not finish (``stacks``: where they waited); ``crashed``
    maps ranks that died to their exit codes; ``certain`` says why the ``hung`` ranks
    could never finish, where that was known before the ``timeout``; ``injected``
    maps the crashed ranks the example killed on purpose to why
    (:mod:`dcprop.runner.kills`): when every crashed rank is one, the failure is an
    :class:`~dcprop.errors.InjectedKill`, which the property that injected it expects.
    """
    internal = {r: o for r, o in sorted(outcomes.items()) if o.internal}
    if internal:
        return _harness_error(internal)
    crashed = crashed or {}
    stacks = stacks or {}
    blamed = blamed_outcomes(outcomes)
    if not (blamed or hung or crashed):
        return None
    cls: type[ExampleFailure] = ExampleFailure
    signature = ""
    lines: list[str] = []
    if crashed:
        cls, signature, line = _crash(crashed, injected or {})
        lines.append(line)
    if blamed:
        first = next(iter(blamed.values()))
        signature = signature or first.signature
        lines.append(
            f"example failed on rank(s) {sorted(blamed)}: {first.error_type}: {first.message}"
        )
    if hung and not (crashed or blamed):
        cls, signature = RankTimeout, hang_signature(stacks)
        lines.append(_hang_line(hung, timeout, certain))
    elif hung:
        lines.append(f"rank(s) {list(hung)} were still running and were stopped")
    lines += _details(blamed, hung, stacks, certain)
    return cls("\n".join(lines), outcomes=dict(outcomes), signature=signature)


def _crash(crashed: dict[int, int], injected: dict[int, str]) -> tuple[type[RankCrashed], str, str]:
    """The failure type, signature and line of ranks that died: an injected kill only if
    every one of them was injected (one unmarked death is a crash, whatever else
    happened)."""
    line = "; ".join(f"rank {r} {_describe_exit(c)}" for r, c in sorted(crashed.items()))
    exit_code = min(crashed.items())[1]
    if set(crashed) <= set(injected):
        why = injected[min(crashed)]
        return (
            InjectedKill,
            f"InjectedKill: {_describe_exit(exit_code)}",
            f"{line}; injected: {why}",
        )
    return RankCrashed, crash_signature(exit_code), line


def _harness_error(internal: dict[int, Outcome]) -> HarnessError:
    first = next(iter(internal.values()))
    return HarnessError(
        f"dcprop's harness failed on rank(s) {sorted(internal)}, so the example has no "
        f"verdict: {first.error_type}: {headline(first.message)}\n"
        + "".join(f"\n--- rank {r} traceback ---\n{o.traceback}" for r, o in internal.items())
    )


def _hang_line(hung: Sequence[int], timeout: float, certain: str) -> str:
    if certain:
        return (
            f"hang certain before the {timeout:.0f}s timeout: rank(s) {list(hung)} "
            f"did not finish; {certain}"
        )
    return f"timed out after {timeout:.0f}s: rank(s) {list(hung)} did not finish"


def _details(
    blamed: dict[int, Outcome], hung: Sequence[int], stacks: dict[int, str], certain: str
) -> list[str]:
    """The blamed ranks' tracebacks, then the hung ranks' stacks."""
    lines = [f"\n--- rank {r} traceback ---\n{o.traceback.rstrip()}" for r, o in blamed.items()]
    when = "when the hang was certain" if certain else "at the timeout"
    lines += [f"\n--- rank {r} stacks {when} ---\n{stacks[r]}" for r in hung if stacks.get(r)]
    return lines
