"""Known upstream bugs that dcprop finds: in stock torch, and in the checkpoint
libraries it ships adapters for (``KnownBug.project``).

An example's failure is *known*, not new, when one entry explains the failure of
every rank that failed: its signature, in a scenario the bug can occur in, showing
what the bug's diagnosis predicts.  ``dcprop check`` counts such examples under
``known`` and exits 0 unless ``--strict``; each of them checked nothing past the
bug.  Each entry's shrunk reproducer lives in the regression corpus
(``strategies/corpus/``) as an expected failure, so the suite notices when upstream
fixes it.  Never add an entry to hide a dcprop bug.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

from dcprop import specs as S
from dcprop.errors import ExampleFailure, RankCrashed
from dcprop.runner.failures import blamed_outcomes

__all__ = ["KNOWN_BUGS", "KnownBug", "Sighting", "match_known", "sightings", "together"]


@attrs.frozen
class Sighting:
    """One failing rank's failure as a known bug is matched against it: its signature,
    message and state-dict keys (see ``PropertyFailure.keys``).  A hang or a crash is
    one sighting of the example as a whole."""

    scenario: S.Scenario
    failure: ExampleFailure
    signature: str
    message: str = ""
    keys: tuple[str, ...] = ()


def sightings(failure: ExampleFailure, scenario: S.Scenario) -> list[Sighting]:
    """Every failure in ``failure`` that a known bug must explain: each blamed rank's
    (ranks that stopped only because a peer failed are not blamed), and the example's
    own for a crash or a hang."""
    out = [
        Sighting(scenario, failure, o.signature, o.message, tuple(o.keys))
        for o in blamed_outcomes(failure.outcomes).values()
    ]
    if isinstance(failure, RankCrashed) or not out:
        out.append(Sighting(scenario, failure, failure.signature))
    return out


def _always(_: Any) -> bool:
    return True


@attrs.frozen
class KnownBug:
    """One upstream bug: what it is, and how to recognise a failure as this bug.

    A sighting is this bug when its signature matches ``pattern``, its scenario is
    one the bug can occur in (``occurs_in``), and it shows what the diagnosis
    predicts (``shows``: for example, which keys differ).  A narrow match, so that a
    new bug with a similar message in an unrelated scenario is still reported as new.
    """

    id: str
    title: str
    pattern: str  # a regular expression searched in the failure signature
    # whose bug: "torch" (met with any checkpointer: DCP and the state-dict API under
    # it are what every property runs), or a checkpoint library's, met only when the
    # example ran with that library's adapter (``ExampleFailure.checkpointer_project``)
    project: str = "torch"
    occurs_in: Callable[[S.Scenario], bool] = _always
    shows: Callable[[Sighting], bool] = _always
    related: tuple[str, ...] = ()
    explanation: str = ""
    # scenarios that always end in this bug: once a campaign has confirmed the bug, it
    # skips them (counted) instead of paying for the bug again, unless strict
    certain_in: Callable[[S.Scenario], bool] | None = None

    def explains(self, sighting: Sighting) -> bool:
        return (
            self.project in ("torch", sighting.failure.checkpointer_project)
            and re.search(self.pattern, sighting.signature) is not None
            and self.occurs_in(sighting.scenario)
            and self.shows(sighting)
        )


def _topologies(scenario: S.Scenario) -> tuple[S.Topology, ...]:
    """The topologies an example runs on; a lifecycle program's saves choose their own
    state-dict options, so there each topology counts once per option set saved with."""
    saves = [s.state_dict for s in scenario.program if isinstance(s, S.Save)]
    if not saves:
        return (scenario.save, scenario.load_topology)
    return tuple(attrs.evolve(t, state_dict=o) for t in scenario.topologies for o in saves)


def _on_a_topology(condition: Callable[[S.Topology], bool]) -> Callable[[S.Scenario], bool]:
    """A scenario condition: ``condition`` holds for the save or the load topology."""
    return lambda scenario: any(condition(t) for t in _topologies(scenario))


def _options(**wanted: bool) -> Callable[[S.Topology], bool]:
    return lambda t: all(getattr(t.state_dict, k) == v for k, v in wanted.items())


def _experts_with(**wanted: bool) -> Callable[[S.Topology], bool]:
    def condition(t: S.Topology) -> bool:
        plan = t.plan
        return isinstance(plan, S.FSDP2Plan) and plan.experts is not None and _options(**wanted)(t)

    return condition


def _stateless_optimizer(scenario: S.Scenario) -> bool:
    """The optimizer keeps no state tensors: SGD without momentum."""
    return scenario.optimizer.kind == "sgd" and not scenario.optimizer.momentum


def _colwise_single_output(scenario: S.Scenario) -> bool:
    """A tensor-parallel plan whose colwise Linear has one output feature."""
    return any(
        scenario.model.module(col).out_features == 1
        for t in _topologies(scenario)
        if isinstance(t.plan, S.FSDP2Plan) and t.plan.tp is not None
        for col, _ in t.plan.tp.pairs
    )


def _trainable_counts(scenario: S.Scenario, topology: S.Topology) -> set[int]:
    """How many parameters each rank of ``topology`` trains (one optimizer group each):
    every trainable one, or under an expert layout the shared ones and its own expert's."""
    frozen = set(scenario.frozen)
    trainable = [n for n in scenario.model.parameter_names() if n not in frozen]
    plan = topology.plan
    if not (isinstance(plan, S.FSDP2Plan) and plan.experts is not None):
        return {len(trainable)}
    module = plan.experts.module
    held = [S.expert_index(n, module) for n in trainable]
    experts = len(scenario.model.module(module).layers)
    return {held.count(None) + held.count(e) for e in range(experts)}


