"""``scenarios(property)``: whole examples, drawn in the order that keeps them valid.

World size, then plan kind and mesh shape, then a model that fits them (shard
count for uneven dims, a splittable MLP for tensor parallel, one expert per
expert-parallel coordinate), then plan details, frozen set and options.  Nothing
is filtered: every draw is valid by construction.  Excluded regions (``exclude``)
are left out of the choices where they are choices; only an uneven layout, which
falls out of the model's dims, is filtered.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from dcprop import specs as S
from dcprop.properties import PROPERTY_NAMES
from dcprop.specs.scenario import eps_underflows
from dcprop.strategies._damage import damage_for
from dcprop.strategies._kills import kills
from dcprop.strategies._lazy import defines_strategy
from dcprop.strategies._lifecycle import lifecycles
from dcprop.strategies._models import LAYER_KINDS, frozen_groups, models
from dcprop.strategies._options import (
    optimizers,
    state_dict_options,
    storage_options,
    trainings,
)
from dcprop.strategies._topology import (
    PLAN_KINDS,
    names_for,
    plan_kinds_for,
    plans_of_kind,
    shapes_for,
    shard_count,
)
from dcprop.strategies._validation import (
    check_choices,
    check_fraction,
    check_int,
    check_type,
)

_PRETRAINED = "pretrain"  # the module a fine-tuning scenario freezes and saves apart
PLAN_KINDS_BY_PROPERTY = {
    "roundtrip": PLAN_KINDS,
    "reshard": PLAN_KINDS,
    "ddp_parity": ("fsdp2", "hsdp", "fsdp2+tp", "hsdp+tp", "fsdp1"),
    "finetune_resume": ("fsdp2", "ddp", "hsdp", "fsdp1"),
    "submesh_layout": ("submesh",),
    "loud_failure": PLAN_KINDS,
    "async_isolation": PLAN_KINDS,
    "durability": PLAN_KINDS,
    # freezing after wrapping needs the plan to see requires_grad at each step, which
    # DDP's reducer does not; FSDP1 and expert layouts constrain which sets can freeze
    "lifecycle": ("fsdp2", "hsdp", "fsdp2+tp", "hsdp+tp"),
}
#: layers a lifecycle model leaves out: a normalisation's exactly-zero gradients make
#: Adam steps rounding noise (see dcprop.properties.lifecycle)
_NORMALISING = ("layernorm", "batchnorm")


#: The state-dict options a scenario draws, which an exclusion can fix.
DRAWN_OPTIONS = (
    "full_state_dict",
    "cpu_offload",
    "ignore_frozen_params",
    "flatten_optimizer_state_dict",
    "broadcast_from_rank0",
)
#: The regions of scenarios a campaign can leave out (``exclude``): ``name=value``
#: words in the coverage table's terms (:func:`dcprop.campaign.describe_scenario`).
#: ``plan=KIND``: a plan kind on either side of a reshard; ``job=sub-world``: a model
#: on a sub-world of its job; ``layout=uneven``; ``frozen=some``; ``OPTION=true`` or
#: ``OPTION=false``: a state-dict option's value on either side.
EXCLUSIONS: dict[str, tuple[str, ...]] = {
    "plan": PLAN_KINDS,
    "job": ("sub-world",),
    "layout": ("uneven",),
    "frozen": ("some",),
    **{name: ("true", "false") for name in DRAWN_OPTIONS},
}


def parse_exclusions(words: Any, argument: str = "exclude") -> tuple[str, ...]:
    """``words`` (``"name=value"`` strings, see :data:`EXCLUSIONS`) checked and
    normalized: option values in lower case, each word once.  ``argument`` names them
    in the error."""
    if isinstance(words, str):
        words = (words,)
    check_type(argument, words, (tuple, list))
    valid = ", ".join(f"{name}={'|'.join(values)}" for name, values in EXCLUSIONS.items())
    out: list[str] = []
    for word in words:
        name, _, value = str(word).partition("=")
        name, value = name.strip(), value.strip()
        value = value.lower() if name in DRAWN_OPTIONS else value
        if value not in EXCLUSIONS.get(name, ()):
            raise InvalidArgument(
                f"{argument}={word!r} is not a region dcprop can exclude; use one of: {valid}"
            )
        if f"{name}={value}" not in out:
            out.append(f"{name}={value}")
    return tuple(out)


def _fixed_options(exclude: tuple[str, ...]) -> dict[str, bool]:
    """The state-dict options an exclusion fixes: excluding one value leaves the other."""
    return {
        name: value == "false"
        for name, _, value in (w.partition("=") for w in exclude)
        if name in DRAWN_OPTIONS
    }


def _allowed_options(options: S.StateDictSpec, exclude: tuple[str, ...]) -> S.StateDictSpec:
    """``options`` with the excluded values of each option replaced by the other value
    (broadcast_from_rank0 follows full_state_dict, which it needs)."""
    fixed = _fixed_options(exclude)
    if not fixed:
        return options
    values = {name: getattr(options, name) for name in DRAWN_OPTIONS} | fixed
    if values["broadcast_from_rank0"] and not values["full_state_dict"]:
        values["full_state_dict" if "broadcast_from_rank0" in fixed else "broadcast_from_rank0"] = (
            "broadcast_from_rank0" in fixed
        )
    return attrs.evolve(options, **values)


def uneven_layout(scenario: S.Scenario) -> bool:
    """True if a sharded parameter's first dim does not divide by the saving shard count."""
    shards = scenario.save.shard_count
    return shards > 1 and any(
        shape and shape[0] % shards for shape in scenario.model.parameters().values()
    )


