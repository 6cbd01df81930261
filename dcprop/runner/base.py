"""The interface every runner offers (:class:`~dcprop.runner.pool.Pool`,
:class:`~dcprop.runner.pools.Pools`, :class:`~dcprop.runner.spmd.SPMDRunner`): what
properties, campaigns and reproducers call on one."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from dcprop.specs import MeshSpec

__all__ = ["Runner", "example_dir"]


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


@contextlib.contextmanager
def example_dir(base: str) -> Iterator[str]:
    """A directory under ``base`` of one example's own, removed when the example ends."""
    path = tempfile.mkdtemp(prefix="example-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