def _param_group_sizes_differ(scenario: S.Scenario) -> bool:
    """Under an expert layout on either side, the ranks that save and those that load do
    not all train as many parameters (frozen parameters in some experts, experts of
    different sizes, or a load onto a layout without experts), so one rank's saved
    param_groups list does not fit another's optimizer."""
    topologies = _topologies(scenario)
    if not any(isinstance(t.plan, S.FSDP2Plan) and t.plan.experts for t in topologies):
        return False
    return len(set().union(*(_trainable_counts(scenario, t) for t in topologies))) > 1


def _broadcast_off_the_model(sighting: Sighting) -> bool:
    """A rank of the default group holds no model of a topology that broadcasts from
    rank 0: the scenario's job is larger than that topology's world, or (a runner whose
    pool is larger than the scenario's job) a rank outside the example reported idle."""
    scenario = sighting.scenario
    idle = any(o.status == "idle" for o in sighting.failure.outcomes.values())
    return _broadcasts_off_the_model(scenario) or (
        idle and any(t.state_dict.broadcast_from_rank0 for t in _topologies(scenario))
    )


def _broadcasts_off_the_model(scenario: S.Scenario) -> bool:
    """A topology broadcasts from rank 0 on fewer ranks than the scenario's job."""
    return any(
        t.state_dict.broadcast_from_rank0 and t.world_size < scenario.job_world
        for t in _topologies(scenario)
    )


_MISSING = re.compile(r"Missing key\(s\) in state_dict: (.*)")
_QUOTED = re.compile(r'"([^"]+)"')
_OPTIMIZER_ENTRY = re.compile(r"optim/state/([^/]+)/")  # one parameter's optimizer state
_INTEGER_ENTRY = re.compile(r"optim/state/(\d+)/")  # ... under its index, not its name


def _off_rank0_expert(scenario: S.Scenario, **wanted: bool) -> re.Pattern[str] | None:
    """Matches a state-dict name or key (``experts.2.weight``, ``model/experts.2.weight``,
    ``optim.state.experts.2.bias.exp_avg``) of an expert that global rank 0 does not
    hold, in the topologies with options ``wanted``; None if no such topology has
    experts.  Rank 0 sits at coordinate 0 of every mesh dim: it holds expert 0."""
    modules = [
        t.plan.experts.module
        for t in _topologies(scenario)
        if isinstance(t.plan, S.FSDP2Plan) and t.plan.experts is not None and _options(**wanted)(t)
    ]
    if not modules:
        return None
    either = "|".join(map(re.escape, modules))
    return re.compile(rf"(?:model[/.]|optim[/.]state[/.])?(?:{either})\.(?!0[./])\d+[./]")


def _unloaded_experts_only(sighting: Sighting) -> bool:
    """What rank 0's broadcast leaves out, and nothing else: a strict load reports only
    experts that rank 0 does not hold as missing; a non-strict one differs only in
    those experts' entries (stale values, lost optimizer state), plus integer-keyed
    optimizer entries, at most one per parameter that lost its state (where that
    state reappears)."""
    unloaded = _off_rank0_expert(sighting.scenario, broadcast_from_rank0=True)
    if unloaded is None:
        return False
    missing = _MISSING.search(sighting.message)
    if missing:
        names = _QUOTED.findall(missing.group(1))
        return (
            bool(names)
            and "Unexpected key(s)" not in sighting.message
            and all(unloaded.match(n) for n in names)
        )
    stray = [k for k in sighting.keys if not unloaded.match(k)]
    lost = {
        m.group(1) for k in sighting.keys if unloaded.match(k) and (m := _OPTIMIZER_ENTRY.match(k))
    }
    moved = {m.group(1) for k in stray if (m := _INTEGER_ENTRY.match(k))}
    return (
        len(stray) < len(sighting.keys)
        and all(_INTEGER_ENTRY.match(k) for k in stray)
        and len(moved) <= len(lost)
    )


