"""Checkpointers with crash-consistency bugs, for tests/test_kills.py (importable: they
run in the rank processes).  Each is plain DCP with one mistake real checkpoint
managers make; each passes ``roundtrip``, where no save is interrupted."""

import os
import shutil
import signal

import attrs
import torch.distributed as dist

from dcprop.checkpointer import DCPCheckpointer
from dcprop.runner.kills import kill_ranks

LATEST = "latest"


class EagerLatest(DCPCheckpointer):
    """Publishes its ``latest`` pointer (a file naming the checkpoint) before it writes
    the checkpoint, instead of after."""

    async_save = None  # start_save then saves synchronously: the pointer goes first

    def save(self, state_dict, path, *, storage, group):
        if dist.get_rank(group) == 0:
            with open(os.path.join(os.path.dirname(path), LATEST), "w") as f:
                f.write(os.path.basename(path))
        dist.barrier(group=group)
        _sync_save(state_dict, path, storage, group)

    def latest(self, root):
        try:
            with open(os.path.join(root, LATEST)) as f:
                return os.path.join(root, f.read())
        except FileNotFoundError:
            return None

    def __repr__(self):
        return "EagerLatest()"


class InPlace(DCPCheckpointer):
    """Keeps one checkpoint directory and saves the next checkpoint over its files (to
    save space): it moves the previous checkpoint's directory to the new name, then
    writes there."""

    async_save = None

    def save(self, state_dict, path, *, storage, group):
        root = os.path.dirname(path)
        if dist.get_rank(group) == 0:
            for old in self.complete(root):
                if old != path:
                    shutil.move(old, path)
        dist.barrier(group=group)
        _sync_save(state_dict, path, storage, group)

    def __repr__(self):
        return "InPlace()"


def _sync_save(state_dict, path, storage, group):
    """DCP's save in the drawn layout, synchronously (these have no async_save)."""
    storage = attrs.evolve(storage, async_save=False)
    DCPCheckpointer().save(state_dict, path, storage=storage, group=group)


# -- tasks for the runner's tests ------------------------------------------------------


def die_on(ctx, rank, marked):
    """Rank ``rank`` dies by SIGKILL, marked as an injected kill or not; the others wait
    for it in a barrier (which fails as its sockets close)."""
    if ctx.rank == rank:
        if marked:
            kill_ranks(ctx.example_dir, {rank: os.getpid()}, "the test killed it")
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def die_marked_and_unmarked(ctx):
    """Rank 0 dies marked, rank 1 unmarked: one unexplained death is a crash."""
    if ctx.rank == 0:
        kill_ranks(ctx.example_dir, {0: os.getpid()}, "the test killed it")
    os.kill(os.getpid(), signal.SIGKILL)
