"""The model: a tree of layers whose forward is fixed by the tree itself.

Containers chain their children, so every spec that validates runs forward and
backward; :func:`output_width` is the width algebra that proves it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from dcprop.errors import SpecError
from dcprop.specs._base import (
    IDENTIFIER,
    Spec,
    as_pairs,
    as_tuple,
    at_least,
    at_most,
    flag,
    instance_of,
    non_empty,
    non_negative,
    one_of,
    pairs_of,
    positive,
    tuple_of,
)

ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "identity")
#: Parameter dtypes a :class:`Linear` may hold; the first is every other layer's.
DTYPES = ("fp32", "bf16", "fp16")


@attrs.frozen(repr=False)
class Linear(Spec):
    """``nn.Linear``; with ``unused_input`` it also takes the model input and ignores it.

    ``dtype`` other than ``"fp32"`` keeps weight and bias in bf16 or fp16 beside the
    model's float32 parameters: the layer computes in its dtype and hands float32 on.
    """

    in_features: int = attrs.field(validator=positive)
    out_features: int = attrs.field(validator=positive)
    bias: bool = attrs.field(default=True, validator=flag)
    unused_input: bool = attrs.field(default=False, validator=flag)
    dtype: str = attrs.field(default="fp32", validator=one_of(DTYPES))


@attrs.frozen(repr=False)
class Activation(Spec):
    kind: str = attrs.field(default="relu", validator=one_of(ACTIVATIONS))


@attrs.frozen(repr=False)
class LayerNorm(Spec):
    dim: int = attrs.field(validator=positive)
    elementwise_affine: bool = attrs.field(default=True, validator=flag)


@attrs.frozen(repr=False)
class BatchNorm(Spec):
    """``nn.BatchNorm1d``: parameters plus running-statistics buffers."""

    dim: int = attrs.field(validator=positive)


@attrs.frozen(repr=False)
class Embedding(Spec):
    """``nn.Embedding``; only valid as the model's first layer (its input is token ids)."""

    num_embeddings: int = attrs.field(validator=positive)
    dim: int = attrs.field(validator=positive)


@attrs.frozen(repr=False)
class Mask(Spec):
    """A fixed sign mask: ``where(keep, x, -x)`` with ``keep`` a persistent bool buffer.

    With ``cache`` it also adds ``cache``, a float buffer registered with
    ``persistent=False``: derived from the spec like a rotary-embedding table, rebuilt
    by every constructor, and never part of a state dict.
    """

    dim: int = attrs.field(validator=positive)
    cache: bool = attrs.field(default=False, validator=flag)


