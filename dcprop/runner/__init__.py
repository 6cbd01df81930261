"""The multi-rank runner: a persistent local :class:`Pool`, or :class:`SPMDRunner`
under torchrun.  Both offer ``run(fn, *args, world_size=, meshes=, seed=, timeout=)``.

Importing this package does not import torch; the torchrun mode does, on use.
"""

from __future__ import annotations

import os
from typing import Any

from dcprop.runner.pool import DEFAULT_TIMEOUT, Pool

__all__ = ["DEFAULT_TIMEOUT", "Pool", "SPMDRunner", "make_runner", "under_torchrun"]


def under_torchrun() -> bool:
    """True in a process started by torchrun (or a launcher that sets the same variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def make_runner(
    world_size: int, *, device: str = "cpu", timeout: float = DEFAULT_TIMEOUT, **pool_options: Any
) -> Any:
    """A :class:`SPMDRunner` under torchrun, else a lazily started :class:`Pool`."""
    if under_torchrun():
        from dcprop.runner.spmd import SPMDRunner

        return SPMDRunner(device=device, timeout=timeout)
    return Pool(world_size, device=device, timeout=timeout, **pool_options)


def __getattr__(name: str) -> Any:
    if name == "SPMDRunner":
        from dcprop.runner.spmd import SPMDRunner

        return SPMDRunner
    raise AttributeError(name)