# a name, not the f-string of torch's source line that a CheckpointException quotes
_KEY_ERROR = re.compile(r"^'([\w.]+)'$")


def _rank0_keys_are_not_every_ranks(sighting: Sighting) -> bool:
    """What sending rank 0's keys to every rank does: a KeyError (with ``cpu_offload``)
    on a rank lacking rank 0's own expert, or what ``_unloaded_experts_only`` says."""
    if not sighting.signature.startswith("KeyError"):
        return _unloaded_experts_only(sighting)
    found = _KEY_ERROR.match(sighting.message.strip())
    scenario = sighting.scenario
    rank0_expert = [
        t.plan.experts.module
        for t in _topologies(scenario)
        if isinstance(t.plan, S.FSDP2Plan)
        and t.plan.experts is not None
        and _options(broadcast_from_rank0=True, cpu_offload=True)(t)
    ]
    return found is not None and any(S.is_within(found.group(1), f"{m}.0") for m in rank0_expert)


_CHECKPOINT_LACKS = re.compile(r"Missing key in checkpoint state_dict: ([\w.]+?)\.?$", re.M)


def _checkpoint_lacks_off_rank0_expert(sighting: Sighting) -> bool:
    """The key the load misses is an expert's that global rank 0 does not hold."""
    dropped = _off_rank0_expert(sighting.scenario, full_state_dict=True, cpu_offload=True)
    found = _CHECKPOINT_LACKS.search(sighting.message)
    return dropped is not None and found is not None and dropped.match(found.group(1)) is not None


def _flat_local_dict_off_rank0(sighting: Sighting) -> bool:
    """A rank that ends with its own, still flat, optimizer state dict (no
    ``param_groups``) is one that was given none: off rank 0 under
    ``broadcast_from_rank0``."""
    broadcast = _options(
        full_state_dict=True, flatten_optimizer_state_dict=True, broadcast_from_rank0=True
    )
    return "'param_groups' @" not in sighting.signature or _on_a_topology(broadcast)(
        sighting.scenario
    )


def _all(*conditions: Callable[[S.Scenario], bool]) -> Callable[[S.Scenario], bool]:
    return lambda scenario: all(c(scenario) for c in conditions)


def _tied_frozen_names(scenario: S.Scenario) -> set[str]:
    """Every name (``model/...``) of a tied weight that is frozen at some point: from the
    start, by fine-tuning, or by a lifecycle's ``Freeze`` step."""
    aliases = scenario.model.aliases()
    freezes = {n for step in scenario.program if isinstance(step, S.Freeze) for n in step.names}
    frozen = set(scenario.fine_tuning_frozen) | freezes
    return {f"model/{n}" for p in frozen if len(aliases.get(p, ())) > 1 for n in aliases[p]}


def _frozen_tied_weight_skipped(scenario: S.Scenario) -> bool:
    """A frozen weight is tied, and a state dict is taken without frozen parameters: by a
    topology's options (a lifecycle save's included), or by fine-tuning (which saves its
    trainable state only)."""
    tied_frozen = bool(_tied_frozen_names(scenario))
    skipped = scenario.pretrained is not None or _on_a_topology(
        _options(ignore_frozen_params=True)
    )(scenario)
    return tied_frozen and skipped


_LISTED_MODEL_KEY = re.compile(r"'model/([^']+)'")


def _only_second_names_kept(sighting: Sighting) -> bool:
    """Every frozen name the state dict kept is a later name of a frozen tied weight
    (the first is the one removed).  The names: the failure's keys, else those its
    message lists."""
    aliases = sighting.scenario.model.aliases()
    frozen = sighting.scenario.fine_tuning_frozen
    later = {f"model/{n}" for p in frozen for n in aliases[p][1:]}
    kept = sighting.keys or tuple(f"model/{n}" for n in _LISTED_MODEL_KEY.findall(sighting.message))
    return bool(kept) and set(kept) <= later


_RELOADED_AT = re.compile(r"^  at program\[\d+\] (?:Load|Restart|Crash)\(", re.M)


def _frozen_tied_weight_reloaded(sighting: Sighting) -> bool:
    """The lifecycle face: right after a load of a checkpoint saved without frozen
    parameters, the only entries that differ from the reference are the names of a
    frozen tied weight (the checkpoint kept it under its later name, and the load put
    the saved value back where the job's own value must stay)."""
    names = _tied_frozen_names(sighting.scenario)
    reloaded = _RELOADED_AT.search(sighting.message) is not None
    return reloaded and bool(sighting.keys) and set(sighting.keys) <= names


