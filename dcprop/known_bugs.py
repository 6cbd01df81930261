"""Known upstream (PyTorch) bugs that dcprop finds on stock torch.

A failure whose signature matches an entry, in a scenario that the entry says the
bug can occur in, is reported as *known*, not as a new failure: ``dcprop check``
lists it under ``known`` and exits 0 unless ``--strict``.  Each entry's shrunk
reproducer lives in the regression corpus (``strategies/corpus/``) as an expected
failure, so the suite notices when upstream fixes it.  Never add an entry to hide
a dcprop bug.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

from dcprop import specs as S

__all__ = ["KNOWN_BUGS", "KnownBug", "match_known"]


def _always(scenario: S.Scenario) -> bool:
    return True


@attrs.frozen
class KnownBug:
    """One upstream bug: what it is, and how to recognise a failure as this bug.

    A failure is this bug when its signature matches ``signature`` *and* its scenario
    is one the bug can occur in (``occurs_in``): a narrow match, so that a new bug
    with a similar message in an unrelated scenario is still reported as new.
    """

    id: str
    title: str
    signature: str  # a regular expression searched in the failure signature
    occurs_in: Callable[[S.Scenario], bool] = _always
    upstream: str | None = None  # the upstream issue, where one exists
    related: tuple[str, ...] = ()
    explanation: str = ""

    def matches(self, signature: str, scenario: S.Scenario) -> bool:
        return re.search(self.signature, signature) is not None and self.occurs_in(scenario)


def _on_a_topology(condition: Callable[[S.Topology], bool]) -> Callable[[S.Scenario], bool]:
    """A scenario condition: ``condition`` holds for the save or the load topology."""
    return lambda scenario: any(condition(t) for t in (scenario.save, scenario.load_topology))


def _options(**wanted: bool) -> Callable[[S.Topology], bool]:
    return lambda t: all(getattr(t.state_dict, k) == v for k, v in wanted.items())


def _experts_with(**wanted: bool) -> Callable[[S.Topology], bool]:
    def condition(t: S.Topology) -> bool:
        plan = t.plan
        return isinstance(plan, S.FSDP2Plan) and plan.experts is not None and _options(**wanted)(t)

    return condition


def _tensor_parallel(t: S.Topology) -> bool:
    return isinstance(t.plan, S.FSDP2Plan) and t.plan.tp is not None


def _frozen_tied_weight_skipped(scenario: S.Scenario) -> bool:
    aliases = scenario.model.aliases()
    tied_frozen = any(len(aliases[p]) > 1 for p in scenario.frozen)
    return tied_frozen and _on_a_topology(_options(ignore_frozen_params=True))(scenario)


KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        id="dsd-full-osd-stateless-optimizer",
        title="set_state_dict(full_state_dict=True) asserts for an optimizer without state "
        "tensors (SGD without momentum)",
        signature=r"^AssertionError: Expected device to be set @ _load_optim_state_dict$",
        occurs_in=_on_a_topology(_options(full_state_dict=True)),
        explanation="_load_optim_state_dict takes the device from optimizer state tensors with "
        "dim() > 0; a stateless optimizer has none, so loading a full optimizer "
        "state dict fails instead of being a no-op.",
    ),
    KnownBug(
        id="dsd-flatten-full-osd",
        title="set_state_dict rejects its own full, flattened optimizer state dict "
        "(full_state_dict=True, flatten_optimizer_state_dict=True)",
        signature=r"^KeyError: '(state|param_groups\.N\.params\.N)' @ "
        r"(_unflatten_state_dict|load_state_dict)$",
        occurs_in=_on_a_topology(_options(full_state_dict=True, flatten_optimizer_state_dict=True)),
        related=(
            "https://github.com/pytorch/pytorch/issues/192224",
            "https://github.com/pytorch/pytorch/issues/192225",
        ),
        explanation="_load_optim_state_dict's full_state_dict branch re-flattens the already "
        "flat dict and _unflatten_state_dict then looks up keys its mapping lacks.",
    ),
    KnownBug(
        id="dtensor-view-size1-shard",
        title="DTensor backward of a colwise-parallel Linear with one output feature: "
        "view of a Shard(1) [N, 1] tensor is refused",
        signature=r"This operation would remove or reshape sharded dimension N",
        occurs_in=_on_a_topology(_tensor_parallel),
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
        signature=r"^ValueError: loaded state dict contains a parameter group that doesn't "
        r"match the size of optimizer's group @ load_state_dict$",
        occurs_in=_on_a_topology(_experts_with()),
        explanation="Non-tensor values are saved as if replicated; with sub-mesh experts (and "
        "frozen parameters making lists differ in length) the loaded list does not "
        "fit the rank's optimizer.  Diagnosis by dcprop; no upstream issue found.",
    ),
    KnownBug(
        id="dsd-broadcast-default-group",
        title="set_*_state_dict(broadcast_from_rank0=True) broadcasts over the default process "
        "group, so a model on a sub-world deadlocks",
        signature=r"^RankTimeout: .*waiting in _broadcast_state_dict",
        occurs_in=_on_a_topology(_options(broadcast_from_rank0=True)),
        explanation="_broadcast_state_dict calls broadcast_object_list with no group; ranks of "
        "the default group that do not hold the model never join.",
    ),
    KnownBug(
        id="dsd-broadcast-submesh-params",
        title="set_state_dict(broadcast_from_rank0=True) assumes rank 0 holds every parameter: "
        "parameters on a sub-mesh without rank 0 (experts) are not loaded",
        signature=r"^RuntimeError: Error\(s\) in loading state_dict for \w+: Missing key\(s\)"
        r"|^PropertyFailure: state after load on rank N: differences in N of N entries",
        occurs_in=_on_a_topology(_experts_with(broadcast_from_rank0=True)),
        related=("https://github.com/pytorch/pytorch/pull/150239",),
        explanation="_broadcast_state_dict sends the keys of rank 0's dict only.  Rank 0's full "
        "state dict (from get_state_dict) has only its own experts, so other ranks' "
        "experts get nothing: a strict load reports them missing; a non-strict one "
        "silently keeps stale values and loses their optimizer state (it reappears "
        "under integer keys).  Giving rank 0 every expert does not help either: its "
        "own strict load rejects the experts it does not hold.  Diagnosis by dcprop.",
    ),
    KnownBug(
        id="dsd-full-offload-drops-submesh-params",
        title="get_state_dict(full_state_dict=True, cpu_offload=True) keeps the full state "
        "dict on global rank 0 only, so parameters on a sub-mesh without rank 0 "
        "(experts) are in no rank's state dict",
        signature=r"^RuntimeError: Missing key in checkpoint state_dict: (model|optim)\.",
        occurs_in=_on_a_topology(
            _experts_with(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
        ),
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
        signature=r"^PropertyFailure: ignore_frozen_params=True but the model state dict on "
        r"rank N holds frozen parameters",
        occurs_in=_frozen_tied_weight_skipped,
        explanation="_get_model_state_dict pops frozen parameters by iterating "
        "model.named_parameters(), which lists a shared Parameter once, so only its first "
        "name is removed (e.g. embed.weight goes, head.weight tied to it stays).  Shown on "
        "a plain nn.Module without FSDP.  Diagnosis by dcprop; no upstream issue found.",
    ),
)


def match_known(signature: str, scenario: S.Scenario) -> KnownBug | None:
    """The known upstream bug that a failure of ``scenario`` with ``signature`` is, if any."""
    for bug in KNOWN_BUGS:
        if bug.matches(signature, scenario):
            return bug
    return None


def describe(bug: KnownBug) -> dict[str, Any]:
    return {
        "id": bug.id,
        "title": bug.title,
        "upstream": bug.upstream,
        "related": list(bug.related),
    }
