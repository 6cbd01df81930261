"""Scenario specs: plain, frozen, picklable data that describe one dcprop example.

Nothing here imports torch.  Every class is a frozen, slotted attrs class whose
validators reject impossible values when the spec is built (always with
:class:`~dcprop.errors.SpecError`), and whose ``repr`` is valid Python that rebuilds
an equal spec (``eval(repr(s), vars(dcprop.specs))``).  JSON serialisation lives
apart, in :mod:`dcprop.serialization`.

The package is split by concern: :mod:`~dcprop.specs.model` (the layer tree and its
width algebra), :mod:`~dcprop.specs.topology` (meshes, plans, options),
:mod:`~dcprop.specs.training` (optimizer, scheduler, data),
:mod:`~dcprop.specs.lifecycle` (the steps of a lifecycle program) and
:mod:`~dcprop.specs.scenario` (the cross-field rules); everything is re-exported here.
"""

from dcprop.specs._base import explicit_fields
from dcprop.specs.lifecycle import (
    STEP_TYPES,
    Crash,
    Freeze,
    Load,
    Restart,
    Save,
    SetLR,
    Step,
    Train,
    Unfreeze,
    Wait,
)
from dcprop.specs.model import (
    ACTIVATIONS,
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
    ModelSpec,
    ModuleList,
    Repeat,
    Sequential,
    children_of,
    expert_index,
    is_within,
    join,
    output_width,
    own_buffers,
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
    "FSDP1_SHARDING_STRATEGIES",
    "LEAVES",
    "SCHEDULERS",
    "STEP_TYPES",
    "Activation",
    "BatchNorm",
    "Block",
    "Branches",
    "Crash",
    "DDPPlan",
    "Embedding",
    "ExpertParallel",
    "Experts",
    "FSDP1Plan",
    "FSDP2Plan",
    "Freeze",
    "Layer",
    "LayerNorm",
    "Linear",
    "Load",
    "MeshSpec",
    "ModelSpec",
    "ModuleList",
    "OptimizerSpec",
    "Plan",
    "Repeat",
    "Restart",
    "Save",
    "Scenario",
    "SchedulerSpec",
    "Sequential",
    "SetLR",
    "StateDictSpec",
    "Step",
    "StorageSpec",
    "TensorParallel",
    "Topology",
    "Train",
    "TrainingSpec",
    "Unfreeze",
    "Wait",
    "children_of",
    "expert_index",
    "explicit_fields",
    "flat_unit",
    "is_within",
    "join",
    "output_width",
    "own_buffers",
    "own_parameters",
    "walk",
]
