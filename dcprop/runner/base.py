"""The interface every runner offers (:class:`~dcprop.runner.pool.Pool`,
:class:`~dcprop.runner.pools.Pools`, :class:`~dcprop.runner.spmd.SPMDRunner`): what
properties, campaigns and reproducers call on one."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from dcprop.errors import ExampleFailure, HarnessError
from dcprop.runner.failures import example_sizes
from dcprop.runner.messages import Outcome, Task
from dcprop.specs import MeshSpec

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

__all__ = ["Runner", "TaskRunner", "example_dir"]


class Runner(Protocol):
    """Runs one example at a time on ranks ``0..world_size-1``.

    :meth:`run` returns ``{rank: value}`` or raises
    :class:`~dcprop.errors.ExampleFailure` (the example failed, hung or crashed: a
    verdict on the code under test), :class:`~dcprop.errors.ExampleSkipped` (this
    runner cannot run the example as described) or
    :class:`~dcprop.errors.RunnerError` (the runner itself, or dcprop's harness,
    failed: never a verdict, never shrunk).
    """

    #: the most ranks an example may use
    world_size: int

    def run(
        self,
        fn: Callable[..., Any] | str,
        *args: Any,
        world_size: int | None = None,
        meshes: Sequence[MeshSpec] = (),
        seed: int = 0,
        timeout: float | None = None,
        job_world_size: int | None = None,
    ) -> dict[int, Any]: ...

    def close(self, exit_code: int = 0) -> None:
        """Stop the ranks (under torchrun: release them to exit with ``exit_code``).
        Safe to call twice."""
        ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TaskRunner(Runner):
    """What :class:`~dcprop.runner.pool.Pool` and :class:`~dcprop.runner.spmd.SPMDRunner`
    share: :meth:`run` checks the example's sizes, gives it a directory, sends it to
    the ranks as one :class:`~dcprop.runner.messages.Task`, and turns their outcomes
    into values or a failure.  A subclass says where an example's job may run
    (:meth:`_check_job`), readies its ranks (:meth:`_ready`) and runs a task on them
    (:meth:`_run_task`)."""

    device: str
    timeout: float
    examples: int
    _ids: Iterator[int]
    _where: str  # this runner's ranks, as an error names them

    def run(
        self,
        fn: Callable[..., Any] | str,
        *args: Any,
        world_size: int | None = None,
        meshes: Sequence[MeshSpec] = (),
        seed: int = 0,
        timeout: float | None = None,
        job_world_size: int | None = None,
    ) -> dict[int, Any]:
        """Call ``fn(ctx, *args)`` on ranks ``0..world_size-1``; return ``{rank: value}``.

        ``fn`` must be importable by reference (a module-level function, or its
        ``"module:qualname"``).  Raises :class:`~dcprop.errors.ExampleFailure` (or a
        subclass) if any rank fails.  ``job_world_size`` is the size of the example's
        default process group (see :class:`~dcprop.runner.pools.Pools`); ``timeout``
        (default the runner's) bounds the example.
        """
        meshes = tuple(meshes)
        k, job = example_sizes(world_size, meshes, job_world_size, self.world_size, self._where)
        self._check_job(job, job_world_size)
        timeout = self.timeout if timeout is None else timeout
        base = self._ready()
        with example_dir(base) as path:
            task = Task(next(self._ids), fn, tuple(args), k, meshes, path, seed, self.device)
            outcomes, failure = self._run_task(task, timeout)
        self.examples += 1
        if failure is not None:
            raise failure
        return {r: o.value for r, o in outcomes.items() if o.status == "ok"}

    def _check_job(self, job: int, job_world_size: int | None) -> None:
        """Raise unless an example whose job has ``job`` ranks can run here."""
        raise NotImplementedError

    def _ready(self) -> str:
        """Make the ranks ready for an example; the directory examples go under."""
        raise NotImplementedError

    def _run_task(
        self, task: Task, timeout: float
    ) -> tuple[dict[int, Outcome], ExampleFailure | HarnessError | None]:
        """Each rank's outcome of ``task``, and the failure they make (None if none)."""
        raise NotImplementedError


@contextlib.contextmanager
def example_dir(base: str) -> Iterator[str]:
    """A directory under ``base`` of one example's own, removed when the example ends."""
    path = tempfile.mkdtemp(prefix="example-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
