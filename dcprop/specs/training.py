"""How the example trains: optimizer, LR scheduler, steps and data."""

from __future__ import annotations

import attrs

from dcprop.errors import SpecError
from dcprop.specs._base import (
    Spec,
    above,
    as_float,
    at_least,
    at_most,
    below,
    flag,
    instance_of,
    non_negative,
    one_of,
    optional,
    positive,
)

SCHEDULERS = ("step", "linear")


@attrs.frozen(repr=False)
class SchedulerSpec(Spec):
    """An LR scheduler, stepped after every optimizer step and saved with the optimizer:
    ``"step"`` is ``StepLR(step_size=period, gamma=factor)``, ``"linear"`` is
    ``LinearLR(start_factor=factor, total_iters=period)``."""

    kind: str = attrs.field(default="step", validator=one_of(SCHEDULERS))
    period: int = attrs.field(default=1, validator=[*positive, at_most(64)])
    factor: float = attrs.field(
        default=0.5, converter=as_float, validator=[instance_of(float), above(0.0), at_most(1.0)]
    )


@attrs.frozen(repr=False)
class OptimizerSpec(Spec):
    """SGD (with or without momentum), Adam, or AdamW; optionally with an LR scheduler."""

    kind: str = attrs.field(default="sgd", validator=one_of(("sgd", "adam", "adamw")))
    lr: float = attrs.field(
        default=0.01, converter=as_float, validator=[instance_of(float), above(0.0)]
    )
    momentum: float = attrs.field(
        default=0.0, converter=as_float, validator=[instance_of(float), at_least(0.0), below(1.0)]
    )
    weight_decay: float = attrs.field(
        default=0.0, converter=as_float, validator=[instance_of(float), at_least(0.0)]
    )
    scheduler: SchedulerSpec | None = attrs.field(
        default=None, validator=optional(instance_of(SchedulerSpec))
    )

    def __attrs_post_init__(self) -> None:
        if self.momentum and self.kind != "sgd":
            raise SpecError(f"momentum={self.momentum} is an SGD option; {self.kind} has betas")


@attrs.frozen(repr=False)
class TrainingSpec(Spec):
    """How many optimizer steps, the per-rank batch, and the data seed."""

    steps: int = attrs.field(default=1, validator=[*positive, at_most(64)])
    batch_size: int = attrs.field(default=1, validator=positive)
    input_requires_grad: bool = attrs.field(default=False, validator=flag)
    data_seed: int = attrs.field(default=0, validator=non_negative)