def excluded_by(scenario: S.Scenario, exclude: tuple[str, ...]) -> str | None:
    """The first word of ``exclude`` (as :func:`parse_exclusions` returns them) whose
    region ``scenario`` lies in, or None."""
    topologies = (scenario.save, scenario.load_topology)
    for word in exclude:
        name, _, value = word.partition("=")
        if name == "plan":
            hit = any(t.plan_kind == value for t in topologies)
        elif name == "job":
            hit = scenario.job_world_size is not None
        elif name == "layout":
            hit = uneven_layout(scenario)
        elif name == "frozen":
            hit = bool(scenario.frozen)
        else:
            hit = any(getattr(t.state_dict, name) == (value == "true") for t in topologies)
        if hit:
            return word
    return None


@attrs.frozen
class _Config:
    property: str
    world_sizes: tuple[int, ...]
    device: str
    kinds: tuple[str, ...]
    max_layers: int
    max_depth: int
    max_dim: int
    uneven: float
    layers: tuple[str, ...]
    max_steps: int
    frozen: bool
    job_world_size: int | None
    exclude: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = S.DTYPES


@st.composite
def _model_for(draw: Any, cfg: _Config, kind: str, shape: tuple[int, ...]) -> S.ModelSpec:
    tp_size = shape[-1] if kind.endswith("+tp") else 0
    experts = shape[1] if kind == "submesh" else 0
    strategy = models(
        max_layers=cfg.max_layers,
        max_depth=cfg.max_depth,
        max_dim=cfg.max_dim,
        shards=shard_count(kind, shape),
        uneven=cfg.uneven,
        layers=_layers(cfg),
        tp_size=tp_size,
        experts=experts,
        embedding=cfg.property != "finetune_resume",
        dtypes=_dtypes(cfg),
    )
    model = draw(strategy)
    if cfg.property != "finetune_resume":
        return model
    head_out = draw(st.integers(1, cfg.max_dim))
    ties = tuple((f"{_PRETRAINED}.{s}", f"{_PRETRAINED}.{d}") for s, d in model.ties)
    root = S.Block(
        (
            (_PRETRAINED, model.root),
            ("act", S.Activation()),
            ("head", S.Linear(model.out_features, head_out)),
        )
    )
    return S.ModelSpec(root, ties)


