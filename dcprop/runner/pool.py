"""The controller: a persistent pool of rank processes that runs one example at a time.

Start-up (importing torch, joining a process group) is paid once; each example
then costs what its body costs.  Every way an example can go wrong becomes an
exception in the controller, never a hang:

* an exception on some ranks -> :class:`~dcprop.errors.ExampleFailure`, as soon as
  the other ranks report or a short grace period ends;
* ranks that do not finish -> :class:`~dcprop.errors.RankTimeout` with each hung
  rank's stacks (dumped by ``faulthandler``), after which the pool is restarted; as
  soon as the hang is certain (:func:`certain_hang`), else at the timeout;
* a rank that dies -> :class:`~dcprop.errors.RankCrashed`, pool restarted;
* more restarts than ``max_restarts`` -> :class:`~dcprop.errors.PoolExhausted`.

The controller never imports torch.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable
from multiprocessing.connection import Connection, wait
from typing import cast

from dcprop.errors import ExampleFailure, HarnessError, PoolExhausted, RunnerError
from dcprop.runner.base import TaskRunner
from dcprop.runner.failures import failure_from_outcomes
from dcprop.runner.kills import injected_kills
from dcprop.runner.messages import Blocked, Outcome, Task
from dcprop.runner.spawn import RankProcess

__all__ = ["DEFAULT_TIMEOUT", "Pool", "certain_hang", "remove_stale_tempdirs"]

DEFAULT_TIMEOUT = 30.0
TEMP_PREFIX = "dcprop-"
# A rank's report that it stands in a collective counts for this long (it repeats the
# report at every sample, worker.SAMPLE_INTERVAL, while it stays there): a rank too
# starved to report gets no early verdict.
FRESH = 1.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_prefix(pid: int) -> str:
    # The host is part of the name: on a checkpoint root that several hosts share, a pid
    # says nothing about another host's processes, so only this host's dirs are swept.
    return f"{TEMP_PREFIX}{pid}-{socket.gethostname()}-"


def remove_stale_tempdirs(root: str | None = None) -> list[str]:
    """Remove this host's dcprop temp dirs whose owning process is gone (a controller
    killed hard)."""
    removed = []
    for path in glob.glob(os.path.join(root or tempfile.gettempdir(), f"{TEMP_PREFIX}*-*")):
        try:
            pid = int(os.path.basename(path)[len(TEMP_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        mine = os.path.basename(path).startswith(_owner_prefix(pid))
        if mine and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class _Rank:
    __slots__ = ("conn", "log", "proc", "rank", "stacks")

    def __init__(
        self, rank: int, proc: RankProcess, conn: Connection, log: str, stacks: str
    ) -> None:
        self.rank, self.proc, self.conn, self.log, self.stacks = rank, proc, conn, log, stacks


class Pool(TaskRunner):
    """``world_size`` persistent ranks on ``device`` ("cpu" or "cuda").

    >>> with Pool(2) as pool:                                  # doctest: +SKIP
    ...     pool.run(my_property, scenario, world_size=2, meshes=(mesh,))

    ``timeout`` bounds each example (seconds); ``grace`` is how long the controller
    waits for the remaining ranks once one has failed; ``max_restarts`` bounds
    restarts after hangs and crashes over the pool's life.  ``detect_hangs`` ends an
    example as soon as its hang is certain (:func:`certain_hang`) instead of at the
    timeout; turn it off only to measure what it saves.
    """

    def __init__(
        self,
        world_size: int,
        *,
        device: str = "cpu",
        timeout: float = DEFAULT_TIMEOUT,
        grace: float = 3.0,
        max_restarts: int = 32,
        start_timeout: float = 180.0,
        tmp_root: str | None = None,
        detect_hangs: bool = True,
    ) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise RunnerError(f"world_size={world_size!r} must be a positive int")
        if device not in ("cpu", "cuda"):
            raise RunnerError(f"device={device!r} must be 'cpu' or 'cuda'")
        if timeout <= 0:
            raise RunnerError(f"timeout={timeout!r} must be positive (seconds)")
        self.world_size = world_size
        self.device = device
        self.timeout = float(timeout)
        self.grace = float(grace)
        self.max_restarts = max_restarts
        self.start_timeout = start_timeout
        self.detect_hangs = detect_hangs
        self.restarts = 0
        self._failed_restarts = 0  # restarts since the last example that ended healthy
        self.starts = 0
        self.examples = 0
        self.backend = ""
        self._tmp_root = tmp_root
        self._base: str | None = None
        self._ranks: list[_Rank] = []
        self._ids = itertools.count()
        self._needs_restart = False
        self._unfit: RunnerError | None = None  # the start-up check failed: it would again
        atexit.register(_close_ref, weakref.ref(self))

    # -- life cycle ----------------------------------------------------------------
    @property
    def started(self) -> bool:
        return bool(self._ranks)

    @property
    def base_dir(self) -> str | None:
        return self._base

    def pids(self) -> list[int]:
        return [r.proc.pid for r in self._ranks]

    def start(self) -> None:
        if self._ranks:
            return
        if self._unfit is not None:
            raise self._unfit
        if self._needs_restart:
            if self._failed_restarts >= self.max_restarts:
                raise PoolExhausted(
                    f"the pool was restarted {self._failed_restarts} times in a row without a "
                    f"healthy example (max_restarts={self.max_restarts}); raise max_restarts "
                    "or fix what hangs or crashes"
                )
            self.restarts += 1
            self._failed_restarts += 1
            self._needs_restart = False
        remove_stale_tempdirs(self._tmp_root)
        if self._base is None:
            self._base = tempfile.mkdtemp(prefix=_owner_prefix(os.getpid()), dir=self._tmp_root)
        incarnation = tempfile.mkdtemp(prefix=f"pool{self.starts}-", dir=self._base)
        self.starts += 1
        store = os.path.join(incarnation, "store")
        try:
            for rank in range(self.world_size):
                self._ranks.append(self._spawn(rank, store, incarnation))
            self._await_ready()
        except BaseException:
            self._kill()
            raise

    def _spawn(self, rank: int, store: str, incarnation: str) -> _Rank:
        ours, theirs = socket.socketpair()
        log = os.path.join(incarnation, f"rank{rank}.log")
        stacks = os.path.join(incarnation, f"rank{rank}.stacks")
        argv = [
            "--rank",
            str(rank),
            "--world-size",
            str(self.world_size),
            "--store",
            store,
            "--device",
            self.device,
            "--pg-timeout",
            str(self.timeout + 60.0),
            "--stacks",
            stacks,
        ]
        if self.detect_hangs:
            argv.append("--watch-collectives")
        proc = RankProcess(theirs, argv, log)
        theirs.close()
        conn = Connection(ours.detach())
        conn.send([p for p in sys.path])
        return _Rank(rank, proc, conn, log, stacks)

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        waiting = {r.conn: r for r in self._ranks}
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunnerError(
                    f"ranks {sorted(r.rank for r in waiting.values())} did not "
                    f"start within {self.start_timeout:.0f}s"
                )
            for conn in wait(list(waiting), timeout=remaining):
                r = waiting.pop(conn)  # type: ignore[call-overload]
                try:
                    _, info = cast(Connection, conn).recv()
                except EOFError:
                    raise RunnerError(
                        f"rank {r.rank} exited during start-up:\n{_tail(r.log)}"
                    ) from None
                if info["error"]:
                    self._unfit = RunnerError(
                        f"rank {r.rank} failed its start-up check: {info['error']}"
                    )
                    raise self._unfit
                self.backend = info["backend"]

    def close(self, exit_code: int = 0) -> None:
        """Stop every rank and remove the pool's temp dir.  Safe to call twice.
        (``exit_code`` is for torchrun's followers, :meth:`SPMDRunner.close`; local
        ranks have no exit status.)"""
        for r in self._ranks:
            with contextlib.suppress(OSError, ValueError):
                r.conn.send(("shutdown", None))
        deadline = time.monotonic() + 5.0
        for r in self._ranks:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    def _kill(self) -> None:
        for r in self._ranks:
            if r.proc.poll() is None:
                r.proc.kill()
        for r in self._ranks:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=10)
            r.conn.close()
        if self._ranks:
            self._needs_restart = True
        self._ranks = []

    # -- examples ------------------------------------------------------------------
    _where = "a pool"

    def _check_job(self, job: int, job_world_size: int | None) -> None:
        if job_world_size is not None and job != self.world_size:
            raise RunnerError(
                f"job_world_size={job} needs a pool of that many ranks, not "
                f"{self.world_size}; run it on dcprop.runner.Pools"
            )

    def _ready(self) -> str:
        self.start()
        assert self._base is not None
        return self._base

    def _run_task(
        self, task: Task, timeout: float
    ) -> tuple[dict[int, Outcome], ExampleFailure | HarnessError | None]:
        example = self._send(task, timeout)
        # read now: the example's directory, and the kill markers in it, go when it ends
        injected = injected_kills(task.example_dir, example.crashed)
        return example.outcomes, self._failure(example, timeout, injected)

    def _send(self, task: Task, timeout: float) -> _Example:
        """Send ``task`` to every rank and collect what they report."""
        try:
            payload = pickle.dumps(task)
        except Exception as e:
            raise RunnerError(f"cannot send {task.fn!r} and its arguments to the ranks: {e}") from e
        try:
            for r in self._ranks:
                r.conn.send(("run", payload))
            return self._collect(_Example(task.id, self._ranks, timeout, self.grace))
        except BaseException:
            self._kill()  # interrupted mid-example: ranks may be inside collectives
            raise

    def _collect(self, example: _Example) -> _Example:
        """Dispatch the ranks' messages to ``example`` until every rank has reported,
        the timeout, the grace period after a failure, or a certain hang."""
        while example.pending and not example.certain:
            remaining = example.deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(example.pending), timeout=min(remaining, FRESH)):
                example.receive(example.pending[conn])  # type: ignore[index]
            example.check_hang()
        return example

    def _failure(
        self, example: _Example, timeout: float, injected: dict[int, str]
    ) -> ExampleFailure | HarnessError | None:
        """The example's failure (None if it passed), after stopping the ranks a hang or
        a crash left unusable (``injected``: the deaths the example caused on purpose)."""
        hung = example.hung
        stacks = self._stacks(hung) if hung else {}
        if hung or example.crashed:
            self._kill()
        else:
            self._failed_restarts = 0
        return failure_from_outcomes(
            example.outcomes,
            hung=hung,
            crashed=example.crashed,
            stacks=stacks,
            timeout=timeout,
            certain=example.certain,
            injected=injected,
        )

    def _stacks(self, ranks: list[int]) -> dict[int, str]:
        for r in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._ranks[r].proc.pid, signal.SIGUSR1)
        _wait_until_quiet([self._ranks[r].stacks for r in ranks])
        return {r: _main_thread_stack(self._ranks[r].stacks) for r in ranks}


class _Example:
    """What the controller knows of one example while its ranks run it; each message
    a rank sends goes to the method named for it (``rank_<name>``), as pytest-xdist's
    controller dispatches ``worker_<event>``."""

    def __init__(self, task: int, ranks: list[_Rank], timeout: float, grace: float) -> None:
        self.task = task
        self.pending = {r.conn: r for r in ranks}
        self.outcomes: dict[int, Outcome] = {}
        self.crashed: dict[int, int] = {}  # exit codes of the ranks that died
        self.finished: dict[int, float] = {}  # when each rank reported or was seen dead
        self.blocked: dict[int, tuple[Blocked, float]] = {}  # latest report, when it came
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.grace = grace
        self.certain = ""  # why the hang is certain, once it is

    @property
    def hung(self) -> list[int]:
        """The ranks that have not reported (yet)."""
        return sorted(r.rank for r in self.pending.values())

    def receive(self, r: _Rank) -> None:
        try:
            name, payload = r.conn.recv()
        except (EOFError, OSError):
            self.rank_died(r)
            return
        handler = getattr(self, f"rank_{name}", None)
        if handler is None:
            raise RunnerError(f"rank {r.rank} sent an unknown message {name!r}")
        handler(r, payload)

    def rank_outcome(self, r: _Rank, outcome: Outcome) -> None:
        self._finish(r)
        self.outcomes[r.rank] = outcome
        if outcome.failed:
            self._shorten()

    def rank_died(self, r: _Rank) -> None:
        code = _exit_code(r.proc)
        self._finish(r)
        self.crashed[r.rank] = code
        self._shorten()

    def rank_blocked(self, r: _Rank, blocked: Blocked) -> None:
        if blocked.task == self.task:
            self.blocked[r.rank] = (blocked, time.monotonic())

    def rank_moved(self, r: _Rank, task: int) -> None:
        self.blocked.pop(r.rank, None)

    def check_hang(self) -> None:
        """Note whether the hang is certain, from the ranks' current reports."""
        now = time.monotonic()
        current = {r: b for r, (b, seen) in self.blocked.items() if now - seen <= FRESH}
        why = certain_hang(self.hung, current, self.finished)
        if why:
            self.certain = f"after {now - self.started:.1f}s, {why}"

    def _finish(self, r: _Rank) -> None:
        del self.pending[r.conn]
        self.finished[r.rank] = time.monotonic()

    def _shorten(self) -> None:
        """A rank failed: wait for the others only for the grace period."""
        self.deadline = min(self.deadline, time.monotonic() + self.grace)


