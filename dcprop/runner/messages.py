"""What travels between the controller and the ranks.

Messages are ``(name, payload)`` pairs, as in pytest-xdist.  Controller to rank:
``("run", <the pickled Task>)``, ``("shutdown", None)``.  Rank to controller:
``("ready", {"rank", "backend", "device", "error"})`` once, at start-up;
``("blocked", Blocked)`` and ``("moved", task id)`` (any number, while a task runs:
see :class:`~dcprop.runner.worker.CollectiveWatch`); ``("outcome", Outcome)``.
Under torchrun rank 0 broadcasts ``("run", (Task, timeout))`` and
``("shutdown", exit status)`` to the others.  Everything here is plain picklable data.
"""

from __future__ import annotations

from typing import Any

import attrs

from dcprop.specs import MeshSpec

__all__ = ["Blocked", "Outcome", "Task"]


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
    example_dir: str
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
