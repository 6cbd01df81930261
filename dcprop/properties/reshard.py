"""reshard (seed 002's HSDP -> FSDP conversion, generalized): save on topology A,
load on topology B.

A and B may differ in world size (4 -> 2, 2 -> 4, 3 -> 2, ...), mesh, plan (FSDP2,
HSDP, DDP, TP, sub-mesh) and state-dict options.  After loading under B, the
gathered full model and optimizer tensors equal those saved under A, bitwise, and
a training step under B matches the same step under A within a reduction-order
tolerance (the two shard the sums differently).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from dcprop import specs as S
from dcprop.compare import assert_same, full_values
from dcprop.contract import expert_coordinate
from dcprop.errors import PropertyFailure
from dcprop.properties._harness import DEFAULT_HOOKS, FULL_STATE, Hooks, Job, setup

__all__ = ["STEP_RTOL", "reshard"]

# Losses are sums over the same rows in a different order and split: float32
# reassociation error, well below what a wrongly placed shard produces.
STEP_RTOL = 1e-4


def reshard(ctx: Any, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS) -> dict[str, Any]:
    a = setup(ctx, scenario, scenario.save, hooks=hooks)
    failed = None
    if a is not None:
        try:
            for _ in range(scenario.training.steps):
                a.train_step()
            state = a.state()
            a.check_keys(state, "before save")
            a.save(state, "ckpt")
            expected = full_values(a.state(**FULL_STATE))
            next_loss = a.train_step()
            torch.save({"state": expected, "loss": next_loss}, _expected_file(ctx, ctx.rank))
        except BaseException as e:
            failed = e
    ctx.agree(failed is None, "saving under topology A")
    if failed is not None:
        raise failed

    # A seed of its own: a value the load never wrote cannot pass for one it did.
    b = setup(ctx, scenario, scenario.load_topology, seed=scenario.seed + 1, hooks=hooks)
    if b is None:
        return {}
    reference: dict[str, Any] = {}
    for r in range(scenario.save.world_size):
        part = torch.load(_expected_file(ctx, r), weights_only=False)
        reference.setdefault("loss", part["loss"])
        reference.setdefault("state", {}).update(part["state"])
    # B's own state dict meets the contract too (under ignore_frozen_params a kept frozen
    # name would be loaded and named as a wrong value, not as the bug it is)
    b.check_keys(b.state(), "before load")
    skipped = _skipped(scenario)
    own_initial = {k: v for k, v in full_values(b.state(**FULL_STATE)).items() if k in skipped}
    if scenario.save.state_dict.ignore_frozen_params:  # B can neither read nor require them
        b.restore("ckpt", ignore_frozen_params=True)
    else:
        b.restore("ckpt")
    after = b.state(**FULL_STATE)
    loaded = full_values(after)
    # what is deliberately not in the checkpoint keeps B's own initial values
    expected = {**_comparable(reference["state"]), **own_initial}
    assert_same(
        _owned(expected, b.topology.plan, expert_coordinate(b.topology, b.rank)),
        _comparable(loaded),
        what=f"full state after resharding {_describe(scenario.save)} -> "
        f"{_describe(scenario.load_topology)}",
        rank=ctx.rank,
    )
    b.check_keys(after, "after load", **FULL_STATE)
    if skipped:  # the step compares functions: frozen weights come from A, as in fine-tuning
        _set_full(b, {k: v for k, v in reference["state"].items() if k in own_initial})
    b.resume_at(scenario.training.steps)
    loss = b.train_step()
    # Batch statistics depend on the split of rows; an expert layout on either side
    # changes which experts each rank applies: neither is the checkpoint's doing.
    same_function = all(t.plan_kind != "submesh" for t in (scenario.save, b.topology))
    same_split = not scenario.model.has_batch_statistics() or scenario.save.dp_size == b.data_split.parts
    if same_function and same_split:
        expected_loss = reference["loss"]
        if abs(loss - expected_loss) > STEP_RTOL * max(abs(expected_loss), 1e-6):
            raise PropertyFailure(
                f"training step after resharding: loss {loss!r} under "
                f"{_describe(b.topology)} != {expected_loss!r} under "
                f"{_describe(scenario.save)} (rtol {STEP_RTOL:g}, rank "
                f"{ctx.rank})"
            )
    return {"loss": loss}


# Which FQNs a param group lists is layout (a rank lists only its own experts), not state.
_PARAM_LIST = re.compile(r"^optim/param_groups\[\d+\]/params\[\d+\]$")


def _expected_file(ctx: Any, rank: int) -> str:
    return os.path.join(ctx.tmpdir, f"expected-rank{rank}.pt")


def _skipped(scenario: S.Scenario) -> frozenset[str]:
    """Flattened keys deliberately not in the checkpoint: frozen parameters when either
    side's options skip them."""
    if not any(t.state_dict.ignore_frozen_params for t in (scenario.save, scenario.load_topology)):
        return frozenset()
    return frozenset(f"model/{name}" for name in scenario.frozen_state_dict_names)


def _owned(expected: dict[str, Any], plan: S.Plan, coordinate: int | None) -> dict[str, Any]:
    """Under an expert layout a rank holds only its own expert, the one at its
    ``coordinate`` on the expert dim of the mesh: expect exactly that one."""
    if not (isinstance(plan, S.FSDP2Plan) and plan.experts):
        return expected
    experts = f"/{plan.experts.module}."
    mine = f"{experts}{coordinate}."
    return {k: v for k, v in expected.items() if experts not in "/" + k or mine in "/" + k}


def _comparable(values: dict[str, Any]) -> dict[str, Any]:
    """Which FQNs a param group lists is layout (a rank lists only its own experts)."""
    return {k: v for k, v in values.items() if not _PARAM_LIST.match(k)}


def _set_full(job: Job, values: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = {k[len("model/") :]: v.to(job.ctx.device) for k, v in values.items()}
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(job.model, full, options=options)


def _describe(t: S.Topology) -> str:
    return f"{t.plan_kind} on mesh {t.mesh.shape}"