def _dtypes(cfg: _Config) -> tuple[str, ...]:
    # lifecycle compares every step against its float32 reference within a float32
    # tolerance; a bf16/fp16 parameter differs by rounding in the last place between
    # reduction orders, and ddp_parity's low-precision tolerance does not come along yet
    # (an oracle limit, not a torch bug: the other properties draw these dtypes)
    return ("fp32",) if cfg.property == "lifecycle" else cfg.dtypes


def _layers(cfg: _Config) -> tuple[str, ...]:
    if cfg.property != "lifecycle":
        return cfg.layers
    return tuple(k for k in cfg.layers if k not in _NORMALISING)


def _kinds(cfg: _Config, allowed: tuple[str, ...]) -> list[str]:
    return [k for k in allowed if k in cfg.kinds and (k != "fsdp1" or cfg.device == "cuda")]


def _job(cfg: _Config, world: int) -> st.SearchStrategy[int | None]:
    """The job the model's ``world`` runs in: None (its own world) three times in four
    where a larger one is possible, else a larger world size (the model on a sub-world)."""
    if cfg.job_world_size is not None:
        return st.just(cfg.job_world_size if cfg.job_world_size > world else None)
    larger = [w for w in cfg.world_sizes if w > world and "job=sub-world" not in cfg.exclude]
    return st.sampled_from([None] * (3 * len(larger)) + larger) if larger else st.none()


@st.composite
def _scenarios(draw: Any, cfg: _Config) -> S.Scenario:
    world = draw(st.sampled_from(cfg.world_sizes))
    kind, mesh = draw(_meshes(cfg, PLAN_KINDS_BY_PROPERTY[cfg.property], world))
    model = draw(_model_for(cfg, kind, mesh.shape))
    save = draw(_save_topology(cfg, model, kind, mesh))
    load = draw(_load_topology(cfg, model, save)) if cfg.property == "reshard" else None
    frozen = draw(_frozen(cfg, model, save, load))
    scenario = S.Scenario(
        model=model,
        save=save,
        load=load,
        frozen=frozen,
        optimizer=draw(_optimizer(cfg, model, frozen)),
        training=draw(_training(cfg, model)),
        storage=draw(storage_options()),
        pretrained=_PRETRAINED if cfg.property == "finetune_resume" else None,
        seed=draw(st.integers(0, 2**16)),
        device=cfg.device,
        damage=draw(damage_for(cfg.property)),
        kill=draw(kills(save.world_size)) if cfg.property == "durability" else None,
    )
    if cfg.property == "lifecycle":
        restarts = _restart_topologies(cfg, model)
        program = draw(lifecycles(model, save, frozen=frozen, restarts=restarts, async_saves=True))
        scenario = attrs.evolve(scenario, program=program)
    return attrs.evolve(scenario, job_world_size=draw(_job(cfg, scenario.world_size)))


@st.composite
def _restart_topologies(draw: Any, cfg: _Config, model: S.ModelSpec) -> S.Topology:
    """A topology for a restart: any world size allowed, any plan kind that fits."""
    world = draw(st.sampled_from(cfg.world_sizes))
    kind, mesh = draw(_meshes(cfg, PLAN_KINDS_BY_PROPERTY["lifecycle"], world, model))
    return S.Topology(world, mesh, draw(plans_of_kind(model, mesh, kind)))


@st.composite
def _meshes(
    draw: Any, cfg: _Config, allowed: tuple[str, ...], world: int, model: S.ModelSpec | None = None
) -> tuple[str, S.MeshSpec]:
    """A plan kind and its role-named mesh of ``world`` ranks; with ``model``, only
    kinds that fit it."""
    fits = [
        (kind, S.MeshSpec(shape, names_for(kind, shape)))
        for kind in _kinds(cfg, allowed)
        for shape in shapes_for(kind, world)
    ]
    if model is not None:
        fits = [(k, m) for k, m in fits if k in plan_kinds_for(model, m, cfg.device)]
    return draw(st.sampled_from(fits))


