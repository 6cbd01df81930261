"""The check every rank passes before a runner takes its first example.

An environment that cannot run a collective, an object collective or a DCP save and
load would otherwise fail every example, each looking like a property failure (and
shrunk, and written as a reproducer).  Checked once at start-up, such an environment
is reported as what it is, with the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from dcprop.errors import headline
from dcprop.runner.execute import root_cause

__all__ = ["preflight"]

# (text in the error, fix): causes whose fix is known
_FIXES = (
    ("Numpy is not available", "install numpy: torch's object collectives need it"),
    ("No module named 'numpy'", "install numpy: torch's object collectives need it"),
)


def preflight(directory: str, group: dist.ProcessGroup | None = None) -> str | None:
    """Run the start-up checks on this rank; return None if they pass, else one line
    that names the step that failed, the error and, where known, the fix.

    Collective over ``group`` (default: the default group); ``directory`` must be the
    same path on every rank."""
    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        ("a collective (all_reduce)", lambda: _collective(group)),
        ("an object collective (all_gather_object)", lambda: _object_collective(group)),
        (
            "a torch.distributed.checkpoint save and load",
            lambda: _save_and_load(directory, group),
        ),
    )
    for what, step in steps:
        try:
            step()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            cause, _ = root_cause(e)
            fix = next((fix for text, fix in _FIXES if text in str(cause)), None)
            error = f"{type(cause).__name__}: {headline(str(cause))}"
            return f"cannot run {what}: {error}" + (f"; {fix}" if fix else "")
    return None


def _collective(group: dist.ProcessGroup | None) -> None:
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    if t.item() != dist.get_world_size(group):
        raise RuntimeError(f"all_reduce of ones gave {t.item()}")


def _object_collective(group: dist.ProcessGroup | None) -> None:
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dist.get_rank(group), group=group)
    if gathered != list(range(len(gathered))):
        raise RuntimeError(f"all_gather_object of ranks gave {gathered}")


def _save_and_load(directory: str, group: dist.ProcessGroup | None) -> None:
    import torch.distributed.checkpoint as dcp

    path = os.path.join(directory, "preflight-checkpoint")
    rank = dist.get_rank(group)
    key = f"rank{rank}"
    dcp.save({key: torch.full((2,), float(rank))}, checkpoint_id=path, process_group=group)
    loaded = {key: torch.zeros(2)}
    dcp.load(loaded, checkpoint_id=path, process_group=group)
    if loaded[key].tolist() != [float(rank)] * 2:
        raise RuntimeError(f"loaded {loaded} after saving rank {rank}'s values")