# A container's children are checked against LAYERS, defined once every layer class
# exists, so these look it up when they run.
def _layer(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    instance_of(*LAYERS)(inst, attribute, value)


def _layers(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    tuple_of(*LAYERS)(inst, attribute, value)


def _named_layers(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    pairs_of(str, *LAYERS)(inst, attribute, value)


def _unique_child_names(_inst: Any, attribute: attrs.Attribute, value: tuple) -> None:
    names = [n for n, _ in value]
    for n in names:
        if not isinstance(n, str) or not IDENTIFIER.match(n):
            raise SpecError(f"child name {n!r} in {attribute.name} is not a Python identifier")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"{attribute.name} has duplicate child names {dupes}")


@attrs.frozen(repr=False)
class Sequential(Spec):
    """``nn.Sequential``: children named ``0, 1, ...``, applied in order."""

    layers: tuple[Layer, ...] = attrs.field(converter=as_tuple, validator=[_layers, non_empty])


@attrs.frozen(repr=False)
class ModuleList(Spec):
    """``nn.ModuleList`` whose entries are applied in order (like ``module_list`` in PyTorch's
    ``test/distributed/checkpoint/e2e/test_fine_tuning.py``)."""

    layers: tuple[Layer, ...] = attrs.field(converter=as_tuple, validator=[_layers, non_empty])


@attrs.frozen(repr=False)
class Block(Spec):
    """A module with named children applied in order (``pretrain``, ``layer1``, ...)."""

    children: tuple[tuple[str, Layer], ...] = attrs.field(
        converter=as_pairs, validator=[_named_layers, non_empty, _unique_child_names]
    )


@attrs.frozen(repr=False)
class Branches(Spec):
    """Children applied to the same input; outputs concatenated on the last dim.

    With ``concat_input`` the input itself is concatenated too, so a model input
    that requires grad reaches the loss even when no branch uses it (PyTorch's
    ``test/distributed/fsdp/test_fsdp_fine_tune.py``).
    """

    layers: tuple[Layer, ...] = attrs.field(converter=as_tuple, validator=[_layers, non_empty])
    concat_input: bool = attrs.field(default=False, validator=flag)


@attrs.frozen(repr=False)
class Repeat(Spec):
    """One module applied ``times`` times in one forward (the multi-traversal of PyTorch's
    ``test/distributed/fsdp/test_fsdp_fine_tune.py``).

    With ``no_grad_residual`` each pass also adds ``body(x)`` computed under
    ``torch.no_grad()``: the same parameters used with and without autograd.
    """

    body: Layer = attrs.field(validator=_layer)
    times: int = attrs.field(default=2, validator=[*positive, at_most(16)])
    no_grad_residual: bool = attrs.field(default=False, validator=flag)


@attrs.frozen(repr=False)
class Experts(Spec):
    """Expert modules (``x + sum(expert(x))``) that an :class:`ExpertParallel` plan
    places one per expert-parallel coordinate, each sharded on its own sub-mesh."""

    layers: tuple[Layer, ...] = attrs.field(converter=as_tuple, validator=[_layers, non_empty])


@attrs.frozen(repr=False)
class Skip(Spec):
    """``body`` on the training steps ``s`` with ``s % period == phase``, the identity on
    the others: a branch (an expert no token was routed to) that a step leaves without
    gradients, so that a checkpoint may hold no optimizer state for it.

    The module counts its forward calls in ``calls``, a persistent int64 buffer that
    training updates: a resumed job gates as the uninterrupted one only if it was
    restored.  One call per step, so a Skip may not lie inside a :class:`Repeat`.
    """

    body: Layer = attrs.field(validator=_layer)
    period: int = attrs.field(default=2, validator=[*positive, at_least(2), at_most(16)])
    phase: int = attrs.field(default=0, validator=non_negative)

    def __attrs_post_init__(self) -> None:
        if self.phase >= self.period:
            raise SpecError(f"phase={self.phase}: must be < period={self.period}")

    def used_at(self, call: int) -> bool:
        """Whether the ``call``-th forward (0-based) applies the body."""
        return call % self.period == self.phase


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
    | Mask
    | Skip
)


LAYERS = (
    Linear,
    Activation,
    LayerNorm,
    BatchNorm,
    Embedding,
    Sequential,
    ModuleList,
    Block,
    Branches,
    Repeat,
    Experts,
    Mask,
    Skip,
)
LEAVES = (Linear, Activation, LayerNorm, BatchNorm, Embedding, Mask)


def children_of(layer: Any) -> tuple[tuple[str, Any], ...]:
    """Named children, in the order torch registers them."""
    if isinstance(layer, Block):
        return layer.children
    if isinstance(layer, (Repeat, Skip)):
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


#: The running statistics torch's BatchNorm keeps; the variance must stay positive.
RUNNING_MEAN, RUNNING_VAR = "running_mean", "running_var"


def own_buffers(layer: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The persistent buffers a layer registers itself: ``(name, shape)`` pairs."""
    if isinstance(layer, BatchNorm):
        return (
            (RUNNING_MEAN, (layer.dim,)),
            (RUNNING_VAR, (layer.dim,)),
            ("num_batches_tracked", ()),
        )
    if isinstance(layer, Mask):
        return (("keep", (layer.dim,)),)
    if isinstance(layer, Skip):
        return (("calls", ()),)
    return ()


def own_non_persistent_buffers(layer: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The buffers a layer registers with ``persistent=False``: never in a state dict."""
    if isinstance(layer, Mask) and layer.cache:
        return (("cache", (layer.dim,)),)
    return ()


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def is_within(path: str, prefix: str) -> bool:
    """``path`` is the module path ``prefix`` or lies inside it."""
    return path == prefix or path.startswith(prefix + ".")


def expert_index(name: str, experts: str) -> int | None:
    """Which expert of the ``Experts`` module at ``experts`` the name lies in (None:
    outside it): ``expert_index("moe.2.fc.weight", "moe") == 2``."""
    if not name.startswith(experts + "."):
        return None
    return int(name[len(experts) + 1 :].split(".", 1)[0])


def walk(layer: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every module path and layer, parents before children (``named_modules`` order)."""
    yield prefix, layer
    for name, child in children_of(layer):
        yield from walk(child, join(prefix, name))


def output_width(layer: Any, width: int | None, path: str) -> int:
    """Output width of ``layer`` given its input width (None: token ids); raises
    :class:`SpecError` where a layer cannot take its input."""
    if width is None and not isinstance(layer, (Embedding, *_CHAINS)):
        raise SpecError(
            f"{type(layer).__name__} at {path or '<root>'!r} receives token ids; only an "
            "Embedding may be the first layer of a token model"
        )
    return _WIDTH_RULES[type(layer)](layer, width, path)


_CHAINS = (Sequential, ModuleList, Block)


def _embedding_width(layer: Embedding, width: int | None, path: str) -> int:
    if width is not None:
        raise SpecError(
            f"Embedding at {path or '<root>'!r} must be the model's first layer: its input "
            f"is token ids, but it receives features of width {width}"
        )
    return layer.dim


def _linear_width(layer: Linear, width: int, path: str) -> int:
    if layer.in_features != width:
        raise SpecError(
            f"Linear at {path or '<root>'!r} has in_features={layer.in_features} but its "
            f"input has width {width}"
        )
    return layer.out_features


def _norm_width(layer: LayerNorm | BatchNorm | Mask, width: int, path: str) -> int:
    if layer.dim != width:
        raise SpecError(
            f"{type(layer).__name__} at {path or '<root>'!r} has dim={layer.dim} but its "
            f"input has width {width}"
        )
    return width


def _same_width(layer: Activation | Mask, width: int, path: str) -> int:
    return width


def _chain_width(layer: Any, width: int | None, path: str) -> int:
    for name, child in children_of(layer):
        width = output_width(child, width, join(path, name))
    return width  # type: ignore[return-value]  # a container is never empty


def _concat_width(layer: Branches, width: int, path: str) -> int:
    outs = [output_width(c, width, join(path, n)) for n, c in children_of(layer)]
    return sum(outs) + (width if layer.concat_input else 0)


def _width_keeping(layer: Repeat | Experts | Skip, width: int, path: str) -> int:
    for name, child in children_of(layer):
        out = output_width(child, width, join(path, name))
        if out != width:
            raise SpecError(
                f"{type(layer).__name__} at {path or '<root>'!r} needs children that keep "
                f"the width, but {join(path, name)!r} maps {width} -> {out}"
            )
    return width


_WIDTH_RULES: dict[type, Any] = {
    Embedding: _embedding_width,
    Linear: _linear_width,
    LayerNorm: _norm_width,
    BatchNorm: _norm_width,
    Activation: _same_width,
    Sequential: _chain_width,
    ModuleList: _chain_width,
    Block: _chain_width,
    Branches: _concat_width,
    Repeat: _width_keeping,
    Experts: _width_keeping,
    Mask: _norm_width,
    Skip: _width_keeping,
}


@attrs.frozen(repr=False)
class ModelSpec(Spec):
    """A whole model: a root :class:`Block`, and weight ties.

    ``ties`` holds ``(source, target)`` module paths: the target's ``weight`` is the
    source's ``weight`` (one ``nn.Parameter`` shared by two modules).

    >>> ModelSpec(Block((("fc", Linear(4, 8)), ("act", Activation()))))
    ModelSpec(Block((('fc', Linear(4, 8)), ('act', Activation()))))
    """

    root: Block = attrs.field(validator=instance_of(Block))
    ties: tuple[tuple[str, str], ...] = attrs.field(
        default=(), converter=as_pairs, validator=pairs_of(str, str)
    )

    def __attrs_post_init__(self) -> None:
        first = self.first_leaf()
        output_width(self.root, None if isinstance(first, Embedding) else self.in_features, "")
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
            dtypes = {getattr(modules[p], "dtype", "fp32") for p in (src, dst)}
            if len(dtypes) > 1:
                raise SpecError(
                    f"tie ({src!r}, {dst!r}): one shared weight has one dtype, got {sorted(dtypes)}"
                )
        for path, layer in self.modules():
            if isinstance(layer, Repeat) and any(isinstance(x, Skip) for _, x in walk(layer)):
                raise SpecError(
                    f"Repeat at {path or '<root>'!r} holds a Skip: a Skip gates on its calls, "
                    "one per training step, and a Repeat calls it several times"
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
        if isinstance(first, (LayerNorm, BatchNorm, Mask)):
            return first.dim
        raise SpecError(
            "the model's first layer must fix the input width (Linear, LayerNorm, "
            f"BatchNorm, Mask or Embedding), got {first!r}"
        )

    @property
    def out_features(self) -> int:
        return output_width(self.root, None if self.takes_tokens else self.in_features, "")

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
                out.setdefault(f"{owner}#{name}", ([], shape))[0].append(join(path, name))
        return out

    def state_dict_names(self) -> tuple[str, ...]:
        """Parameter names as a model state dict lists them: a tied weight under each name."""
        return tuple(join(p, n) for p, layer in self.modules() for n, _ in own_parameters(layer))

    def buffers(self) -> dict[str, tuple[int, ...]]:
        """Persistent buffer FQN -> shape: the buffers a model state dict holds."""
        return {join(p, n): s for p, layer in self.modules() for n, s in own_buffers(layer)}

    def non_persistent_buffers(self) -> dict[str, tuple[int, ...]]:
        """Buffers registered with ``persistent=False``: never saved, never loaded."""
        return {
            join(p, n): s
            for p, layer in self.modules()
            for n, s in own_non_persistent_buffers(layer)
        }

    def in_dtype(self, dtype: str) -> ModelSpec:
        """This model with every :class:`Linear` in ``dtype`` (one of :data:`DTYPES`): a
        job built in another precision.  The Linears are the layers whose spec carries a
        dtype (each computes in it and hands float32 on), so the rest stay float32.

        >>> ModelSpec(Block((("fc", Linear(4, 8)),))).in_dtype("bf16")
        ModelSpec(Block((('fc', Linear(4, 8, dtype='bf16')),)))
        """
        one_of(DTYPES)(self, attrs.fields(Linear).dtype, dtype)
        return attrs.evolve(self, root=_with_linears(self.root, dtype))

    def low_precision_modules(self) -> tuple[str, ...]:
        """Paths of the layers whose parameters are not float32."""
        return tuple(
            p for p, layer in self.modules() if isinstance(layer, Linear) and layer.dtype != "fp32"
        )

    def ungated_parameters(self) -> frozenset[str]:
        """Parameter FQNs that some module outside every :class:`Skip` body uses: each
        training step uses them, whichever branches it skips."""
        gated = {
            p
            for path, layer in self.modules()
            if isinstance(layer, Skip)
            for p, _ in walk(layer.body, join(path, "body"))
        }
        return frozenset(
            fqn
            for fqn, names in self.aliases().items()
            if any(_owner(name) not in gated for name in names)
        )

    def idle_parameters(self, steps: int) -> frozenset[str]:
        """Parameter FQNs that no forward of the first ``steps`` training steps used:
        each lies in a :class:`Skip` body that every one of those steps skipped, so it
        never had a gradient (a tied weight is used if any of its modules is)."""
        used: set[str] = set()
        calls = {p: 0 for p, layer in self.modules() if isinstance(layer, Skip)}

        def run(layer: Any, path: str) -> None:
            used.add(path)
            if isinstance(layer, Skip):
                call, calls[path] = calls[path], calls[path] + 1
                if not layer.used_at(call):
                    return
            for name, child in children_of(layer):
                run(child, join(path, name))

        for _ in range(steps):
            run(self.root, "")
        return frozenset(
            fqn
            for fqn, names in self.aliases().items()
            if not any(_owner(name) in used for name in names)
        )

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
                canonical[join(p, n)]
                for p, leaf in walk(layer, prefix)
                for n, _ in own_parameters(leaf)
            }

        def before(layer: Any, prefix: str) -> set[str]:
            if prefix == path:
                return set()
            upstream: set[str] = set()
            for name, child in children_of(layer):
                child_path = join(prefix, name)
                if is_within(path, child_path):
                    if isinstance(layer, Repeat) and (layer.times > 1 or layer.no_grad_residual):
                        upstream |= inside(child, child_path)
                    return upstream | before(child, child_path)
                if not isinstance(layer, (Branches, Experts)):  # siblings see the same input
                    upstream |= inside(child, child_path)
            return upstream

        return frozenset(before(self.root, ""))


def _with_linears(value: Any, dtype: str) -> Any:
    """``value`` (a layer, or a tuple of layers or named layers) with every Linear in
    ``dtype``; containers are rebuilt through their own validators."""
    if isinstance(value, Linear):
        return attrs.evolve(value, dtype=dtype)
    if isinstance(value, tuple):
        return tuple(_with_linears(v, dtype) for v in value)
    if attrs.has(type(value)):
        fields = attrs.fields(type(value))
        return attrs.evolve(
            value, **{f.alias: _with_linears(getattr(value, f.name), dtype) for f in fields}
        )
    return value
