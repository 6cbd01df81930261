"""``lifecycles()``: programs for the ``lifecycle`` property, drawn step by step.

The strategy keeps what a job would hold while it draws (the frozen set, the
checkpoints saved, in flight and lost) and offers at each step only the kinds of step
that can run then, so every program is valid by construction, and stays valid while
Hypothesis shrinks it: a shrunk choice sequence is drawn again through the same rules.
Step kinds are offered in a fixed order that starts with ``Train``, so programs shrink
toward fewer steps, each a ``Train(1)``; a restart into a changed model is the last
kind, drawn rarely.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from dcprop import specs as S
from dcprop.errors import SpecError
from dcprop.strategies._lazy import defines_strategy
from dcprop.strategies._options import state_dict_options
from dcprop.strategies._validation import check_int, check_type

__all__ = ["STEP_KINDS", "lifecycles"]

#: the kinds of step a program draws, in the order they shrink toward
STEP_KINDS = (
    "train",
    "save",
    "load",
    "restart",
    "freeze",
    "unfreeze",
    "set_lr",
    "wait",
    "crash",
    "restart_into",
)
_LRS = (0.05, 0.005, 0.1)
#: Restart dtypes drawn.  None only, for now: after a restart into bf16 (or out of a
#: model's bf16 Linears into fp32) the reference comparison meets bf16 rounding that
#: differs by an ulp between reduction orders, beyond the float32 tolerance the property
#: compares with; ddp_parity's low-precision tolerance would have to come along first.
#: Programs with a dtype are written by hand meanwhile (tests/test_lifecycle.py).
_RESTART_DTYPES: tuple[str | None, ...] = (None,)


@attrs.define
class _Tracker:
    """What the program drawn so far leaves the job holding."""

    model: S.ModelSpec
    topology: S.Topology
    frozen: set[str]
    saved: dict[str, tuple[S.Save, frozenset[str]]] = attrs.field(factory=dict)
    in_flight: set[str] = attrs.field(factory=set)
    lost: set[str] = attrs.field(factory=set)

    def trainable(self) -> list[str]:
        return [n for n in self.model.parameter_names() if n not in self.frozen]

    def whole(self) -> list[str]:
        """Loadable checkpoints saved with every parameter (a restart into a changed
        model loads only those)."""
        return [n for n in self.loadable() if not self.saved[n][0].state_dict.ignore_frozen_params]

    def changes(self) -> tuple[S.ModelSpec, ...]:
        return _changed_models(self.model, self.topology, frozenset(self.frozen))

    def loadable(self, crash: bool = False) -> list[str]:
        out = []
        for name, (save, frozen) in self.saved.items():
            gone = name in self.lost or (name in self.in_flight and crash)
            if gone or (name in self.in_flight and not crash):
                continue
            if save.state_dict.ignore_frozen_params and frozen != self.frozen:
                continue  # it loads only under the frozen set it was saved with
            out.append(name)
        return out

    def after_wait(self) -> _Tracker:
        """The job once its saves in flight have finished (as a graceful restart waits)."""
        return _Tracker(self.model, self.topology, self.frozen, self.saved, set(), self.lost)

    def enabled(self) -> list[str]:
        ok = {
            # a step may skip every Skip body: something outside them must train
            "train": bool(self.model.ungated_parameters() - self.frozen),
            "save": True,
            "load": bool(self.loadable()),
            "restart": bool(self.after_wait().loadable()),
            "freeze": len(self.trainable()) > 1,
            "unfreeze": bool(self.frozen),
            "set_lr": True,
            "wait": bool(self.in_flight),
            "crash": bool(self.loadable(crash=True)),
            "restart_into": bool(self.whole()) and bool(self.changes()),
        }
        return [kind for kind in STEP_KINDS if ok[kind]]


@functools.lru_cache(maxsize=64)
def _changed_models(
    model: S.ModelSpec, topology: S.Topology, frozen: frozenset[str]
) -> tuple[S.ModelSpec, ...]:
    """``model`` with its last layer one output wider, with an extra Linear after it,
    or without it: those of the three that are valid models on ``topology`` and differ
    from ``model`` in their parameters."""
    children = model.root.children
    name, last = children[-1]
    candidates = []
    if isinstance(last, S.Linear):
        wider = attrs.evolve(last, out_features=last.out_features + 1)
        candidates.append((*children[:-1], (name, wider)))
    if "extra" not in dict(children):
        width = model.out_features
        candidates.append((*children, ("extra", S.Linear(width, width))))
    if len(children) > 1:
        candidates.append(children[:-1])
    out = []
    for layers in candidates:
        try:
            changed = S.ModelSpec(S.Block(layers), model.ties)
            keep = tuple(sorted(frozen & set(changed.parameter_names())))
            S.Scenario(changed, topology, frozen=keep)
        except SpecError:
            continue  # a tie or a plan that names the layer, a model left without one
        if changed.parameters() != model.parameters():
            out.append(changed)
    return tuple(out)


def _save_options() -> st.SearchStrategy[S.StateDictSpec]:
    return state_dict_options().map(
        lambda o: attrs.evolve(o, broadcast_from_rank0=False, strict=True, submodules=())
    )


@st.composite
def _step(draw: Any, t: _Tracker, restarts: Any, async_saves: bool) -> S.Step:
    kind = draw(st.sampled_from(t.enabled()))
    if kind == "train":
        return S.Train(draw(st.integers(1, 3)))
    if kind in ("freeze", "unfreeze"):
        pool = t.trainable() if kind == "freeze" else sorted(t.frozen)
        most = len(pool) - 1 if kind == "freeze" else len(pool)
        names = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=most, unique=True))
        return S.Freeze(names) if kind == "freeze" else S.Unfreeze(names)
    if kind == "set_lr":
        return S.SetLR(draw(st.sampled_from(_LRS)))
    if kind == "save":
        # one save in flight at a time, as trainers do (their collectives share a group)
        asynchronous = draw(st.booleans()) if async_saves and not t.in_flight else False
        return S.Save(f"c{len(t.saved)}", draw(_save_options()), async_=asynchronous)
    if kind == "wait":
        return S.Wait()
    if kind == "load":
        return S.Load(draw(st.sampled_from(t.loadable())), strict=not draw(st.booleans()))
    if kind == "restart":
        # a graceful restart awaits the saves in flight first
        topology, name = draw(restarts), draw(st.sampled_from(t.after_wait().loadable()))
        return S.Restart(topology, name, dtype=draw(st.sampled_from(_dtypes(t.model))))
    if kind == "restart_into":
        return S.RestartInto(draw(st.sampled_from(t.changes())), draw(st.sampled_from(t.whole())))
    return S.Crash(draw(restarts), draw(st.sampled_from(t.loadable(crash=True))))


@functools.lru_cache(maxsize=64)
def _dtypes(model: S.ModelSpec) -> tuple[str | None, ...]:
    """The restart dtypes ``model`` can be built in (a tie to a non-Linear cannot)."""
    out: list[str | None] = []
    for dtype in _RESTART_DTYPES:
        try:
            if dtype is not None:
                model.in_dtype(dtype)
        except SpecError:
            continue
        out.append(dtype)
    return tuple(out)


def _record(t: _Tracker, step: S.Step) -> None:
    if isinstance(step, S.Freeze):
        t.frozen |= set(step.names)
    elif isinstance(step, S.Unfreeze):
        t.frozen -= set(step.names)
    elif isinstance(step, S.Save):
        t.saved[step.name] = (step, frozenset(t.frozen))
        if step.async_:
            t.in_flight.add(step.name)
    elif isinstance(step, S.Wait):
        t.in_flight.clear()
    elif isinstance(step, S.Restart | S.Crash):
        if isinstance(step, S.Crash):
            t.lost |= t.in_flight
        t.in_flight.clear()
        t.topology = step.topology


@st.composite
def _programs(
    draw: Any,
    model: S.ModelSpec,
    topology: S.Topology,
    frozen: tuple[str, ...],
    restarts: Any,
    max_steps: int,
    async_saves: bool,
) -> tuple[S.Step, ...]:
    t = _Tracker(model, topology, set(frozen))
    program: list[S.Step] = []
    for _ in range(draw(st.integers(1, max_steps))):
        step = draw(_step(t, restarts, async_saves))
        _record(t, step)
        program.append(step)
    return tuple(program)


@defines_strategy
def lifecycles(
    model: S.ModelSpec,
    topology: S.Topology,
    *,
    frozen: tuple[str, ...] = (),
    restarts: Any = None,
    max_steps: int = 8,
    async_saves: bool = False,
) -> st.SearchStrategy[tuple[S.Step, ...]]:
    """Programs (tuples of :mod:`~dcprop.specs.lifecycle` steps) for ``model`` starting
    on ``topology`` with ``frozen`` parameters: training, freezing and unfreezing,
    learning-rate changes, saves (``async_saves``: some asynchronous), loads, restarts
    and crashes onto a topology drawn from ``restarts``
    (default: ``topology`` again), restarts into a changed model, at most ``max_steps``
    steps.  Every program is valid: loads name finished saves,
    something is always left to train.  Shrinks toward fewer steps, each a ``Train(1)``.

    >>> m = S.ModelSpec(S.Block((("fc", S.Linear(2, 2)),)))
    >>> t = S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan())
    >>> lifecycles(m, t).example()                                      # doctest: +SKIP
    (Train(steps=2), Save('c0'), Train(), Load('c0'))
    """
    check_type("model", model, S.ModelSpec)
    check_type("topology", topology, S.Topology)
    check_int("max_steps", max_steps, min_value=1, max_value=64)
    check_type("async_saves", async_saves, bool)
    try:
        S.Scenario(model, topology, frozen=frozen)
    except SpecError as e:
        raise InvalidArgument(f"frozen={frozen!r} does not fit the model: {e}") from None
    if restarts is None:
        restarts = st.just(topology)
    check_type("restarts", restarts, st.SearchStrategy)
    return _programs(model, topology, frozen, restarts, max_steps, async_saves)