def certain_hang(
    running: Iterable[int], blocked: dict[int, Blocked], finished: dict[int, float]
) -> str:
    """Why the ranks still ``running`` can never finish, or "" if that is not certain.

    Certain when every one of them stands in a collective (``blocked``: its current
    report) whose group holds a rank that had reported its outcome, or died, before it
    entered (``finished``: when; one clock for every process).  A rank that has
    reported runs nothing more until the next example, which the controller holds
    back, and a dead one nothing at all: it never joins that collective, and under
    gloo no rank's part of a collective ends before the peers it exchanges with have
    joined.  A rank that computes, or waits in a collective that every member may
    still join, keeps the example alive until the timeout.
    """
    running = list(running)
    why = []
    for r in running:
        b = blocked.get(r)
        if b is None:
            return ""
        absent = [m for m in b.ranks if finished.get(m, math.inf) < b.entered_after]
        if not absent:
            return ""
        why.append(f"rank {r} waits in {b.op} over ranks {list(b.ranks)}, left by {absent}")
    return "; ".join(why)


def _exit_code(proc: RankProcess) -> int:
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return 0


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _wait_until_quiet(paths: list[str], limit: float = 3.0) -> None:
    """Wait until faulthandler has finished writing: sizes stop changing."""
    deadline = time.monotonic() + limit
    sizes: list[int] = []
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = [os.path.getsize(p) if os.path.exists(p) else 0 for p in paths]
        if now == sizes and all(now):
            return
        sizes = now


def _main_thread_stack(path: str) -> str:
    """The faulthandler dump in ``path``, without the rank's watchdog threads."""
    blocks = _tail(path, 400).strip().split("\n\n")
    keep = [b for b in blocks if "in watch" not in b]  # both watchdogs' loops: watch*
    return "\n\n".join(keep).strip()


def _close_ref(ref: weakref.ref) -> None:
    pool = ref()
    if pool is not None:
        pool.close()
