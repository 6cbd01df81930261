"""Every property on CPU at world sizes up to 4, and bug injections each must catch."""

import helpers
import pytest
from hypothesis import example, find, settings
from seeds import CPU_SEEDS, SEED_003_FSDP1

import dcprop.specs as S
from dcprop import strategies as dst
from dcprop.errors import ExampleFailure
from dcprop.properties import run_property
from dcprop.properties._harness import Hooks
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


@with_seed_examples("roundtrip")
@property_test("roundtrip", world_sizes=(1, 2, 3, 4))
def test_roundtrip(scenario):
    pass


@with_seed_examples("reshard")
@property_test("reshard", world_sizes=(1, 2, 3, 4))
def test_reshard(scenario):
    pass


@with_seed_examples("ddp_parity")
@property_test("ddp_parity", world_sizes=(1, 2, 3, 4))
def test_ddp_parity(scenario):
    pass


@with_seed_examples("finetune_resume")
@property_test("finetune_resume", world_sizes=(1, 2, 3, 4))
def test_finetune_resume(scenario):
    pass


@with_seed_examples("submesh_layout")
@property_test("submesh_layout", world_sizes=(1, 2, 3, 4))
def test_submesh_layout(scenario):
    pass


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
            return "PropertyFailure" in failure.signature
        return False

    return predicate


SMALL = dict(world_sizes=(1, 2), max_layers=2, max_dim=6)
FIND = settings(max_examples=40, deadline=None, database=None, derandomize=True)


def _has_bn(s):
    return s.model.has_batch_statistics()


ZEROS = dict(layers=("linear", "activation"), kinds=("fsdp2", "ddp"))

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
    found = find(strategy, _catches(dcprop_runner, prop, hooks, want), settings=FIND)
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
