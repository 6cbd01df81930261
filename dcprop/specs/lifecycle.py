"""The steps of a lifecycle program: what a training job does to its model, optimizer and
checkpoints, one step at a time (the ``lifecycle`` property runs them).

A program is a tuple of steps in :attr:`Scenario.program <dcprop.specs.Scenario.program>`;
the rules that tie steps to each other and to the model (a load names an earlier,
finished save; a restart topology fits the model) live in
:mod:`dcprop.specs.scenario`.

>>> program = (Train(2), Save("c0"), Freeze(("fc0.bias",)), Train(), Load("c0"))
>>> program[1]
Save('c0')
"""

from __future__ import annotations

from typing import Any

import attrs

from dcprop.errors import SpecError
from dcprop.specs._base import (
    Spec,
    above,
    as_float,
    at_most,
    flag,
    identifier,
    instance_of,
    one_of,
    positive,
    tuple_of,
)
from dcprop.specs.model import DTYPES, ModelSpec
from dcprop.specs.topology import StateDictSpec, Topology

__all__ = [
    "STEP_TYPES",
    "Crash",
    "Freeze",
    "Load",
    "Restart",
    "RestartInto",
    "Save",
    "SetLR",
    "Step",
    "Train",
    "Unfreeze",
    "Wait",
]


def _names(value: Any) -> Any:
    if isinstance(value, (tuple, list)) and all(isinstance(n, str) for n in value):
        return tuple(sorted(set(value)))
    return value  # the validator names what is wrong


def _some(_inst: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value:
        raise SpecError(f"{attribute.name}=(): name at least one parameter")


@attrs.frozen(repr=False)
class Train(Spec):
    """``steps`` optimizer steps, each on the sampler's next global batch, each followed
    by an LR scheduler step (if the optimizer has a scheduler) and one draw from every
    rank's training RNG."""

    steps: int = attrs.field(default=1, validator=[*positive, at_most(64)])


@attrs.frozen(repr=False)
class Freeze(Spec):
    """``requires_grad_(False)`` on the parameters ``names`` (canonical FQNs): they keep
    their optimizer state, and the optimizer skips them while they have no gradient."""

    names: tuple[str, ...] = attrs.field(converter=_names, validator=[tuple_of(str), _some])


@attrs.frozen(repr=False)
class Unfreeze(Spec):
    """``requires_grad_(True)`` on the parameters ``names``."""

    names: tuple[str, ...] = attrs.field(converter=_names, validator=[tuple_of(str), _some])


@attrs.frozen(repr=False)
class SetLR(Spec):
    """Set every param group's learning rate (the scheduler goes on from it)."""

    lr: float = attrs.field(converter=as_float, validator=[instance_of(float), above(0.0)])


def _save_options(_inst: Any, attribute: attrs.Attribute[Any], value: StateDictSpec) -> None:
    instance_of(StateDictSpec)(_inst, attribute, value)
    if value.submodules or value.broadcast_from_rank0 or not value.strict:
        raise SpecError(
            f"{attribute.name}={value!r}: a lifecycle save takes the whole state dict "
            "(no submodules), and broadcast_from_rank0 and strict are load options"
        )


@attrs.frozen(repr=False)
class Save(Spec):
    """Save the job's whole state (model, optimizer, LR scheduler, train state) as
    checkpoint ``name``, taken with the state-dict options ``state_dict``; with
    ``async_``, through the checkpointer's ``async_save``, and training goes on before
    the save is awaited (by :class:`Wait`, a restart, or the end of the program); one
    async save may be in flight at a time."""

    name: str = attrs.field(validator=identifier)
    state_dict: StateDictSpec = attrs.field(factory=StateDictSpec, validator=_save_options)
    async_: bool = attrs.field(default=False, validator=flag)


@attrs.frozen(repr=False)
class Wait(Spec):
    """Await every save in flight."""


@attrs.frozen(repr=False)
class Load(Spec):
    """Roll the live job back to checkpoint ``name`` (with its own options): model,
    optimizer, scheduler and train state.  ``strict=False`` tolerates missing keys."""

    name: str = attrs.field(validator=identifier)
    strict: bool = attrs.field(default=True, validator=flag)


def _dtype(inst: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        one_of(DTYPES)(inst, attribute, value)


@attrs.frozen(repr=False)
class Restart(Spec):
    """Await the saves in flight, drop the whole job, build a fresh one on ``topology``
    (fresh weights, a fresh optimizer and scheduler) and load ``checkpoint`` into it.

    With ``dtype`` (one of :data:`~dcprop.specs.DTYPES`) the fresh job builds the
    scenario's model with every Linear in that dtype
    (:meth:`ModelSpec.in_dtype <dcprop.specs.ModelSpec.in_dtype>`), whatever dtype the
    checkpoint was saved in: DCP copies what it reads into the template's tensors, so
    each value arrives cast to the new dtype (and ``Optimizer.load_state_dict`` casts
    the state to its parameter's dtype).  ``None``: the scenario's model as written."""

    topology: Topology = attrs.field(validator=instance_of(Topology))
    checkpoint: str = attrs.field(validator=identifier)
    dtype: str | None = attrs.field(default=None, validator=_dtype)


@attrs.frozen(repr=False)
class Crash(Spec):
    """As :class:`Restart`, but the job dies: the saves in flight are lost (never
    loadable), and so is everything not saved."""

    topology: Topology = attrs.field(validator=instance_of(Topology))
    checkpoint: str = attrs.field(validator=identifier)


@attrs.frozen(repr=False)
class RestartInto(Spec):
    """Try to restart into ``model``, a model that differs from the one that saved
    ``checkpoint`` (a Linear of another width, a layer missing, an extra layer): a fresh
    job on the current topology loads ``checkpoint`` strictly, then goes.  The program
    goes on with the job from before (as a user goes back to the job that saved, once a
    restart into the wrong model is refused).

    The load must fail loudly, naming a key that differs, if the model has an entry the
    checkpoint lacks or holds with another shape; where every entry of ``model`` is in
    the checkpoint with its shape (a layer missing), DCP's documented rule is that a
    load reads exactly the entries asked for, so it must succeed with each one equal to
    the saved value."""

    model: ModelSpec = attrs.field(validator=instance_of(ModelSpec))
    checkpoint: str = attrs.field(validator=identifier)


Step = Train | Freeze | Unfreeze | SetLR | Save | Wait | Load | Restart | Crash | RestartInto
STEP_TYPES: tuple[type, ...] = (
    Train,
    Freeze,
    Unfreeze,
    SetLR,
    Save,
    Wait,
    Load,
    Restart,
    Crash,
    RestartInto,
)
