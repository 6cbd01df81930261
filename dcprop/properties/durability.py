"""durability: after ranks die mid-save (``SIGKILL``, at the point the scenario's
:class:`~dcprop.specs.Kill` names), every checkpoint the checkpointer calls complete
(``complete(root)``) or latest (``latest(root)``) loads and equals what was saved into
it, bitwise, and the previous complete checkpoint is still one of them, unless the
killed save is whole and claimed (a checkpointer may retire the previous checkpoint
once the next is complete).

Killed ranks cannot go on, so one example is two tasks on the same runner, run from
the controller by :func:`run_durability`: the first
(:func:`~dcprop.properties._durability.save_then_die`) saves ``previous``, trains
one more step and saves ``killed`` while the kill is armed; its dying ranks are killed
and the runner reports an :class:`~dcprop.errors.InjectedKill`, which is expected
(any other ending is the example's failure).  The pool restarts, and the second task
(:func:`~dcprop.properties._durability.check_durability`) checks on fresh ranks.
Imports no torch: the controller runs it.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from dcprop.errors import ExampleSkipped, InjectedKill, RunnerError, UsageError
from dcprop.runner import Pool, Pools
from dcprop.specs import Scenario

if TYPE_CHECKING:
    from dcprop.properties._harness import Hooks

__all__ = ["CHECK", "PHASE_PREFIX", "SAVE", "run_durability"]

#: the prefix of the directory (under the runner's) one example's checkpoints live in
PHASE_PREFIX = "durability-"
SAVE = "dcprop.properties._durability:save_then_die"
CHECK = "dcprop.properties._durability:check_durability"


def run_durability(
    runner: Any, scenario: Scenario, *, hooks: Hooks | None = None, timeout: float | None = None
) -> dict[int, Any]:
    """One ``durability`` example on ``runner``: the values of its checking task, by rank.
    Raises the example's failure as :meth:`~dcprop.runner.Runner.run` does."""
    if scenario.kill is None:
        raise UsageError("durability needs a scenario with a kill (Scenario.kill), e.g. Kill()")
    if not isinstance(runner, (Pool, Pools)):
        raise ExampleSkipped(
            "durability kills ranks, and only a pool of dcprop's own can start new ones; "
            "under torchrun it is skipped"
        )
    phase = f"{PHASE_PREFIX}{secrets.token_hex(6)}"
    args: tuple[Any, ...] = (scenario, phase) if hooks is None else (scenario, phase, hooks)
    where: dict[str, Any] = dict(
        world_size=scenario.world_size,
        meshes=scenario.meshes,
        seed=scenario.seed,
        timeout=timeout,
        job_world_size=scenario.job_world,
    )
    try:
        runner.run(SAVE, *args, **where)
    except InjectedKill:
        pass  # what the first task is for; any other failure is the example's
    else:
        raise RunnerError(f"durability: no rank died in {scenario.kill!r}'s save")
    return runner.run(CHECK, *args, **where)
