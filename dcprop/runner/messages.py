"""What travels between the controller and the ranks.

Messages are ``(name, payload)`` pairs, as in pytest-xdist.  Controller to rank:
``("run", Task)``, ``("shutdown", None)``.  Rank to controller: ``("ready", rank)``,
``("blocked", Blocked)`` (any number, while a task runs), ``("outcome", Outcome)``.
Everything here is plain picklable data.
"""

from __future__ import annotations

from typing import Any

import attrs

from dcprop.errors import RunnerError
from dcprop.specs import MeshSpec

__all__ = ["Blocked", "Outcome", "Task", "blamed_outcomes", "example_world_size"]


def example_world_size(
    world_size: int | None, meshes: tuple[MeshSpec, ...], available: int, where: str
) -> int:
    """The ranks an example uses (default: all ``available``), checked against its meshes."""
    k = available if world_size is None else world_size
    if not 1 <= k <= available:
        raise RunnerError(f"world_size={k} does not fit in {where} of {available} ranks")
    for m in meshes:
        if m.size > available:
            raise RunnerError(f"mesh {m.shape} needs {m.size} ranks but {where} has {available}")
    return k


@attrs.frozen
class Task:
    """One example: call ``fn(ctx, *args)`` on every rank below ``world_size``.

    ``meshes`` are the device meshes the example will ask for; every pool rank takes
    part in creating them (group creation is collective), then ranks outside the
    example's world stay idle.
    """

    id: int
    fn: Any
    args: tuple[Any, ...]
    world_size: int
    meshes: tuple[MeshSpec, ...]
    tmpdir: str
    seed: int
    device: str


@attrs.frozen
class Outcome:
    """What one rank reports for one task."""

    rank: int
    # "ok" | "error" (the code under test or a property assertion failed) | "internal"
    # (dcprop's harness failed: see HarnessError) | "idle" (outside the example's world)
    status: str
    value: Any = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    signature: str = ""
    seconds: float = 0.0
    keys: tuple[str, ...] = ()  # a PropertyFailure's state-dict entries (see its docstring)

    @property
    def failed(self) -> bool:
        return self.status in ("error", "internal")

    @property
    def internal(self) -> bool:
        return self.status == "internal"


@attrs.frozen
class Blocked:
    """A rank's main thread has stood in one gloo collective for a while (see
    :mod:`dcprop.runner.worker`), sent again at every sample while it stays there.

    ``entered_after`` is a time (``time.monotonic``, one clock for every process of
    the machine) before which the rank had certainly not entered this collective:
    the last sample that saw it elsewhere, or the task's start.  ``ranks`` are the
    global ranks of the collective's group.
    """

    task: int
    rank: int
    op: str
    ranks: tuple[int, ...]
    entered_after: float


def blamed_outcomes(outcomes: dict[int, Outcome]) -> dict[int, Outcome]:
    """The failed ranks a failure is about, by rank: not those that stopped only because
    a peer failed (``PeerFailed``), unless no other rank failed."""
    errors = {r: o for r, o in sorted(outcomes.items()) if o.failed}
    return {r: o for r, o in errors.items() if o.error_type != "PeerFailed"} or errors
