"""lifecycle: a program of train, freeze, save, load, restart and crash steps, checked
against a single-process reference after every step.

Every rank runs two jobs side by side:

* the sharded job (:class:`~dcprop.properties._harness.Job`) on the scenario's topology,
  then on each restart's, saving and loading through the checkpointer under test;
* the reference: the same model unsharded in this process, trained on the same global
  batches in plain PyTorch, whose checkpoints are exact in-memory copies.

A job's state is its model, optimizer, LR scheduler and *train state*: a step counter,
the position of a stateful data sampler (rows consumed; it picks the next batch) and a
per-rank training RNG (drawn once per step, as dropout or augmentation would).  The RNG
is saved under a per-rank key (``rng_rank{r}``); a job restores its own rank's, and a
rank the checkpoint has no RNG for (a restart on a larger world) starts a fresh one
seeded from the scenario seed, its rank and the restored step, as the reference does.

After every step the sharded job's gathered state must match the reference's: train
state, LR and scheduler exactly, tensors within the reduction-order tolerance of
``ddp_parity`` (the two sum the same rows in another order and split), and every train
step's loss the same way.  Right after a load, a restart or a crash the sharded state
must equal, bitwise, what the sharded job held when it saved that checkpoint; a
checkpoint saved without frozen parameters leaves them at their values from before
the load (the documented partial-load rule).  The reference comparison is also the key
contract here: an entry missing on one side is a mismatch.

Lifecycle models have no normalisation layers: their exactly-zero gradients make
Adam's steps rounding noise (``ddp_parity`` tracks such elements with a float64 twin,
which a program's loads and restarts would have to carry along).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Collection
from typing import Any

import attrs
import torch

from dcprop import build
from dcprop import specs as S
from dcprop.checkpointer import Pending
from dcprop.compare import assert_same, full_values
from dcprop.errors import PropertyFailure, UsageError
from dcprop.properties._harness import (
    DEFAULT_HOOKS,
    FULL_STATE,
    Hooks,
    Job,
    canonical_name,
    checkpointer_error,
    global_rows,
    load_template_overrides,
)
from dcprop.properties.ddp_parity import ATOL, RTOL, _backward, _state_options
from dcprop.runner.execute import RankContext

__all__ = ["WHERE", "TrainState", "lifecycle", "where"]

TRAIN = "train"


@attrs.define
class TrainState:
    """A job's step counter, sampler position (rows consumed) and this rank's RNG."""

    step: int
    position: int
    rng: torch.Generator

    @classmethod
    def fresh(cls, scenario: S.Scenario, rank: int, step: int = 0, position: int = 0) -> TrainState:
        seed = scenario.seed * 1_000_003 + 7919 * rank + step
        return cls(step, position, torch.Generator().manual_seed(seed))

    def advance(self, rows: int) -> None:
        self.step += 1
        self.position += rows
        torch.randint(0, 2**31, (1,), generator=self.rng)

    def state_dict(self, rank: int) -> dict[str, Any]:
        return {
            "step": self.step,
            "position": self.position,
            f"rng_rank{rank}": self.rng.get_state(),
        }

    @classmethod
    def restored(
        cls, scenario: S.Scenario, rank: int, saved: dict[str, Any], world: int
    ) -> TrainState:
        """The train state loaded from ``saved`` (a checkpoint of ``world`` ranks)."""
        state = cls.fresh(scenario, rank, saved["step"], saved["position"])
        if rank < world:
            state.rng.set_state(saved[f"rng_rank{rank}"])
        return state


def template(rank: int, world: int) -> dict[str, Any]:
    """A train state to load a checkpoint of ``world`` ranks into."""
    out: dict[str, Any] = {"step": -1, "position": -1}
    if rank < world:
        out[f"rng_rank{rank}"] = torch.Generator().get_state().zero_()
    return out


@attrs.define
class Saved:
    """What one Save left: its step, the world and model that saved it, the frozen set
    then, and both sides' states (the sharded job's as full values on this rank)."""

    step: S.Save
    world: int
    model: S.ModelSpec
    frozen: frozenset[str]
    sharded: dict[str, Any] | None
    reference: dict[str, Any]
    train_step: int


def lifecycle(
    ctx: RankContext, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS
) -> dict[str, Any]:
    if not scenario.program:
        raise UsageError("lifecycle needs a scenario with a program (Scenario(program=...))")
    run = _Run(ctx, scenario, hooks)
    try:
        for index, step in enumerate(scenario.program):
            run.do(index, step)
    finally:
        run.finish()
    return {"losses": run.losses, "refused": run.refused}


class _Run:
    """The two jobs of one program on this rank, and the checkpoints they saved."""

    def __init__(self, ctx: RankContext, scenario: S.Scenario, hooks: Hooks) -> None:
        self.ctx, self.scenario, self.hooks = ctx, scenario, hooks
        self.rows = global_rows(scenario)
        self.frozen = frozenset(scenario.frozen)
        self.job: Job | None = None
        self.train: TrainState | None = None
        self.reference = _Reference(ctx, scenario, hooks, scenario.seed)
        self.saved: dict[str, Saved] = {}
        self.pending: dict[str, Pending] = {}
        self.lost: list[Pending] = []
        self.losses: list[float] = []
        #: each RestartInto's error on this rank (None: it loaded)
        self.refused: list[str | None] = []
        self._start(scenario.save, scenario.seed, scenario.model)

    def _start(self, topology: S.Topology, seed: int, model: S.ModelSpec) -> None:
        self.topology, self.world, self.model = topology, topology.world_size, model
        self.job = None
        if self.ctx.rank < topology.world_size:
            self.job = self._new_job(topology, seed, model)
            self.train = TrainState.fresh(self.scenario, self.ctx.rank)

    def _new_job(self, topology: S.Topology, seed: int, model: S.ModelSpec) -> Job:
        # every optimizer holds every parameter, so that what it holds never depends
        # on when it was built; the frozen set is then applied as a Freeze step would
        job = Job(
            self.ctx, self.scenario, topology, model=model, seed=seed, frozen=(), hooks=self.hooks
        )
        frozen = self.frozen & set(model.parameter_names())
        job.frozen = tuple(sorted(frozen))
        _set_requires_grad(job.model, frozen, False)
        return job

    def do(self, index: int, step: S.Step) -> None:
        failed: BaseException | None = None
        try:
            loaded = self._apply(index, step)
            if self.job is not None:
                self._compare(loaded)
        except BaseException as e:
            failed = e
        self.ctx.agree(failed is None, f"program[{index}] {step!r}")
        if isinstance(failed, PropertyFailure):
            # the step goes last: the first line is the signature, the same across shrinks
            raise PropertyFailure(f"{failed}\n  {where(index, step)}", keys=failed.keys) from None
        if failed is not None:
            note = getattr(failed, "add_note", None)  # Python 3.11+: shown in the traceback
            if note is not None:
                note(where(index, step))
            raise failed

    def _apply(self, index: int, step: S.Step) -> Saved | None:
        """Run ``step`` on both jobs; the checkpoint it loaded, if any."""
        if isinstance(step, S.Train):
            for _ in range(step.steps):
                self._train_step()
        elif isinstance(step, (S.Freeze, S.Unfreeze)):
            self._refreeze(set(step.names), freeze=isinstance(step, S.Freeze))
        elif isinstance(step, S.SetLR):
            for optimizer in self._optimizers():
                for group in optimizer.param_groups:
                    group["lr"] = step.lr
        elif isinstance(step, S.Save):
            self._save(step)
        elif isinstance(step, S.Wait):
            self._await()
        elif isinstance(step, S.Load):
            return self._load(step.name, strict=step.strict)
        elif isinstance(step, (S.Restart, S.Crash)):
            return self._restart(index, step)
        elif isinstance(step, S.RestartInto):
            self._restart_into(index, step)
        return None

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        job = [self.job.optimizer] if self.job is not None else []
        return [*job, self.reference.optimizer]

    def _train_step(self) -> None:
        expected = self.reference.train_step(self.rows)
        if self.job is None or self.train is None:
            return
        self.job.resume_at(self.train.position // self.rows)
        loss = self.job.train_step()
        self.train.advance(self.rows)
        self.losses.append(loss)
        if abs(loss - expected) > ATOL + RTOL * abs(expected):
            raise PropertyFailure(
                f"train step {self.train.step}: loss {loss!r} != reference loss {expected!r} "
                f"(rtol={RTOL:g}, atol={ATOL:g}) on rank {self.ctx.rank}"
            )

    def _refreeze(self, names: set[str], *, freeze: bool) -> None:
        self.frozen = self.frozen | names if freeze else self.frozen - names
        _set_requires_grad(self.reference.module, names, not freeze)
        if self.job is not None:
            self.job.frozen = tuple(sorted(self.frozen))
            _set_requires_grad(self.job.model, names, not freeze)

    def _save(self, step: S.Save) -> None:
        sharded = None
        if self.job is not None and self.train is not None:
            state = self.job.state(step.state_dict)
            state[TRAIN] = self.train.state_dict(self.ctx.rank)
            self.job.resume_at(self.train.step)  # the step an app state's train_state holds
            if step.async_:
                group = self.ctx.checkpoint_group(self.world)  # training goes on meanwhile
                self.pending[step.name] = self.job.start_save(state, step.name, group)
            else:
                self.job.save(state, step.name)
            sharded = self._sharded_state()
        self.saved[step.name] = Saved(
            step,
            self.world,
            self.model,
            self.frozen,
            sharded,
            self.reference.snapshot(),
            self.reference.train.step if self.train is None else self.train.step,
        )

    def _await(self) -> None:
        while self.pending:
            _, pending = self.pending.popitem()
            pending.result()

    def _load(self, name: str, *, strict: bool) -> Saved:
        saved = self.saved[name]
        self.reference.restore(saved)
        if self.job is None or self.train is None:
            return saved
        options = saved.step.state_dict
        target = self.job.state(options, **load_template_overrides(options))
        target[TRAIN] = template(self.ctx.rank, saved.world)
        self.job.load(target, name, step=saved.train_step)
        self.job.apply(target, options, **({} if strict else {"strict": False}))
        self.train = TrainState.restored(self.scenario, self.ctx.rank, target[TRAIN], saved.world)
        return saved

    def _restart(self, index: int, step: S.Restart | S.Crash) -> Saved:
        failed: BaseException | None = None
        try:
            if isinstance(step, S.Crash):
                # A dead job's saves in flight are never loaded.  Their writer threads are
                # let finish before the next job starts (a dead process's would be gone):
                # their collectives would otherwise meet the next job's saves' on one group.
                self.lost.extend(self.pending.values())
                self.pending.clear()
                self._end_lost()
            else:
                self._await()
        except BaseException as e:
            failed = e
        # every rank of the next job waits for them, also those the old job did not hold
        self.ctx.agree(failed is None, "awaiting the saves in flight")
        if failed is not None:
            raise failed
        seed = self.scenario.seed + 1 + index  # fresh weights: a value never loaded shows
        model = self.scenario.model
        if isinstance(step, S.Restart) and step.dtype is not None:
            model = model.in_dtype(step.dtype)
        self.reference = _Reference(
            self.ctx, self.scenario, self.hooks, seed, self.frozen, model=model
        )
        self._start(step.topology, seed, model)
        return self._load(step.checkpoint, strict=True)

    def _restart_into(self, index: int, step: S.RestartInto) -> None:
        """A fresh job of the changed model tries to load the checkpoint, then goes; the
        job from before goes on (ranks outside it hold no job to change)."""
        if self.job is None:
            return
        saved = self.saved[step.checkpoint]
        job = self._new_job(self.topology, self.scenario.seed + 1 + index, step.model)
        options = saved.step.state_dict
        fresh = full_values(job.state(**FULL_STATE))  # the dtypes a load must keep
        target = job.state(options, **load_template_overrides(options))
        target[TRAIN] = template(self.ctx.rank, saved.world)
        # only the checkpointer's load may refuse, as in loud_failure: an error from
        # applying what it loaded is the example's failure
        error = checkpointer_error(lambda: job.load(target, step.checkpoint, step=saved.train_step))
        self.refused.append(error)
        if job.any_rank(error is not None):
            changed = _changed_entries(saved.model, step.model)
            _check_loud(error or "another rank's load raised", changed, step, self.ctx.rank)
            return
        job.apply(target, options)
        state = full_values(job.state(**FULL_STATE))
        actual = {k: v for k, v in state.items() if k.startswith(("model/", "optim/state/"))}
        assert saved.sharded is not None
        expected = _cast_like({k: saved.sharded[k] for k in actual if k in saved.sharded}, fresh)
        assert_same(
            expected,
            actual,
            what=f"a restart into a changed model loaded {step.checkpoint!r} without an error "
            "(it must fail naming a changed entry, or load each entry as saved):",
            rank=self.ctx.rank,
        )

    def _sharded_state(self) -> dict[str, Any]:
        """The sharded job's whole state as full values (collective over its ranks)."""
        assert self.job is not None and self.train is not None
        state = self.job.state(**FULL_STATE)
        state[TRAIN] = self.train.state_dict(self.ctx.rank)
        return full_values(state)

    def _compare(self, loaded: Saved | None) -> None:
        actual = self._sharded_state()
        expected = self.reference.state(self.ctx.rank)
        if loaded is not None and loaded.sharded is not None:
            self._compare_loaded(loaded, actual, expected)
        assert_same(
            _without_fresh_state(expected),
            _without_fresh_state(actual),
            what="sharded job vs single-process reference",
            rank=self.ctx.rank,
            rtol=RTOL,
            atol=ATOL,
        )

    def _compare_loaded(
        self, loaded: Saved, actual: dict[str, Any], reference: dict[str, Any]
    ) -> None:
        """Right after a load: exactly what the sharded job saved, cast to the dtype the
        reference's fresh model holds each entry in (its frozen parameters as they were
        before the load where the checkpoint left them out)."""
        assert loaded.sharded is not None
        # this rank saved it, so it restores its RNG
        expected = _cast_like(loaded.sharded, reference)
        for key in _left_out(loaded, self.scenario.model):
            expected[key] = actual[key]  # the reference holds the value it must keep
        assert_same(
            expected, actual, what=f"state loaded from {loaded.step.name!r}", rank=self.ctx.rank
        )

    def _end_lost(self) -> None:
        lost, self.lost = self.lost, []
        for pending in lost:
            with contextlib.suppress(Exception):  # the job that started it is gone
                pending.result()

    def finish(self) -> None:
        """Await every save still in flight: its writer thread must end before the
        example's directory goes."""
        self._end_lost()
        self._await()