@st.composite
def _save_topology(
    draw: Any, cfg: _Config, model: S.ModelSpec, kind: str, mesh: S.MeshSpec
) -> S.Topology:
    plan = draw(plans_of_kind(model, mesh, kind))
    options = draw(_state_dicts(cfg))
    if cfg.property == "finetune_resume":  # save the pretrained part alone, unprefixed
        options = attrs.evolve(
            options,
            submodules=(_PRETRAINED,),
            keep_submodule_prefixes=False,
            ignore_frozen_params=True,
        )
    return S.Topology(mesh.size, mesh, plan, options)


@st.composite
def _load_topology(draw: Any, cfg: _Config, model: S.ModelSpec, save: S.Topology) -> S.Topology:
    world = draw(st.sampled_from(cfg.world_sizes))
    kind, mesh = draw(_meshes(cfg, PLAN_KINDS, world, model))
    plan = draw(plans_of_kind(model, mesh, kind))
    # the optimizer layout is the checkpoint's key format: both sides must share it
    options = attrs.evolve(
        draw(_state_dicts(cfg)),
        flatten_optimizer_state_dict=save.state_dict.flatten_optimizer_state_dict,
    )
    return S.Topology(world, mesh, plan, options)


def _state_dicts(cfg: _Config) -> st.SearchStrategy[S.StateDictSpec]:
    return state_dict_options().map(lambda options: _allowed_options(options, cfg.exclude))


def _frozen(
    cfg: _Config, model: S.ModelSpec, save: S.Topology, load: S.Topology | None
) -> st.SearchStrategy[tuple[str, ...]]:
    names = model.parameter_names()
    units = _flat_units(model, (save, load))
    if cfg.property == "finetune_resume":
        pretrained = {n for n in names if S.is_within(n, _PRETRAINED)}
        # a flat parameter cannot mix frozen and trainable: then nothing is frozen
        whole = all(set(unit) <= pretrained or not pretrained & set(unit) for unit in units)
        return st.just(tuple(sorted(pretrained)) if whole else ())
    if not cfg.frozen:
        return st.just(())
    frozen = frozen_groups(units, len(names), min_trainable=1)
    # One parameter always trains: every rank holds it (outside an expert layout's
    # experts) and every step uses it (outside every Skip body), so no rank's optimizer
    # is empty and no step's loss lacks a gradient.  The root's first layer is one.
    experts = save.plan.experts if isinstance(save.plan, S.FSDP2Plan) else None
    ungated = model.ungated_parameters()
    if experts is None and ungated == set(names):
        return frozen
    anchor = next(
        n for n in names if n in ungated and not (experts and S.is_within(n, experts.module))
    )
    unit = next(u for u in units if anchor in u)
    return frozen.map(lambda f: tuple(n for n in f if n not in unit))


def _flat_units(
    model: S.ModelSpec, topologies: tuple[S.Topology | None, ...]
) -> tuple[tuple[str, ...], ...]:
    """The groups of parameters that must be frozen together: each unit of an FSDP1
    plan without use_orig_params is one flat tensor, so two parameters sharing a unit
    in either plan share a group (each parameter alone where no such plan is)."""
    names = model.parameter_names()
    group = {name: frozenset((name,)) for name in names}
    for t in topologies:
        if t and isinstance(t.plan, S.FSDP1Plan) and not t.plan.use_orig_params:
            units: dict[str, list[str]] = {}
            for name in names:
                units.setdefault(S.flat_unit(name, t.plan.wrap), []).append(name)
            for unit in units.values():
                merged = frozenset().union(*(group[name] for name in unit))
                group.update(dict.fromkeys(merged, merged))
    ordered = dict.fromkeys(group[name] for name in names)
    return tuple(tuple(n for n in names if n in members) for members in ordered)


def _optimizer(
    cfg: _Config, model: S.ModelSpec, frozen: tuple[str, ...]
) -> st.SearchStrategy[S.OptimizerSpec]:
    """SGD alone where fp16 parameters train: Adam's eps underflows in fp16 (see
    :func:`~dcprop.specs.scenario.eps_underflows`); any optimizer elsewhere."""
    pretrained = _PRETRAINED if cfg.property == "finetune_resume" else None
    if eps_underflows(model, frozen, pretrained):
        return optimizers(kinds=("sgd",))
    return optimizers()


