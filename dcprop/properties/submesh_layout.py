"""submesh_layout: experts sharded on sub-meshes, the rest on the whole mesh (generalizes
PyTorch's ``test/distributed/checkpoint/e2e/test_fsdp_ep.py``).

The model and optimizer state dicts hold exactly the keys this rank owns (its own
expert's, not the others'), each parameter a DTensor on the expected ranks (the
expert's sub-mesh, or every rank), optimizer keys match model keys, and the whole
layout survives a save/perturb/load round trip.
"""

from __future__ import annotations

from typing import Any

import torch

from dcprop import specs as S
from dcprop.contract import expert_coordinate
from dcprop.errors import PropertyFailure, UsageError
from dcprop.properties._harness import DEFAULT_HOOKS, Hooks, setup, uninterrupted_next_step
from dcprop.properties.roundtrip import check_roundtrip
from dcprop.runner.execute import RankContext

__all__ = ["expected_layout", "submesh_layout"]


def submesh_layout(
    ctx: RankContext, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS
) -> dict[str, Any]:
    topology = scenario.save
    plan = topology.plan
    if not (isinstance(plan, S.FSDP2Plan) and plan.experts):
        raise UsageError("submesh_layout needs a save plan with experts=ExpertParallel(...)")
    job = setup(ctx, scenario, topology, hooks=hooks)
    if job is None:
        return {}
    losses = [job.train_step() for _ in range(scenario.training.steps)]
    state = job.state()
    job.check_keys(state, "before save")  # exactly the keys this rank owns
    expected = expected_layout(scenario, ctx.rank)
    if not topology.state_dict.full_state_dict:
        _check_placements(state, expected, topology.state_dict, ctx.rank)

    result = check_roundtrip(
        job,
        uninterrupted=lambda: uninterrupted_next_step(ctx, scenario, topology, hooks),
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
    mine = expert_coordinate(topology, rank)
    module = plan.experts.module
    out = {}
    for name in scenario.model.state_dict_names():
        expert = S.expert_index(name, module)
        if expert is None:
            out[name] = tuple(range(topology.world_size))
        elif expert == mine:
            out[name] = tuple(grid.select(axis, mine).flatten().tolist())
    return out


def _check_placements(
    state: dict[str, Any],
    expected: dict[str, tuple[int, ...]],
    options: S.StateDictSpec,
    rank: int,
) -> None:
    """Each parameter, and each optimizer value of it, is a DTensor on its mesh (the
    key contract has already said which keys there are)."""
    for key, value in state["model"].items():
        if key in expected:
            _check_dtensor(value, expected[key], f"model state dict {key!r}", rank)
    for key, name, value in _optimizer_values(state["optim"], options):
        if name != "step":
            _check_dtensor(value, expected[key], f"optimizer state {key!r}[{name!r}]", rank)


def _optimizer_values(osd: dict[str, Any], options: S.StateDictSpec) -> list[tuple[str, str, Any]]:
    if not options.flatten_optimizer_state_dict:
        return [(k, n, v) for k, values in osd["state"].items() for n, v in values.items()]
    out = []
    for k, v in osd.items():
        if k.startswith("state."):
            fqn, _, name = k[len("state.") :].rpartition(".")
            out.append((fqn, name, v))
    return out


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