def where(index: int, step: S.Step) -> str:
    """How a failure names the step it happened at (``at program[3] Load('c0')``)."""
    return f"at program[{index}] {step!r}"


#: finds the step a failure happened at in its message
WHERE = re.compile(r"at program\[(\d+)\]")


def _set_requires_grad(module: torch.nn.Module, names: Collection[str], value: bool) -> None:
    for name, p in module.named_parameters():
        if canonical_name(name) in names:
            p.requires_grad_(value)


def _without_fresh_state(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` without the optimizer state that equals a fresh one (every value zero).

    ``get_optimizer_state_dict`` gives zero state to trainable parameters that have none
    when the optimizer has no state at all (torch's ``_init_optim_state``), a side
    effect of looking, so which parameters hold it depends on when each run was looked
    at.  Zero state steps exactly as no state (SGD's momentum buffer, Adam's moments at
    step 0), so the two are the same state; a nonzero entry still counts."""
    state: dict[str, list[str]] = {}
    for key in flat:
        if key.startswith("optim/state/"):
            state.setdefault(key.rsplit("/", 1)[0], []).append(key)
    fresh = {
        key
        for keys in state.values()
        if all(isinstance(flat[k], torch.Tensor) and not bool(flat[k].any()) for k in keys)
        for key in keys
    }
    return {k: v for k, v in flat.items() if k not in fresh}


def _changed_entries(saved: S.ModelSpec, model: S.ModelSpec) -> list[str]:
    """The entries of ``model`` that a checkpoint of ``saved`` lacks or holds with
    another shape: what a strict load into ``model`` must name as it fails."""
    before = {**saved.parameters(), **saved.buffers()}
    after = {**model.parameters(), **model.buffers()}
    return sorted(name for name, shape in after.items() if before.get(name) != shape)


def _check_loud(text: str, changed: list[str], step: S.RestartInto, rank: int) -> None:
    """A failed load into a changed model is right only if it names a changed entry
    (``text``: the error, or that another rank's load raised; that rank checks it)."""
    checkpoint = step.checkpoint
    if text.startswith("another rank"):
        return
    if not changed:
        raise PropertyFailure(
            f"a restart into a changed model failed to load {checkpoint!r}, though the "
            f"checkpoint holds every entry of that model with its shape (DCP loads exactly "
            f"the entries asked for), on rank {rank}: {text}"
        )
    if not any(name in text for name in changed):
        raise PropertyFailure(
            f"a restart into a changed model failed to load {checkpoint!r} without naming "
            f"any of the changed entries {changed}, on rank {rank}: {text}",
            keys=[f"model/{name}" for name in changed],
        )


def _cast_like(saved: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with each floating tensor cast to the dtype of ``reference``'s entry (a
    fresh job's: one built in another dtype loads into tensors of that dtype)."""
    out = dict(saved)
    for key, value in saved.items():
        like = reference.get(key)
        if (
            isinstance(value, torch.Tensor)
            and isinstance(like, torch.Tensor)
            and value.is_floating_point()
            and like.is_floating_point()
        ):
            out[key] = value.to(like.dtype)
    return out


def _left_out(saved: Saved, model: S.ModelSpec) -> list[str]:
    """The keys of frozen parameters a checkpoint saved without them."""
    if not saved.step.state_dict.ignore_frozen_params:
        return []
    aliases = model.aliases()
    return [f"model/{alias}" for name in saved.frozen for alias in aliases[name]]


class _Reference:
    """The single-process run: the whole model in plain PyTorch on this rank.  Its
    loads cast as DCP's do: ``load_state_dict`` copies into the module's tensors, and
    ``Optimizer.load_state_dict`` casts state to its parameter's dtype."""

    def __init__(
        self,
        ctx: RankContext,
        scenario: S.Scenario,
        hooks: Hooks,
        seed: int,
        frozen: frozenset[str] | None = None,
        model: S.ModelSpec | None = None,
    ) -> None:
        self.ctx, self.scenario = ctx, scenario
        self.module = hooks.model_factory(model or scenario.model, seed, ctx.device, ())
        self.optimizer = build.optimizer_for(self.module.parameters(), scenario.optimizer)
        _set_requires_grad(self.module, scenario.frozen if frozen is None else frozen, False)
        self.scheduler = build.scheduler_for(self.optimizer, scenario.optimizer)
        self.train = TrainState.fresh(scenario, ctx.rank)

    def train_step(self, rows: int) -> float:
        from dcprop.properties._harness import batch_rows

        x, _ = batch_rows(
            self.scenario.model,
            self.scenario.training,
            self.train.position // rows,
            0,
            1,
            rows,
            self.ctx.device,
        )
        total, width = _backward(self.module, x, rows)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.train.advance(rows)
        return float(total.detach().to(torch.float64).item()) / (rows * width)

    def _tree(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.module, self.optimizer, options=_state_options())
        tree: dict[str, Any] = {"model": msd, "optim": osd}
        if self.scheduler is not None:
            tree["scheduler"] = self.scheduler.state_dict()
        return tree

    def state(self, rank: int) -> dict[str, Any]:
        """As the sharded job's ``_sharded_state`` flattens its own."""
        return full_values({**self._tree(), TRAIN: self.train.state_dict(rank)})

    def snapshot(self) -> dict[str, Any]:
        """An exact in-memory checkpoint (every rank's RNG is derived, so only ours)."""
        return copy.deepcopy(
            {
                "module": self.module.state_dict(),
                "optim": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "train": (self.train.step, self.train.position, self.train.rng.get_state()),
            }
        )

    def restore(self, saved: Saved) -> None:
        snap = copy.deepcopy(saved.reference)
        keep = {k for k in _left_out(saved, self.scenario.model)}
        current = self.module.state_dict()
        module = {k: current[k] if f"model/{k}" in keep else v for k, v in snap["module"].items()}
        self.module.load_state_dict(module)
        self.optimizer.load_state_dict(snap["optim"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        step, position, rng = snap["train"]
        self.train = TrainState.fresh(self.scenario, self.ctx.rank, step, position)
        if self.ctx.rank < saved.world:
            self.train.rng.set_state(rng)
