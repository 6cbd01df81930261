"""The rank side of ``durability`` (see :mod:`dcprop.properties.durability`): the two
tasks of one example.

:func:`save_then_die` trains, saves checkpoint ``previous`` completely, trains one
more step and saves ``killed`` with the scenario's :class:`~dcprop.specs.Kill` armed:
its dying ranks never return.  :func:`check_durability` runs on fresh ranks: it
recomputes both states, since training is deterministic (a perturbation, as
``roundtrip`` uses, would not do: its noise differs between the replicas of a tensor
where the local shards before it differ in size, and DCP saves one replica), then
checks what the checkpointer left.
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
from dcprop.errors import PropertyFailure, headline
from dcprop.properties._harness import (
    DEFAULT_HOOKS,
    Hooks,
    Job,
    app_state_of,
    load_template_overrides,
    setup,
)
from dcprop.properties._kills import armed, die
from dcprop.properties.durability import PHASE_PREFIX
from dcprop.runner.execute import RankContext, root_cause

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
    job.train_step()
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
    """Task two, on fresh ranks: every checkpoint the checkpointer calls complete (or
    latest) loads and equals what was saved into it, bitwise, and one survives:
    ``previous``, unless the killed save is whole and claimed (a checkpointer may retire
    the previous checkpoint once the next is complete)."""
    job = _trained(ctx, scenario, _root(ctx, phase, fresh=False), hooks)
    if job is None:
        return {}
    expected = {PREVIOUS: local_values(job.state())}
    job.train_step()
    expected[KILLED] = local_values(job.state())
    found = _claims(job)
    if not (found["complete"] or found["latest"]):
        _fail(job, f"no complete checkpoint survives, not even the previous one: {found}")
    if found["latest"] not in (None, PREVIOUS, KILLED):
        _fail(job, f"latest points at neither checkpoint of the example: {found}")
    if KILLED not in found["claimed"] and PREVIOUS not in found["claimed"]:
        _fail(job, f"the previous checkpoint is no longer listed complete: {found}")
    for name in (PREVIOUS, KILLED):
        if name in found["claimed"]:
            what = "the previous checkpoint" if name == PREVIOUS else "the killed save"
            _check_loads(job, name, expected[name], f"{what} ({found['claimed'][name]})")
    if ctx.rank == 0:
        shutil.rmtree(job.checkpoint_root, ignore_errors=True)
    return {key: found[key] for key in ("complete", "latest")}


def _claims(job: Job) -> dict[str, Any]:
    """What the checkpointer says of the example's checkpoint root: the complete
    checkpoints and the latest (by name where they are the example's own), and what it
    claims of each of the two checkpoints."""
    root = job.checkpoint_root
    checkpointer = live(job.hooks.checkpointer, job.ctx)
    names = {job.checkpoint_dir(n): n for n in (PREVIOUS, KILLED)}
    complete = [os.path.normpath(p) for p in complete_checkpoints(checkpointer, root)]
    latest = latest_checkpoint(checkpointer, root)
    latest = None if latest is None else names.get(os.path.normpath(latest), latest)
    complete = [names.get(p, p) for p in complete]
    claimed = {}
    for name in (PREVIOUS, KILLED):
        claims = ["listed complete"] if name in complete else []
        claims += ["latest"] if latest == name else []
        if claims:
            claimed[name] = ", ".join(claims)
    return {"complete": complete, "latest": latest, "claimed": claimed}


def _check_loads(job: Job, name: str, expected: dict[str, Any], what: str) -> None:
    """Checkpoint ``name`` loads and equals ``expected`` bitwise, on every rank.

    The previous checkpoint was whole before the kill: an error loading it is raised
    as it is, the very failure a ``roundtrip`` would meet (and a known bug matches by
    it).  An error loading the killed save, which the checkpointer calls complete,
    is this property's failure."""
    steps = job.scenario.training.steps + (name == KILLED)
    target = job.state(**load_template_overrides(job.topology.state_dict))
    error: BaseException | None = None
    try:
        job.load(target, name, step=steps)
        job.apply(target)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if name == PREVIOUS:
            raise
        error = e
    job.agree(error is None, f"loading {name}")
    if error is not None:
        root, _ = root_cause(error)  # DCP's CheckpointException: the error it wraps
        _fail(job, f"{what} does not load: {type(root).__name__}: {headline(str(root))}", error)
    after = local_values(job.state())
    job.agree(not mismatches(expected, after), f"comparing {name}")
    try:
        assert_same(expected, after, what=f"{what} after loading", rank=job.rank)
    except PropertyFailure as e:
        raise PropertyFailure(f"{e}\n{_killed(job)}", keys=e.keys) from None


def _fail(job: Job, message: str, cause: BaseException | None = None) -> None:
    """Raise the failure: its first line is its identity (the signature), the kill,
    which changes as an example shrinks, follows."""
    raise PropertyFailure(f"{message} (rank {job.rank})\n{_killed(job)}") from cause


def _killed(job: Job) -> str:
    kill = job.scenario.kill
    return f"after a save where {kill.describe() if kill else 'no rank was killed'}"