def _training(cfg: _Config, model: S.ModelSpec) -> st.SearchStrategy[S.TrainingSpec]:
    min_batch = 2 if model.has_batch_statistics() else 1  # BatchNorm needs two rows
    min_steps = 2 if cfg.property == "ddp_parity" else 1
    # a lifecycle's program says when it trains: training.steps goes unused
    max_steps = 1 if cfg.property == "lifecycle" else max(min_steps, cfg.max_steps)
    return trainings(
        min_steps=min_steps,
        max_steps=max_steps,
        min_batch=min_batch,
        max_batch=max(min_batch, 3),
        input_requires_grad=not model.takes_tokens,
    )


@defines_strategy
def scenarios(
    property: str = "roundtrip",
    *,
    world_sizes: Any = (1, 2, 3, 4),
    device: str = "cpu",
    kinds: Any = PLAN_KINDS,
    max_layers: int = 3,
    max_depth: int = 1,
    max_dim: int = 12,
    uneven: float = 0.5,
    layers: Any = LAYER_KINDS,
    max_steps: int = 3,
    frozen: bool = True,
    job_world_size: int | None = None,
    exclude: Any = (),
    dtypes: Any = S.DTYPES,
) -> st.SearchStrategy[S.Scenario]:
    """Whole examples for ``property`` (one of ``PROPERTY_NAMES``).

    ``world_sizes``: the world sizes to draw from (a reshard draws save and load
    sizes separately).  ``kinds``: allowed plan kinds (FSDP1 only with
    ``device="cuda"``).  The model arguments (``dtypes`` among them) are those of
    :func:`models`; ``frozen=False`` freezes nothing.  ``job_world_size``: the size of
    every example's job (its default process group; torchrun's world), which the model's world must
    fit in; by default the job is usually the model's own world and sometimes a
    larger size from ``world_sizes``, the model then on a sub-world of the job.
    ``exclude``: regions never drawn, such as ``("plan=submesh",
    "broadcast_from_rank0=true")`` (see :data:`EXCLUSIONS`), to step past a bug
    already known.  Shrinks toward the smallest world size, a 1D FSDP2 mesh, one small Linear,
    nothing frozen, default options and a job of the model's own world; the fault of
    ``loud_failure`` (:func:`damages`) toward ``RemoveFile()``, that of
    ``async_isolation`` (:func:`mutations`) toward an optimizer step.
    already known.  ``durability`` scenarios also draw the kill their second save
    suffers (:func:`~dcprop.strategies.kills`).  Shrinks toward the smallest world
    size, a 1D FSDP2 mesh, one small Linear, nothing frozen, default options, a job of
    the model's own world and rank 0 killed before it writes anything.

    >>> from hypothesis import given
    >>> @given(scenarios("reshard", world_sizes=(2, 4)))             # doctest: +SKIP
    ... def test_my_checkpointer(scenario): ...
    """
    cfg = _config(
        property, world_sizes, device, kinds, max_layers, max_depth, max_dim, uneven,
        layers, max_steps, frozen, job_world_size, exclude, dtypes,
    )  # fmt: skip
    if not cfg.exclude:
        return _scenarios(cfg)
    # a safety net, and the only filter for an uneven layout, rare with uneven=0
    return _scenarios(cfg).filter(lambda scenario: excluded_by(scenario, cfg.exclude) is None)


