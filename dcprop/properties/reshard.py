"""reshard (generalizes the HSDP -> FSDP conversion of PyTorch's
``test/distributed/checkpoint/test_hsdp_checkpoint.py``): save on topology A,
load on topology B.

A and B may differ in world size (4 -> 2, 2 -> 4, 3 -> 2, ...), mesh, plan (FSDP2,
HSDP, DDP, TP, sub-mesh) and state-dict options.  After loading under B, the
gathered full model and optimizer tensors equal those saved under A, bitwise, and
a training step under B matches the same step under A within a reduction-order
tolerance (the two shard the sums differently).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch.distributed as dist

from dcprop import specs as S
from dcprop.compare import assert_same, full_values
from dcprop.contract import expert_coordinate
from dcprop.errors import PropertyFailure
from dcprop.properties._harness import DEFAULT_HOOKS, FULL_STATE, Hooks, Job, setup
from dcprop.runner.execute import RankContext

__all__ = ["STEP_RTOL", "reshard"]

# Losses are sums over the same rows in a different order and split: float32
# reassociation error, well below what a wrongly placed shard produces.
STEP_RTOL = 1e-4


def reshard(ctx: RankContext, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS) -> dict[str, Any]:
    reference = _save_under_a(ctx, scenario, hooks)
    # A seed of its own: a value the load never wrote cannot pass for one it did.
    b = setup(ctx, scenario, scenario.load_topology, seed=scenario.seed + 1, hooks=hooks)
    if b is None:
        return {}
    # B's own state dict meets the contract too (under ignore_frozen_params a kept frozen
    # name would be loaded and named as a wrong value, not as the bug it is)
    b.check_keys(b.state(), "before load")
    skipped = _skipped(scenario)
    own_initial = {k: v for k, v in full_values(b.state(**FULL_STATE)).items() if k in skipped}
    if scenario.save.state_dict.ignore_frozen_params:  # B can neither read nor require them
        b.restore("ckpt", ignore_frozen_params=True)
    else:
        b.restore("ckpt")
    # what is deliberately not in the checkpoint keeps B's own initial values
    _check_loaded(b, scenario, {**_comparable(reference.state), **own_initial})
    if skipped:  # the step compares functions: frozen weights come from A, as in fine-tuning
        _set_full(b, {k: v for k, v in reference.state.items() if k in own_initial})
    b.resume_at(scenario.training.steps)
    loss = b.train_step()
    _check_step(b, scenario, loss, reference.loss)
    return {"loss": loss}


class _Reference(NamedTuple):
    """What topology A saved, as full values under flattened keys, and the loss of the
    training step that followed the save."""

    state: dict[str, Any]
    loss: float


def _save_under_a(ctx: RankContext, scenario: S.Scenario, hooks: Hooks) -> _Reference:
    """Train and save under topology A; A's reference, on every rank of the example."""
    a = setup(ctx, scenario, scenario.save, hooks=hooks)
    mine, failed = None, None
    if a is not None:
        try:
            mine = _train_and_save(a, scenario)
        except BaseException as e:
            failed = e
    ctx.agree(failed is None, "saving under topology A")
    if failed is not None:
        raise failed
    return _gather(ctx, mine)


def _train_and_save(a: Job, scenario: S.Scenario) -> _Reference:
    for _ in range(scenario.training.steps):
        a.train_step()
    state = a.state()
    a.check_keys(state, "before save")
    a.save(state, "ckpt")
    expected = full_values(a.state(**FULL_STATE))
    return _Reference(expected, a.train_step())


def _gather(ctx: RankContext, mine: _Reference | None) -> _Reference:
    """The union of A's ranks' references (under an expert layout each holds only its
    own experts), sent over the example's process group: its ranks may be on other
    hosts, where no file of this one can be read.  Ranks outside A send None."""
    group = ctx.group()
    parts: list[_Reference | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    held = [part for part in parts if part is not None]
    state: dict[str, Any] = {}
    for part in held:
        state.update(part.state)
    return _Reference(state, held[0].loss)


def _check_loaded(b: Job, scenario: S.Scenario, expected: dict[str, Any]) -> None:
    """B's full state after the load is ``expected``, bitwise, and meets the contract."""
    after = b.state(**FULL_STATE)
    assert_same(
        _owned(expected, b.topology.plan, expert_coordinate(b.topology, b.rank)),
        _comparable(full_values(after)),
        what=f"full state after resharding {_describe(scenario.save)} -> "
        f"{_describe(scenario.load_topology)}",
        rank=b.ctx.rank,
    )
    b.check_keys(after, "after load", **FULL_STATE)


def _check_step(b: Job, scenario: S.Scenario, loss: float, expected_loss: float) -> None:
    """B's first step after the load matches A's after the save, where the two compute
    the same function on the same split of rows."""
    # Batch statistics depend on the split of rows; an expert layout on either side
    # changes which experts each rank applies: neither is the checkpoint's doing.
    same_function = all(t.plan_kind != "submesh" for t in (scenario.save, b.topology))
    same_split = (
        not scenario.model.has_batch_statistics() or scenario.save.dp_size == b.data_split.parts
    )
    if not (same_function and same_split):
        return
    if abs(loss - expected_loss) > STEP_RTOL * max(abs(expected_loss), 1e-6):
        raise PropertyFailure(
            f"training step after resharding: loss {loss!r} under "
            f"{_describe(b.topology)} != {expected_loss!r} under "
            f"{_describe(scenario.save)} (rtol {STEP_RTOL:g}, rank "
            f"{b.ctx.rank})"
        )


# Which FQNs a param group lists is layout (a rank lists only its own experts), not state.
_PARAM_LIST = re.compile(r"^optim/param_groups\[\d+\]/params\[\d+\]$")


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
