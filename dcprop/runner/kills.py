"""Injected kills: how a rank that kills itself (or a peer) on purpose says so, so that
the runner tells a fault an example injects from a crash of the code under test.

Before a rank sends ``SIGKILL`` it writes one marker file per dying rank under the
example's directory (:func:`mark_killed`); the controller reads them
(:func:`injected_kills`) before it removes that directory.  A rank that died without a
marker crashed.  Imports no torch: the controller uses it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable

__all__ = ["MARKERS", "injected_kills", "kill_ranks", "mark_killed"]

#: the directory of the markers, under the example's directory
MARKERS = ".dcprop-killed"


def mark_killed(example_dir: str, rank: int, why: str) -> None:
    """Record that ``rank`` is about to be killed on purpose, durably, before the kill."""
    folder = os.path.join(example_dir, MARKERS)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f"rank{rank}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, why.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def kill_ranks(example_dir: str, pids: dict[int, int], why: str) -> None:
    """Mark, then ``SIGKILL``, every rank of ``pids`` (rank: pid); this process last,
    if it is one of them (then this call does not return)."""
    for rank in pids:
        mark_killed(example_dir, rank, why)
    me = os.getpid()
    for pid in pids.values():
        if pid != me:
            with contextlib.suppress(ProcessLookupError):  # it may have died already
                os.kill(pid, signal.SIGKILL)
    if me in pids.values():
        os.kill(me, signal.SIGKILL)


def injected_kills(example_dir: str, ranks: Iterable[int]) -> dict[int, str]:
    """Of ``ranks`` (those that died), the ones killed on purpose, with why."""
    found = {}
    for rank in ranks:
        path = os.path.join(example_dir, MARKERS, f"rank{rank}")
        with contextlib.suppress(OSError), open(path) as f:
            found[rank] = f.read()
    return found
