"""Using dcprop's strategies in your own Hypothesis tests, with no distributed run at all:
every generated model builds and trains in one process, and each parameter the first step
uses gets a gradient (a ``Skip`` body that step skips gets none, as the spec says)."""

import torch
from hypothesis import given, settings

from dcprop import strategies as dst
from dcprop.build import build_model


@settings(max_examples=25, deadline=None)
@given(dst.models(max_layers=4, max_depth=2), dst.trainings())
def test_every_generated_model_trains(model, training):
    module = build_model(model, seed=0)
    if model.takes_tokens:
        x = torch.randint(0, model.in_features, (max(2, training.batch_size),))
    else:
        x = torch.randn(max(2, training.batch_size), model.in_features)
    module(x).square().mean().backward()
    idle = model.idle_parameters(steps=1)
    for name, p in module.named_parameters():
        assert (p.grad is None) == (name in idle), name


if __name__ == "__main__":
    test_every_generated_model_trains()
    print("every generated model ran forward and backward")
