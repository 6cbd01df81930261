"""The key contract: which entries a state dict must hold, known from the spec alone.

Comparing a state dict after a load with the one saved cannot notice an entry that is
missing from both.  The contract derives the keys instead: model keys from the model
spec (every name of every parameter, tied aliases included, and every persistent
buffer; frozen names left out under ``ignore_frozen_params``), optimizer keys from the
trainable parameters and the optimizer kind, both narrowed to what this rank owns (on
an expert layout a rank holds only the expert on its coordinate; a full state dict
with ``cpu_offload`` lives on rank 0 alone).

A buffer registered with ``persistent=False`` (a cache the constructor rebuilds) is
never a key: ``ModelSpec.buffers`` lists persistent buffers only, so one that shows
up in a state dict is an unexpected key.  Every trainable parameter has optimizer
state, including one that no step has given a gradient yet (a skipped branch):
``get_state_dict`` initialises an optimizer that has no state at all for exactly
that reason (``_init_optim_state``), and ``set_optimizer_state_dict`` under
``strict=True`` refuses a state dict that lacks a trainable parameter's state.

Optimizer keys are compared in torch's flattened form (``state.<fqn>.<name>``,
``param_groups.<fqn>.<hyperparameter>``); a nested optimizer state dict is read into
that form first, so both layouts meet one contract.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import attrs

from dcprop import specs as S
from dcprop.errors import PropertyFailure

__all__ = ["Contract", "expert_coordinate", "optimizer_entries"]

# What each optimizer keeps per parameter once it has stepped (DSD steps a fresh one).
_STATE_NAMES = {
    "sgd": (),
    "sgd+momentum": ("momentum_buffer",),
    "adam": ("step", "exp_avg", "exp_avg_sq"),
    "adamw": ("step", "exp_avg", "exp_avg_sq"),
}


def expert_coordinate(topology: S.Topology, rank: int) -> int | None:
    """The expert that ``rank`` holds under ``topology`` (None: not an expert layout)."""
    plan = topology.plan
    if not (isinstance(plan, S.FSDP2Plan) and plan.experts):
        return None
    coords = []
    for size in reversed(topology.mesh.shape):  # the mesh lists ranks row-major
        coords.append(rank % size)
        rank //= size
    coords.reverse()
    return coords[topology.mesh.dim_names.index(plan.experts.dim)]


@attrs.frozen
class Contract:
    """The keys of the state dict that ``get_state_dict(options)`` gives on ``rank``."""

    model: S.ModelSpec
    frozen: tuple[str, ...]
    optimizer: S.OptimizerSpec
    topology: S.Topology
    options: S.StateDictSpec
    rank: int

    def top_keys(self) -> frozenset[str]:
        """What the harness saves: the LR scheduler beside model and optimizer."""
        scheduler = ("scheduler",) if self.optimizer.scheduler else ()
        return frozenset(("model", "optim", *scheduler))

    def model_keys(self) -> frozenset[str]:
        if self._off_rank0(full_only=self.options.cpu_offload):
            return frozenset()
        names = [*self.model.state_dict_names(), *self.model.buffers()]
        skipped = self._frozen_names() if self.options.ignore_frozen_params else frozenset()
        return frozenset(n for n in names if self._owns(n) and n not in skipped)

    def optimizer_keys(self) -> frozenset[str]:
        # FSDP1 also keeps a full optimizer state dict on rank 0 alone when rank 0
        # broadcasts it (torch's FullOptimStateDictConfig(rank0_only=...)).
        fsdp1_rank0 = isinstance(self.topology.plan, S.FSDP1Plan) and (
            self.options.broadcast_from_rank0
        )
        if self._off_rank0(full_only=self.options.cpu_offload or fsdp1_rank0):
            return frozenset()
        frozen = set(self.frozen)
        trained = [n for n in self.model.parameter_names() if n not in frozen and self._owns(n)]
        hyper = _fresh(self.optimizer).hyperparameters
        names = [*_state_names(self.optimizer), *(f"/{h}" for h in hyper)]
        return frozenset(
            f"param_groups.{fqn}.{n[1:]}" if n.startswith("/") else f"state.{fqn}.{n}"
            for fqn in trained
            for n in names
        )

    def check(self, state: Mapping[str, Any], when: str) -> None:
        """Raise :class:`PropertyFailure` naming each missing and unexpected key."""
        problems = _differences("state", self.top_keys(), set(state))
        if "model" in state:
            model = set(state["model"])
            self._check_frozen_absent(model, when)
            problems += _differences("model", self.model_keys(), model)
        if "optim" in state:
            flat = self.options.flatten_optimizer_state_dict
            found = optimizer_entries(state["optim"], flattened=flat)
            problems += _differences("optimizer", self.optimizer_keys(), found)
        if "scheduler" in state:
            found = set(state["scheduler"])
            problems += _differences("scheduler", _fresh(self.optimizer).scheduler_keys, found)
        if problems:
            # the first lines stay the same across shrink steps: they are the signature
            raise PropertyFailure(
                f"state dict {when} on rank {self.rank} breaks the key contract:\n  "
                + "\n  ".join(problems)
                + f"\n  (the contract of {self._describe()})"
            )

    def _check_frozen_absent(self, keys: set[str], when: str) -> None:
        # its own message: a known upstream bug (dsd-ignore-frozen-tied-alias) reads so
        if not self.options.ignore_frozen_params:
            return
        present = sorted(keys & self._frozen_names())
        if present:
            raise PropertyFailure(
                f"ignore_frozen_params=True but the model state dict on rank {self.rank} "
                f"holds frozen parameters {present[:5]} ({when})",
                keys=tuple(f"model/{name}" for name in present),
            )

    def _frozen_names(self) -> frozenset[str]:
        aliases = self.model.aliases()
        return frozenset(n for p in self.frozen for n in aliases[p])

    def _owns(self, name: str) -> bool:
        mine = expert_coordinate(self.topology, self.rank)
        plan = self.topology.plan
        if mine is None or not isinstance(plan, S.FSDP2Plan) or plan.experts is None:
            return True
        expert = S.expert_index(name, plan.experts.module)
        return expert is None or expert == mine

    def _off_rank0(self, *, full_only: bool) -> bool:
        """A full state dict kept on rank 0 alone: every other rank's is empty."""
        return self.options.full_state_dict and full_only and self.rank != 0

    def _describe(self) -> str:
        set_options = [n for n, v in S.explicit_fields(self.options) if n is not None]
        return (
            f"{self.topology.plan_kind} on mesh {self.topology.mesh.shape}, "
            f"{self.optimizer!r}, options {set_options or 'default'}"
        )


