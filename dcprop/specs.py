"""Scenario specs: plain, frozen, picklable data that describe one dcprop example.

Nothing here imports torch.  Every class is a frozen, slotted attrs class whose
validators reject impossible values when the spec is built, and whose ``repr``
is valid Python that rebuilds an equal spec (``eval(repr(s), vars(dcprop.specs))``).
JSON serialisation lives apart, in :mod:`dcprop.serialization`.

A model is a tree of layers whose forward is fixed by the tree itself: containers
chain their children, so every spec that validates runs forward and backward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import attrs
from attrs import validators as v

from dcprop.errors import SpecError

__all__ = [
    "ACTIVATIONS",
    "DEVICES",
    "FSDP1_SHARDING_STRATEGIES",
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
    "LayerNorm",
    "Linear",
    "MeshSpec",
    "ModelSpec",
    "ModuleList",
    "OptimizerSpec",
    "Repeat",
    "Scenario",
    "SchedulerSpec",
    "Sequential",
    "StateDictSpec",
    "StorageSpec",
    "TensorParallel",
    "Topology",
    "TrainingSpec",
]

ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "identity")
DEVICES = ("cpu", "cuda")
SCHEDULERS = ("step", "linear")
FSDP1_SHARDING_STRATEGIES = (
    "FULL_SHARD",
    "SHARD_GRAD_OP",
    "NO_SHARD",
    "HYBRID_SHARD",
    "_HYBRID_SHARD_ZERO2",
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------- repr


def explicit_fields(spec: Any) -> list[tuple[str | None, Any]]:
    """The fields a constructor call must spell out: mandatory ones as ``(None, value)``
    (positional), then those that differ from their default as ``(name, value)``."""
    out: list[tuple[str | None, Any]] = []
    for a in attrs.fields(type(spec)):
        value = getattr(spec, a.name)
        if a.default is attrs.NOTHING:
            out.append((None, value))
            continue
        default = a.default.factory() if hasattr(a.default, "factory") else a.default
        if value != default:
            out.append((a.name, value))
    return out


def _spec_repr(self: Any) -> str:
    """Constructor-call repr that omits defaults: short, and valid Python."""
    parts = [repr(v) if n is None else f"{n}={v!r}" for n, v in explicit_fields(self)]
    return f"{type(self).__name__}({', '.join(parts)})"


class _Spec:
    """Base of every spec: the short, valid-Python repr (attrs' own is turned off)."""

    __slots__ = ()

    __repr__ = _spec_repr


_positive = [v.instance_of(int), v.ge(1)]
_non_negative = [v.instance_of(int), v.ge(0)]


def _names(value: Any) -> tuple[str, ...]:
    return tuple(value)


def _check_ident(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not _IDENT.match(value):
        raise SpecError(
            f"{attribute.name}={value!r} is not a valid module name (a Python identifier)"
        )


# ---------------------------------------------------------------------- the model


@attrs.frozen(repr=False)
class Linear(_Spec):
    """``nn.Linear``; with ``unused_input`` it also takes the model input and ignores it."""

    in_features: int = attrs.field(validator=_positive)
    out_features: int = attrs.field(validator=_positive)
    bias: bool = attrs.field(default=True, validator=v.instance_of(bool))
    unused_input: bool = attrs.field(default=False, validator=v.instance_of(bool))


@attrs.frozen(repr=False)
class Activation(_Spec):
    kind: str = attrs.field(default="relu", validator=v.in_(ACTIVATIONS))


@attrs.frozen(repr=False)
class LayerNorm(_Spec):
    dim: int = attrs.field(validator=_positive)
    elementwise_affine: bool = attrs.field(default=True, validator=v.instance_of(bool))


@attrs.frozen(repr=False)
class BatchNorm(_Spec):
    """``nn.BatchNorm1d``: parameters plus running-statistics buffers."""

    dim: int = attrs.field(validator=_positive)


@attrs.frozen(repr=False)
class Embedding(_Spec):
    """``nn.Embedding``; only valid as the model's first layer (its input is token ids)."""

    num_embeddings: int = attrs.field(validator=_positive)
    dim: int = attrs.field(validator=_positive)


def _layer_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value)


def _named_tuple(value: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((str(n), layer) for n, layer in value)


def _non_empty(_inst: Any, attribute: attrs.Attribute, value: tuple[Any, ...]) -> None:
    if not value:
        raise SpecError(f"{attribute.name} must hold at least one layer, got ()")


def _unique_child_names(_inst: Any, attribute: attrs.Attribute, value: tuple) -> None:
    names = [n for n, _ in value]
    for n in names:
        if not _IDENT.match(n):
            raise SpecError(f"child name {n!r} in {attribute.name} is not a Python identifier")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"{attribute.name} has duplicate child names {dupes}")


@attrs.frozen(repr=False)
class Sequential(_Spec):
    """``nn.Sequential``: children named ``0, 1, ...``, applied in order."""

    layers: tuple[Layer, ...] = attrs.field(converter=_layer_tuple, validator=_non_empty)


@attrs.frozen(repr=False)
class ModuleList(_Spec):
    """``nn.ModuleList`` whose entries are applied in order (like seed 000's ``module_list``)."""

    layers: tuple[Layer, ...] = attrs.field(converter=_layer_tuple, validator=_non_empty)


@attrs.frozen(repr=False)
class Block(_Spec):
    """A module with named children applied in order (``pretrain``, ``layer1``, ...)."""

    children: tuple[tuple[str, Layer], ...] = attrs.field(
        converter=_named_tuple, validator=[_non_empty, _unique_child_names]
    )


@attrs.frozen(repr=False)
class Branches(_Spec):
    """Children applied to the same input; outputs concatenated on the last dim.

    With ``concat_input`` the input itself is concatenated too, so a model input
    that requires grad reaches the loss even when no branch uses it (seed 003).
    """

    layers: tuple[Layer, ...] = attrs.field(converter=_layer_tuple, validator=_non_empty)
    concat_input: bool = attrs.field(default=False, validator=v.instance_of(bool))


@attrs.frozen(repr=False)
class Repeat(_Spec):
    """One module applied ``times`` times in one forward (seed 003's multi-traversal).

    With ``no_grad_residual`` each pass also adds ``body(x)`` computed under
    ``torch.no_grad()``: the same parameters used with and without autograd.
    """

    body: Layer = attrs.field()
    times: int = attrs.field(default=2, validator=[v.instance_of(int), v.ge(1), v.le(16)])
    no_grad_residual: bool = attrs.field(default=False, validator=v.instance_of(bool))


@attrs.frozen(repr=False)
class Experts(_Spec):
    """Expert modules (``x + sum(expert(x))``) that an :class:`ExpertParallel` plan
    places one per expert-parallel coordinate, each sharded on its own sub-mesh."""

    layers: tuple[Layer, ...] = attrs.field(converter=_layer_tuple, validator=_non_empty)


Layer = (
    Linear
    | Activation
    | LayerNorm
    | BatchNorm
    | Embedding
    | Sequential
    | ModuleList
    | Block
    | Branches
    | Repeat
    | Experts
)
LEAVES = (Linear, Activation, LayerNorm, BatchNorm, Embedding)
CONTAINERS = (Sequential, ModuleList, Block, Branches, Repeat, Experts)


def children_of(layer: Any) -> tuple[tuple[str, Any], ...]:
    """Named children, in the order torch registers them."""
    if isinstance(layer, Block):
        return layer.children
    if isinstance(layer, Repeat):
        return (("body", layer.body),)
    if isinstance(layer, (Sequential, ModuleList, Branches, Experts)):
        return tuple((str(i), c) for i, c in enumerate(layer.layers))
    return ()


def own_parameters(layer: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The parameters a leaf registers itself: ``(name, shape)`` pairs."""
    if isinstance(layer, Linear):
        out = [("weight", (layer.out_features, layer.in_features))]
        return tuple(out + ([("bias", (layer.out_features,))] if layer.bias else []))
    if isinstance(layer, LayerNorm) and layer.elementwise_affine:
        return (("weight", (layer.dim,)), ("bias", (layer.dim,)))
    if isinstance(layer, BatchNorm):
        return (("weight", (layer.dim,)), ("bias", (layer.dim,)))
    if isinstance(layer, Embedding):
        return (("weight", (layer.num_embeddings, layer.dim)),)
    return ()


def own_buffers(layer: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if isinstance(layer, BatchNorm):
        return (
            ("running_mean", (layer.dim,)),
            ("running_var", (layer.dim,)),
            ("num_batches_tracked", ()),
        )
    return ()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def walk(layer: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every module path and layer, parents before children (``named_modules`` order)."""
    yield prefix, layer
    for name, child in children_of(layer):
        yield from walk(child, _join(prefix, name))


def _flow(layer: Any, width: int | None, path: str) -> int:
    """Output width of ``layer`` given input width (None: token ids). Raises on mismatch."""
    where = path or "<root>"
    if isinstance(layer, Embedding):
        if width is not None:
            raise SpecError(
                f"Embedding at {where!r} must be the model's first layer: its input is token "
                f"ids, but it receives features of width {width}"
            )
        return layer.dim
    if width is None:
        if isinstance(layer, (Sequential, ModuleList, Block)):
            pass  # the first child decides
        else:
            raise SpecError(
                f"{type(layer).__name__} at {where!r} receives token ids; only an "
                "Embedding may be the first layer of a token model"
            )
    if isinstance(layer, Linear):
        if layer.in_features != width:
            raise SpecError(
                f"Linear at {where!r} has in_features={layer.in_features} but its "
                f"input has width {width}"
            )
        return layer.out_features
    if isinstance(layer, (LayerNorm, BatchNorm)):
        if layer.dim != width:
            raise SpecError(
                f"{type(layer).__name__} at {where!r} has dim={layer.dim} but its "
                f"input has width {width}"
            )
        return width  # type: ignore[return-value]
    if isinstance(layer, Activation):
        return width  # type: ignore[return-value]
    if isinstance(layer, (Sequential, ModuleList, Block)):
        w = width
        for name, child in children_of(layer):
            w = _flow(child, w, _join(path, name))
        return w  # type: ignore[return-value]
    if isinstance(layer, Branches):
        outs = [_flow(c, width, _join(path, n)) for n, c in children_of(layer)]
        return sum(outs) + (width if layer.concat_input else 0)  # type: ignore[operator]
    if isinstance(layer, (Repeat, Experts)):
        for name, child in children_of(layer):
            out = _flow(child, width, _join(path, name))
            if out != width:
                raise SpecError(
                    f"{type(layer).__name__} at {where!r} needs children that keep the "
                    f"width, but {_join(path, name)!r} maps {width} -> {out}"
                )
        return width  # type: ignore[return-value]
    raise SpecError(f"unknown layer {layer!r} at {where!r}")


def _tie_tuple(value: Any) -> tuple[tuple[str, str], ...]:
    return tuple((str(a), str(b)) for a, b in value)


@attrs.frozen(repr=False)
class ModelSpec(_Spec):
    """A whole model: a root :class:`Block`, and weight ties.

    ``ties`` holds ``(source, target)`` module paths: the target's ``weight`` is the
    source's ``weight`` (one ``nn.Parameter`` shared by two modules).

    >>> ModelSpec(Block((("fc", Linear(4, 8)), ("act", Activation()))))
    ModelSpec(Block((('fc', Linear(4, 8)), ('act', Activation()))))
    """

    root: Block = attrs.field(validator=v.instance_of(Block))
    ties: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_tie_tuple)

    def __attrs_post_init__(self) -> None:
        first = self.first_leaf()
        _flow(self.root, None if isinstance(first, Embedding) else self.in_features, "")
        modules = dict(self.modules())
        for src, dst in self.ties:
            for p in (src, dst):
                if p not in modules:
                    raise SpecError(f"tie ({src!r}, {dst!r}): no module at {p!r}")
            shapes = [dict(own_parameters(modules[p])).get("weight") for p in (src, dst)]
            if None in shapes or shapes[0] != shapes[1]:
                raise SpecError(
                    f"tie ({src!r}, {dst!r}): weights must exist and have one shape, "
                    f"got {shapes[0]} and {shapes[1]}"
                )
        targets = [d for _, d in self.ties]
        if len(set(targets)) != len(targets) or set(targets) & {s for s, _ in self.ties}:
            raise SpecError(f"ties {self.ties} must not chain or repeat a target")

    # -- shape of the model ------------------------------------------------------
    def first_leaf(self) -> Any:
        for _, layer in walk(self.root):
            if isinstance(layer, LEAVES):
                return layer
        raise SpecError("model has no layers")

    @property
    def takes_tokens(self) -> bool:
        return isinstance(self.first_leaf(), Embedding)

    @property
    def in_features(self) -> int:
        """Input width (for a token model: the vocabulary size)."""
        first = self.first_leaf()
        if isinstance(first, Embedding):
            return first.num_embeddings
        if isinstance(first, Linear):
            return first.in_features
        if isinstance(first, (LayerNorm, BatchNorm)):
            return first.dim
        raise SpecError(
            "the model's first layer must fix the input width (Linear, LayerNorm, "
            f"BatchNorm or Embedding), got {first!r}"
        )

    @property
    def out_features(self) -> int:
        return _flow(self.root, None if self.takes_tokens else self.in_features, "")

    def modules(self) -> Iterator[tuple[str, Any]]:
        return walk(self.root)

    def module(self, path: str) -> Any:
        for p, layer in self.modules():
            if p == path:
                return layer
        raise SpecError(f"no module at path {path!r}")

    def parameters(self) -> dict[str, tuple[int, ...]]:
        """Parameter FQN -> shape, deduplicated like ``named_parameters()``."""
        return {names[0]: shape for names, shape in self._tensors().values()}

    def parameter_names(self) -> tuple[str, ...]:
        return tuple(self.parameters())

    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Parameter FQN -> every name a state dict lists that tensor under (the FQN
        first; a tied weight has more than one)."""
        return {names[0]: tuple(names) for names, _ in self._tensors().values()}

    def _tensors(self) -> dict[str, tuple[list[str], tuple[int, ...]]]:
        tied = {dst: src for src, dst in self.ties}
        out: dict[str, tuple[list[str], tuple[int, ...]]] = {}
        for path, layer in self.modules():
            for name, shape in own_parameters(layer):
                # the owning module of a tied weight is its source: one tensor, many names
                owner = tied.get(path, path) if name == "weight" else path
                out.setdefault(f"{owner}#{name}", ([], shape))[0].append(_join(path, name))
        return out

    def state_dict_names(self) -> tuple[str, ...]:
        """Parameter names as a model state dict lists them: a tied weight under each name."""
        return tuple(_join(p, n) for p, layer in self.modules() for n, _ in own_parameters(layer))

    def buffers(self) -> dict[str, tuple[int, ...]]:
        return {_join(p, n): s for p, layer in self.modules() for n, s in own_buffers(layer)}

    def has_batch_statistics(self) -> bool:
        return any(isinstance(layer, BatchNorm) for _, layer in self.modules())

    def feeding(self, path: str) -> frozenset[str]:
        """Parameter FQNs whose values reach the input of the module at ``path``: those
        of every layer applied before it, and of an enclosing :class:`Repeat`'s body
        (a later pass sees what earlier passes computed)."""
        self.module(path)  # raises on an unknown path
        canonical = {alias: fqn for fqn, names in self.aliases().items() for alias in names}

        def inside(layer: Any, prefix: str) -> set[str]:
            return {
                canonical[_join(p, n)]
                for p, leaf in walk(layer, prefix)
                for n, _ in own_parameters(leaf)
            }

        def before(layer: Any, prefix: str) -> set[str]:
            if prefix == path:
                return set()
            upstream: set[str] = set()
            for name, child in children_of(layer):
                child_path = _join(prefix, name)
                if is_within(path, child_path):
                    if isinstance(layer, Repeat) and (layer.times > 1 or layer.no_grad_residual):
                        upstream |= inside(child, child_path)
                    return upstream | before(child, child_path)
                if not isinstance(layer, (Branches, Experts)):  # siblings see the same input
                    upstream |= inside(child, child_path)
            return upstream

        return frozenset(before(self.root, ""))


# ------------------------------------------------------------------ the topology


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in value)


@attrs.frozen(repr=False)
class MeshSpec(_Spec):
    """A ``DeviceMesh`` shape with dim names; 1 to 3 dims, dims of size 1 allowed.

    >>> MeshSpec((2, 2), ("replicate", "shard")).size
    4
    """

    shape: tuple[int, ...] = attrs.field(converter=_shape)
    dim_names: tuple[str, ...] = attrs.field(converter=_names)

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
            if not _IDENT.match(n):
                raise SpecError(f"mesh dim name {n!r} is not an identifier")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def dim_size(self, name: str) -> int:
        return self.shape[self.dim_names.index(name)]


@attrs.frozen(repr=False)
class DDPPlan(_Spec):
    """``DistributedDataParallel`` over a 1D mesh."""


@attrs.frozen(repr=False)
class TensorParallel(_Spec):
    """Tensor parallel on mesh dim ``dim``: each pair is (colwise Linear, rowwise Linear)."""

    dim: str = attrs.field(validator=_check_ident)
    pairs: tuple[tuple[str, str], ...] = attrs.field(converter=_tie_tuple, validator=_non_empty)


@attrs.frozen(repr=False)
class ExpertParallel(_Spec):
    """Seed 004's layout: the experts of the :class:`Experts` module at ``module`` are
    spread over mesh dim ``dim`` (expert ``e`` lives on the ranks whose coordinate on
    ``dim`` is ``e``) and each is sharded on the sub-mesh of the remaining dim; every
    other module is sharded on the whole mesh, flattened."""

    module: str = attrs.field(validator=v.instance_of(str))
    dim: str = attrs.field(default="ep", validator=_check_ident)


@attrs.frozen(repr=False)
class FSDP2Plan(_Spec):
    """``fully_shard`` on each path in ``wrap`` (deepest first), then on the root.

    ``replicate_dim`` set makes it HSDP (replicate x shard); ``tp`` applies tensor
    parallel first on its own mesh dim; ``experts`` gives the sub-mesh layout.
    """

    shard_dim: str = attrs.field(default="shard", validator=_check_ident)
    wrap: tuple[str, ...] = attrs.field(default=(), converter=_names)
    reshard_after_forward: bool = attrs.field(default=True, validator=v.instance_of(bool))
    replicate_dim: str | None = attrs.field(default=None, validator=v.optional(_check_ident))
    tp: TensorParallel | None = attrs.field(
        default=None, validator=v.optional(v.instance_of(TensorParallel))
    )
    experts: ExpertParallel | None = attrs.field(
        default=None, validator=v.optional(v.instance_of(ExpertParallel))
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


@attrs.frozen(repr=False)
class FSDP1Plan(_Spec):
    """``FullyShardedDataParallel`` (FSDP1). Validates anywhere; runs on CUDA only."""

    sharding_strategy: str = attrs.field(
        default="FULL_SHARD", validator=v.in_(FSDP1_SHARDING_STRATEGIES)
    )
    use_orig_params: bool = attrs.field(default=True, validator=v.instance_of(bool))
    cpu_offload: bool = attrs.field(default=False, validator=v.instance_of(bool))
    mixed_precision: str | None = attrs.field(
        default=None, validator=v.optional(v.in_(("fp16", "bf16")))
    )
    backward_prefetch: str | None = attrs.field(
        default=None, validator=v.optional(v.in_(("BACKWARD_PRE", "BACKWARD_POST")))
    )
    wrap: tuple[str, ...] = attrs.field(default=(), converter=_names)

    @property
    def hybrid(self) -> bool:
        return "HYBRID" in self.sharding_strategy


Plan = DDPPlan | FSDP2Plan | FSDP1Plan


@attrs.frozen(repr=False)
class StateDictSpec(_Spec):
    """``torch.distributed.checkpoint.state_dict.StateDictOptions``, as data."""

    full_state_dict: bool = attrs.field(default=False, validator=v.instance_of(bool))
    cpu_offload: bool = attrs.field(default=False, validator=v.instance_of(bool))
    ignore_frozen_params: bool = attrs.field(default=False, validator=v.instance_of(bool))
    keep_submodule_prefixes: bool = attrs.field(default=True, validator=v.instance_of(bool))
    strict: bool = attrs.field(default=True, validator=v.instance_of(bool))
    flatten_optimizer_state_dict: bool = attrs.field(default=False, validator=v.instance_of(bool))
    broadcast_from_rank0: bool = attrs.field(default=False, validator=v.instance_of(bool))
    submodules: tuple[str, ...] = attrs.field(default=(), converter=_names)

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
class StorageSpec(_Spec):
    """DCP ``FileSystemWriter`` options and the save mode."""

    single_file_per_rank: bool = attrs.field(default=True, validator=v.instance_of(bool))
    thread_count: int = attrs.field(default=1, validator=[v.instance_of(int), v.ge(1), v.le(8)])
    async_save: bool = attrs.field(default=False, validator=v.instance_of(bool))


@attrs.frozen(repr=False)
class Topology(_Spec):
    """Where a state dict lives: world size, mesh, parallel plan, state-dict options."""

    world_size: int = attrs.field(validator=_positive)
    mesh: MeshSpec = attrs.field(validator=v.instance_of(MeshSpec))
    plan: Plan = attrs.field(validator=v.instance_of((DDPPlan, FSDP2Plan, FSDP1Plan)))
    state_dict: StateDictSpec = attrs.field(
        factory=StateDictSpec, validator=v.instance_of(StateDictSpec)
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
        p = self.plan
        if isinstance(p, DDPPlan):
            return 1
        if isinstance(p, FSDP1Plan):
            if p.sharding_strategy == "NO_SHARD":
                return 1
            return self.mesh.shape[-1]
        if p.experts:
            return self.world_size
        return self.mesh.dim_size(p.shard_dim)

    @property
    def dp_size(self) -> int:
        """Number of distinct data shards (ranks that see different batches)."""
        p = self.plan
        if isinstance(p, FSDP2Plan) and p.tp:
            return self.world_size // self.mesh.dim_size(p.tp.dim)
        return self.world_size


@attrs.frozen(repr=False)
class SchedulerSpec(_Spec):
    """An LR scheduler, stepped after every optimizer step and saved with the optimizer:
    ``"step"`` is ``StepLR(step_size=period, gamma=factor)``, ``"linear"`` is
    ``LinearLR(start_factor=factor, total_iters=period)``."""

    kind: str = attrs.field(default="step", validator=v.in_(SCHEDULERS))
    period: int = attrs.field(default=1, validator=[v.instance_of(int), v.ge(1), v.le(64)])
    factor: float = attrs.field(default=0.5, converter=float, validator=[v.gt(0.0), v.le(1.0)])


@attrs.frozen(repr=False)
class OptimizerSpec(_Spec):
    """SGD (with or without momentum), Adam, or AdamW; optionally with an LR scheduler."""

    kind: str = attrs.field(default="sgd", validator=v.in_(("sgd", "adam", "adamw")))
    lr: float = attrs.field(default=0.01, converter=float, validator=v.gt(0.0))
    momentum: float = attrs.field(default=0.0, converter=float, validator=[v.ge(0.0), v.lt(1.0)])
    weight_decay: float = attrs.field(default=0.0, converter=float, validator=v.ge(0.0))
    scheduler: SchedulerSpec | None = attrs.field(
        default=None, validator=v.optional(v.instance_of(SchedulerSpec))
    )

    def __attrs_post_init__(self) -> None:
        if self.momentum and self.kind != "sgd":
            raise SpecError(f"momentum={self.momentum} is an SGD option; {self.kind} has betas")


@attrs.frozen(repr=False)
class TrainingSpec(_Spec):
    """How many optimizer steps, the per-rank batch, and the data seed."""

    steps: int = attrs.field(default=1, validator=[v.instance_of(int), v.ge(1), v.le(64)])
    batch_size: int = attrs.field(default=1, validator=_positive)
    input_requires_grad: bool = attrs.field(default=False, validator=v.instance_of(bool))
    data_seed: int = attrs.field(default=0, validator=_non_negative)


def _module_paths(model: ModelSpec) -> dict[str, Any]:
    return dict(model.modules())


def _check_wrap(model: ModelSpec, wrap: tuple[str, ...], what: str) -> None:
    modules = _module_paths(model)
    for p in wrap:
        if p not in modules or p == "":
            raise SpecError(
                f"{what} wraps {p!r}, which is not a submodule path of the model "
                f"(paths: {sorted(m for m in modules if m)[:12]})"
            )
    if len(set(wrap)) != len(wrap):
        raise SpecError(f"{what} wraps a path twice: {wrap}")
    for src, dst in model.ties:
        for p in wrap:
            inside = [is_within(x, p) for x in (src, dst)]
            if inside[0] != inside[1]:
                raise SpecError(
                    f"{what} wraps {p!r}, which holds one side of the tie "
                    f"({src!r}, {dst!r}) but not the other; a shared weight must "
                    "live in one sharded unit"
                )


def is_within(path: str, prefix: str) -> bool:
    """``path`` is the module path ``prefix`` or lies inside it."""
    return path == prefix or path.startswith(prefix + ".")


def expert_index(name: str, experts: str) -> int | None:
    """Which expert of the ``Experts`` module at ``experts`` the name lies in (None:
    outside it): ``expert_index("moe.2.fc.weight", "moe") == 2``."""
    if not name.startswith(experts + "."):
        return None
    return int(name[len(experts) + 1 :].split(".", 1)[0])


def _check_tp(model: ModelSpec, topo: Topology, tp: TensorParallel) -> None:
    modules = _module_paths(model)
    size = topo.mesh.dim_size(tp.dim)
    tied = {p for t in model.ties for p in t}
    for col, row in tp.pairs:
        for p in (col, row):
            if not isinstance(modules.get(p), Linear):
                raise SpecError(f"tensor-parallel pair ({col!r}, {row!r}): {p!r} is not a Linear")
            if p in tied:
                raise SpecError(f"tensor-parallel pair ({col!r}, {row!r}): {p!r} has a tied weight")
        c, r = modules[col], modules[row]
        if c.out_features != r.in_features:
            raise SpecError(
                f"tensor-parallel pair ({col!r}, {row!r}): colwise out_features="
                f"{c.out_features} != rowwise in_features={r.in_features}"
            )
        if c.out_features % size:
            raise SpecError(
                f"tensor-parallel pair ({col!r}, {row!r}): the hidden width "
                f"{c.out_features} must be divisible by mesh dim {tp.dim!r} of size "
                f"{size} ({c.out_features} % {size} = {c.out_features % size})"
            )
        parent_c, _, name_c = col.rpartition(".")
        parent_r, _, name_r = row.rpartition(".")
        parent = modules.get(parent_c)
        ok = parent_c == parent_r and isinstance(parent, (Sequential, ModuleList, Block))
        if ok:
            names = [n for n, _ in children_of(parent)]
            between = children_of(parent)[names.index(name_c) + 1 : names.index(name_r)]
            ok = names.index(name_c) < names.index(name_r) and all(
                isinstance(x, Activation) for _, x in between
            )
        if not ok:
            raise SpecError(
                f"tensor-parallel pair ({col!r}, {row!r}) must be siblings in order "
                "with only activations between them"
            )


def _check_experts(model: ModelSpec, topo: Topology, ep: ExpertParallel) -> None:
    layer = _module_paths(model).get(ep.module)
    if not isinstance(layer, Experts):
        raise SpecError(f"ExpertParallel(module={ep.module!r}) must name an Experts module")
    size = topo.mesh.dim_size(ep.dim)
    if len(layer.layers) != size:
        raise SpecError(
            f"Experts at {ep.module!r} has {len(layer.layers)} experts but mesh dim "
            f"{ep.dim!r} has size {size}; one expert per coordinate"
        )
    for src, dst in model.ties:
        if is_within(src, ep.module) or is_within(dst, ep.module):
            raise SpecError(f"tie ({src!r}, {dst!r}) reaches into the experts at {ep.module!r}")


def _check_topology(
    model: ModelSpec, topo: Topology, device: str, frozen: tuple[str, ...], which: str
) -> None:
    plan = topo.plan
    if isinstance(plan, FSDP1Plan):
        if device != "cuda":
            raise SpecError(
                f"{which} topology uses {plan!r}, which needs device='cuda' "
                f"(FSDP1 refuses CPU ranks), got device={device!r}"
            )
        _check_wrap(model, plan.wrap, f"{which} plan")
        if not plan.use_orig_params:
            _check_uniform_frozen(model, plan.wrap, frozen, which)
    if isinstance(plan, FSDP2Plan):
        _check_wrap(model, plan.wrap, f"{which} plan")
        if plan.tp:
            _check_tp(model, topo, plan.tp)
        if plan.experts:
            _check_experts(model, topo, plan.experts)
            _check_every_rank_trains(model, plan.experts, frozen, which)
            for p in plan.wrap:
                if is_within(p, plan.experts.module):
                    raise SpecError(
                        f"{which} plan wraps {p!r}, inside the experts at "
                        f"{plan.experts.module!r} (they get their own sub-mesh)"
                    )
    for sub in topo.state_dict.submodules:
        if sub not in _module_paths(model) or sub == "":
            raise SpecError(f"{which} state_dict submodules names {sub!r}, not a submodule path")


def _check_every_rank_trains(
    model: ModelSpec, ep: ExpertParallel, frozen: tuple[str, ...], which: str
) -> None:
    """Under an expert layout a rank holds the shared parameters and its own expert; an
    optimizer over nothing is an error, so each rank needs something trainable."""
    trainable = [n for n in model.parameter_names() if n not in set(frozen)]
    prefix = ep.module + "."
    if any(not n.startswith(prefix) for n in trainable):
        return
    experts = len(model.module(ep.module).layers)
    idle = [e for e in range(experts) if not any(n.startswith(f"{prefix}{e}.") for n in trainable)]
    if idle:
        raise SpecError(
            f"{which} plan: the ranks of expert(s) {idle} have nothing to train "
            "(their expert and every shared parameter are frozen)"
        )


def _check_uniform_frozen(
    model: ModelSpec, wrap: tuple[str, ...], frozen: tuple[str, ...], which: str
) -> None:
    """FSDP1 without use_orig_params flattens a unit's parameters into one tensor,
    which cannot mix requires_grad values."""
    units: dict[str, set[bool]] = {}
    for name in model.parameter_names():
        owners = [w for w in wrap if is_within(name, w)]
        unit = max(owners, key=len) if owners else ""
        units.setdefault(unit, set()).add(name in frozen)
    for unit, flags in units.items():
        if len(flags) > 1:
            raise SpecError(
                f"{which} FSDP1 plan with use_orig_params=False: unit "
                f"{unit or '<root>'!r} mixes frozen and trainable parameters"
            )


def _frozen_tuple(value: Any) -> tuple[str, ...]:
    return tuple(sorted(value))


@attrs.frozen(repr=False)
class Scenario(_Spec):
    """Everything one property run needs.

    ``load`` is the topology the checkpoint is loaded on (``None``: the same as
    ``save``).  ``pretrained`` names the submodule that a fine-tuning run loads from
    a pretraining checkpoint (seeds 000/001).  ``seed`` fixes model initialisation.
    ``job_world_size`` is the size of the job (the default process group) the model
    runs in: ``None``, the model's own world; larger, the model lives on the first
    ranks of a bigger job, and the ranks beyond its world hold no model.

    >>> m = ModelSpec(Block((("fc", Linear(4, 4)),)))
    >>> Scenario(m, save=Topology(2, MeshSpec((2,), ("shard",)), FSDP2Plan())).world_size
    2
    """

    model: ModelSpec = attrs.field(validator=v.instance_of(ModelSpec))
    save: Topology = attrs.field(validator=v.instance_of(Topology))
    load: Topology | None = attrs.field(default=None, validator=v.optional(v.instance_of(Topology)))
    frozen: tuple[str, ...] = attrs.field(default=(), converter=_frozen_tuple)
    optimizer: OptimizerSpec = attrs.field(
        factory=OptimizerSpec, validator=v.instance_of(OptimizerSpec)
    )
    training: TrainingSpec = attrs.field(
        factory=TrainingSpec, validator=v.instance_of(TrainingSpec)
    )
    storage: StorageSpec = attrs.field(factory=StorageSpec, validator=v.instance_of(StorageSpec))
    pretrained: str | None = attrs.field(default=None)
    seed: int = attrs.field(default=0, validator=_non_negative)
    device: str = attrs.field(default="cpu", validator=v.in_(DEVICES))
    job_world_size: int | None = attrs.field(default=None, validator=v.optional(_positive))

    def __attrs_post_init__(self) -> None:
        if self.job_world_size is not None and self.job_world_size < self.world_size:
            raise SpecError(
                f"job_world_size={self.job_world_size} is smaller than the model's world "
                f"({self.world_size} ranks): the job must hold the model, so use None or "
                f"at least {self.world_size}"
            )
        params = set(self.model.parameter_names())
        unknown = sorted(set(self.frozen) - params)
        if unknown:
            raise SpecError(
                f"frozen names {unknown} are not parameters of the model "
                f"(parameters: {sorted(params)[:12]})"
            )
        if params and set(self.frozen) == params:
            raise SpecError(
                f"frozen={self.frozen} freezes every parameter, so the optimizer would "
                "have nothing to train: leave at least one parameter out of frozen"
            )
        if self.model.takes_tokens and self.training.input_requires_grad:
            raise SpecError(
                "training.input_requires_grad=True needs float input, but the model "
                "starts with an Embedding (token ids cannot require grad)"
            )
        if self.model.has_batch_statistics() and self.training.batch_size < 2:
            raise SpecError(
                f"training.batch_size={self.training.batch_size}: BatchNorm needs at "
                "least 2 rows per rank in training mode"
            )
        for which, topo in (("save", self.save), ("load", self.load)):
            if topo is not None:
                _check_topology(self.model, topo, self.device, self.frozen, which)
        if self.pretrained is not None:
            layer = _module_paths(self.model).get(self.pretrained)
            if self.pretrained == "" or layer is None:
                raise SpecError(f"pretrained={self.pretrained!r} is not a submodule path")
            if self.pretrained_model is None:
                raise SpecError(
                    f"pretrained={self.pretrained!r} must be a Block directly under "
                    "the root, so it can be saved and loaded as a model of its own"
                )

    @property
    def world_size(self) -> int:
        """Ranks the example needs: the larger of the save and load worlds."""
        return max(self.save.world_size, self.load_topology.world_size)

    @property
    def job_world(self) -> int:
        """Ranks of the job (the default process group) the example runs in."""
        return self.job_world_size or self.world_size

    @property
    def meshes(self) -> tuple[MeshSpec, ...]:
        """The device meshes an example over this scenario asks the runner for."""
        load = self.load_topology.mesh
        return (self.save.mesh,) if load == self.save.mesh else (self.save.mesh, load)

    @property
    def load_topology(self) -> Topology:
        return self.save if self.load is None else self.load

    @property
    def fine_tuning_frozen(self) -> tuple[str, ...]:
        """The parameters frozen while fine-tuning: ``frozen`` and the whole pretrained
        submodule (fine-tuning trains on top of it, and saves without it)."""
        if self.pretrained is None:
            return self.frozen
        inside = {n for n in self.model.parameter_names() if is_within(n, self.pretrained)}
        return tuple(sorted(set(self.frozen) | inside))

    @property
    def frozen_state_dict_names(self) -> frozenset[str]:
        """Every name a state dict lists a frozen parameter under (tied aliases too)."""
        aliases = self.model.aliases()
        return frozenset(n for p in self.frozen for n in aliases[p])

    @property
    def pretrained_model(self) -> ModelSpec | None:
        if self.pretrained is None:
            return None
        layer = dict(self.model.root.children).get(self.pretrained)
        if not isinstance(layer, Block):
            return None
        ties = tuple(
            (s.split(".", 1)[1], d.split(".", 1)[1])
            for s, d in self.model.ties
            if is_within(s, self.pretrained) and is_within(d, self.pretrained)
        )
        return ModelSpec(layer, ties)
