"""The :class:`Scenario`, and the rules that tie its model, topologies, frozen set and
options together (what no single spec can check alone)."""

from __future__ import annotations

from typing import Any

import attrs

from dcprop.errors import SpecError
from dcprop.specs import lifecycle as L
from dcprop.specs._base import (
    Spec,
    as_tuple,
    instance_of,
    non_negative,
    one_of,
    optional,
    positive,
    tuple_of,
)
from dcprop.specs.damage import DAMAGE_KINDS, Damage
from dcprop.specs.kills import Kill
from dcprop.specs.model import (
    Activation,
    Block,
    Experts,
    Linear,
    ModelSpec,
    ModuleList,
    Sequential,
    children_of,
    is_within,
)
from dcprop.specs.topology import (
    ExpertParallel,
    FSDP1Plan,
    FSDP2Plan,
    MeshSpec,
    StorageSpec,
    TensorParallel,
    Topology,
)
from dcprop.specs.training import OptimizerSpec, TrainingSpec

DEVICES = ("cpu", "cuda")


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
        _check_uniform_dtypes(model, plan.wrap, (), which)
    if isinstance(plan, FSDP2Plan):
        _check_wrap(model, plan.wrap, f"{which} plan")
        units = plan.wrap
        if plan.experts:
            experts = len(_module_paths(model)[plan.experts.module].layers)
            units += tuple(f"{plan.experts.module}.{e}" for e in range(experts))
        _check_uniform_dtypes(model, units, frozen, which)
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


def flat_unit(name: str, wrap: tuple[str, ...]) -> str:
    """The FSDP1 unit whose flat parameter holds parameter ``name``: the innermost of
    the ``wrap``ped modules around it, or ``""`` (the root)."""
    owners = [w for w in wrap if is_within(name, w)]
    return max(owners, key=len) if owners else ""


def _check_uniform_frozen(
    model: ModelSpec, wrap: tuple[str, ...], frozen: tuple[str, ...], which: str
) -> None:
    """FSDP1 without use_orig_params flattens a unit's parameters into one tensor,
    which cannot mix requires_grad values."""
    units: dict[str, set[bool]] = {}
    for name in model.parameter_names():
        units.setdefault(flat_unit(name, wrap), set()).add(name in frozen)
    for unit, flags in units.items():
        if len(flags) > 1:
            raise SpecError(
                f"{which} FSDP1 plan with use_orig_params=False: unit "
                f"{unit or '<root>'!r} mixes frozen and trainable parameters"
            )


def _check_uniform_dtypes(
    model: ModelSpec, units: tuple[str, ...], exempt: tuple[str, ...], which: str
) -> None:
    """torch's FSDP keeps one all-gather and one reduce-scatter buffer per unit and
    asserts that the unit's parameters share a dtype (FSDP2: its trainable ones, so
    the ``exempt`` frozen ones aside; FSDP1: all, flattened into one tensor)."""
    modules = _module_paths(model)
    dtypes: dict[str, set[str]] = {}
    for name in model.parameter_names():
        if name not in exempt:
            layer = modules[name.rpartition(".")[0]]
            dtypes.setdefault(flat_unit(name, units), set()).add(getattr(layer, "dtype", "fp32"))
    for unit, found in dtypes.items():
        if len(found) > 1:
            raise SpecError(
                f"{which} plan: unit {unit or '<root>'!r} mixes parameter dtypes "
                f"{sorted(found)}; torch's FSDP needs one dtype per unit (wrap each "
                "low-precision Linear on its own)"
            )


def _check_every_step_trains(
    model: ModelSpec, frozen: tuple[str, ...], fine_tuning_frozen: tuple[str, ...]
) -> None:
    if model.parameter_names() and not model.ungated_parameters() - set(fine_tuning_frozen):
        raise SpecError(
            f"frozen={frozen} leaves only parameters inside Skip bodies to train: a step "
            "that skips them all has a loss without gradient, which backward refuses; "
            "leave a parameter outside every Skip trainable"
        )


def eps_underflows(
    model: ModelSpec, frozen: tuple[str, ...], pretrained: str | None
) -> tuple[str, ...]:
    """The fp16 parameters that some phase trains (a fine-tuning scenario's pretrain
    phase trains the pretrained part, frozen later): where Adam's eps underflows."""
    fp16 = {p for p, layer in model.modules() if getattr(layer, "dtype", "") == "fp16"}
    return tuple(
        n
        for n in model.parameter_names()
        if n.rpartition(".")[0] in fp16
        and (n not in frozen or (pretrained is not None and is_within(n, pretrained)))
    )


def _sorted_names(value: Any) -> Any:
    if isinstance(value, (tuple, list)) and all(isinstance(n, str) for n in value):
        return tuple(sorted(value))
    return value  # the validator names what is wrong


