"""The rank side of ``durability`` (see :mod:`dcprop.properties.durability`): the two
tasks of one example.

:func:`save_then_die` trains, saves checkpoint ``previous`` completely, changes every
entry (:meth:`~dcprop.properties._harness.Job.perturb`) and saves ``killed`` with the
scenario's :class:`~dcprop.specs.Kill` armed: its dying ranks never return.
:func:`check_durability` runs on fresh ranks: it recomputes both states (training is
deterministic, and so is the perturbation), then checks what the checkpointer left.
Both checkpoints live in a directory under the runner's (``ctx.runner_dir``), which
outlives the first task's ranks.
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Any

import torch.distributed as dist

from dcprop import specs as S
from dcprop.checkpointer import (
    Pending,
    StatefulCheckpointer,
    complete_checkpoints,
    latest_checkpoint,
    live,
    start_save,
)
from dcprop.compare import assert_same, local_values, mismatches
from dcprop.errors import PropertyFailure
from dcprop.properties._harness import DEFAULT_HOOKS, Hooks, Job, app_state_of, setup
from dcprop.properties._kills import armed, die
from dcprop.properties.durability import PHASE_PREFIX
from dcprop.runner.execute import RankContext

__all__ = ["check_durability", "save_then_die"]
PREVIOUS, KILLED = "previous", "killed"


def _root(ctx: RankContext, phase: str, *, fresh: bool) -> str:
    """The example's checkpoint root (``fresh``: made now, after rank 0 removed what an
    example whose second task never ran left behind)."""
    root = os.path.join(ctx.runner_dir, phase)
    if fresh and ctx.rank == 0:
        for stale in glob.glob(os.path.join(ctx.runner_dir, f"{PHASE_PREFIX}*")):
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(root)
    ctx.agree(True, "making the checkpoint root")
    return root


def _trained(ctx: RankContext, scenario: S.Scenario, root: str, hooks: Hooks) -> Job | None:
    job = setup(ctx, scenario, scenario.save, hooks=hooks)
    if job is not None:
        job.checkpoint_root = root
        for _ in range(scenario.training.steps):
            job.train_step()
    return job


def _change_everything(job: Job) -> None:
    """What happens between the two saves: every saved entry changes (as in roundtrip,
    frozen parameters a checkpoint leaves out stay)."""
    options = job.topology.state_dict
    frozen = set(job.scenario.frozen) if options.ignore_frozen_params else set()
    job.perturb(keep=lambda name: name in frozen)


def save_then_die(
    ctx: RankContext, scenario: S.Scenario, phase: str, hooks: Hooks = DEFAULT_HOOKS
) -> dict[str, Any]:
    """Task one: save ``previous``, then ``killed`` under the kill; dying ranks never
    return, the others return when their save ends (or fails, its peers gone)."""
    kill = scenario.kill
    assert kill is not None, "run_durability checks that the scenario has a kill"
    job = _trained(ctx, scenario, _root(ctx, phase, fresh=True), hooks)
    if job is None:
        return {}
    job.save(job.state(), PREVIOUS)
    _change_everything(job)
    state = job.state()
    pids: list[Any] = [None] * job.topology.world_size
    dist.all_gather_object(pids, os.getpid(), group=job.group)
    pending: Pending | None = None
    with armed(kill, job.rank, job.checkpoint_root, ctx.example_dir, dict(enumerate(pids))):
        if kill.at == "in_flight":
            pending = _start_save(job, state, KILLED)
        else:
            job.save(state, KILLED)
    if job.rank in kill.ranks:
        why = "its async save returned" if pending else "its save returned"
        die(kill, job.rank, ctx.example_dir, why)
    if pending is not None:
        pending.result()
    return {}


def _start_save(job: Job, state: dict[str, Any], name: str) -> Pending:
    """The checkpointer's async save of ``state`` (a synchronous one where it has none)."""
    checkpointer = live(job.hooks.checkpointer, job.ctx)
    if isinstance(checkpointer, StatefulCheckpointer):
        state = app_state_of(state, job.steps_taken)  # type: ignore[assignment]
    path = job.checkpoint_dir(name)
    return start_save(checkpointer, state, path, storage=job.scenario.storage, group=job.group)


def check_durability(
    ctx: RankContext, scenario: S.Scenario, phase: str, hooks: Hooks = DEFAULT_HOOKS
) -> dict[str, Any]:
    """Task two, on fresh ranks: ``previous`` loads and equals what was saved, bitwise,
    and is still listed complete; ``killed`` is listed complete, or is the checkpointer's
    latest, only if it loads and equals what was saved."""
    root = _root(ctx, phase, fresh=False)
    job = _trained(ctx, scenario, root, hooks)
    if job is None:
        return {}
    previous = local_values(job.state())
    _change_everything(job)
    killed = local_values(job.state())
    checkpointer = live(job.hooks.checkpointer, ctx)
    complete = [os.path.normpath(p) for p in complete_checkpoints(checkpointer, root)]
    latest = latest_checkpoint(checkpointer, root)
    latest = None if latest is None else os.path.normpath(latest)
    names = {job.checkpoint_dir(n): n for n in (PREVIOUS, KILLED)}
    found = {
        "complete": [names.get(p, p) for p in complete],
        "latest": names.get(latest, latest) if latest else None,
    }
    _check_loads(job, PREVIOUS, previous, "the previous complete checkpoint")
    if job.checkpoint_dir(PREVIOUS) not in complete:
        _fail(job, f"complete_checkpoints no longer lists the previous checkpoint: {found}")
    if latest is not None and latest not in names:
        _fail(job, f"latest points at neither checkpoint of the example: {found}")
    claims = [
        claim
        for claim, holds in (
            ("complete_checkpoints lists it", job.checkpoint_dir(KILLED) in complete),
            ("latest points at it", latest == job.checkpoint_dir(KILLED)),
        )
        if holds
    ]
    if claims:
        _check_loads(job, KILLED, killed, f"the killed save, which {' and '.join(claims)},")
    if ctx.rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    return found


def _check_loads(job: Job, name: str, expected: dict[str, Any], what: str) -> None:
    """Checkpoint ``name`` loads and equals ``expected`` bitwise, on every rank."""
    error: BaseException | None = None
    try:
        job.restore(name)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        error = e
    job.agree(error is None, f"loading {name}")
    if error is not None:
        _fail(job, f"{what} does not load: {type(error).__name__}: {error}", error)
    after = local_values(job.state())
    job.agree(not mismatches(expected, after), f"comparing {name}")
    try:
        assert_same(expected, after, what=f"{what} after loading", rank=job.rank)
    except PropertyFailure as e:
        raise PropertyFailure(f"{e}\n{_killed(job)}", keys=e.keys) from None


def _fail(job: Job, message: str, cause: BaseException | None = None) -> None:
    first, _, rest = message.partition("\n")
    raise PropertyFailure(f"{first} (rank {job.rank})\n{_killed(job)}{rest}") from cause


def _killed(job: Job) -> str:
    kill = job.scenario.kill
    return f"after a save where {kill.describe() if kill else 'no rank was killed'}"