def _tied_alias_kept_or_reloaded(sighting: Sighting) -> bool:
    if sighting.signature.startswith("PropertyFailure: ignore_frozen_params=True"):
        return _only_second_names_kept(sighting)
    return _frozen_tied_weight_reloaded(sighting)


def _unstepped_parameters(scenario: S.Scenario) -> frozenset[str]:
    """Trainable parameters that no step before the save gave a gradient (a skipped
    branch), where others have one: an optimizer with partial state.  Empty for an
    optimizer without state tensors, and where nothing was stepped (then
    ``get_state_dict`` initialises every parameter's state)."""
    if _stateless_optimizer(scenario):
        return frozenset()
    trainable = set(scenario.model.parameter_names()) - set(scenario.frozen)
    idle = scenario.model.idle_parameters(scenario.training.steps) & trainable
    return idle if trainable - idle else frozenset()


_CONTRACT_PROBLEM = re.compile(
    r"^  (\w+) (misses|has) \d+ (?:unexpected )?key\(s\): (\[.*\])$", re.M
)


def _only_unstepped_state_missing(sighting: Sighting) -> bool:
    """The contract's only complaint: optimizer state entries missing, each of a
    parameter that no step has given a gradient yet."""
    problems = _CONTRACT_PROBLEM.findall(sighting.message)
    unstepped = _unstepped_parameters(sighting.scenario)
    if not problems or any((what, how) != ("optimizer", "misses") for what, how, _ in problems):
        return False
    keys = [k for *_, listed in problems for k in re.findall(r"'([^']+)'", listed)]
    return bool(keys) and all(
        k.startswith("state.") and k[len("state.") :].rpartition(".")[0] in unstepped for k in keys
    )


def _strided_uneven_full_load(scenario: S.Scenario) -> bool:
    """The load applies a full state dict to an FSDP2 + TP plan on a shard dim of size
    > 1 where a colwise Linear's rows do not divide by tp size times shard size (its
    weight and bias are ``_StridedShard`` then), with optimizer state to distribute."""
    load = scenario.load_topology
    plan = load.plan
    if not (
        isinstance(plan, S.FSDP2Plan)
        and plan.tp is not None
        and load.state_dict.full_state_dict
        and not _stateless_optimizer(scenario)
    ):
        return False
    split = load.mesh.dim_size(plan.tp.dim) * load.mesh.dim_size(plan.shard_dim)
    return load.mesh.dim_size(plan.shard_dim) > 1 and any(
        scenario.model.module(col).out_features % split for col, _ in plan.tp.pairs
    )


def _frozen_at(scenario: S.Scenario, index: int) -> set[str]:
    """The parameters frozen when step ``index`` of the program runs."""
    frozen = set(scenario.frozen)
    for step in scenario.program[:index]:
        if isinstance(step, S.Freeze):
            frozen |= set(step.names)
        elif isinstance(step, S.Unfreeze):
            frozen -= set(step.names)
    return frozen


def _loaded_frozen_optim_state_missing(sighting: Sighting) -> bool:
    """Only optimizer state of parameters frozen at the failing load is missing."""
    at = re.search(r"at program\[(\d+)\]", sighting.message)
    if at is None or not sighting.keys:
        return False
    frozen = _frozen_at(sighting.scenario, int(at.group(1)))
    others = ("present after load", "elements differ", "dtype ", "shape ", " != ")
    return not any(word in sighting.message for word in others) and all(
        k.startswith("optim/state/") and k.split("/")[2] in frozen for k in sighting.keys
    )


def _unfrozen_then_loaded(scenario: S.Scenario) -> bool:
    """A parameter frozen at first (or by a step) is unfrozen before a later load."""
    kinds = [type(s) for s in scenario.program]
    loads = (S.Load, S.Restart, S.Crash)
    return S.Unfreeze in kinds and any(k in loads for k in kinds[kinds.index(S.Unfreeze) :])


_NO_SAVED_STATE = (
    r"Missing optimizer state for parameter '([^']+)'",
    r"Missing key in checkpoint state_dict: optim\.state\.(.+)\.\w+\.$",
)


def _missing_state_of_unfrozen(sighting: Sighting) -> bool:
    """The parameter the load misses optimizer state for is one the program unfroze."""
    lines = sighting.message.splitlines()
    found = [re.search(p, line) for p in _NO_SAVED_STATE for line in lines]
    names = {m.group(1) for m in found if m is not None}
    unfrozen = {n for s in sighting.scenario.program if isinstance(s, S.Unfreeze) for n in s.names}
    return len(names) == 1 and names <= unfrozen


def _frozen_then_loaded(scenario: S.Scenario) -> bool:
    kinds = [type(s) for s in scenario.program]
    loads = (S.Load, S.Restart, S.Crash)
    return S.Freeze in kinds and any(k in loads for k in kinds[kinds.index(S.Freeze) :])