@attrs.frozen(repr=False)
class Scenario(Spec):
    """Everything one property run needs.

    ``load`` is the topology the checkpoint is loaded on (``None``: the same as
    ``save``).  ``pretrained`` names the submodule that a fine-tuning run loads from
    a pretraining checkpoint (as PyTorch's
    ``test/distributed/checkpoint/e2e/test_fine_tuning.py`` does).  ``seed`` fixes model
    initialisation.
    ``job_world_size`` is the size of the job (the default process group) the model
    runs in: ``None``, the model's own world; larger, the model lives on the first
    ranks of a bigger job, and the ranks beyond its world hold no model.
    ``kill`` is the fault the ``durability`` property injects into a save (None: none).

    >>> m = ModelSpec(Block((("fc", Linear(4, 4)),)))
    >>> Scenario(m, save=Topology(2, MeshSpec((2,), ("shard",)), FSDP2Plan())).world_size
    2
    """

    model: ModelSpec = attrs.field(validator=instance_of(ModelSpec))
    save: Topology = attrs.field(validator=instance_of(Topology))
    load: Topology | None = attrs.field(default=None, validator=optional(instance_of(Topology)))
    frozen: tuple[str, ...] = attrs.field(
        default=(), converter=_sorted_names, validator=tuple_of(str)
    )
    optimizer: OptimizerSpec = attrs.field(
        factory=OptimizerSpec, validator=instance_of(OptimizerSpec)
    )
    training: TrainingSpec = attrs.field(factory=TrainingSpec, validator=instance_of(TrainingSpec))
    storage: StorageSpec = attrs.field(factory=StorageSpec, validator=instance_of(StorageSpec))
    pretrained: str | None = attrs.field(default=None, validator=optional(instance_of(str)))
    seed: int = attrs.field(default=0, validator=non_negative)
    device: str = attrs.field(default="cpu", validator=one_of(DEVICES))
    job_world_size: int | None = attrs.field(default=None, validator=optional(*positive))
    damage: Damage | None = attrs.field(
        default=None, validator=optional(instance_of(*DAMAGE_KINDS))
    )
    kill: Kill | None = attrs.field(default=None, validator=optional(instance_of(Kill)))
    program: tuple[L.Step, ...] = attrs.field(
        default=(), converter=as_tuple, validator=tuple_of(*L.STEP_TYPES)
    )

    def __attrs_post_init__(self) -> None:
        self._check_worlds()
        self._check_frozen()
        self._check_training()
        for which, topo in (("save", self.save), ("load", self.load)):
            if topo is not None:
                _check_topology(self.model, topo, self.device, self.frozen, which)
        self._check_pretrained()
        if self.program:
            _ProgramCheck(self).run()

    def _check_worlds(self) -> None:
        if self.kill is not None and self.kill.ranks[-1] >= self.save.world_size:
            raise SpecError(
                f"kill.ranks={self.kill.ranks!r}: the save runs on ranks "
                f"0..{self.save.world_size - 1}, so only those can be killed during it"
            )
        if self.job_world_size is not None and self.job_world_size < self.world_size:
            raise SpecError(
                f"job_world_size={self.job_world_size} is smaller than the model's world "
                f"({self.world_size} ranks): the job must hold the model, so use None or "
                f"at least {self.world_size}"
            )

    def _check_frozen(self) -> None:
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
        _check_every_step_trains(self.model, self.frozen, self.fine_tuning_frozen)

    def _check_training(self) -> None:
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
        underflow = eps_underflows(self.model, self.frozen, self.pretrained)
        if underflow and self.optimizer.kind != "sgd":
            raise SpecError(
                f"optimizer kind={self.optimizer.kind!r} trains fp16 parameters "
                f"{list(underflow)[:4]}: its eps (1e-8) is 0 in fp16, so a zero gradient "
                "steps them to NaN (0/0), and a NaN state compares equal to itself; "
                "use SGD, bf16, or freeze them"
            )

    def _check_pretrained(self) -> None:
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
        """Ranks the example needs: the largest of the save, load and program worlds."""
        return max(t.world_size for t in self.topologies)

    @property
    def topologies(self) -> tuple[Topology, ...]:
        """Every topology the example runs a job on: save, load, then each restart's."""
        restarts = [s.topology for s in self.program if isinstance(s, (L.Restart, L.Crash))]
        return (self.save, self.load_topology, *restarts)

    @property
    def job_world(self) -> int:
        """Ranks of the job (the default process group) the example runs in."""
        return self.job_world_size or self.world_size

    @property
    def meshes(self) -> tuple[MeshSpec, ...]:
        """The device meshes an example over this scenario asks the runner for."""
        return tuple(dict.fromkeys(t.mesh for t in self.topologies))

    @property
    def load_topology(self) -> Topology:
        """The topology the checkpoint is loaded on.  ``load`` is the drawn change of
        topology (None: no resharding, which known-bug conditions and the corpus read);
        this is the topology either way."""
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