def optimizer_entries(osd: Mapping[str, Any], *, flattened: bool) -> set[str]:
    """An optimizer state dict's entries in the flattened form (nested dicts read so);
    anything out of place comes back as itself, so it shows up as unexpected."""
    if flattened:
        return set(osd)
    out = {k for k in osd if k not in ("state", "param_groups")}
    for fqn, values in osd.get("state", {}).items():
        out.update(f"state.{fqn}.{name}" for name in values)
    seen: set[str] = set()
    for i, group in enumerate(osd.get("param_groups", [])):
        for fqn in group.get("params", []):
            if fqn in seen:
                out.add(f"param_groups[{i}] lists {fqn} a second time")
            seen.add(fqn)
            out.update(f"param_groups.{fqn}.{k}" for k in group if k != "params")
    return out


def _differences(what: str, expected: Iterable[str], found: set[str]) -> list[str]:
    missing, extra = sorted(set(expected) - found), sorted(found - set(expected))
    out = []
    if missing:
        out.append(f"{what} misses {len(missing)} key(s): {missing[:8]}")
    if extra:
        out.append(f"{what} has {len(extra)} unexpected key(s): {extra[:8]}")
    return out


def _state_names(spec: S.OptimizerSpec) -> tuple[str, ...]:
    kind = "sgd+momentum" if spec.kind == "sgd" and spec.momentum else spec.kind
    return _STATE_NAMES[kind]


class _Fresh(NamedTuple):
    hyperparameters: tuple[str, ...]
    scheduler_keys: frozenset[str]


@functools.lru_cache(maxsize=64)
def _fresh(spec: S.OptimizerSpec) -> _Fresh:
    """What the optimizer and LR scheduler that ``spec`` builds hold whatever they train:
    the names in a param group (torch's for the kind: lr, betas, eps, foreach, ...;
    ``initial_lr`` under a scheduler), ``params`` aside, and the scheduler's keys."""
    import torch

    from dcprop import build

    optimizer = build.optimizer_for([torch.nn.Parameter(torch.zeros(1))], spec)
    scheduler = build.scheduler_for(optimizer, spec)
    return _Fresh(
        tuple(sorted(k for k in optimizer.param_groups[0] if k != "params")),
        frozenset(scheduler.state_dict() if scheduler is not None else ()),
    )
