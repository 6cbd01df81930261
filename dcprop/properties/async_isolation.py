"""async_isolation: an async save saves the values of the moment it was called.

Build and train per the scenario's save topology, take the state dict and a copy of
its values, and start an async save (:func:`dcprop.checkpointer.start_save`: DCP's
``async_save``, or the checkpointer's own).  Before awaiting it, the training loop
goes on as ``scenario.damage`` (a :class:`~dcprop.specs.MutateInFlight`) says: an
optimizer step (on gradients of ones: a training step's collectives would race the
save's own on the same process group), an in-place shift of every parameter, buffer
and optimizer value, or an in-place change of every tensor of the state dict handed
to the save.  Then await the save, perturb, load: every entry equals the copy taken
at the call, bitwise.
"""

from __future__ import annotations

from typing import Any

import torch

from dcprop import specs as S
from dcprop.compare import assert_same, flatten, local_values, mismatches
from dcprop.errors import UsageError
from dcprop.properties._harness import DEFAULT_HOOKS, Hooks, Job, setup
from dcprop.runner.execute import RankContext

__all__ = ["async_isolation"]


def async_isolation(
    ctx: RankContext, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS
) -> dict[str, Any]:
    """Run on every rank of the example's world; raises PropertyFailure if it fails."""
    mutation = scenario.damage
    if not isinstance(mutation, S.MutateInFlight):
        raise UsageError(
            f"async_isolation needs a scenario with damage=MutateInFlight(...), got {mutation!r}"
        )
    job = setup(ctx, scenario, scenario.save, hooks=hooks)
    if job is None:
        return {}
    for _ in range(scenario.training.steps):
        job.train_step()
    state = job.state()
    job.check_keys(state, "before save")
    at_call = local_values(state)
    pending = job.start_save(state, "ckpt")
    _mutate(job, state, mutation.how)
    pending.result()
    job.ctx.agree(True, "the async save")
    job.perturb()
    job.restore("ckpt")
    loaded = local_values(job.state())
    job.ctx.agree(not mismatches(at_call, loaded), "state comparison")
    # one signature whatever the mutation: one bug (an async save that did not stage)
    assert_same(at_call, loaded, what="state saved by an async save", rank=job.rank)
    return {"entries": len(at_call), "mutation": mutation.how}


def _mutate(job: Job, state: dict[str, Any], how: str) -> None:
    """What the training loop does while the save is in flight."""
    if how == "step":
        _local_step(job)
    elif how == "perturb":
        job.perturb()
    else:
        with torch.no_grad():
            for _, value in flatten(state):
                local = value.to_local() if hasattr(value, "to_local") else value
                if isinstance(local, torch.Tensor) and local.numel():
                    local.add_(1)


def _local_step(job: Job) -> None:
    """An optimizer step on gradients of ones: it moves every trainable parameter and
    its optimizer state in place, and, unlike a training step, runs no collective,
    which would race the save's own collectives on the same group."""
    for p in job.model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
