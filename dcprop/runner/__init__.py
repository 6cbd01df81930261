"""The multi-rank runner: persistent local :class:`Pools` (one :class:`Pool` per job
size), or :class:`SPMDRunner` under torchrun.  All are a :class:`Runner`:
``run(fn, *args, world_size=, meshes=, seed=, timeout=, job_world_size=)`` and
``close(exit_code=0)``.  A property's ``fn`` gets a :class:`RankContext` on each rank.

Importing this package does not import torch; the torchrun mode does, on use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from dcprop.errors import UsageError
from dcprop.runner.base import Runner
from dcprop.runner.pool import DEFAULT_TIMEOUT, Pool
from dcprop.runner.pools import Pools

if TYPE_CHECKING:
    from dcprop.runner.execute import RankContext
    from dcprop.runner.spmd import SPMDRunner

__all__ = [
    "CHECKPOINT_ROOT_ENV",
    "DEFAULT_TIMEOUT",
    "Pool",
    "Pools",
    "RankContext",
    "Runner",
    "SPMDRunner",
    "make_runner",
    "resolve_checkpoint_root",
    "resolve_device",
    "under_torchrun",
]


#: where every example's checkpoints go when no checkpoint root is given (default: the
#: temp directory); under torchrun across hosts it must be a file system every host mounts
CHECKPOINT_ROOT_ENV = "DCPROP_CHECKPOINT_ROOT"


def resolve_checkpoint_root(given: str | None = None) -> str | None:
    """The directory examples write their checkpoints under: ``given``, else
    ``$DCPROP_CHECKPOINT_ROOT``, else None (the temp directory)."""
    return given or os.environ.get(CHECKPOINT_ROOT_ENV) or None


def under_torchrun() -> bool:
    """True in a process started by torchrun (or a launcher that sets the same variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def resolve_device(requested: str, *, option: str) -> str:
    """ "cpu", "cuda" or "auto" -> "cpu" or "cuda"; "cuda" without a CUDA device is a
    :class:`~dcprop.errors.UsageError` that names ``option`` (checked here, in the
    controller: on the ranks it would be a start-up traceback).  Imports torch unless "cpu"."""
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "auto":
        return "cpu"
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise UsageError(
        f"{option} cuda: torch {torch.__version__} ({build}) sees no CUDA device; "
        f"use {option} cpu or {option} auto"
    )


def make_runner(
    world_size: int,
    *,
    device: str = "cpu",
    timeout: float = DEFAULT_TIMEOUT,
    checkpoint_root: str | None = None,
    **pool_options: Any,
) -> Any:  # Pools | SPMDRunner; callers ask the latter for is_driver and follow()
    """A :class:`SPMDRunner` under torchrun, else lazily started :class:`Pools` of up to
    ``world_size`` ranks; either writes checkpoints under :func:`resolve_checkpoint_root`."""
    root = resolve_checkpoint_root(checkpoint_root)
    if under_torchrun():
        from dcprop.runner.spmd import SPMDRunner

        return SPMDRunner(device=device, timeout=timeout, tmp_root=root)
    if root is not None and not os.path.isdir(root):
        raise UsageError(f"checkpoint root {root!r} is not a directory; create it")
    return Pools(world_size, device=device, timeout=timeout, tmp_root=root, **pool_options)


def __getattr__(name: str) -> Any:
    # these import torch, which this package does not until they are used
    if name == "SPMDRunner":
        from dcprop.runner.spmd import SPMDRunner

        return SPMDRunner
    if name == "RankContext":
        from dcprop.runner.execute import RankContext

        return RankContext
    raise AttributeError(name)
