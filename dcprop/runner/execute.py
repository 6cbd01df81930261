"""Running one task on one rank, isolated from the examples before and after it.

Shared by the pool worker (:mod:`dcprop.runner.worker`) and the torchrun mode
(:mod:`dcprop.runner.spmd`), so both run an example the same way.
"""

from __future__ import annotations

import os
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.distributed as dist

from dcprop.errors import DcpropError, PropertyFailure
from dcprop.runner.failures import failure_signature
from dcprop.runner.messages import Outcome, Task
from dcprop.runner.worlds import Worlds
from dcprop.specs import MeshSpec

__all__ = ["PeerFailed", "RankContext", "execute", "harness_error", "resolve", "root_cause"]


class RankContext:
    """What a property sees on one rank: its rank, the example's world, meshes, a temp dir.

    Annotate a property's first parameter with it (``dcprop.runner.RankContext``)."""

    rank: int  #: this rank, in the default process group
    world_size: int  #: the example's world: ranks ``0..world_size-1`` run it
    example_dir: str  #: the example's directory, the same on every rank, removed after it
    device: torch.device  #: where this rank's tensors go

    def __init__(self, task: Task, worlds: Worlds, device: torch.device) -> None:
        self.rank = dist.get_rank()
        self.world_size = task.world_size
        self.example_dir = task.example_dir
        self.device = device
        self._worlds = worlds

    @property
    def runner_dir(self) -> str:
        """The directory the runner keeps examples under: the same on every rank, kept
        across pool restarts, removed when the runner closes.  For state that must
        outlive one task's ranks (``durability`` runs two tasks, the first of which
        kills ranks); whoever puts something there removes it."""
        return os.path.dirname(self.example_dir)

    def mesh(self, spec: MeshSpec) -> Any:
        """The mesh for ``spec`` (ranks ``0..spec.size-1``), or None if this rank is off it."""
        return self._worlds.mesh(spec)

    def flat_mesh(self, world_size: int) -> Any:
        """The 1D mesh over ranks ``0..world_size-1`` (declared with any mesh of that size)."""
        return self._worlds.flat_mesh(world_size)

    def group(self, world_size: int | None = None) -> Any:
        """The process group over ranks ``0..world_size-1`` (default: the example's world)."""
        return self._worlds.world_group(world_size or self.world_size)

    def checkpoint_group(self, world_size: int | None = None) -> Any:
        """A second process group over the same ranks as :meth:`group`, for the
        collectives of saves in flight while training goes on (as trainers give async
        checkpointing a group of its own)."""
        return self._worlds.checkpoint_group(world_size or self.world_size)

    def agree(self, ok: bool, what: str) -> None:
        """Raise on every rank if any rank of the example's world says ``ok=False``.

        Properties call this at phase boundaries, so a failure on one rank stops the
        others before the next collective rather than leaving them to time out.
        """
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self.group())
        if flag.item() and ok:
            raise PeerFailed(f"another rank failed during {what}")


class PeerFailed(RuntimeError):
    """This rank stopped because another rank of the example failed first."""


def _set_environ(environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ)


# process-wide settings an example may change: (read, write) each
_SETTINGS: tuple[tuple[Callable[[], Any], Callable[[Any], Any]], ...] = (
    (torch.get_default_dtype, torch.set_default_dtype),
    (torch.get_default_device, torch.set_default_device),
    (torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms),
    (torch.is_grad_enabled, torch.set_grad_enabled),
    (torch.is_anomaly_enabled, torch.autograd.set_detect_anomaly),
    (torch.get_num_threads, torch.set_num_threads),
    (lambda: dict(os.environ), _set_environ),
    (os.getcwd, os.chdir),
)


