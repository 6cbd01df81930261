import torch
from hypothesis import given, settings

import dcprop.specs as S
from dcprop import strategies as dst
from dcprop.build import build_model


@settings(max_examples=40, deadline=None)
@given(dst.models(max_layers=4, max_depth=2))
def test_every_generated_model_builds_and_runs_forward_backward(model):
    module = build_model(model, seed=3)
    x = (
        torch.randint(0, model.in_features, (3,))
        if model.takes_tokens
        else torch.randn(3, model.in_features, requires_grad=True)
    )
    out = module(x)
    assert out.shape == (3, model.out_features)
    out.square().mean().backward()
    idle = model.idle_parameters(1)  # a Skip whose body the first step skips
    for name, p in module.named_parameters():
        assert (p.grad is None) == (name in idle), name


@settings(max_examples=20, deadline=None)
@given(dst.models(), dst.frozen_subsets(S.ModelSpec(S.Block((("fc0", S.Linear(2, 2)),)))))
def test_building_is_bitwise_deterministic(model, _):
    a, b = build_model(model, seed=5), build_model(model, seed=5)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    c = build_model(model, seed=6)
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_meta_device_and_frozen():
    model = S.ModelSpec(S.Block((("fc", S.Linear(3, 2)), ("bn", S.BatchNorm(2)))))
    meta = build_model(model, device="meta", frozen=("fc.bias",))
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert [n for n, p in meta.named_parameters() if not p.requires_grad] == ["fc.bias"]


def test_initialisation_ignores_the_global_rng():
    model = S.ModelSpec(S.Block((("fc", S.Linear(3, 2)),)))
    torch.manual_seed(0)
    a = build_model(model, seed=1)
    torch.manual_seed(99)
    b = build_model(model, seed=1)
    assert torch.equal(a.fc.weight, b.fc.weight)
