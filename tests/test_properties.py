"""Every property on CPU at world sizes up to 4, and bug injections each must catch."""

import attrs
import helpers
import pytest
from hypothesis import example, find, given, settings
from hypothesis import strategies as st
from seeds import CPU_SEEDS, SEED_003_FSDP1

import dcprop.specs as S
from dcprop import strategies as dst
from dcprop.errors import ExampleFailure, PropertyFailure
from dcprop.known_bugs import match_known
from dcprop.properties import run_property
from dcprop.properties._harness import Hooks
from dcprop.properties.ddp_parity import Reference, Tolerance, adam_step_bound, compare_trained
from dcprop.properties.reshard import _owned
from dcprop.testing import property_test

# --- every property over generated scenarios (the profile sets how many), with the ----
# --- upstream seed tests' exact scenarios as explicit examples at world size 4 -------


def with_seed_examples(prop):
    def decorate(test):
        for name, (seed_prop, scenario) in sorted(CPU_SEEDS.items()):
            if seed_prop == prop:
                test = example(scenario=scenario).via(f"upstream seed {name}")(test)
        return test

    return decorate


# After a step DDP's ranks hold different running statistics (DDP broadcasts rank 0's
# before the next forward, not after this one); DCP saves one copy (dcprop check --seed 12).
DDP_BATCH_STATISTICS = S.Scenario(
    S.ModelSpec(
        S.Block((("fc0", S.Linear(1, 1)), ("act1", S.Activation()), ("bn2", S.BatchNorm(1))))
    ),
    S.Topology(2, S.MeshSpec((2,), ("dp",)), S.DDPPlan()),
    load=S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()),
    training=S.TrainingSpec(batch_size=2),
)
DDP_STATS = "DDP ranks' own batch statistics"


@example(scenario=attrs.evolve(DDP_BATCH_STATISTICS, load=None)).via(DDP_STATS)
@with_seed_examples("roundtrip")
@property_test("roundtrip", world_sizes=(1, 2, 3, 4))
def test_roundtrip(scenario):
    pass


@example(scenario=DDP_BATCH_STATISTICS).via(DDP_STATS)
@with_seed_examples("reshard")
@property_test("reshard", world_sizes=(1, 2, 3, 4))
def test_reshard(scenario):
    pass


# Gradients that are zero in exact arithmetic are rounding noise, which Adam scales up to
# steps of size lr: fc0 before a LayerNorm over one feature (dcprop check --seed 1,
# shrunk), a Linear's bias before a BatchNorm (and that norm's running mean).
ZERO_GRADIENT_SCENARIOS = [
    S.Scenario(
        S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)), ("norm1", S.LayerNorm(1))))),
        S.Topology(
            3, S.MeshSpec((3, 1), ("replicate", "shard")), S.FSDP2Plan(replicate_dim="replicate")
        ),
        optimizer=S.OptimizerSpec(kind="adam"),
        training=S.TrainingSpec(steps=2),
    ),
    S.Scenario(
        S.ModelSpec(S.Block((("fc0", S.Linear(3, 2)), ("bn", S.BatchNorm(2))))),
        S.Topology(3, S.MeshSpec((3,), ("shard",)), S.FSDP2Plan()),
        optimizer=S.OptimizerSpec(kind="adam"),
        training=S.TrainingSpec(steps=2, batch_size=2),
    ),
]


def with_zero_gradient_examples(test):
    for scenario in ZERO_GRADIENT_SCENARIOS:
        test = example(scenario=scenario).via("a gradient that is zero in exact arithmetic")(test)
    return test


# the three runs' LR schedules are compared too (found when schedulers joined the state)
@example(
    scenario=S.Scenario(
        S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)),))),
        S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()),
        optimizer=S.OptimizerSpec(scheduler=S.SchedulerSpec()),
        training=S.TrainingSpec(steps=2),
    )
).via("an LR scheduler in the trained state")
@with_zero_gradient_examples
@with_seed_examples("ddp_parity")
@property_test("ddp_parity", world_sizes=(1, 2, 3, 4))
def test_ddp_parity(scenario):
    pass


