"""One persistent :class:`~dcprop.runner.pool.Pool` per job size.

An example runs on ranks whose default process group is exactly its job: the
model's own world, unless the scenario deliberately places the model on the first
ranks of a larger job (``Scenario.job_world_size``).  Real training code and real
checkpointers use the default process group; with one pool of ``N`` ranks for
every example, each example smaller than ``N`` would run on a sub-world by
accident, and code that uses the default group would hang or fail there.

Pools start lazily, on the first example of their size, and live for the
session: start-up (importing torch, joining a process group) is paid once per
size.  A hang or a crash restarts only the pool it happened in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dcprop.errors import RunnerError
from dcprop.runner.base import Runner
from dcprop.runner.failures import example_sizes
from dcprop.runner.pool import DEFAULT_TIMEOUT, Pool
from dcprop.specs import MeshSpec

__all__ = ["Pools"]


class Pools(Runner):
    """A :class:`~dcprop.runner.base.Runner` of one pool per job size, up to ``world_size`` ranks.

    >>> with Pools(4) as runner:                                   # doctest: +SKIP
    ...     runner.run(my_property, scenario, world_size=2)                    # 2 ranks
    ...     runner.run(my_property, scenario, world_size=2, job_world_size=4)  # 4 ranks

    Keyword arguments other than ``device`` and ``timeout`` go to each :class:`Pool`.
    """

    def __init__(
        self,
        world_size: int,
        *,
        device: str = "cpu",
        timeout: float = DEFAULT_TIMEOUT,
        **pool_options: Any,
    ) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise RunnerError(f"world_size={world_size!r} must be a positive int")
        Pool(1, device=device, timeout=timeout, **pool_options)  # check the options now
        self.world_size = world_size
        self.device = device
        self.timeout = float(timeout)
        self._options = pool_options
        self._pools: dict[int, Pool] = {}

    def pool(self, size: int) -> Pool:
        """The pool of ``size`` ranks (created on first use; its ranks start on its first run)."""
        if not 1 <= size <= self.world_size:
            raise RunnerError(f"a job of {size} ranks does not fit in {self.world_size} ranks")
        if size not in self._pools:
            self._pools[size] = Pool(
                size, device=self.device, timeout=self.timeout, **self._options
            )
        return self._pools[size]

    @property
    def pools(self) -> dict[int, Pool]:
        """The pools created so far, by size."""
        return dict(sorted(self._pools.items()))

    @property
    def examples(self) -> int:
        return sum(p.examples for p in self._pools.values())

    @property
    def starts(self) -> int:
        return sum(p.starts for p in self._pools.values())

    @property
    def restarts(self) -> int:
        return sum(p.restarts for p in self._pools.values())

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
        """As :meth:`Pool.run`, on the pool of ``job_world_size`` ranks (default: the
        example's world, its meshes included)."""
        meshes = tuple(meshes)
        k, job = example_sizes(world_size, meshes, job_world_size, self.world_size, "the runner")
        return self.pool(job).run(
            fn, *args, world_size=k, meshes=meshes, seed=seed, timeout=timeout
        )

    def close(self, exit_code: int = 0) -> None:
        """Stop every pool.  Safe to call twice.  (``exit_code`` is for torchrun's
        followers, :meth:`SPMDRunner.close`; local ranks have no exit status.)"""
        for pool in self._pools.values():
            pool.close()
