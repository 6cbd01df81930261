"""Where a state dict lives: the device mesh, the parallel plan, the state-dict and
storage options, and the :class:`Topology` that binds them to a world size."""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

from dcprop.errors import SpecError
from dcprop.specs._base import (
    IDENTIFIER,
    Spec,
    as_pairs,
    as_tuple,
    at_most,
    flag,
    identifier,
    instance_of,
    non_empty,
    one_of,
    optional,
    pairs_of,
    positive,
    tuple_of,
)

FSDP1_SHARDING_STRATEGIES = (
    "FULL_SHARD",
    "SHARD_GRAD_OP",
    "NO_SHARD",
    "HYBRID_SHARD",
    "_HYBRID_SHARD_ZERO2",
)


@attrs.frozen(repr=False)
class MeshSpec(Spec):
    """A ``DeviceMesh`` shape with dim names; 1 to 3 dims, dims of size 1 allowed.

    >>> MeshSpec((2, 2), ("replicate", "shard")).size
    4
    """

    shape: tuple[int, ...] = attrs.field(converter=as_tuple, validator=tuple_of(int))
    dim_names: tuple[str, ...] = attrs.field(converter=as_tuple, validator=tuple_of(str))

    def __attrs_post_init__(self) -> None:
        if not 1 <= len(self.shape) <= 3:
            raise SpecError(f"mesh shape {self.shape} must have 1 to 3 dims")
        if any(s < 1 for s in self.shape):
            raise SpecError(f"mesh shape {self.shape} has a dim smaller than 1")
        if len(self.dim_names) != len(self.shape):
            raise SpecError(
                f"mesh shape {self.shape} has {len(self.shape)} dims but dim_names "
                f"{self.dim_names} has {len(self.dim_names)}"
            )
        if len(set(self.dim_names)) != len(self.dim_names):
            raise SpecError(f"mesh dim_names {self.dim_names} repeat a name")
        for n in self.dim_names:
            if not IDENTIFIER.match(n):
                raise SpecError(f"mesh dim name {n!r} is not an identifier")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def dim_size(self, name: str) -> int:
        return self.shape[self.dim_names.index(name)]

    def size_of(self, names: Iterable[str]) -> int:
        """The number of ranks spanned by the dims ``names`` (1 for none)."""
        return math.prod(self.dim_size(n) for n in names)


@attrs.frozen(repr=False)
class DDPPlan(Spec):
    """``DistributedDataParallel`` over a 1D mesh."""

    def split_dims(self, mesh: MeshSpec) -> tuple[str, ...]:
        """The mesh dims a parameter's dim 0 is split over: none, DDP replicates."""
        return ()


@attrs.frozen(repr=False)
class TensorParallel(Spec):
    """Tensor parallel on mesh dim ``dim``: each pair is (colwise Linear, rowwise Linear)."""

    dim: str = attrs.field(validator=identifier)
    pairs: tuple[tuple[str, str], ...] = attrs.field(
        converter=as_pairs, validator=[pairs_of(str, str), non_empty]
    )


@attrs.frozen(repr=False)
class ExpertParallel(Spec):
    """The layout of PyTorch's ``test/distributed/checkpoint/e2e/test_fsdp_ep.py``: the
    experts of the :class:`Experts` module at ``module`` are spread over mesh dim ``dim``
    (expert ``e`` lives on the ranks whose coordinate on ``dim`` is ``e``) and each is
    sharded on the sub-mesh of the remaining dim; every other module is sharded on the
    whole mesh, flattened."""

    module: str = attrs.field(validator=instance_of(str))
    dim: str = attrs.field(default="ep", validator=identifier)


@attrs.frozen(repr=False)
class FSDP2Plan(Spec):
    """``fully_shard`` on each path in ``wrap`` (deepest first), then on the root.

    ``replicate_dim`` set makes it HSDP (replicate x shard); ``tp`` applies tensor
    parallel first on its own mesh dim; ``experts`` gives the sub-mesh layout.
    """

    shard_dim: str = attrs.field(default="shard", validator=identifier)
    wrap: tuple[str, ...] = attrs.field(default=(), converter=as_tuple, validator=tuple_of(str))
    reshard_after_forward: bool = attrs.field(default=True, validator=flag)
    replicate_dim: str | None = attrs.field(default=None, validator=optional(identifier))
    tp: TensorParallel | None = attrs.field(
        default=None, validator=optional(instance_of(TensorParallel))
    )
    experts: ExpertParallel | None = attrs.field(
        default=None, validator=optional(instance_of(ExpertParallel))
    )

    def __attrs_post_init__(self) -> None:
        if self.experts is not None and (self.tp is not None or self.replicate_dim is not None):
            raise SpecError("FSDP2Plan(experts=...) combines with neither tp nor replicate_dim")

    @property
    def mesh_dims(self) -> tuple[str, ...]:
        dims = [self.shard_dim]
        if self.replicate_dim:
            dims.append(self.replicate_dim)
        if self.tp:
            dims.append(self.tp.dim)
        if self.experts:
            dims.append(self.experts.dim)
        return tuple(dims)

    def split_dims(self, mesh: MeshSpec) -> tuple[str, ...]:
        """The mesh dims a parameter's dim 0 is split over: the shard dim, or with
        experts every dim (an expert is sharded on its sub-mesh, the rest on the
        flattened mesh)."""
        return mesh.dim_names if self.experts else (self.shard_dim,)