class _GlobalState:
    """Process-wide state an example may change, captured before and put back after."""

    _HOOK_DICTS = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
        "_global_forward_hooks_always_called",
        "_global_forward_hooks_with_kwargs",
        "_global_module_registration_hooks",
        "_global_parameter_registration_hooks",
        "_global_buffer_registration_hooks",
    )

    def __init__(self, known_groups: set[Any]) -> None:
        from torch.nn.modules import module as nn_module

        self._nn = nn_module
        self.settings = [read() for read, _ in _SETTINGS]
        self.hooks = {n: dict(getattr(nn_module, n, {})) for n in self._HOOK_DICTS}
        self.groups = set(_all_groups()) | known_groups

    def restore(self) -> None:
        """Put everything back."""
        for (read, write), before in zip(_SETTINGS, self.settings):
            if read() != before:
                write(before)
        for name, before in self.hooks.items():
            current = getattr(self._nn, name, None)
            if current is not None and set(current) != set(before):
                current.clear()
                current.update(before)
        for g in _all_groups():
            if g not in self.groups:
                dist.destroy_process_group(g)


def _all_groups() -> list[Any]:
    return list(dist.distributed_c10d._world.pg_map.keys())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def execute(task: Task, worlds: Worlds, device: torch.device) -> Outcome:
    """Run ``task`` on this rank and report how it went.  Never raises, except
    KeyboardInterrupt: any other exception (``CheckpointException`` derives from
    BaseException) becomes an outcome: ``internal`` where dcprop's own harness failed
    (building the example's meshes, resolving its function, a ``DcpropError`` such as a
    property's unmet precondition), ``error`` where the code under test or a property's
    check did."""
    rank = dist.get_rank()
    started = time.perf_counter()
    try:
        worlds.prepare(task.meshes, task.world_size)
        fn = resolve(task.fn) if isinstance(task.fn, str) else task.fn
    except Exception as e:
        return harness_error(rank, e, started)
    if rank >= task.world_size:
        return Outcome(rank, "idle")
    state = _GlobalState(worlds.known_groups())
    _seed_everything(task.seed)
    try:
        value = fn(RankContext(task, worlds, device), *task.args)
        outcome = Outcome(rank, "ok", value=value, seconds=time.perf_counter() - started)
    except KeyboardInterrupt:
        raise
    except DcpropError as e:
        outcome = harness_error(rank, e, started)
    except BaseException as e:
        outcome = _error(rank, e, started)
    finally:
        # no forced gc.collect(): a full collection per example cost more than the example
        # itself (measured in benchmarks/bench_runner.py); automatic collection suffices
        state.restore()
    return outcome


def resolve(ref: str) -> Any:
    """``"package.module:qualname"`` -> the object."""
    import importlib

    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def harness_error(rank: int, e: BaseException, started: float) -> Outcome:
    """The outcome of an exception raised by dcprop's harness rather than the code under test."""
    return attrs.evolve(_error(rank, e, started), status="internal")


def _error(rank: int, e: BaseException, started: float) -> Outcome:
    error_type = type(e).__name__
    root, frames = root_cause(e)
    message = str(e)
    if root is not e:  # lead with the cause: a CheckpointException's own line is rank numbers
        message = f"{type(root).__name__}: {root}\n{message}"
    return Outcome(
        rank,
        "error",
        error_type=error_type,
        message=message,
        traceback="".join(traceback.format_exception(type(e), e, e.__traceback__)),
        signature=failure_signature(
            type(root).__name__, str(root), frames[-1].name if frames else ""
        ),
        seconds=time.perf_counter() - started,
        keys=root.keys if isinstance(root, PropertyFailure) else (),
    )


def root_cause(e: BaseException) -> tuple[BaseException, list[Any]]:
    """The exception a failure is about, and the frames it was raised in.

    DCP wraps what went wrong on any rank into one ``CheckpointException`` whose
    message only lists rank numbers; two different bugs would share that signature,
    so it is identified by the wrapped exception of its lowest failing rank.
    """
    failures = getattr(e, "failures", None)
    if type(e).__name__ == "CheckpointException" and isinstance(failures, dict) and failures:
        inner, summary = failures[min(failures)]
        return inner, list(summary or [])
    return e, list(traceback.extract_tb(e.__traceback__))
