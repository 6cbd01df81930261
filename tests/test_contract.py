"""The key contract against torch's own get_state_dict on a plain module (no ranks), and
the ownership rules that need a mesh, from the spec alone."""

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import dcprop.specs as S
from dcprop import build
from dcprop.contract import Contract, expert_coordinate
from dcprop.errors import PropertyFailure

MODEL = S.ModelSpec(
    S.Block(
        (
            ("embed", S.Embedding(5, 4)),
            ("fc0", S.Linear(4, 4)),
            ("bn", S.BatchNorm(4)),
            ("head", S.Linear(4, 4)),
        )
    ),
    ties=(("fc0", "head"),),
)
ONE_RANK = S.Topology(1, S.MeshSpec((1,), ("dp",)), S.DDPPlan())
OPTIMIZERS = [
    S.OptimizerSpec(),
    S.OptimizerSpec(momentum=0.9),
    S.OptimizerSpec("adam"),
    S.OptimizerSpec("adamw", scheduler=S.SchedulerSpec("linear", period=2)),
]


def _state(optimizer, options, frozen=()):
    module = build.build_model(MODEL, frozen=frozen)
    optim = build.optimizer_for(module.parameters(), optimizer)
    scheduler = build.scheduler_for(optim, optimizer)
    module(torch.tensor([0, 1, 2])).sum().backward()
    optim.step()
    torch_options = StateDictOptions(
        ignore_frozen_params=options.ignore_frozen_params,
        flatten_optimizer_state_dict=options.flatten_optimizer_state_dict,
    )
    msd, osd = get_state_dict(module, optim, options=torch_options)
    state = {"model": msd, "optim": osd}
    if scheduler is not None:
        scheduler.step()
        state["scheduler"] = scheduler.state_dict()
    return state


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=repr)
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("ignore_frozen", [False, True], ids=["frozen-kept", "frozen-skipped"])
def test_torch_state_dicts_meet_the_contract(optimizer, flatten, ignore_frozen):
    options = S.StateDictSpec(
        ignore_frozen_params=ignore_frozen, flatten_optimizer_state_dict=flatten
    )
    frozen = ("embed.weight",)
    contract = Contract(MODEL, frozen, optimizer, ONE_RANK, options, 0)
    contract.check(_state(optimizer, options, frozen), "in the test")
    assert "head.weight" in contract.model_keys()  # the tied alias
    assert ("embed.weight" in contract.model_keys()) != ignore_frozen


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda s: s["model"].pop("bn.running_mean"), "model misses 1 key(s): ['bn.running_mean']"),
        (lambda s: s["model"].pop("head.weight"), "model misses 1 key(s): ['head.weight']"),
        (lambda s: s["model"].update(extra=torch.zeros(1)), "model has 1 unexpected key(s)"),
        (lambda s: s["optim"]["state"].pop("bn.bias"), "'state.bn.bias.exp_avg'"),
        (lambda s: s["optim"]["param_groups"][0].pop("betas"), "'param_groups.bn.bias.betas'"),
        (lambda s: s["optim"]["param_groups"][0]["params"].pop(), "param_groups.head.bias.amsgrad"),
        (lambda s: s.pop("scheduler"), "state misses 1 key(s): ['scheduler']"),
        (lambda s: s["scheduler"].pop("last_epoch"), "scheduler misses 1 key(s): ['last_epoch']"),
    ],
)
def test_a_missing_or_unexpected_entry_is_named(damage, named):
    optimizer = S.OptimizerSpec("adam", scheduler=S.SchedulerSpec())
    state = _state(optimizer, S.StateDictSpec())
    damage(state)
    contract = Contract(MODEL, (), optimizer, ONE_RANK, S.StateDictSpec(), 3)
    with pytest.raises(
        PropertyFailure, match=r"before save on rank 3 breaks the key contract"
    ) as e:
        contract.check(state, "before save")
    assert named in str(e.value)


def test_the_flattened_layout_is_not_the_nested_one():
    optimizer = S.OptimizerSpec("adam")
    state = _state(optimizer, S.StateDictSpec())
    flat = S.StateDictSpec(flatten_optimizer_state_dict=True)
    with pytest.raises(PropertyFailure, match=r"unexpected key\(s\): \['param_groups', 'state'\]"):
        Contract(MODEL, (), optimizer, ONE_RANK, flat, 0).check(state, "after load")


EXPERTS = S.ModelSpec(
    S.Block(
        (
            ("fc0", S.Linear(2, 2)),
            ("moe", S.Experts((S.Linear(2, 2), S.Linear(2, 2)))),
        )
    )
)
SUBMESH = S.Topology(
    4,
    S.MeshSpec((2, 2), ("shard", "ep")),
    S.FSDP2Plan(experts=S.ExpertParallel("moe")),
)


@pytest.mark.parametrize(("rank", "expert"), [(0, 0), (1, 1), (2, 0), (3, 1)])
def test_a_rank_holds_only_the_expert_on_its_coordinate(rank, expert):
    assert expert_coordinate(SUBMESH, rank) == expert
    contract = Contract(EXPERTS, (), S.OptimizerSpec("adam"), SUBMESH, S.StateDictSpec(), rank)
    experts = {k for k in contract.model_keys() if k.startswith("moe.")}
    assert experts == {f"moe.{expert}.weight", f"moe.{expert}.bias"}
    assert f"state.moe.{expert}.weight.exp_avg" in contract.optimizer_keys()
    assert not any(f"moe.{1 - expert}." in k for k in contract.optimizer_keys())


def test_a_full_offloaded_state_dict_lives_on_rank_0_alone():
    options = S.StateDictSpec(full_state_dict=True, cpu_offload=True)
    for rank in range(4):
        contract = Contract(EXPERTS, (), S.OptimizerSpec("adam"), SUBMESH, options, rank)
        assert bool(contract.model_keys()) == (rank == 0)
        assert bool(contract.optimizer_keys()) == (rank == 0)
