"""torchrun mode: every process is a rank; rank 0 drives, the others follow.

Under ``torchrun --nproc-per-node N`` (and so across nodes) rank 0 runs Hypothesis
or the CLI and calls :meth:`SPMDRunner.run` exactly as it would call
:meth:`Pool.run`; the task travels to every rank over a gloo control group, each
rank runs it through the same :func:`~dcprop.runner.execute.execute` as a pool
worker, and outcomes are gathered on rank 0.  The other ranks sit in
:meth:`SPMDRunner.follow` until rank 0 closes the runner.

Processes belong to torchrun, so a hang cannot be cured by a restart here: an
example's collectives wait at most its timeout (the process-group timeout of the
default group and of every group the example uses), rank 0 waits for the others'
outcomes at most that long again and a grace, and after that the runner refuses
further examples.

Across hosts every rank must see the checkpoints the others write: examples write
them under a checkpoint root that rank 0 creates and every rank checks it can see.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import tempfile
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

from dcprop.errors import ExampleFailure, ExampleSkipped, HarnessError, RunnerError, UsageError
from dcprop.runner import CHECKPOINT_ROOT_ENV, under_torchrun
from dcprop.runner.base import TaskRunner
from dcprop.runner.execute import execute
from dcprop.runner.failures import (
    failure_from_outcomes,
    innermost_first,
    waited_out,
)
from dcprop.runner.messages import Outcome, Task
from dcprop.runner.pool import DEFAULT_TIMEOUT
from dcprop.runner.preflight import preflight
from dcprop.runner.worker import backend_for, rank_device
from dcprop.runner.worlds import Worlds

__all__ = ["SPMDRunner"]

#: how long followers wait for rank 0's next task (torch's default for a gloo group)
_IDLE = timedelta(minutes=30)
#: how much longer than an example's timeout rank 0 waits for the other ranks' outcomes
_GRACE = 60.0
_ROOT_OPTIONS = (
    f"--checkpoint-root (dcprop check), --dcprop-checkpoint-root (pytest) or ${CHECKPOINT_ROOT_ENV}"
)


class SPMDRunner(TaskRunner):
    """A :class:`~dcprop.runner.base.Runner` over torchrun's processes."""

    def __init__(
        self, *, device: str = "cpu", timeout: float = DEFAULT_TIMEOUT, tmp_root: str | None = None
    ) -> None:
        """``tmp_root``: where examples write their checkpoints (default: the temp
        directory), the same path on every rank.  A job across hosts needs one that
        every host mounts: node-local temp directories are not shared."""
        if not under_torchrun():
            raise RunnerError(
                "SPMDRunner needs torchrun's environment (RANK, WORLD_SIZE, "
                "LOCAL_RANK, MASTER_ADDR); use Pool outside torchrun"
            )
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if tmp_root is None and local < world:
            raise UsageError(
                f"torchrun's job spans hosts ({world} ranks, {local} on this one): give "
                f"{_ROOT_OPTIONS} a directory every host mounts, for the checkpoints"
            )
        # GPUs are shared by the ranks of one host: their count decides, not the job's size
        backend, device_type = backend_for(device, local)
        self._device = rank_device(device_type, int(os.environ["LOCAL_RANK"]))
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout + _GRACE))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        self.timeout = timeout
        self.examples = 0
        self._control = dist.new_group(backend="gloo", timeout=_IDLE)
        self._worlds = Worlds(device_type)
        self._ids = itertools.count()
        self._broken = False  # the control group is gone: no rank can be told anything
        self._hung = False  # an example hung: its groups are unusable, the control group is not
        self._closed = False
        root = None if tmp_root is None else os.path.abspath(tmp_root)
        self._base: str | None = self._shared_base(root)
        problem = preflight(self._base, self._control)
        if problem is not None:
            self._broken = True  # every rank stops here: no rank follows
            self.close()
            raise RunnerError(f"rank {self.rank} failed its start-up check: {problem}")

    def _shared_base(self, root: str | None) -> str:
        """The run's directory, made by rank 0 under ``root``; every rank must see it,
        since ranks read checkpoints that other ranks wrote."""
        made: list[Any] = [(None, None)]  # (the directory, or why it could not be made)
        if self.rank == 0:
            try:
                # named for its host: a local pool's sweep of stale directories (by pid,
                # on its own host) must never take it for one of its own
                prefix = f"dcprop-torchrun-{socket.gethostname()}-{os.getpid()}-"
                made[0] = (tempfile.mkdtemp(prefix=prefix, dir=root), None)
            except OSError as e:
                made[0] = (None, f"cannot create a directory under {root}: {e}")
        dist.broadcast_object_list(made, src=0, group=self._control)
        base, reason = made[0]
        if reason is not None:  # on every rank
            raise UsageError(f"{reason}; give {_ROOT_OPTIONS} a directory that can be written")
        blind: list[Any] = [None] * self.world_size
        seen = os.path.isdir(base)
        dist.all_gather_object(blind, None if seen else socket.gethostname(), group=self._control)
        if any(blind):
            if self.rank == 0:
                shutil.rmtree(base, ignore_errors=True)
            hosts = ", ".join(sorted({h for h in blind if h}))
            raise UsageError(
                f"the ranks on {hosts} do not see {base}, made on rank 0's host: give "
                f"{_ROOT_OPTIONS} a directory every host mounts, for the checkpoints"
            )
        return base

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    _where = "torchrun's world"

    def _check_job(self, job: int, job_world_size: int | None) -> None:
        """torchrun's world is the job: an example whose job (``job_world_size``,
        default its own world) is of another size is skipped."""
        if job != self.world_size:
            raise ExampleSkipped(
                f"the example's job has {job} ranks but torchrun's world has "
                f"{self.world_size}: its default process group would not be its job"
            )

    def _ready(self) -> str:
        self._check_usable()
        assert self._base is not None
        return self._base

    def _run_task(
        self, task: Task, timeout: float
    ) -> tuple[dict[int, Outcome], ExampleFailure | HarnessError | None]:
        """``timeout`` is the process-group timeout of the example's collectives."""
        outcomes = {o.rank: o for o in self._round(task, timeout)}
        return outcomes, self._failure(outcomes, timeout)

    def _check_usable(self) -> None:
        if not self.is_driver:
            raise RunnerError("only rank 0 drives; other ranks call follow()")
        if self._closed:
            raise RunnerError("this runner is closed: its other ranks have exited")
        if self._broken or self._hung:
            raise RunnerError(
                "an earlier example hung; torchrun's processes cannot be "
                "restarted from inside, so this run cannot continue"
            )

    def _failure(
        self, by_rank: dict[int, Outcome], timeout: float
    ) -> ExampleFailure | HarnessError | None:
        """As the pool's, with one difference: a rank whose collective ran out of the
        process-group timeout (the only clock torchrun mode has) hung there, which is
        a hang, not a failure of the code under test."""
        hung = {r: o for r, o in by_rank.items() if waited_out(o)}
        if not hung:
            return failure_from_outcomes(by_rank)
        self._hung = True  # gloo's connections of the example's groups are gone
        return failure_from_outcomes(
            {r: o for r, o in by_rank.items() if r not in hung},
            hung=sorted(hung),
            stacks={r: innermost_first(o.traceback) for r, o in hung.items()},
            timeout=timeout,
        )

    def _round(self, task: Task, timeout: float) -> list[Outcome]:
        dist.broadcast_object_list([("run", (task, timeout))], src=0, group=self._control)
        return self._answer(task, timeout)

    def follow(self) -> int:
        """Run what rank 0 sends until it closes the runner; return the exit status it
        closed it with, for this process to exit with (torchrun's agents of other hosts
        would otherwise report success, after waiting for the failed one)."""
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=self._control)
            name, payload = box[0]
            if name == "shutdown":
                return int(payload)
            self._answer(*payload)

    def _answer(self, task: Task, timeout: float) -> list[Outcome]:
        """Run the task on this rank, its collectives under its timeout; gather every
        rank's outcome on rank 0, which waits for the others at most that long again
        and a grace."""
        self._worlds.set_timeout(timedelta(seconds=timeout))
        outcome = execute(task, self._worlds, self._device)
        gathered: list[Any] = [None] * self.world_size if self.is_driver else []
        _set_pg_timeout(timedelta(seconds=timeout + _GRACE), self._control)
        try:
            dist.gather_object(
                outcome, gathered if self.is_driver else None, dst=0, group=self._control
            )
        except Exception as e:
            self._broken = True
            raise RunnerError(f"ranks did not report within the process-group timeout: {e}") from e
        finally:
            _set_pg_timeout(_IDLE, self._control)
        return gathered

    def close(self, exit_code: int = 0) -> None:
        """On rank 0: release the other ranks, which exit with ``exit_code``.  Safe to
        call twice."""
        if self.is_driver and not (self._broken or self._closed):
            self._closed = True
            dist.broadcast_object_list([("shutdown", exit_code)], src=0, group=self._control)
        if self.is_driver and self._base is not None:  # the directory rank 0 made
            shutil.rmtree(self._base, ignore_errors=True)
        self._base = None