class _ProgramCheck:
    """Walks ``scenario.program`` keeping what a job would hold at each step (the frozen
    set, the checkpoints saved, in flight and lost), and raises a :class:`SpecError`
    naming the step that cannot run."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.params = set(scenario.model.parameter_names())
        self.frozen = set(scenario.frozen)
        self.topology = scenario.save
        self.saved: dict[str, L.Save] = {}
        self.frozen_at: dict[str, frozenset[str]] = {}
        self.in_flight: set[str] = set()
        self.lost: set[str] = set()

    def run(self) -> None:
        for index, step in enumerate(self.scenario.program):
            try:
                self.step(step)
            except SpecError as e:
                raise SpecError(f"program[{index}] {step!r}: {e}") from None

    def step(self, step: L.Step) -> None:
        if isinstance(step, L.Train) and not self.scenario.model.ungated_parameters() - self.frozen:
            raise SpecError(
                "no parameter outside every Skip body is trainable: a step that skips them "
                "all has a loss without gradient, which backward refuses; unfreeze one first"
            )
        if isinstance(step, (L.Freeze, L.Unfreeze)):
            self.refreeze(step)
        elif isinstance(step, L.Save):
            self.save(step)
        elif isinstance(step, L.Wait):
            self.in_flight.clear()
        elif isinstance(step, L.Load):
            self.loadable(step.name)
        elif isinstance(step, (L.Restart, L.Crash)):
            if isinstance(step, L.Crash):
                self.lost |= self.in_flight
            else:
                self.restart_dtype(step.dtype)
            self.in_flight.clear()
            self.topology = step.topology
            self.check_topology()
            self.loadable(step.checkpoint)
        elif isinstance(step, L.RestartInto):
            self.restart_into(step)

    def restart_dtype(self, dtype: str | None) -> None:
        if dtype is None:
            return
        self.scenario.model.in_dtype(dtype)  # a tie across dtypes is a SpecError
        if dtype == "fp16" and self.scenario.optimizer.kind != "sgd":
            raise SpecError(
                f"dtype='fp16' with optimizer kind={self.scenario.optimizer.kind!r}: its "
                "eps (1e-8) is 0 in fp16, so a zero gradient steps a parameter to NaN; "
                "use SGD or bf16"
            )

    def restart_into(self, step: L.RestartInto) -> None:
        self.loadable(step.checkpoint)
        if self.saved[step.checkpoint].state_dict.ignore_frozen_params:
            raise SpecError(
                f"checkpoint {step.checkpoint!r} was saved without frozen parameters: "
                "entries it leaves out on purpose would blur the entries a changed model "
                "misses; restart into a changed model from a whole checkpoint"
            )
        if step.model.parameters() == self.scenario.model.parameters():
            raise SpecError(
                "the model has the same parameters and shapes as the scenario's: that is "
                "a Restart, not a restart into a changed model"
            )
        frozen = tuple(sorted(self.frozen & set(step.model.parameter_names())))
        _check_topology(step.model, self.topology, self.scenario.device, frozen, "the current")

    def refreeze(self, step: L.Freeze | L.Unfreeze) -> None:
        unknown = sorted(set(step.names) - self.params)
        if unknown:
            raise SpecError(f"{unknown} are not parameters of the model")
        freeze = isinstance(step, L.Freeze)
        already = sorted(set(step.names) & self.frozen if freeze else set(step.names) - self.frozen)
        if already:
            raise SpecError(f"{already} are {'frozen' if freeze else 'trainable'} already")
        self.frozen = self.frozen | set(step.names) if freeze else self.frozen - set(step.names)
        self.check_topology()

    def check_topology(self) -> None:
        frozen = tuple(sorted(self.frozen))
        _check_topology(self.scenario.model, self.topology, self.scenario.device, frozen, "the")

    def save(self, step: L.Save) -> None:
        if step.name in self.saved:
            raise SpecError(f"checkpoint {step.name!r} is saved twice")
        if step.async_ and self.in_flight:
            raise SpecError(
                f"an async save while {sorted(self.in_flight)} is in flight: two saves' "
                "collectives would share one group; Wait() first"
            )
        self.saved[step.name] = step
        self.frozen_at[step.name] = frozenset(self.frozen)
        if step.async_:
            self.in_flight.add(step.name)

    def loadable(self, name: str) -> None:
        if name not in self.saved:
            raise SpecError(f"checkpoint {name!r} is not saved before this step")
        if name in self.lost:
            raise SpecError(f"checkpoint {name!r} was in flight at a crash: it is lost")
        if name in self.in_flight:
            raise SpecError(f"checkpoint {name!r} is still in flight: Wait() for it first")
        at_save = self.frozen_at[name]
        if self.saved[name].state_dict.ignore_frozen_params and at_save != self.frozen:
            raise SpecError(
                f"checkpoint {name!r} was saved without the frozen parameters "
                f"{sorted(at_save)}, so it loads only under that frozen set (now "
                f"{sorted(self.frozen)})"
            )
