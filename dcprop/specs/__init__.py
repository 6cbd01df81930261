"""Scenario specs: plain, frozen, picklable data that describe one dcprop example.

Nothing here imports torch.  Every class is a frozen, slotted attrs class whose
validators reject impossible values when the spec is built (always with
:class:`~dcprop.errors.SpecError`), and whose ``repr`` is valid Python that rebuilds
an equal spec (``eval(repr(s), vars(dcprop.specs))``).  JSON serialisation lives
apart, in :mod:`dcprop.serialization`.

The package is split by concern: :mod:`~dcprop.specs.model` (the layer tree and its
width algebra), :mod:`~dcprop.specs.topology` (meshes, plans, options),
:mod:`~dcprop.specs.training` (optimizer, scheduler, data) and
:mod:`~dcprop.specs.scenario` (the cross-field rules); everything is re-exported here.
"""

from dcprop.specs._base import explicit_fields
from dcprop.specs.model import (
    ACTIVATIONS,
    DTYPES,
    LEAVES,
    Activation,
    BatchNorm,
    Block,
    Branches,
    Embedding,
    Experts,
    Layer,
    LayerNorm,
    Linear,
    Mask,
    ModelSpec,
    ModuleList,
    Repeat,
    Sequential,
    Skip,
    children_of,
    expert_index,
    is_within,
    join,
    output_width,
    own_buffers,
    own_non_persistent_buffers,
    own_parameters,
    walk,
)
from dcprop.specs.scenario import DEVICES, Scenario, flat_unit
from dcprop.specs.topology import (
    FSDP1_SHARDING_STRATEGIES,
    DDPPlan,
    ExpertParallel,
    FSDP1Plan,
    FSDP2Plan,
    MeshSpec,
    Plan,
    StateDictSpec,
    StorageSpec,
    TensorParallel,
    Topology,
)
from dcprop.specs.training import SCHEDULERS, OptimizerSpec, SchedulerSpec, TrainingSpec

__all__ = [
    "ACTIVATIONS",
    "DEVICES",
    "DTYPES",
    "FSDP1_SHARDING_STRATEGIES",
    "LEAVES",
    "SCHEDULERS",
    "Activation",
    "BatchNorm",
    "Block",
    "Branches",
    "DDPPlan",
    "Embedding",
    "ExpertParallel",
    "Experts",
    "FSDP1Plan",
    "FSDP2Plan",
    "Layer",
    "LayerNorm",
    "Linear",
    "Mask",
    "MeshSpec",
    "ModelSpec",
    "ModuleList",
    "OptimizerSpec",
    "Plan",
    "Repeat",
    "Scenario",
    "SchedulerSpec",
    "Sequential",
    "Skip",
    "StateDictSpec",
    "StorageSpec",
    "TensorParallel",
    "Topology",
    "TrainingSpec",
    "children_of",
    "expert_index",
    "explicit_fields",
    "flat_unit",
    "is_within",
    "join",
    "output_width",
    "own_buffers",
    "own_non_persistent_buffers",
    "own_parameters",
    "walk",
]
