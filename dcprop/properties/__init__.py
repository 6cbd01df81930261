"""The properties dcprop checks, one module each.

Each property is a plain function ``prop(ctx, scenario, hooks=DEFAULT_HOOKS)`` that
every rank of the example's world calls, with or without Hypothesis; ``ctx`` is the
runner's :class:`~dcprop.runner.execute.RankContext`.  A property raises
:class:`~dcprop.errors.PropertyFailure` when it does not hold.

The registry holds import strings, so that the controller (pytest, the CLI) can
name a property without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

from dcprop.checkpointer import load_checkpointer, project_of
from dcprop.errors import ExampleFailure, UsageError
from dcprop.known_bugs import KnownBug, match_known
from dcprop.limitations import match_limitation
from dcprop.runner import Runner
from dcprop.specs import Scenario

if TYPE_CHECKING:
    from dcprop.properties._harness import Hooks

__all__ = ["PROPERTIES", "Failed", "make_hooks", "property_ref", "run_and_match", "run_property"]

PROPERTIES: dict[str, str] = {
    "roundtrip": "dcprop.properties.roundtrip:roundtrip",
    "reshard": "dcprop.properties.reshard:reshard",
    "ddp_parity": "dcprop.properties.ddp_parity:ddp_parity",
    "finetune_resume": "dcprop.properties.finetune_resume:finetune_resume",
    "submesh_layout": "dcprop.properties.submesh_layout:submesh_layout",
    "loud_failure": "dcprop.properties.loud_failure:loud_failure",
    "async_isolation": "dcprop.properties.async_isolation:async_isolation",
    "durability": "dcprop.properties._durability:check_durability",
    "lifecycle": "dcprop.properties.lifecycle:lifecycle",
}
PROPERTY_NAMES = tuple(PROPERTIES)
#: Properties whose example is more than one task (the ranks of the first die on
#: purpose), each run by a controller-side function
#: ``run(runner, scenario, *, hooks, timeout) -> {rank: value}``; their registry entry
#: above is the task that checks.
DRIVERS: dict[str, str] = {
    "durability": "dcprop.properties.durability:run_durability",
}


def property_ref(name: str) -> str:
    if name not in PROPERTIES:
        raise UsageError(f"unknown property {name!r}; choose from {', '.join(PROPERTIES)}")
    return PROPERTIES[name]


def run_property(
    runner: Runner,
    name: str,
    scenario: Scenario,
    *,
    hooks: Hooks | None = None,
    timeout: float | None = None,
) -> dict[int, Any]:
    """Run property ``name`` over ``scenario`` on ``runner`` (Pools, a Pool or an
    SPMDRunner), in a job of ``scenario.job_world`` ranks (a property of several tasks:
    through its driver, :data:`DRIVERS`)."""
    args: tuple[Any, ...] = (scenario,) if hooks is None else (scenario, hooks)
    try:
        if name in DRIVERS:
            module, _, function = DRIVERS[name].partition(":")
            drive = getattr(importlib.import_module(module), function)
            return drive(runner, scenario, hooks=hooks, timeout=timeout)  # type: ignore[no-any-return]
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


class Failed(NamedTuple):
    """An example that failed: the failure, and the known upstream bug that explains it
    (None for a new failure), or the checkpointer's documented limitation
    (:class:`~dcprop.limitations.Limitation`, a ``KnownBug`` of its own kind)."""

    failure: ExampleFailure
    known: KnownBug | None


def run_and_match(
    runner: Any,
    name: str,
    scenario: Scenario,
    *,
    hooks: Hooks | None = None,
    timeout: float | None = None,
) -> Failed | None:
    """:func:`run_property`, then :func:`~dcprop.known_bugs.match_known` (or else
    :func:`~dcprop.limitations.match_limitation`) on its failure: None if the property
    held.  Errors that are not the example's failure (a skipped
    example, the runner's own) propagate."""
    try:
        run_property(runner, name, scenario, hooks=hooks, timeout=timeout)
    except ExampleFailure as failure:
        return Failed(
            failure, match_known(failure, scenario) or match_limitation(failure, scenario)
        )
    return None


def make_hooks(checkpointer: Any = None, model_factory: Any = None) -> Hooks | None:
    """The :class:`~dcprop.properties._harness.Hooks` for a checkpointer (an object, a
    short name or ``"module:attr"``) and a model factory (an object or ``"module:attr"``);
    None stands for dcprop's default, and both defaults give None."""
    if checkpointer is None and model_factory is None:
        return None
    from dcprop.checkpointer import DCPCheckpointer
    from dcprop.properties._harness import Hooks, default_model_factory
    from dcprop.runner.execute import resolve

    if isinstance(checkpointer, str):
        checkpointer = load_checkpointer(checkpointer)
    if isinstance(model_factory, str):
        model_factory = resolve(model_factory)
    return Hooks(
        checkpointer=checkpointer or DCPCheckpointer(),
        model_factory=model_factory or default_model_factory,
    )
