"""Known upstream (PyTorch) bugs that dcprop finds on stock torch.

A failure whose signature matches an entry is reported as *known*, not as a new
failure: ``dcprop check`` lists it under ``known`` and exits 0 unless
``--strict``.  Each entry's shrunk reproducer lives in the regression corpus
(``strategies/corpus/``) as an expected failure, so the suite notices when
upstream fixes it.  Never add an entry to hide a dcprop bug.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

__all__ = ["KNOWN_BUGS", "KnownBug", "match_known"]


@attrs.frozen
class KnownBug:
    id: str
    title: str
    signature: str  # a regular expression matched against the failure signature
    upstream: str | None = None  # the upstream issue, where one exists
    related: tuple[str, ...] = ()
    explanation: str = ""

    def matches(self, signature: str) -> bool:
        return re.search(self.signature, signature) is not None


KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        id="dsd-full-osd-stateless-optimizer",
        title="set_state_dict(full_state_dict=True) asserts for an optimizer without state "
        "tensors (SGD without momentum)",
        signature=r"^AssertionError: Expected device to be set @ _load_optim_state_dict$",
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
        explanation="Non-tensor values are saved as if replicated; with sub-mesh experts (and "
        "frozen parameters making lists differ in length) the loaded list does not "
        "fit the rank's optimizer.  Diagnosis by dcprop; no upstream issue found.",
    ),
    KnownBug(
        id="dsd-broadcast-default-group",
        title="set_*_state_dict(broadcast_from_rank0=True) broadcasts over the default process "
        "group, so a model on a sub-world deadlocks",
        signature=r"^RankTimeout: .*waiting in _broadcast_state_dict",
        explanation="_broadcast_state_dict calls broadcast_object_list with no group; ranks of "
        "the default group that do not hold the model never join.",
    ),
)


def match_known(signature: str) -> KnownBug | None:
    """The known upstream bug a failure signature belongs to, if any."""
    for bug in KNOWN_BUGS:
        if bug.matches(signature):
            return bug
    return None


def describe(bug: KnownBug) -> dict[str, Any]:
    return {
        "id": bug.id,
        "title": bug.title,
        "upstream": bug.upstream,
        "related": list(bug.related),
    }