# a restarted DDP job's first step must sum gradients as the uninterrupted job's does
# (dcprop check --seed 2 found DDP rebuilding its buckets in between, shrunk)
@example(
    scenario=S.Scenario(
        S.ModelSpec(
            S.Block(
                (
                    ("pretrain", S.Block((("fc0", S.Linear(6, 1)), ("act1", S.Activation())))),
                    ("act", S.Activation()),
                    ("head", S.Linear(1, 3)),
                )
            )
        ),
        S.Topology(
            3,
            S.MeshSpec((3,), ("dp",)),
            S.DDPPlan(),
            state_dict=S.StateDictSpec(
                ignore_frozen_params=True,
                keep_submodule_prefixes=False,
                submodules=("pretrain",),
            ),
        ),
        frozen=("pretrain.fc0.bias", "pretrain.fc0.weight"),
        optimizer=S.OptimizerSpec(momentum=0.9),
        pretrained="pretrain",
    )
).via("a restarted DDP job")
@with_seed_examples("finetune_resume")
@property_test("finetune_resume", world_sizes=(1, 2, 3, 4))
def test_finetune_resume(scenario):
    pass


@with_seed_examples("submesh_layout")
@property_test("submesh_layout", world_sizes=(1, 2, 3, 4))
def test_submesh_layout(scenario):
    pass


@settings(deadline=None)
@given(st.lists(st.floats(-1e3, 1e3).filter(lambda g: abs(g) > 1e-30), min_size=1, max_size=64))
def test_adam_step_bound_bounds_every_adam_update(gradients):
    """ddp_parity lets a free element drift by this bound per step: no gradient sequence
    may move Adam further (eps 0 is Adam's largest step)."""
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([p], lr=1.0, eps=0.0)
    for step, g in enumerate(gradients, start=1):
        before = p.detach().clone()
        p.grad = torch.tensor([g], dtype=torch.float64)
        optimizer.step()
        assert abs(float(p - before)) <= adam_step_bound(step) * (1 + 1e-9)


def test_mixed_precision_compares_updates_not_values():
    """A dropped gradient (a quarter of the update) hides inside a 2% tolerance on values
    but not inside 10% of the update; bf16-sized errors (1%) of the update pass."""
    torch = pytest.importorskip("torch")
    fsdp1 = S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP1Plan(mixed_precision="bf16"))
    model = S.ModelSpec(S.Block((("fc0", S.Linear(2, 2)),)))
    scenario = S.Scenario(model, fsdp1, device="cuda")
    initial = {"fc0.weight": torch.full((2, 2), 0.3), "fc0.bias": torch.full((2,), -0.3)}
    update = {"fc0.weight": torch.full((2, 2), 4e-3), "fc0.bias": torch.full((2,), -4e-3)}
    never = {k: torch.full(v.shape, 1) for k, v in initial.items()}
    trained = {f"model/{k}": initial[k] + update[k] for k in initial}
    reference = Reference([0.0], initial, trained, never)
    tol = Tolerance.of(scenario)

    def run(factor):
        actual = {f"model/{k}": initial[k] + factor * update[k] for k in initial}
        compare_trained(scenario, reference, trained, actual, tol, what="mixed", rank=0)

    run(1.01)
    with pytest.raises(PropertyFailure, match="update"):
        run(0.75)
    assert torch.allclose(initial["fc0.weight"] + 0.75 * update["fc0.weight"],
                          trained["model/fc0.weight"], rtol=2e-2, atol=2e-3)  # fmt: skip


