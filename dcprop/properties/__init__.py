"""The properties dcprop checks, one module each.

Each property is a plain function ``prop(ctx, scenario, hooks=DEFAULT_HOOKS)`` that
every rank of the example's world calls, with or without Hypothesis; ``ctx`` is the
runner's :class:`~dcprop.runner.execute.RankContext`.  A property raises
:class:`~dcprop.errors.PropertyFailure` when it does not hold.

The registry holds import strings, so that the controller (pytest, the CLI) can
name a property without importing torch.
"""

from __future__ import annotations

from typing import Any

from dcprop.checkpointer import project_of
from dcprop.errors import ExampleFailure, UsageError
from dcprop.specs import Scenario

__all__ = ["PROPERTIES", "property_ref", "run_property"]

PROPERTIES: dict[str, str] = {
    "roundtrip": "dcprop.properties.roundtrip:roundtrip",
    "reshard": "dcprop.properties.reshard:reshard",
    "ddp_parity": "dcprop.properties.ddp_parity:ddp_parity",
    "finetune_resume": "dcprop.properties.finetune_resume:finetune_resume",
    "submesh_layout": "dcprop.properties.submesh_layout:submesh_layout",
}
PROPERTY_NAMES = tuple(PROPERTIES)


def property_ref(name: str) -> str:
    if name not in PROPERTIES:
        raise UsageError(f"unknown property {name!r}; choose from {', '.join(PROPERTIES)}")
    return PROPERTIES[name]


def run_property(
    runner: Any, name: str, scenario: Scenario, *, hooks: Any = None, timeout: float | None = None
) -> dict[int, Any]:
    """Run property ``name`` over ``scenario`` on ``runner`` (Pools, a Pool or an
    SPMDRunner), in a job of ``scenario.job_world`` ranks."""
    args: tuple[Any, ...] = (scenario,) if hooks is None else (scenario, hooks)
    try:
        return runner.run(
            property_ref(name),
            *args,
            world_size=scenario.world_size,
            meshes=scenario.meshes,
            seed=scenario.seed,
            timeout=timeout,
            job_world_size=scenario.job_world,
        )
    except ExampleFailure as failure:
        # a checkpoint library's known bugs explain only failures met with it
        failure.checkpointer_project = project_of(hooks.checkpointer if hooks else None)
        raise