def _restart_into_fewer_parameters(scenario: S.Scenario) -> bool:
    """A RestartInto loads a checkpoint into a model without some of its parameters."""
    params = set(scenario.model.parameter_names())
    return any(
        isinstance(s, S.RestartInto) and params - set(s.model.parameter_names())
        for s in scenario.program
    )


KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        id="dsd-partial-optim-state-init",
        title="a parameter saved without optimizer state (frozen then, or unfrozen and not yet "
        "stepped) cannot be loaded once it is trainable: the load template asks DCP for state "
        "the checkpoint never had, or set_optimizer_state_dict(strict=True) rejects it",
        pattern=r"^RuntimeError: Missing optimizer state for parameter '.*' in checkpoint\. "
        r"The parameter requires gradients but has no saved optimizer state\."
        r"|^RuntimeError: Missing key in checkpoint state_dict: optim\.state\..* "
        r"@ create_default_local_load_plan$",
        occurs_in=_unfrozen_then_loaded,
        shows=_missing_state_of_unfrozen,
        related=("https://github.com/pytorch/pytorch/issues/192202",),
        explanation="Optimizer state follows requires_grad: _init_optim_state steps only "
        "trainable parameters, and only when the optimizer has no state at all, so a parameter "
        "frozen at the save, or unfrozen since the last step, is saved without state.  Once it "
        "is trainable, the template that get_optimizer_state_dict makes for the load holds "
        "state for it (DCP: missing key), or the strict set_optimizer_state_dict requires it.  "
        "A plain Optimizer.load_state_dict accepts the checkpoint.",
    ),
    KnownBug(
        id="dsd-frozen-optim-state-dropped",
        title="set_optimizer_state_dict drops the saved optimizer state of a parameter that is "
        "frozen at load time",
        pattern=r"^PropertyFailure: state loaded from 'cN' on rank N: differences in N of N "
        r"entries \(bitwise\):",
        occurs_in=_frozen_then_loaded,
        shows=_loaded_frozen_optim_state_missing,
        related=("https://github.com/pytorch/pytorch/issues/192202",),
        explanation="_split_optim_state_dict and _unflatten_optim_state_dict keep state only for "
        "parameters with requires_grad, so a parameter trained, then frozen, loses its momentum "
        "or Adam moments at every load (and restarts from zero moments when unfrozen), though "
        "the checkpoint holds them and get_optimizer_state_dict saved them.",
    ),
    KnownBug(
        id="dsd-full-osd-stateless-optimizer",
        title="set_state_dict(full_state_dict=True) asserts for an optimizer without state "
        "tensors (SGD without momentum)",
        pattern=r"^AssertionError: Expected device to be set @ _load_optim_state_dict$",
        occurs_in=_all(_on_a_topology(_options(full_state_dict=True)), _stateless_optimizer),
        explanation="_load_optim_state_dict takes the device from optimizer state tensors with "
        "dim() > 0; a stateless optimizer has none, so loading a full optimizer "
        "state dict fails instead of being a no-op.",
    ),
    KnownBug(
        id="dsd-stateless-osd-param-groups-unmapped",
        title="set_optimizer_state_dict hands a stateless optimizer's loaded param groups to "
        "Optimizer.load_state_dict unmapped: a checkpoint of a model with more parameters "
        "(a layer removed since) fails naming no parameter, where one with state loads",
        pattern=r"^ValueError: loaded state dict contains a parameter group that doesn't match "
        r"the size of optimizer's group @ load_state_dict$",
        occurs_in=_all(_stateless_optimizer, _restart_into_fewer_parameters),
        explanation="state_dict.py, _split_optim_state_dict: `if all(isinstance(k, int) for k "
        "in optim_state_dict['state'])` returns the loaded dict as if it were keyed by "
        "parameter ids, and all() of an empty state is True; so the param groups keep the "
        "FQN lists that DCP read from the checkpoint (a non-tensor leaf, overwritten whole), "
        "listing parameters the model no longer has.  With optimizer state (Adam, SGD with "
        "momentum) the groups are rebuilt from the optimizer's own parameters and the same "
        "load succeeds with every entry as saved.  Diagnosis by dcprop; no upstream issue "
        "found.",
    ),
    KnownBug(
        id="dsd-flatten-full-osd",
        title="set_state_dict rejects its own full, flattened optimizer state dict "
        "(full_state_dict=True, flatten_optimizer_state_dict=True)",
        pattern=r"^KeyError: '(state|param_groups\.N\.params\.N)' @ "
        r"(_unflatten_state_dict|load_state_dict)$"
        r"|^KeyError: 'param_groups' @ _load_optim_state_dict$",
        occurs_in=_on_a_topology(_options(full_state_dict=True, flatten_optimizer_state_dict=True)),
        shows=_flat_local_dict_off_rank0,
        related=(
            "https://github.com/pytorch/pytorch/issues/192224",
            "https://github.com/pytorch/pytorch/issues/192225",
        ),
        explanation="_load_optim_state_dict's full_state_dict branch unflattens the given dict "
        "but builds the rank's local dict with flatten_optimizer_state_dict still on, so the "
        "two, flattened again by _flatten_state_dict, name the same entries differently "
        "(param_groups.0.lr against param_groups.fc.weight.lr).  Distributed, the full dict's "
        "keys land in the local dict without a mapping: KeyError in _unflatten_state_dict.  "
        "Broadcast from rank 0, only tensors are copied: rank 0 rebuilds a dict with "
        "param_groups but a still flat state (KeyError 'state' in load_state_dict), and the "
        "other ranks, given no dict, rebuild the flat local dict (KeyError 'param_groups').",
    ),
    KnownBug(
        id="dtensor-view-size1-shard",
        title="DTensor backward of a colwise-parallel Linear with one output feature: "
        "view of a Shard(1) [N, 1] tensor is refused",
        pattern=r"This operation would remove or reshape sharded dimension N",
        occurs_in=_colwise_single_output,
        related=(
            "https://github.com/pytorch/pytorch/issues/143372",
            "https://github.com/pytorch/pytorch/pull/135054",
        ),
        explanation="Sharding propagation for aten.view refuses to drop a sharded dim of size "
        "1, even on a mesh dim of size 1.",
    ),
    KnownBug(
        id="dcp-per-rank-param-groups",
        title="DCP keeps one copy of each rank's optimizer param_groups FQN list, so under "
        "expert parallelism a rank loads another rank's list",
        pattern=r"^ValueError: loaded state dict contains a parameter group that doesn't "
        r"match the size of optimizer's group @ load_state_dict$",
        occurs_in=_param_group_sizes_differ,
        explanation="Non-tensor values are saved as if replicated; with sub-mesh experts, ranks "
        "that train different numbers of parameters (frozen parameters in some experts, "
        "experts of different sizes, or a load that reshards onto a layout without experts) "
        "get a list that does not fit their optimizer.  Diagnosis by dcprop; no upstream "
        "issue found.",
    ),
    KnownBug(
        id="dsd-broadcast-default-group",
        title="set_*_state_dict(broadcast_from_rank0=True) broadcasts over the default process "
        "group, so a model on a sub-world deadlocks",
        pattern=r"^RankTimeout: .*waiting in _broadcast_state_dict",
        shows=_broadcast_off_the_model,
        certain_in=_broadcasts_off_the_model,
        explanation="_broadcast_state_dict calls broadcast_object_list with no group; ranks of "
        "the default group that do not hold the model never join.",
    ),
    KnownBug(
        id="dsd-broadcast-submesh-params",
        title="set_state_dict(broadcast_from_rank0=True) assumes rank 0 holds every parameter: "
        "parameters on a sub-mesh without rank 0 (experts) are not loaded",
        pattern=r"^RuntimeError: Error\(s\) in loading state_dict for \w+: Missing key\(s\)"
        r"|^PropertyFailure: state after load on rank N: differences in N of N entries"
        r"|^KeyError: '[\w.]+' @ _broadcast_state_dict$",
        occurs_in=_on_a_topology(_experts_with(broadcast_from_rank0=True)),
        shows=_rank0_keys_are_not_every_ranks,
        related=("https://github.com/pytorch/pytorch/pull/150239",),
        explanation="_broadcast_state_dict sends the keys of rank 0's dict only.  Rank 0's full "
        "state dict (from get_state_dict) has only its own experts, so other ranks' "
        "experts get nothing: a strict load reports them missing; a non-strict one "
        "silently keeps stale values and loses their optimizer state (it reappears "
        "under integer keys).  Giving rank 0 every expert does not help either: its "
        "own strict load rejects the experts it does not hold.  With cpu_offload, the "
        "ranks that lack rank 0's own expert fail on its key instead (``local_state_dict"
        "[key].cpu()`` for every key rank 0 sent).  Diagnosis by dcprop.",
    ),
    KnownBug(
        id="dsd-full-offload-drops-submesh-params",
        title="get_state_dict(full_state_dict=True, cpu_offload=True) keeps the full state "
        "dict on global rank 0 only, so parameters on a sub-mesh without rank 0 "
        "(experts) are in no rank's state dict",
        pattern=r"^RuntimeError: Missing key in checkpoint state_dict: (model|optim)\.",
        # the checkpoint's writer: get_state_dict ignores broadcast_from_rank0
        occurs_in=lambda scenario: _experts_with(full_state_dict=True, cpu_offload=True)(
            scenario.save
        ),
        shows=_checkpoint_lacks_off_rank0_expert,
        related=("https://github.com/pytorch/pytorch/pull/183037",),
        explanation="_maybe_full_or_cpu_state_dict gathers each DTensor on its own mesh, then "
        "keeps values on ranks_only=(0,) by *global* rank: an expert whose sub-mesh "
        "lacks rank 0 is gathered and dropped everywhere, so the checkpoint silently "
        "lacks it and the load fails.",
    ),
    KnownBug(
        id="dsd-ignore-frozen-tied-alias",
        title="get_state_dict(ignore_frozen_params=True) keeps a frozen tied weight under its "
        "second name",
        pattern=r"^PropertyFailure: ignore_frozen_params=True but the model state dict on "
        r"rank N holds frozen parameters"
        r"|^PropertyFailure: sharded job vs single-process reference on rank N: differences "
        r"in N of N entries \(.*\): @ do$",
        occurs_in=_frozen_tied_weight_skipped,
        shows=_tied_alias_kept_or_reloaded,
        explanation="_get_model_state_dict pops frozen parameters by iterating "
        "model.named_parameters(), which lists a shared Parameter once, so only its first "
        "name is removed (e.g. embed.weight goes, head.weight tied to it stays).  Shown on "
        "a plain nn.Module without FSDP.  A lifecycle shows its second face: a job that "
        "loads such a checkpoint (a restart's fresh job) gets the saved value of the frozen "
        "weight back through the kept name, where a checkpoint without frozen parameters "
        "must leave it as it was.  Diagnosis by dcprop; no upstream issue found.",
    ),
    KnownBug(
        id="dsd-partial-optimizer-state",
        title="get_state_dict leaves out the optimizer state of a trainable parameter that "
        "no step has given a gradient yet (a skipped branch, an unrouted expert), which "
        "set_state_dict and a fresh optimizer's load template both require",
        pattern=r"^PropertyFailure: state dict before save on rank N breaks the key contract:",
        occurs_in=lambda scenario: bool(_unstepped_parameters(scenario)),
        shows=_only_unstepped_state_missing,
        related=(
            "https://github.com/pytorch/pytorch/issues/192202",
            "https://github.com/pytorch/pytorch/pull/192307",
        ),
        explanation="_init_optim_state returns as soon as optim.state is non-empty, so once "
        "any parameter has stepped, parameters whose grad was always None keep no state and "
        "the checkpoint lacks them.  A resume cannot load it: a fresh optimizer's "
        "get_state_dict initialises every parameter, so the DCP load template asks for "
        "entries the checkpoint never had ('Missing key in checkpoint state_dict: "
        "optim.state.<fqn>.step'), and _split_optim_state_dict under strict=True refuses "
        "a trainable parameter without state.  dcprop's key contract expects that state "
        "(it is what the loader requires), so the failure shows where the bug is: before "
        "the save.",
    ),
    KnownBug(
        id="dsd-full-osd-strided-uneven",
        title="set_state_dict(full_state_dict=True) cannot distribute the optimizer state of "
        "an FSDP2 + TP parameter whose rows do not divide evenly (a bare AssertionError in "
        "_StridedShard._shard_tensor)",
        pattern=r"^AssertionError:\s+@ _shard_tensor$",
        occurs_in=_strided_uneven_full_load,
        related=(
            "https://github.com/pytorch/pytorch/pull/150490",
            "https://github.com/pytorch/pytorch/pull/135725",
        ),
        explanation="_load_optim_state_dict hands the full optimizer state to "
        "_distribute_state_dict, which calls distribute_tensor; for a _StridedShard placement "
        "that splits with padding and asserts every chunk has one shape, which an uneven "
        "split never has (the model's entries go through DTensor.from_local, which handles "
        "it: only the optimizer state fails).  Diagnosis by dcprop; no upstream issue found.",
    ),
    KnownBug(
        id="tc-direct-io-buffered-write",
        project="torch_checkpointing",
        title="torch_checkpointing's local file-system storage opens files with O_DIRECT and "
        "writes through a buffered file object: where the file system accepts O_DIRECT "
        "(ext4, xfs) the unaligned write fails with EINVAL, so no save completes",
        pattern=r"^OSError: (\[Errno N\] Invalid argument @ close|Unexpected response from "
        r"worker process: .* in _write_key @ _recv)$",
        # a multi-rank save fails earlier, in tc-metadata-gather-cuda (on CPU)
        occurs_in=lambda scenario: scenario.job_world == 1,
        shows=lambda sighting: "[Errno 22] Invalid argument" in sighting.message,
        certain_in=lambda scenario: scenario.job_world == 1,
        explanation="storage/filesystem.py, _DirectIOWriteStream.__enter__: os.open(path, "
        "O_RDWR|O_CREAT|O_TRUNC|O_DIRECT) succeeds on ext4, then os.fdopen(fd, 'wb') wraps "
        "it in a BufferedWriter, whose flush on close writes a Python buffer of arbitrary "
        "address and length: O_DIRECT requires both aligned, and write(2) fails with EINVAL "
        "(the fallback to buffered I/O covers only an EINVAL from open, as on tmpfs).  "
        "The async save shows it from its writer process.  The docs call the O_DIRECT "
        "fallback benign; use_direct_io=False steps past it.  Diagnosis by dcprop; no "
        "upstream issue found.",
    ),
    KnownBug(
        id="tc-metadata-gather-cuda",
        project="torch_checkpointing",
        title="torch_checkpointing's DefaultMetadataManager all-gathers sharding metadata "
        "through CUDA tensors, so a multi-rank save with a resharder fails on a CPU-only host",
        pattern=r"^AssertionError: Torch not compiled with CUDA enabled @ _lazy_init$",
        occurs_in=lambda scenario: scenario.job_world > 1 and scenario.device == "cpu",
        certain_in=lambda scenario: scenario.job_world > 1 and scenario.device == "cpu",
        explanation="metadata_manager.py, DefaultMetadataManager._all_gather_pickled_data "
        "builds torch.tensor([size], device='cuda') and .cuda() tensors whatever the "
        "process group's backend; CheckpointManager wires this manager in whenever an "
        "item has a resharder (the docs' way to reshard on load), and rank_info comes "
        "from the default group, so every save of a job of two or more ranks reaches it, "
        "even with the documented CPU staging configuration.  Diagnosis by dcprop; no "
        "upstream issue found.",
    ),
    KnownBug(
        id="tc-reshard-keeps-template-leaves",
        project="torch_checkpointing",
        title="torch_checkpointing's resharding load reads only the tensors of an item: its "
        "other leaves (an optimizer's learning rate) keep the values of the template, "
        "silently, even with strict=True",
        pattern=r"^PropertyFailure: full state after resharding .*: differences in N of N "
        r"entries \(bitwise\): @ assert_same$",
        # a scheduler moves the saved lr away from the fresh template's; resharding runs
        # for an item with tensors (optimizer state) whose layout changed
        occurs_in=lambda scenario: (
            scenario.load is not None
            and scenario.optimizer.scheduler is not None
            and not _stateless_optimizer(scenario)
        ),
        shows=lambda sighting: (
            bool(sighting.keys)
            and all(re.fullmatch(r"optim/param_groups\[\d+\]/lr", k) for k in sighting.keys)
        ),
        explanation="checkpoint_reader.py, CheckpointReader._read_with_resharding: for an item "
        "whose layout changed it returns the load template itself (result_dict = "
        "checkpoint_info.state_dict) after DefaultResharder.load copied the tensor shards "
        "into it; the resharder's sharding metadata covers tensors only, so non-tensor "
        "leaves are neither read nor reported among the unhandled paths, and strict=True "
        "cannot see them.  An item loaded without resharding reads its leaves.  Diagnosis "
        "by dcprop; no upstream issue found.",
    ),
)


