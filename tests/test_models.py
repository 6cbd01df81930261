"""The models grown for real checkpoints: parameters in bf16/fp16 beside float32 ones,
bool, integer and non-persistent buffers, and branches that some steps skip; built,
trained, saved and loaded for real under the properties."""

import helpers
import pytest
import torch

import dcprop.specs as S
from dcprop.build import build_model
from dcprop.errors import ExampleFailure
from dcprop.known_bugs import match_known
from dcprop.properties import run_property
from dcprop.properties._harness import Hooks

GROWN = S.ModelSpec(
    S.Block(
        (
            ("fc0", S.Linear(4, 4)),
            ("lp", S.Linear(4, 4, dtype="bf16")),
            ("f16", S.Linear(4, 4, dtype="fp16", unused_input=True)),
            ("mask", S.Mask(4, cache=True)),
            ("skip", S.Skip(S.Linear(4, 4), period=2, phase=0)),
        )
    )
)
SGD = S.OptimizerSpec(momentum=0.9)  # fp16 parameters train under SGD (Adam's eps is 0)
FSDP2 = S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan(wrap=("lp", "f16")))
DDP = S.Topology(1, S.MeshSpec((1,), ("dp",)), S.DDPPlan())


def test_build_gives_each_layer_its_dtype_and_buffers():
    a, b = build_model(GROWN, seed=1), build_model(GROWN, seed=2)
    assert (a.lp.weight.dtype, a.f16.bias.dtype, a.fc0.weight.dtype) == (
        torch.bfloat16,
        torch.float16,
        torch.float32,
    )
    assert a.mask.keep.dtype == torch.bool and a.skip.calls.dtype == torch.int64
    assert "mask.cache" not in a.state_dict() and "mask.keep" in a.state_dict()
    # the cache is a function of the spec alone; persistent values follow the seed
    assert torch.equal(a.mask.cache, b.mask.cache) and a.mask.cache.abs().sum() > 0
    assert not torch.equal(a.fc0.weight, b.fc0.weight)
    out = a(torch.randn(3, 4))
    assert out.dtype == torch.float32
    out.square().sum().backward()
    assert a.skip.calls.item() == 1 and a.skip.body.weight.grad is not None  # call 0: used
    a.zero_grad(set_to_none=True)
    a(torch.randn(3, 4)).square().sum().backward()
    assert a.skip.calls.item() == 2 and a.skip.body.weight.grad is None  # call 1: skipped
    a.eval()
    a(torch.randn(3, 4))
    assert a.skip.calls.item() == 2  # an evaluation pass is no training step


def _scenario(save=FSDP2, **kwargs):
    return S.Scenario(GROWN, save, optimizer=SGD, **kwargs)


@pytest.mark.parametrize(
    ("prop", "scenario"),
    [
        ("roundtrip", _scenario()),
        ("reshard", _scenario(load=DDP)),
        ("ddp_parity", _scenario(training=S.TrainingSpec(steps=3))),
    ],
    ids=["roundtrip", "reshard", "ddp_parity"],
)
def test_mixed_dtypes_buffers_and_a_skipped_branch_hold_every_property(
    dcprop_runner, prop, scenario
):
    """The branch trains on step 0 and is skipped on step 1, the step after the save: it
    has optimizer state, no gradient, and the call count decides which steps use it."""
    assert run_property(dcprop_runner, prop, scenario)


def _failure(runner, scenario, hooks=None):
    with pytest.raises(ExampleFailure) as info:
        run_property(runner, "roundtrip", scenario, hooks=hooks, timeout=30)
    return info.value


@pytest.mark.parametrize(
    ("injection", "key"),
    [
        (helpers.DropNamedBuffers("calls"), "model/skip.calls"),  # int64, training updates it
        (helpers.DropNamedBuffers("keep"), "model/mask.keep"),  # bool
        (helpers.OneUlpOffInLowPrecision(), "model/f16.weight"),  # compared bitwise
    ],
    ids=["int-buffer", "bool-buffer", "one-ulp"],
)
def test_a_load_that_misses_a_new_kind_of_value_is_caught(dcprop_runner, injection, key):
    failure = _failure(dcprop_runner, _scenario(), Hooks(checkpointer=injection))
    assert "state after load" in str(failure) and key in str(failure)


def test_a_non_persistent_buffer_never_appears_in_a_saved_state_dict(dcprop_runner):
    hooks = Hooks(model_factory=helpers.with_persistent_cache)
    failure = _failure(dcprop_runner, _scenario(), hooks)
    assert "model has 1 unexpected key(s): ['mask.cache']" in str(failure)


def test_a_branch_no_step_has_used_before_the_save_is_a_known_torch_bug(dcprop_runner):
    """Skipped on step 0, saved after it: get_state_dict leaves the branch's momentum
    out, which the key contract (DSD's strict loader's own requirement) names."""
    skipped_first = S.ModelSpec(
        S.Block((("fc0", S.Linear(4, 4)), ("skip", S.Skip(S.Linear(4, 4), phase=1))))
    )
    scenario = S.Scenario(skipped_first, DDP, optimizer=SGD)
    failure = _failure(dcprop_runner, scenario)
    assert "optimizer misses 2 key(s)" in str(failure)
    assert "state.skip.body.weight.momentum_buffer" in str(failure)
    bug = match_known(failure, scenario)
    assert bug is not None and bug.id == "dsd-partial-optimizer-state"