@attrs.frozen(repr=False)
class FSDP1Plan(Spec):
    """``FullyShardedDataParallel`` (FSDP1). Validates anywhere; runs on CUDA only."""

    sharding_strategy: str = attrs.field(
        default="FULL_SHARD", validator=one_of(FSDP1_SHARDING_STRATEGIES)
    )
    use_orig_params: bool = attrs.field(default=True, validator=flag)
    cpu_offload: bool = attrs.field(default=False, validator=flag)
    mixed_precision: str | None = attrs.field(
        default=None, validator=optional(one_of(("fp16", "bf16")))
    )
    backward_prefetch: str | None = attrs.field(
        default=None, validator=optional(one_of(("BACKWARD_PRE", "BACKWARD_POST")))
    )
    wrap: tuple[str, ...] = attrs.field(default=(), converter=as_tuple, validator=tuple_of(str))

    @property
    def hybrid(self) -> bool:
        return "HYBRID" in self.sharding_strategy

    def split_dims(self, mesh: MeshSpec) -> tuple[str, ...]:
        """The mesh dims a parameter's dim 0 is split over: the last (shard) dim,
        none under ``NO_SHARD``."""
        return () if self.sharding_strategy == "NO_SHARD" else mesh.dim_names[-1:]


Plan = DDPPlan | FSDP2Plan | FSDP1Plan


@attrs.frozen(repr=False)
class StateDictSpec(Spec):
    """``torch.distributed.checkpoint.state_dict.StateDictOptions``, as data."""

    full_state_dict: bool = attrs.field(default=False, validator=flag)
    cpu_offload: bool = attrs.field(default=False, validator=flag)
    ignore_frozen_params: bool = attrs.field(default=False, validator=flag)
    keep_submodule_prefixes: bool = attrs.field(default=True, validator=flag)
    strict: bool = attrs.field(default=True, validator=flag)
    flatten_optimizer_state_dict: bool = attrs.field(default=False, validator=flag)
    broadcast_from_rank0: bool = attrs.field(default=False, validator=flag)
    submodules: tuple[str, ...] = attrs.field(
        default=(), converter=as_tuple, validator=tuple_of(str)
    )

    def __attrs_post_init__(self) -> None:
        if self.broadcast_from_rank0 and not self.full_state_dict:
            raise SpecError(
                "broadcast_from_rank0=True needs full_state_dict=True "
                "(torch only broadcasts full state dicts)"
            )
        if not self.keep_submodule_prefixes and not self.submodules:
            raise SpecError(
                "keep_submodule_prefixes=False only means something with "
                "submodules=(...); set submodules or keep the prefixes"
            )


@attrs.frozen(repr=False)
class StorageSpec(Spec):
    """DCP ``FileSystemWriter`` options and the save mode."""

    single_file_per_rank: bool = attrs.field(default=True, validator=flag)
    thread_count: int = attrs.field(default=1, validator=[*positive, at_most(8)])
    async_save: bool = attrs.field(default=False, validator=flag)


@attrs.frozen(repr=False)
class Topology(Spec):
    """Where a state dict lives: world size, mesh, parallel plan, state-dict options."""

    world_size: int = attrs.field(validator=positive)
    mesh: MeshSpec = attrs.field(validator=instance_of(MeshSpec))
    plan: Plan = attrs.field(validator=instance_of(DDPPlan, FSDP2Plan, FSDP1Plan))
    state_dict: StateDictSpec = attrs.field(
        factory=StateDictSpec, validator=instance_of(StateDictSpec)
    )

    def __attrs_post_init__(self) -> None:
        if self.mesh.size != self.world_size:
            raise SpecError(
                f"mesh {self.mesh.shape} has {self.mesh.size} ranks but world_size "
                f"is {self.world_size}"
            )
        names = set(self.mesh.dim_names)
        if isinstance(self.plan, DDPPlan) and len(self.mesh.shape) != 1:
            raise SpecError(f"DDPPlan needs a 1D mesh, got shape {self.mesh.shape}")
        if isinstance(self.plan, FSDP2Plan) and set(self.plan.mesh_dims) != names:
            raise SpecError(
                f"{self.plan!r} uses mesh dims {sorted(self.plan.mesh_dims)} but the "
                f"mesh has dims {sorted(names)}; name every mesh dim in the plan"
            )
        if isinstance(self.plan, FSDP1Plan):
            want = 2 if self.plan.hybrid else 1
            if len(self.mesh.shape) != want:
                raise SpecError(
                    f"FSDP1Plan(sharding_strategy={self.plan.sharding_strategy!r}) "
                    f"needs a {want}D mesh, got shape {self.mesh.shape}"
                )
        plan = self.plan
        if (
            isinstance(plan, FSDP2Plan)
            and plan.replicate_dim is not None
            and self.mesh.dim_names.index(plan.replicate_dim)
            > self.mesh.dim_names.index(plan.shard_dim)
        ):
            raise SpecError(
                f"HSDP needs the replicate dim before the shard dim, got {self.mesh.dim_names}"
            )

    @property
    def plan_kind(self) -> str:
        """One word for the plan: ddp, fsdp2, hsdp, fsdp2+tp, hsdp+tp, submesh or fsdp1."""
        p = self.plan
        if isinstance(p, DDPPlan):
            return "ddp"
        if isinstance(p, FSDP1Plan):
            return "fsdp1"
        if p.experts:
            return "submesh"
        base = "hsdp" if p.replicate_dim else "fsdp2"
        return base + ("+tp" if p.tp else "")

    @property
    def shard_count(self) -> int:
        """How many ways a parameter's dim 0 is split by data-parallel sharding."""
        return self.mesh.size_of(self.plan.split_dims(self.mesh))

    @property
    def dp_size(self) -> int:
        """Number of distinct data shards (ranks that see different batches)."""
        p = self.plan
        if isinstance(p, FSDP2Plan) and p.tp:
            return self.world_size // self.mesh.dim_size(p.tp.dim)
        return self.world_size