def match_known(failure: ExampleFailure, scenario: S.Scenario) -> KnownBug | None:
    """The known upstream bug that explains every failure in ``failure`` (an example of
    ``scenario``), if one does: a new failure beside a known one is new.  Failures that
    known bugs explain, but not all the same one (one rank meets one bug, another rank
    another), are those bugs together (:func:`together`)."""
    seen = sightings(failure, scenario)
    whole = next((bug for bug in KNOWN_BUGS if all(bug.explains(s) for s in seen)), None)
    if whole is not None or not seen:
        return whole
    each = [next((bug for bug in KNOWN_BUGS if bug.explains(s)), None) for s in seen]
    return together(each) if all(each) else None


def _id(bug: KnownBug) -> str:
    return bug.id


def together(bugs: list[KnownBug | None]) -> KnownBug:
    """Known bugs met in one example, on different ranks, as one entry: its id joins
    theirs with ``+`` (a corpus entry expects it so), and it is certain nowhere."""
    unique = sorted({bug.id: bug for bug in bugs if bug is not None}.values(), key=_id)
    return KnownBug(
        id="+".join(bug.id for bug in unique),
        title=" / ".join(bug.title for bug in unique),
        pattern="",
        project=unique[0].project,
        related=tuple(link for bug in unique for link in bug.related),
        explanation="Each failing rank met one of these known bugs.",
    )


def describe(bug: KnownBug) -> dict[str, Any]:
    return {
        "id": bug.id,
        "title": bug.title,
        "related": list(bug.related),
    }
