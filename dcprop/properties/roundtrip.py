"""roundtrip: save, perturb, load; the state is exactly what was saved (generalizes
PyTorch's ``test/distributed/checkpoint/test_hsdp_checkpoint.py``).

Build and wrap per the scenario's save topology, train, take the state dict with
its options and save it; perturb every entry (a training step, then a shift of
every parameter, buffer and optimizer value, so an ignored load cannot pass);
load and apply; then every model and optimizer entry equals what was saved,
bitwise, and the next training step gives exactly the loss of a run that was
never interrupted.
"""

from __future__ import annotations

from typing import Any

import torch

from dcprop import specs as S
from dcprop.compare import assert_same, local_values, mismatches
from dcprop.errors import PropertyFailure
from dcprop.properties._harness import (
    DEFAULT_HOOKS,
    Hooks,
    Job,
    setup,
    uninterrupted_next_step,
)
from dcprop.runner.execute import RankContext

__all__ = ["check_roundtrip", "roundtrip"]


def roundtrip(
    ctx: RankContext, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS
) -> dict[str, Any]:
    """Run on every rank of the example's world; raises PropertyFailure if it fails."""
    job = setup(ctx, scenario, scenario.save, hooks=hooks)
    if job is None:
        return {}
    losses = [job.train_step() for _ in range(scenario.training.steps)]
    return check_roundtrip(
        job,
        uninterrupted=lambda: uninterrupted_next_step(ctx, scenario, scenario.save, hooks),
        losses=losses,
    )


def check_roundtrip(
    job: Job, *, uninterrupted: Any, losses: list[float], name: str = "ckpt"
) -> dict[str, Any]:
    """The round trip on a trained job (shared with ``submesh_layout``)."""
    options = job.topology.state_dict
    state = job.state()
    job.check_keys(state, "before save")
    saved = local_values(state)
    job.save(state, name)

    frozen = set(job.scenario.frozen) if options.ignore_frozen_params else set()
    job.train_step()
    job.perturb(keep=lambda n: n in frozen)
    before_load = local_values(job.state())
    unchanged = [
        k
        for k in saved
        if k in before_load
        and _has_elements(saved[k])
        and not mismatches({k: saved[k]}, {k: before_load[k]})
    ]
    job.ctx.agree(not unchanged, "perturbation")
    if unchanged:
        raise PropertyFailure(
            f"perturbation left {unchanged[:5]} unchanged on rank {job.rank}; "
            "comparing identical states would prove nothing"
        )

    job.restore(name)
    loaded = job.state()
    after = local_values(loaded)
    job.ctx.agree(not mismatches(saved, after), "state comparison")
    assert_same(saved, after, what="state after load", rank=job.rank)
    job.check_keys(loaded, "after load")

    job.resume_at(job.steps_taken - 1)  # the load undid the perturbing step: replay it
    resumed = job.next_step()
    expected = uninterrupted()
    if resumed != expected:
        raise PropertyFailure(
            f"next step after load: {resumed!r} != {expected!r} from an "
            f"uninterrupted run (rank {job.rank}, step {job.steps_taken - 1})"
        )
    return {"entries": len(saved), "losses": losses}


def _has_elements(value: Any) -> bool:
    """A tensor (or a DTensor's local shard) with at least one element."""
    tensor = getattr(value, "tensor", value)
    return isinstance(tensor, torch.Tensor) and tensor.numel() > 0