def _config(
    property: str,
    world_sizes: Any,
    device: str,
    kinds: Any,
    max_layers: int,
    max_depth: int,
    max_dim: int,
    uneven: float,
    layers: Any,
    max_steps: int,
    frozen: bool,
    job_world_size: int | None,
    exclude: Any,
    dtypes: Any,
) -> _Config:
    """The arguments of :func:`scenarios`, checked, with its exclusions applied."""
    check_choices("property", (property,), PROPERTY_NAMES)
    sizes = _world_sizes(world_sizes, job_world_size)
    check_choices("device", (device,), S.DEVICES)
    kinds = check_choices("kinds", kinds, PLAN_KINDS)
    check_int("max_steps", max_steps, min_value=1, max_value=64)
    check_fraction("uneven", uneven)
    check_type("frozen", frozen, bool)
    layers = check_choices("layers", layers, LAYER_KINDS)
    dtypes = check_choices("dtypes", dtypes, S.DTYPES)
    models(
        max_layers=max_layers, max_depth=max_depth, max_dim=max_dim, uneven=uneven,
        layers=layers, dtypes=dtypes,
    ).validate()  # fmt: skip
    words = parse_exclusions(exclude)
    cfg = _Config(
        property,
        sizes,
        device,
        tuple(k for k in kinds if f"plan={k}" not in words),
        max_layers,
        max_depth,
        max_dim,
        0.0 if "layout=uneven" in words else uneven,
        layers,
        max_steps,
        frozen and "frozen=some" not in words,
        job_world_size,
        words,
        dtypes,
    )
    _check_some_plan(cfg, kinds)
    return _check_satisfiable(cfg)


def _world_sizes(world_sizes: Any, job_world_size: int | None) -> tuple[int, ...]:
    if isinstance(world_sizes, int):
        world_sizes = (world_sizes,)
    check_type("world_sizes", world_sizes, (tuple, list))
    if not world_sizes:
        raise InvalidArgument("world_sizes=() must hold at least one world size")
    for w in world_sizes:
        check_int("world_sizes entry", w, min_value=1, max_value=4096)
    if job_world_size is not None:
        check_int("job_world_size", job_world_size, min_value=1, max_value=4096)
        if max(world_sizes) > job_world_size:
            raise InvalidArgument(
                f"world_sizes={tuple(world_sizes)!r} holds sizes above "
                f"job_world_size={job_world_size}: a job must hold the model's world"
            )
    return tuple(sorted(set(world_sizes)))


def _check_some_plan(cfg: _Config, kinds: tuple[str, ...]) -> None:
    if not _kinds(cfg, PLAN_KINDS_BY_PROPERTY[cfg.property]):
        excluded = f" and exclude={cfg.exclude!r}" if cfg.exclude else ""
        raise InvalidArgument(
            f"kinds={kinds!r}{excluded} on device={cfg.device!r} leaves no plan for "
            f"property={cfg.property!r} (it uses {PLAN_KINDS_BY_PROPERTY[cfg.property]})"
        )


def _check_satisfiable(cfg: _Config) -> _Config:
    """``cfg`` with its world sizes narrowed to what ``job=sub-world`` leaves; raises
    InvalidArgument for exclusions that leave ``cfg.property`` nothing to draw."""
    exclude, property = cfg.exclude, cfg.property

    def refuse(why: str) -> InvalidArgument:
        return InvalidArgument(f"exclude={exclude!r} {why} for property={property!r}")

    fixed = _fixed_options(exclude)
    both = [n for n in DRAWN_OPTIONS if f"{n}=true" in exclude and f"{n}=false" in exclude]
    if both:
        raise refuse(f"excludes both values of {both[0]}")
    if fixed.get("broadcast_from_rank0") and fixed.get("full_state_dict") is False:
        raise refuse("leaves broadcast_from_rank0=true without the full_state_dict it needs")
    pretrained_part = "frozen=some" in exclude or fixed.get("ignore_frozen_params") is False
    if property == "finetune_resume" and pretrained_part:
        raise refuse("excludes what every fine-tuning scenario has (a frozen pretrained part)")
    if "job=sub-world" in exclude and cfg.job_world_size is not None:
        world_sizes = tuple(w for w in cfg.world_sizes if w == cfg.job_world_size)
        if not world_sizes:
            raise refuse(
                f"leaves no world size in world_sizes={cfg.world_sizes!r} that fills "
                f"job_world_size={cfg.job_world_size}"
            )
        return attrs.evolve(cfg, world_sizes=world_sizes)
    return cfg
