"""Strategies for dims, models and frozen subsets."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from dcprop import specs as S
from dcprop.strategies._lazy import defines_strategy
from dcprop.strategies._validation import (
    check_choices,
    check_fraction,
    check_int,
    check_interval,
    check_type,
)

LAYER_KINDS = (
    "linear",
    "activation",
    "layernorm",
    "batchnorm",
    "unused_input",
    "sequential",
    "module_list",
    "block",
    "branches",
    "repeat",
    "mask",
    "skip",
)
_CONTAINERS = ("sequential", "module_list", "block", "branches", "repeat", "skip")
_NAMES = {
    "linear": "fc",
    "activation": "act",
    "layernorm": "norm",
    "batchnorm": "bn",
    "unused_input": "unused",
    "sequential": "seq",
    "module_list": "list",
    "block": "block",
    "branches": "branches",
    "repeat": "repeat",
    "mask": "mask",
    "skip": "skip",
}


def _uneven_share(draw: Any, uneven: float) -> bool:
    """True for about ``uneven`` of draws; shrinks to False (even)."""
    return uneven > 0 and draw(st.integers(0, 99)) >= 100 - round(uneven * 100)


@st.composite
def _dims(draw: Any, shards: int, min_value: int, max_value: int, uneven: float) -> int:
    evens = [k * shards for k in range(max(1, -(-min_value // shards)), max_value // shards + 1)]
    if shards > 1 and (_uneven_share(draw, uneven) or not evens):
        # q=0 gives a dim smaller than the shard count: some ranks hold empty shards.
        q = draw(st.integers(max(0, (min_value - 1) // shards), max(0, (max_value - 1) // shards)))
        r = draw(st.integers(1, shards - 1))
        return max(min_value, min(q * shards + r, max_value))
    if not evens:
        return draw(st.integers(min_value, max_value))
    return draw(st.sampled_from(evens))


@defines_strategy
def dims(
    shards: int = 1, *, min_value: int = 1, max_value: int = 16, uneven: float = 0.5
) -> st.SearchStrategy[int]:
    """Sizes of a dim that is split ``shards`` ways (a parameter's dim 0 under FSDP).

    About ``uneven`` of the draws are deliberately not divisible by ``shards``,
    including sizes smaller than ``shards`` (some ranks get empty shards); the rest
    are multiples of ``shards``.  Shrinks toward the smallest even size.

    >>> dims(4, uneven=1.0).example() % 4 != 0                         # doctest: +SKIP
    True
    """
    check_int("shards", shards, min_value=1)
    check_int("min_value", min_value, min_value=1)
    check_int("max_value", max_value, min_value=1)
    check_interval("min_value", min_value, "max_value", max_value)
    check_fraction("uneven", uneven)
    return _dims(shards, min_value, max_value, uneven)


class _ModelConfig:
    __slots__ = ("dim", "dtypes", "kinds", "max_depth", "max_layers")

    def __init__(
        self,
        kinds: tuple[str, ...],
        max_layers: int,
        max_depth: int,
        dim: st.SearchStrategy[int],
        dtypes: tuple[str, ...],
    ) -> None:
        self.kinds, self.max_layers, self.max_depth, self.dim = kinds, max_layers, max_depth, dim
        self.dtypes = dtypes


def _dtype(draw: Any, cfg: _ModelConfig) -> str:
    """float32 for three Linears in four (a model mostly in one precision, as real ones
    are), else a low-precision dtype of ``cfg.dtypes``; shrinks to float32."""
    low = [d for d in cfg.dtypes if d != "fp32"]
    if low and draw(st.integers(0, 3)) == 3:
        return str(draw(st.sampled_from(low)))
    return "fp32"


def _skip(draw: Any, width: int) -> S.Skip:
    """A Skip whose body keeps the width; phase 0 (used on the first step) is simplest."""
    body: Any = S.Linear(width, width)
    if draw(st.booleans()):
        body = S.Sequential((body, S.Activation("tanh")))
    period = draw(st.integers(2, 4))
    return S.Skip(body, period=period, phase=draw(st.integers(0, period - 1)))


def _layer(draw: Any, kind: str, width: int, depth: int, cfg: _ModelConfig) -> tuple[Any, int]:
    if kind in ("linear", "unused_input"):
        dtype = _dtype(draw, cfg)
        out = draw(cfg.dim)
        bias = not draw(st.booleans())
        unused = kind == "unused_input"
        return S.Linear(width, out, bias=bias, unused_input=unused, dtype=dtype), out
    if kind == "mask":
        return S.Mask(width, cache=draw(st.booleans())), width
    if kind == "skip":
        return _skip(draw, width), width
    if kind == "activation":
        return S.Activation(draw(st.sampled_from(S.ACTIVATIONS))), width
    if kind == "layernorm":
        return S.LayerNorm(width, elementwise_affine=not draw(st.booleans())), width
    if kind == "batchnorm":
        return S.BatchNorm(width), width
    if kind == "repeat":
        body: Any = S.Linear(
            width, width, unused_input="unused_input" in cfg.kinds and draw(st.booleans())
        )
        if draw(st.booleans()):
            body = S.Sequential((body, S.Activation("tanh")))  # bounded, so repeats stay finite
        return S.Repeat(
            body, times=draw(st.integers(1, 3)), no_grad_residual=draw(st.booleans())
        ), width
    if kind == "branches":
        count = draw(st.integers(1, 3))
        branches, out = [], 0
        for _ in range(count):
            child, w = _layer(
                draw,
                draw(
                    st.sampled_from(
                        [k for k in ("linear", "unused_input") if k in cfg.kinds] or ["linear"]
                    )
                ),
                width,
                depth + 1,
                cfg,
            )
            branches.append(child)
            out += w
        concat = draw(st.booleans())
        return S.Branches(tuple(branches), concat_input=concat), out + (width if concat else 0)
    children, out = _chain(draw, width, depth + 1, cfg)
    if kind == "block":
        return S.Block(children), out
    layers = tuple(layer for _, layer in children)
    return (S.Sequential(layers) if kind == "sequential" else S.ModuleList(layers)), out


def _chain(
    draw: Any,
    width: int,
    depth: int,
    cfg: _ModelConfig,
) -> tuple[tuple[tuple[str, Any], ...], int]:
    kinds = [k for k in cfg.kinds if depth < cfg.max_depth or k not in _CONTAINERS]
    children = []
    for i in range(draw(st.integers(1, cfg.max_layers))):
        # the first layer of a chain fixes the width; Linear is the simplest that does
        kind = draw(st.sampled_from(kinds)) if i or depth else "linear"
        layer, width = _layer(draw, kind, width, depth, cfg)
        children.append((f"{_NAMES[kind]}{i}", layer))
    return tuple(children), width


def _square_linears(root: S.Block) -> list[str]:
    """Linears that a tie can pair: square, and float32 (a low-precision Linear is
    wrapped on its own by every sharded plan, which a tie across units forbids)."""
    return [
        p
        for p, layer in S.walk(root)
        if isinstance(layer, S.Linear)
        and layer.in_features == layer.out_features
        and layer.dtype == "fp32"
    ]


@st.composite
def _models(
    draw: Any, cfg: _ModelConfig, embedding: bool, ties: bool, tp_size: int, experts: int
) -> S.ModelSpec:
    head: list[tuple[str, Any]] = []
    width = draw(cfg.dim)
    vocab = None
    if embedding and draw(st.booleans()):
        vocab = draw(cfg.dim)
        head.append(("embed", S.Embedding(vocab, width)))
    children, out = _chain(draw, width, 0, cfg)
    body = [*head, *children]
    if tp_size:
        hidden = tp_size * draw(st.integers(1, max(1, 16 // tp_size)))
        body.append(
            ("mlp", S.Sequential((S.Linear(out, hidden), S.Activation(), S.Linear(hidden, out))))
        )
    if experts:
        hidden = draw(cfg.dim)
        expert = S.Sequential((S.Linear(out, hidden), S.Activation(), S.Linear(hidden, out)))
        body.append(("experts", S.Experts((expert,) * experts)))
    tied: list[tuple[str, str]] = []
    if vocab is not None and ties and draw(st.booleans()):
        if out != width:  # the head's weight has the embedding's shape (vocab, width)
            body.append(("proj", S.Linear(out, width)))
        body.append(("head", S.Linear(width, vocab, bias=False)))
        tied.append(("embed", "head"))
    root = S.Block(tuple(body))
    if ties and not tied:
        modules = dict(S.walk(root))
        square = [p for p in _square_linears(root) if not p.startswith(("mlp", "experts"))]
        pairs = [
            (a, b)
            for i, a in enumerate(square)
            for b in square[i + 1 :]
            if modules[a].in_features == modules[b].in_features
        ]
        if pairs and draw(st.booleans()):
            tied.append(draw(st.sampled_from(pairs)))
    return S.ModelSpec(root, tuple(tied))


@defines_strategy
def models(
    *,
    max_layers: int = 3,
    max_depth: int = 1,
    min_dim: int = 1,
    max_dim: int = 12,
    shards: int = 1,
    uneven: float = 0.5,
    layers: Any = LAYER_KINDS,
    embedding: bool = True,
    ties: bool = True,
    tp_size: int = 0,
    experts: int = 0,
    dtypes: Any = S.DTYPES,
) -> st.SearchStrategy[S.ModelSpec]:
    """Random layered models: a root block of up to ``max_layers`` children, nested up
    to ``max_depth`` containers deep, widths from :func:`dims`.

    ``layers`` picks the layer kinds (``LAYER_KINDS``); ``embedding`` allows a token
    model starting with an ``Embedding`` (optionally tied to an output head);
    ``ties`` allows two modules sharing one weight; ``tp_size`` adds an MLP that a
    tensor-parallel plan of that size can split; ``experts`` adds that many experts
    for a sub-mesh plan.  ``dtypes`` (:data:`~dcprop.specs.DTYPES`, ``"fp32"`` among
    them) are the parameter dtypes a Linear may hold; about one Linear in four is
    drawn in a low-precision one.  The kinds ``"mask"`` (bool and non-persistent
    buffers) and ``"skip"`` (a branch that some steps skip, with a step counter) give
    the buffers and the gradient-less steps that real models have.  Shrinks toward
    one small float32 ``Linear``.

    >>> models(max_layers=2).example()                                  # doctest: +SKIP
    ModelSpec(Block((('fc0', Linear(4, 2)), ('act1', Activation()))))
    """
    check_int("max_layers", max_layers, min_value=1, max_value=16)
    check_int("max_depth", max_depth, min_value=0, max_value=4)
    check_int("min_dim", min_dim, min_value=1)
    check_int("max_dim", max_dim, min_value=1, max_value=4096)
    check_interval("min_dim", min_dim, "max_dim", max_dim)
    check_int("shards", shards, min_value=1)
    check_fraction("uneven", uneven)
    kinds = check_choices("layers", layers, LAYER_KINDS)
    if "linear" not in kinds:
        raise InvalidArgument(f"layers={kinds!r} must include 'linear' (it fixes widths)")
    check_type("embedding", embedding, bool)
    check_type("ties", ties, bool)
    check_int("tp_size", tp_size, min_value=0)
    check_int("experts", experts, min_value=0, max_value=64)
    dim = _dims(shards, min_dim, max_dim, uneven)
    cfg = _ModelConfig(kinds, max_layers, max_depth, dim, _check_dtypes(dtypes))
    return _models(cfg, embedding, ties, tp_size, experts)


def _check_dtypes(dtypes: Any) -> tuple[str, ...]:
    choices = check_choices("dtypes", dtypes, S.DTYPES)
    if "fp32" not in choices:
        raise InvalidArgument(
            f"dtypes={choices!r} must include 'fp32' (every layer but a Linear is float32)"
        )
    return choices


@st.composite
def frozen_groups(
    draw: Any, groups: tuple[tuple[str, ...], ...], parameter_count: int, min_trainable: int
) -> tuple[str, ...]:
    """Unions of ``groups`` (parameter names frozen together) that leave at least
    ``min_trainable`` of a model's ``parameter_count`` parameters trainable.  Shrinks
    toward nothing frozen.  Unchecked: :func:`frozen_subsets` checks its arguments."""
    picked = draw(st.lists(st.sampled_from(groups), unique=True)) if groups else []
    while picked and parameter_count - sum(map(len, picked)) < min_trainable:
        picked.pop()  # keep something to train (shrinks toward none frozen)
    return tuple(sorted(name for group in picked for name in group))


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0]


@defines_strategy
def frozen_subsets(
    model: S.ModelSpec,
    *,
    granularity: str = "parameter",
    min_trainable: int = 1,
    exclude: tuple[str, ...] = (),
) -> st.SearchStrategy[tuple[str, ...]]:
    """Subsets of ``model``'s parameter names to freeze (``requires_grad=False``).

    ``granularity="module"`` freezes whole modules (all of a layer's parameters),
    as FSDP1 without ``use_orig_params`` requires.  At least ``min_trainable``
    parameters stay trainable.  Parameter names starting with an ``exclude`` prefix
    are never drawn.  Shrinks toward nothing frozen.
    """
    check_type("model", model, S.ModelSpec)
    check_choices("granularity", (granularity,), ("parameter", "module"))
    check_int("min_trainable", min_trainable, min_value=0)
    if min_trainable > len(model.parameter_names()):
        raise InvalidArgument(
            f"min_trainable={min_trainable} but the model has only "
            f"{len(model.parameter_names())} parameters"
        )
    names = [n for n in model.parameter_names() if not n.startswith(tuple(exclude))]
    if granularity == "module":
        owners = sorted({_owner(n) for n in names})
        groups = tuple(tuple(n for n in names if _owner(n) == o) for o in owners)
    else:
        groups = tuple((n,) for n in names)
    return frozen_groups(groups, len(model.parameter_names()), min_trainable)
