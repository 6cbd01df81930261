"""ddp_parity (seed 003): sharded training with a frozen subset matches DDP and a
single-process reference.

The same global batches train three models for several steps: the scenario's
sharded plan, DDP over the same ranks, and a single process that replays every
data-parallel rank's rows in turn (so layers with batch statistics see the same
per-rank batches).  Per-step losses and final full parameters must agree within
:data:`RTOL`/:data:`ATOL`.
"""

from __future__ import annotations

from typing import Any

import torch

from dcprop import build
from dcprop import specs as S
from dcprop.compare import assert_same
from dcprop.errors import PropertyFailure
from dcprop.properties._harness import DEFAULT_HOOKS, Hooks, Job, batch_rows, setup

__all__ = ["ATOL", "RTOL", "ddp_parity", "reference_run"]

# Why these: the three runs add the same float32 numbers in different orders
# (all-reduce vs reduce-scatter vs a local sum), an error of a few ulps per step
# (~1e-7 relative) that Adam can grow by its 1/sqrt(v) normalisation over a
# handful of steps.  1e-4 relative sits three orders above that and far below a
# dropped gradient, a wrong shard or a skipped frozen layer (order 1e-2 and up).
RTOL = 1e-4
ATOL = 1e-5
# fp16/bf16 mixed precision (FSDP1 on GPU) rounds every op to 3 significant digits.
MIXED_RTOL = 2e-2
MIXED_ATOL = 2e-3


def ddp_parity(ctx: Any, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS) -> dict[str, Any]:
    sharded = setup(ctx, scenario, scenario.save, hooks=hooks)
    if sharded is None:
        return {}
    world = scenario.save.world_size
    ddp_topology = S.Topology(world, S.MeshSpec((world,), ("world",)), S.DDPPlan())
    ddp = Job(ctx, scenario, ddp_topology, hooks=hooks)
    steps = scenario.training.steps
    rtol, atol = _tolerance(scenario)

    runs = {"sharded": [], "ddp": []}  # type: dict[str, list[float]]
    for _ in range(steps):
        runs["sharded"].append(sharded.train_step())
        runs["ddp"].append(ddp.train_step())
    reference_losses, reference_params = reference_run(
        scenario, sharded.shard.parts, sharded.rows, ctx.device, hooks
    )
    runs["reference"] = reference_losses

    # Batch statistics depend on how rows are split: compare DDP only on the same split.
    compare_ddp = (
        not scenario.model.has_batch_statistics() or ddp.shard.parts == sharded.shard.parts
    )
    for other in ("ddp", "reference") if compare_ddp else ("reference",):
        for step, (a, b) in enumerate(zip(runs[other], runs["sharded"])):
            if not _close(a, b, rtol, atol):
                raise PropertyFailure(
                    f"step {step}: {scenario.save.plan_kind} loss {b!r} != {other} loss {a!r} "
                    f"(rtol={rtol:g}, atol={atol:g}) on rank {ctx.rank}; losses so far: "
                    f"sharded {runs['sharded'][: step + 1]}, {other} {runs[other][: step + 1]}"
                )
    final = sharded.full_parameters()
    assert_same(
        reference_params,
        final,
        what=f"parameters after {steps} steps, "
        f"{scenario.save.plan_kind} vs single-process reference",
        rank=ctx.rank,
        rtol=rtol,
        atol=atol,
    )
    if compare_ddp:
        assert_same(
            ddp.full_parameters(),
            final,
            what=f"parameters after {steps} steps, {scenario.save.plan_kind} vs DDP",
            rank=ctx.rank,
            rtol=rtol,
            atol=atol,
        )
    return {"losses": runs["sharded"]}


def reference_run(
    scenario: S.Scenario, parts: int, rows: int, device: Any, hooks: Hooks = DEFAULT_HOOKS
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train in this process alone, replaying ``parts`` data-parallel ranks per step."""
    module = hooks.model_factory(scenario.model, scenario.seed, device, scenario.frozen)
    optimizer = build.optimizer_for(module.parameters(), scenario.optimizer)
    scheduler = build.scheduler_for(optimizer, scenario.optimizer)
    losses = []
    for step in range(scenario.training.steps):
        total = 0.0
        for index in range(parts):
            x, _ = batch_rows(scenario.model, scenario.training, step, index, parts, rows, device)
            out = module(x).float().square()
            width = out.shape[-1]
            part_sum = out.sum()
            (part_sum / (rows * width)).backward()
            total += float(part_sum.detach().to(torch.float64).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(total / (rows * width))
    params = {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters()}
    return losses, params


def _tolerance(scenario: S.Scenario) -> tuple[float, float]:
    plan = scenario.save.plan
    if isinstance(plan, S.FSDP1Plan) and plan.mixed_precision:
        return MIXED_RTOL, MIXED_ATOL
    return RTOL, ATOL


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(a)