def test_reshard_builds_b_from_its_own_seed(dcprop_runner):
    """LayerNorm(1)'s weight has an exactly zero gradient: SGD never moves it.  A load that
    forgets it (DropKey drops the last model key) leaves B's initial value, which passed
    for the saved one while B was built from A's seed whenever frozen keys were skipped."""
    frozen_skipped = S.StateDictSpec(ignore_frozen_params=True)
    scenario = S.Scenario(
        S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)), ("norm1", S.LayerNorm(1))))),
        S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan(), frozen_skipped),
        load=S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan(), frozen_skipped),
        frozen=("fc0.bias",),
    )
    assert run_property(dcprop_runner, "reshard", scenario)
    drop_key = Hooks(checkpointer=helpers.INJECTIONS["drop_key"])
    with pytest.raises(ExampleFailure, match=r"norm1\.weight"):
        run_property(dcprop_runner, "reshard", scenario, hooks=drop_key)


def test_reshard_passes_its_reference_by_collective_not_by_files(dcprop_runner):
    """B's ranks learn what A saved from A's ranks by a collective: files in the example's
    directory would be node-local under torchrun across hosts."""
    scenario = S.Scenario(
        S.ModelSpec(S.Block((("fc0", S.Linear(2, 2)),))),
        S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan()),
        load=S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()),
    )
    hooks = Hooks(checkpointer=helpers.OnlyCheckpointsBeside())
    assert run_property(dcprop_runner, "reshard", scenario, hooks=hooks)


def test_reshard_expects_a_ranks_own_expert_from_the_mesh():
    """An expert key lost on both sides is missing: ownership comes from the rank's
    coordinate on the expert dim, not from what the load produced."""
    plan = S.FSDP2Plan(experts=S.ExpertParallel("experts"))
    expected = {
        "model/fc.weight": 0,
        "model/experts.0.0.weight": 1,
        "model/experts.1.0.weight": 2,
        "optim/state/experts.1.0.weight/step": 3,
    }
    assert _owned(expected, plan, 1) == {
        "model/fc.weight": 0,
        "model/experts.1.0.weight": 2,
        "optim/state/experts.1.0.weight/step": 3,
    }
    assert _owned(expected, S.FSDP2Plan(), None) == expected


