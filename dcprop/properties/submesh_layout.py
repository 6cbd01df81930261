"""submesh_layout (seed 004): experts sharded on sub-meshes, the rest on the whole mesh.

The model and optimizer state dicts hold exactly the keys this rank owns (its own
expert's, not the others'), each parameter a DTensor on the expected ranks (the
expert's sub-mesh, or every rank), optimizer keys match model keys, and the whole
layout survives a save/perturb/load round trip.
"""

from __future__ import annotations

from typing import Any

import torch

from dcprop import specs as S
from dcprop.compare import local_values
from dcprop.errors import PropertyFailure, UsageError
from dcprop.properties._harness import DEFAULT_HOOKS, Hooks, setup, uninterrupted_next_loss
from dcprop.properties.roundtrip import check_frozen_absent, check_roundtrip

__all__ = ["expected_layout", "submesh_layout"]


def submesh_layout(ctx: Any, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS) -> dict[str, Any]:
    topology = scenario.save
    plan = topology.plan
    if not (isinstance(plan, S.FSDP2Plan) and plan.experts):
        raise UsageError("submesh_layout needs a save plan with experts=ExpertParallel(...)")
    job = setup(ctx, scenario, topology, hooks=hooks)
    if job is None:
        return {}
    losses = [job.train_step() for _ in range(scenario.training.steps)]
    state = job.state()
    check_frozen_absent(job, local_values(state))  # first: the layout check would see it too
    expected = expected_layout(scenario, ctx.rank)
    _check_model(state["model"], expected, topology.state_dict, ctx.rank)
    stateless = scenario.optimizer.kind == "sgd" and not scenario.optimizer.momentum
    trained = (
        set()
        if stateless
        else {
            n
            for n in scenario.model.parameter_names()
            if n in expected and n not in scenario.frozen
        }
    )
    _check_optimizer(state["optim"], expected, trained, topology.state_dict, ctx.rank)

    result = check_roundtrip(
        job,
        uninterrupted=lambda: uninterrupted_next_loss(ctx, scenario, topology, hooks),
        losses=losses,
    )
    return {**result, "keys": len(expected)}


def expected_layout(scenario: S.Scenario, rank: int) -> dict[str, tuple[int, ...]]:
    """Parameter name -> the ranks its DTensor should span, for the keys ``rank`` owns."""
    topology = scenario.save
    plan = topology.plan
    assert isinstance(plan, S.FSDP2Plan) and plan.experts is not None
    grid = torch.arange(topology.world_size).reshape(topology.mesh.shape)
    axis = topology.mesh.dim_names.index(plan.experts.dim)
    mine = int((grid == rank).nonzero()[0][axis])
    module = plan.experts.module
    out = {}
    for name in scenario.model.state_dict_names():
        if S.is_within(name, module):
            expert = int(name[len(module) + 1 :].split(".", 1)[0])
            if expert == mine:
                out[name] = tuple(grid.select(axis, mine).flatten().tolist())
        else:
            out[name] = tuple(range(topology.world_size))
    if topology.state_dict.ignore_frozen_params:
        frozen = scenario.frozen_state_dict_names
        out = {k: v for k, v in out.items() if k not in frozen}
    return out


def _check_model(
    msd: dict[str, Any], expected: dict[str, tuple[int, ...]], options: S.StateDictSpec, rank: int
) -> None:
    if options.full_state_dict and options.cpu_offload and rank != 0:
        return  # only rank 0 keeps a full, offloaded state dict
    params = {k for k in msd if not _is_buffer_key(k, msd)}
    missing, extra = sorted(set(expected) - params), sorted(params - set(expected))
    if missing or extra:
        raise PropertyFailure(
            f"model state dict on rank {rank}: missing {missing[:6]}, unexpected {extra[:6]}"
        )
    if options.full_state_dict:
        return
    for key, ranks in expected.items():
        _check_dtensor(msd[key], ranks, f"model state dict {key!r}", rank)


def _check_optimizer(
    osd: dict[str, Any],
    expected: dict[str, tuple[int, ...]],
    trainable: set[str],
    options: S.StateDictSpec,
    rank: int,
) -> None:
    """Optimizer state exists for exactly the parameters this rank trains (none for a
    stateless optimizer), each value on its parameter's mesh."""
    if options.full_state_dict and options.cpu_offload and rank != 0:
        return
    if options.flatten_optimizer_state_dict:
        entries: dict[str, dict[str, Any]] = {}
        for k, v in osd.items():
            if k.startswith("state."):
                fqn, _, name = k[len("state.") :].rpartition(".")
                entries.setdefault(fqn, {})[name] = v
    else:
        entries = osd["state"]
    if set(entries) != trainable:
        raise PropertyFailure(
            f"optimizer state on rank {rank} has keys for {sorted(set(entries) - trainable)[:6]}"
            f" that the model does not train here, and lacks {sorted(trainable - set(entries))[:6]}"
        )
    if options.full_state_dict:
        return
    for key, values in entries.items():
        for name, value in values.items():
            if name != "step":
                _check_dtensor(value, expected[key], f"optimizer state {key!r}[{name!r}]", rank)


def _is_buffer_key(key: str, msd: dict[str, Any]) -> bool:
    return key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


def _check_dtensor(value: Any, ranks: tuple[int, ...], what: str, rank: int) -> None:
    if not hasattr(value, "device_mesh"):
        raise PropertyFailure(
            f"{what} on rank {rank} is a {type(value).__name__}, expected a DTensor"
        )
    got = tuple(value.device_mesh.mesh.flatten().tolist())
    if got != ranks:
        raise PropertyFailure(
            f"{what} on rank {rank} is a DTensor on ranks {got}, expected ranks {ranks}"
        )
