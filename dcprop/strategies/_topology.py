"""Strategies for meshes, parallel plans and whole topologies."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from dcprop import specs as S
from dcprop.strategies._lazy import defines_strategy
from dcprop.strategies._options import state_dict_options
from dcprop.strategies._validation import check_choices, check_int, check_interval, check_type

# Simplest first: Hypothesis shrinks a sampled_from toward its first entry.
PLAN_KINDS = ("fsdp2", "ddp", "hsdp", "fsdp2+tp", "submesh", "hsdp+tp", "fsdp1")
ROLE_NAMES = {
    "fsdp2": ("shard",),
    "ddp": ("dp",),
    "hsdp": ("replicate", "shard"),
    "fsdp2+tp": ("shard", "tp"),
    "hsdp+tp": ("replicate", "shard", "tp"),
    "submesh": ("shard", "ep"),
}
#: The roles whose dims the plans drawn here split a parameter's dim 0 over.
SPLIT_ROLES = ("shard", "ep")
_NDIM = {"fsdp2": 1, "ddp": 1, "hsdp": 2, "fsdp2+tp": 2, "submesh": 2, "hsdp+tp": 3}


def factorizations(n: int, ndim: int) -> list[tuple[int, ...]]:
    """Every ordered way to write ``n`` as a product of ``ndim`` positive ints."""
    if ndim == 1:
        return [(n,)]
    return [
        (d, *rest)
        for d in range(1, n + 1)
        if n % d == 0
        for rest in factorizations(n // d, ndim - 1)
    ]


@defines_strategy
def meshes(
    world_size: int,
    *,
    min_dims: int = 1,
    max_dims: int = 3,
    dim_names: tuple[str, ...] | None = None,
) -> st.SearchStrategy[S.MeshSpec]:
    """Every factorization of ``world_size`` into ``min_dims`` to ``max_dims`` mesh dims
    (dims of size 1 included).  ``dim_names`` fixes the names (and so the number of
    dims); otherwise dims are named ``dim0, dim1, ...``.  Shrinks toward ``(world_size,)``.

    >>> sorted(m.shape for m in meshes_list(4, max_dims=2))            # doctest: +SKIP
    [(1, 4), (2, 2), (4,), (4, 1)]
    """
    check_int("world_size", world_size, min_value=1, max_value=4096)
    check_int("min_dims", min_dims, min_value=1, max_value=3)
    check_int("max_dims", max_dims, min_value=1, max_value=3)
    check_interval("min_dims", min_dims, "max_dims", max_dims)
    if dim_names is not None:
        check_type("dim_names", dim_names, tuple)
        if not min_dims <= len(dim_names) <= max_dims:
            raise InvalidArgument(
                f"dim_names={dim_names!r} has {len(dim_names)} names, outside "
                f"min_dims={min_dims}..max_dims={max_dims}"
            )
        ndims = [len(dim_names)]
    else:
        ndims = list(range(min_dims, max_dims + 1))
    return st.sampled_from(meshes_list(world_size, ndims, dim_names))


def meshes_list(
    world_size: int, ndims: Any = (1, 2, 3), dim_names: tuple[str, ...] | None = None
) -> list[S.MeshSpec]:
    if isinstance(ndims, int):
        ndims = range(1, ndims + 1)
    return [
        S.MeshSpec(shape, dim_names or tuple(f"dim{i}" for i in range(nd)))
        for nd in ndims
        for shape in factorizations(world_size, nd)
    ]


def tp_pairs(model: S.ModelSpec, size: int) -> list[tuple[str, str]]:
    """(colwise, rowwise) Linear pairs a tensor-parallel plan of ``size`` can split."""
    tied = {p for t in model.ties for p in t}
    experts = [p for p, layer in model.modules() if isinstance(layer, S.Experts)]
    out = []
    for path, layer in model.modules():
        if not isinstance(layer, (S.Sequential, S.ModuleList, S.Block)):
            continue
        if any(S.is_within(path, e) for e in experts):
            continue
        kids = S.children_of(layer)
        for i, (name_c, col) in enumerate(kids):
            if not isinstance(col, S.Linear):
                continue
            for name_r, row in kids[i + 1 :]:
                if isinstance(row, S.Linear):
                    c, r = S.join(path, name_c), S.join(path, name_r)
                    if (
                        col.out_features == row.in_features
                        and col.out_features % size == 0
                        and not {c, r} & tied
                    ):
                        out.append((c, r))
                    break
                if not isinstance(row, S.Activation):
                    break
    return out


def _experts_count(model: S.ModelSpec) -> tuple[str, int] | None:
    for path, layer in model.modules():
        if isinstance(layer, S.Experts):
            return path, len(layer.layers)
    return None


def plan_kinds_for(model: S.ModelSpec, mesh: S.MeshSpec, device: str = "cpu") -> list[str]:
    """The plan kinds that fit ``model`` on ``mesh`` (dims taken by position)."""
    nd = len(mesh.shape)
    out = []
    for kind in PLAN_KINDS:
        if kind == "fsdp1":
            if device == "cuda" and nd in (1, 2):
                out.append(kind)
            continue
        if _NDIM[kind] != nd:
            continue
        if kind.endswith("+tp") and not tp_pairs(model, mesh.shape[-1]):
            continue
        if kind == "submesh":
            experts = _experts_count(model)
            if experts is None or experts[1] != mesh.shape[1]:
                continue
        out.append(kind)
    return out


def _wrap_candidates(model: S.ModelSpec, avoid: str | None) -> list[str]:
    out = []
    for path, _ in model.modules():
        if not path:
            continue
        if avoid and S.is_within(path, avoid):
            continue  # experts get their own sub-mesh; their ancestors may be wrapped
        if any(S.is_within(s, path) != S.is_within(d, path) for s, d in model.ties):
            continue  # would split a shared weight across sharded units
        out.append(path)
    return out


@st.composite
def _wraps(draw: Any, model: S.ModelSpec, candidates: list[str]) -> tuple[str, ...]:
    """Up to three drawn submodules to wrap, and every low-precision Linear.

    torch's FSDP (fully_shard's ``_init_mp_dtypes``, FSDP1's flat parameter) asserts
    that the trainable parameters of one unit share a dtype: a unit has one all-gather
    and one reduce-scatter buffer.  That is its documented contract, not a bug, so each
    low-precision Linear is a unit of its own (the model strategy never ties one, which
    could split a shared weight); the frozen set is drawn after the plan, so the rule
    cannot lean on frozen parameters being exempt."""
    drawn = (
        tuple(draw(st.lists(st.sampled_from(candidates), unique=True, max_size=3)))
        if candidates
        else ()
    )
    return tuple(dict.fromkeys((*drawn, *model.low_precision_modules())))


@st.composite
def plans_of_kind(draw: Any, model: S.ModelSpec, mesh: S.MeshSpec, kind: str) -> S.Plan:
    """Plans of ``kind`` (one of ``plan_kinds_for(model, mesh)``) on the role-named
    ``mesh`` (:func:`names_for`), unchecked: :func:`parallel_plans` checks its arguments."""
    names = mesh.dim_names
    experts = _experts_count(model) if kind == "submesh" else None
    candidates = _wrap_candidates(model, experts[0] if experts else None)
    # wrap and reshard are drawn for every kind (see _optimizers for why)
    wrap = draw(_wraps(model, candidates))
    reshard = not draw(st.booleans())
    if kind == "ddp":
        return S.DDPPlan()
    if kind == "fsdp1":
        strategies = (
            S.FSDP1_SHARDING_STRATEGIES[3:] if len(names) == 2 else S.FSDP1_SHARDING_STRATEGIES[:3]
        )
        return S.FSDP1Plan(
            sharding_strategy=draw(st.sampled_from(strategies)),
            use_orig_params=not draw(st.booleans()),
            cpu_offload=draw(st.booleans()),
            mixed_precision=draw(st.sampled_from((None, "fp16", "bf16"))),
            backward_prefetch=draw(st.sampled_from((None, "BACKWARD_PRE", "BACKWARD_POST"))),
            wrap=wrap,
        )
    if kind == "fsdp2":
        return S.FSDP2Plan(shard_dim=names[0], wrap=wrap, reshard_after_forward=reshard)
    if kind == "hsdp":
        return S.FSDP2Plan(
            replicate_dim=names[0], shard_dim=names[1], wrap=wrap, reshard_after_forward=reshard
        )
    if kind == "submesh":
        assert experts is not None
        return S.FSDP2Plan(
            shard_dim=names[0],
            wrap=wrap,
            reshard_after_forward=reshard,
            experts=S.ExpertParallel(experts[0], dim=names[1]),
        )
    tp = draw(_tensor_parallel(model, mesh))
    if kind == "fsdp2+tp":
        return S.FSDP2Plan(shard_dim=names[0], wrap=wrap, reshard_after_forward=reshard, tp=tp)
    return S.FSDP2Plan(
        replicate_dim=names[0], shard_dim=names[1], wrap=wrap, reshard_after_forward=reshard, tp=tp
    )


@st.composite
def _tensor_parallel(draw: Any, model: S.ModelSpec, mesh: S.MeshSpec) -> S.TensorParallel:
    pairs = tp_pairs(model, mesh.shape[-1])
    picked = draw(st.lists(st.sampled_from(pairs), unique=True, min_size=1))
    chosen: list[tuple[str, str]] = []
    for pair in picked:  # a Linear belongs to one pair at most
        if not {m for p in chosen for m in p} & set(pair):
            chosen.append(pair)
    return S.TensorParallel(mesh.dim_names[-1], tuple(chosen))


@defines_strategy
def parallel_plans(
    model: S.ModelSpec, mesh: S.MeshSpec, *, device: str = "cpu", kinds: Any = PLAN_KINDS
) -> st.SearchStrategy[Any]:
    """Plans for ``model`` on ``mesh``; mesh dims play roles by position: 1D shard or
    DDP; 2D (replicate, shard), (shard, tp) or (shard, ep); 3D (replicate, shard, tp).

    ``kinds`` restricts the plan kinds (``PLAN_KINDS``); FSDP1 is drawn only for
    ``device="cuda"``.  Shrinks toward FSDP2 with no extra wrapped submodules.
    """
    check_type("model", model, S.ModelSpec)
    check_type("mesh", mesh, S.MeshSpec)
    check_choices("device", (device,), S.DEVICES)
    kinds = check_choices("kinds", kinds, PLAN_KINDS)
    fits = [k for k in plan_kinds_for(model, mesh, device) if k in kinds]
    if not fits:
        raise InvalidArgument(
            f"no plan of kinds={kinds!r} fits mesh={mesh!r} for this model "
            f"on device={device!r} (fitting kinds: "
            f"{plan_kinds_for(model, mesh, device)})"
        )
    return st.sampled_from(fits).flatmap(lambda k: plans_of_kind(model, mesh, k))


def shapes_for(kind: str, world_size: int) -> list[tuple[int, ...]]:
    if kind == "fsdp1":
        return [(world_size,), *factorizations(world_size, 2)]
    return factorizations(world_size, _NDIM[kind])


def names_for(kind: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    if kind == "fsdp1":
        return ("shard",) if len(shape) == 1 else ("replicate", "shard")
    return ROLE_NAMES[kind]


def shard_count(kind: str, shape: tuple[int, ...]) -> int:
    """How many ways a parameter's dim 0 is split on the mesh of ``shape`` named for
    ``kind`` (:func:`names_for`), known before the plan is drawn: the plans drawn here
    split it over exactly the dims of the roles in ``SPLIT_ROLES``, so this equals the
    drawn topology's ``Topology.shard_count`` (FSDP1's NO_SHARD, which splits nothing,
    aside)."""
    mesh = S.MeshSpec(shape, names_for(kind, shape))
    return mesh.size_of(n for n in mesh.dim_names if n in SPLIT_ROLES)


@st.composite
def _topology(
    draw: Any,
    model: S.ModelSpec,
    world_size: int,
    kinds: tuple[str, ...],
    device: str,
    options: st.SearchStrategy[S.StateDictSpec],
) -> S.Topology:
    fits = [
        (kind, shape)
        for kind in kinds
        for shape in shapes_for(kind, world_size)
        if kind in plan_kinds_for(model, S.MeshSpec(shape, names_for(kind, shape)), device)
    ]
    if not fits:
        raise InvalidArgument(
            f"no plan of kinds={kinds} fits world_size={world_size} for model {model!r} on {device}"
        )
    kind, shape = draw(st.sampled_from(fits))
    mesh = S.MeshSpec(shape, names_for(kind, shape))
    return S.Topology(world_size, mesh, draw(plans_of_kind(model, mesh, kind)), draw(options))


@defines_strategy
def topologies(
    model: S.ModelSpec,
    world_size: int,
    *,
    kinds: Any = PLAN_KINDS,
    device: str = "cpu",
    state_dicts: st.SearchStrategy[S.StateDictSpec] | None = None,
) -> st.SearchStrategy[S.Topology]:
    """A world size, a role-named mesh, a plan and state-dict options for ``model``.

    Shrinks toward FSDP2 on a 1D mesh with default state-dict options.
    """
    check_type("model", model, S.ModelSpec)
    check_int("world_size", world_size, min_value=1, max_value=4096)
    check_choices("device", (device,), S.DEVICES)
    kinds = check_choices("kinds", kinds, PLAN_KINDS)
    return _topology(model, world_size, kinds, device, state_dicts or state_dict_options())
