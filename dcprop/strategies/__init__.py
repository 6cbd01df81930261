"""Hypothesis strategies for dcprop's specs.

>>> from dcprop import strategies as dst
>>> from hypothesis import given
>>> @given(dst.scenarios("roundtrip", world_sizes=(2,)))
... def test_roundtrip(scenario): ...

Each strategy is lazy, like Hypothesis' own: its repr is the call that made it,
and its arguments are checked on first use (``.validate()`` or a draw;
``InvalidArgument`` names the argument and value).  It generates valid specs by
construction, and shrinks
toward the simplest case: fewest layers, smallest dims and world size, a 1D mesh,
nothing frozen, default options.
"""

from dcprop.properties import PROPERTY_NAMES
from dcprop.strategies._damage import DAMAGE_KINDS, damages, mutations
from dcprop.strategies._kills import kills
from dcprop.strategies._lifecycle import STEP_KINDS, lifecycles
from dcprop.strategies._models import LAYER_KINDS, dims, frozen_subsets, models
from dcprop.strategies._options import (
    OPTIMIZER_KINDS,
    optimizers,
    state_dict_options,
    storage_options,
    trainings,
)
from dcprop.strategies._scenarios import (
    EXCLUSIONS,
    PLAN_KINDS_BY_PROPERTY,
    parse_exclusions,
    scenarios,
)
from dcprop.strategies._topology import (
    PLAN_KINDS,
    factorizations,
    meshes,
    parallel_plans,
    topologies,
)

__all__ = [
    "DAMAGE_KINDS",
    "EXCLUSIONS",
    "LAYER_KINDS",
    "OPTIMIZER_KINDS",
    "PLAN_KINDS",
    "PLAN_KINDS_BY_PROPERTY",
    "PROPERTY_NAMES",
    "STEP_KINDS",
    "damages",
    "dims",
    "factorizations",
    "frozen_subsets",
    "kills",
    "lifecycles",
    "meshes",
    "models",
    "mutations",
    "optimizers",
    "parallel_plans",
    "parse_exclusions",
    "scenarios",
    "state_dict_options",
    "storage_options",
    "topologies",
    "trainings",
]