@pytest.mark.gpu
def test_fsdp1_seed_on_gpus():
    """Seed 003 upstream runs FSDP1 (SHARD_GRAD_OP, use_orig_params=False); FSDP1 needs an
    accelerator, so this runs only with ``-m gpu`` on a machine with two GPUs or more."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < SEED_003_FSDP1.world_size:
        pytest.skip(f"needs {SEED_003_FSDP1.world_size} CUDA devices")
    from dcprop.runner import Pool

    with Pool(SEED_003_FSDP1.world_size, device="cuda") as pool:
        results = run_property(pool, "ddp_parity", SEED_003_FSDP1)
    assert sorted(results) == list(range(SEED_003_FSDP1.world_size))


# --- injected bugs ---------------------------------------------------------------------
def _catches(runner, prop, hooks, want=None):
    def predicate(scenario):
        if want is not None and not want(scenario):
            return False
        try:
            # a hang (some known upstream bugs deadlock) is not what these tests look for:
            # a short timeout keeps the search cheap
            run_property(runner, prop, scenario, hooks=hooks, timeout=10)
        except ExampleFailure as failure:
            # a known upstream bug that a PropertyFailure shows (a contract violation)
            # is not the injection's doing
            return "PropertyFailure" in failure.signature and match_known(failure, scenario) is None
        return False

    return predicate


SMALL = dict(world_sizes=(1, 2), max_layers=2, max_dim=6)
FIND = settings(max_examples=40, deadline=None, database=None, derandomize=True)
# a model with a BatchNorm is a minority of draws: give those searches room
FIND_LONGER = settings(FIND, max_examples=100)
# an exact zero in the saved state (a dead ReLU's momentum) is rarer still
FIND_ZEROS = settings(FIND, max_examples=250)


def _has_bn(s):
    return s.model.has_batch_statistics()


ZEROS = dict(layers=("linear", "activation"), kinds=("fsdp2", "ddp"), dtypes=("fp32",))

INJECTIONS = [
    # (injection, property, extra scenario kwargs, a condition the scenario must meet)
    ("drop_key", "roundtrip", {}, None),
    ("corrupt_one_element", "roundtrip", {}, None),
    ("skip_step_count", "roundtrip", {}, lambda s: s.optimizer.kind != "sgd"),
    ("wrong_offsets", "reshard", {}, None),
    ("drop_buffers", "roundtrip", dict(layers=("linear", "batchnorm")), _has_bn),
    ("zero_frozen", "roundtrip", {}, lambda s: bool(s.frozen)),
    ("corrupt_one_element", "submesh_layout", {}, None),
    # caught only by the key contract: the buffer is missing from both sides
    ("without_running_mean", "roundtrip", dict(layers=("linear", "batchnorm")), _has_bn),
    # caught only because hyperparameters and the LR scheduler are saved and perturbed
    ("keep_live_lr", "roundtrip", {}, lambda s: not s.save.state_dict.flatten_optimizer_state_dict),
    ("keep_live_lr", "roundtrip", {}, lambda s: s.save.state_dict.flatten_optimizer_state_dict),
    ("keep_live_scheduler", "roundtrip", {}, lambda s: s.optimizer.scheduler is not None),
    # caught only by comparing bit patterns; a dead ReLU leaves zeros in momentum buffers
    ("zero_as_nan", "roundtrip", ZEROS, None),
    ("zero_as_negative_zero", "roundtrip", ZEROS, None),
]


def _hooks(name):
    if name in helpers.MODEL_INJECTIONS:
        return Hooks(model_factory=helpers.MODEL_INJECTIONS[name])
    return Hooks(checkpointer=helpers.INJECTIONS[name])


@pytest.mark.parametrize(
    ("name", "prop", "kwargs", "want"), INJECTIONS, ids=[f"{i[0]}-{i[1]}" for i in INJECTIONS]
)
def test_injected_checkpointer_bug_is_caught_and_shrunk(dcprop_runner, name, prop, kwargs, want):
    hooks = _hooks(name)
    strategy = dst.scenarios(prop, **{**SMALL, **kwargs})
    # a BatchNorm, or a zero in the saved state, is a minority of draws: give them room
    budget = FIND_LONGER if want is _has_bn else FIND_ZEROS if kwargs is ZEROS else FIND
    found = find(strategy, _catches(dcprop_runner, prop, hooks, want), settings=budget)
    print(f"{name} / {prop} shrunk to: {found!r}")
    assert found.world_size <= 2 and len(found.model.parameter_names()) <= 6
    # the smallest expert model (root, Linear, Experts, one Sequential expert) has 7 modules
    limit = 7 if prop == "submesh_layout" else 4
    assert len([layer for _, layer in found.model.modules()]) <= limit


def test_gradient_bug_is_caught_by_ddp_parity(dcprop_runner):
    hooks = Hooks(model_factory=helpers.double_grads_on_rank0)
    found = find(
        dst.scenarios("ddp_parity", **SMALL),
        _catches(dcprop_runner, "ddp_parity", hooks),
        settings=FIND,
    )
    print(f"double_grads_on_rank0 / ddp_parity shrunk to: {found!r}")
    assert found.world_size <= 2 and found.model == S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)),)))


def test_clean_checkpointer_passes_the_injection_scenarios(dcprop_runner):
    """The injections fail because of the fault, not the scenario: plain DCP passes."""
    scenario = S.Scenario(
        S.ModelSpec(S.Block((("fc0", S.Linear(2, 2)), ("bn", S.BatchNorm(2))))),
        S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan()),
        frozen=("fc0.bias",),
        optimizer=S.OptimizerSpec("adam"),
        training=S.TrainingSpec(batch_size=2),
    )
    assert run_property(dcprop_runner, "roundtrip", scenario)
    with pytest.raises(ExampleFailure, match="PropertyFailure"):
        run_property(
            dcprop_runner,
            "roundtrip",
            scenario,
            hooks=Hooks(checkpointer=helpers.INJECTIONS["drop_buffers"]),
        )
