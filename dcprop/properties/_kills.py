"""Killing ranks mid-save, at a point of the save the :class:`~dcprop.specs.Kill` names.

The save is the code under test (DCP, or a user's checkpointer), so the kill cannot be a
call placed inside it.  What every checkpointer does, whatever its format, is open files
for writing; Python reports each open (``builtins.open``, ``io.open``, ``os.open``,
``pathlib``) to audit hooks (PEP 578) on the opening thread before the file exists.  One
audit hook per rank process (installed on first use: hooks cannot be removed) watches
the opens under the checkpoint root while a kill is armed (:func:`armed`), counts this
rank's, and kills:

* at point ``"write"``: a dying rank, as it opens its ``writes + 1``-th file;
* at point ``"metadata"``: every dying rank, from whichever rank opens DCP's metadata
  file (``.metadata``, or its ``.tmp``, written once every data file is), by pid;

the points after a save returns (``"saved"``, ``"in_flight"``, and the fallback of a
save that ends before its point) are plain calls of :func:`die` in the property.  Each
kill marks the dying ranks first (:mod:`dcprop.runner.kills`), so the runner reports an
:class:`~dcprop.errors.InjectedKill`, not a crash.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any

from dcprop.runner.kills import kill_ranks
from dcprop.specs import Kill

__all__ = ["armed", "die"]

_WRITING = os.O_WRONLY | os.O_RDWR
# DCP's metadata file (written through a .tmp file), global or, without collectives,
# per rank ("__3.metadata")
_METADATA = re.compile(r"(__\d+)?\.metadata(\.tmp)?")


class _Armed:
    """One armed kill on this rank: what to watch and whom to kill."""

    def __init__(
        self, kill: Kill, rank: int, root: str, example_dir: str, pids: dict[int, int]
    ) -> None:
        self.kill = kill
        self.rank = rank
        self.root = os.path.join(os.path.abspath(root), "")
        self.example_dir = example_dir
        self.victims = {r: pids[r] for r in kill.ranks}
        self.opened = 0
        self.lock = threading.Lock()

    def on_open(self, path: str) -> None:
        with self.lock:
            if self.kill.at == "metadata" and _METADATA.fullmatch(os.path.basename(path)):
                self.fire(f"{self.kill.describe()} (rank {self.rank} opened {path})")
            if self.kill.at == "write" and self.rank in self.victims:
                if self.opened == self.kill.writes:
                    self.fire(f"{self.kill.describe()} (rank {self.rank} opened {path})")
                self.opened += 1

    def fire(self, why: str) -> None:
        global _ARMED
        _ARMED = None  # the markers are files too: write them unwatched
        kill_ranks(self.example_dir, self.victims, why)


_ARMED: _Armed | None = None
_INSTALLED = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    current = _ARMED
    if current is None or event != "open":
        return
    path, _, flags = args
    if not isinstance(flags, int) or not flags & _WRITING or isinstance(path, int):
        return
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return
    if path.startswith(current.root):
        current.on_open(path)


@contextlib.contextmanager
def armed(
    kill: Kill, rank: int, root: str, example_dir: str, pids: dict[int, int]
) -> Iterator[None]:
    """Kill per ``kill`` while the body runs (a save under ``root``): this is ``rank``,
    ``pids`` maps every rank of the save to its process id, and the markers go under
    ``example_dir``."""
    global _ARMED, _INSTALLED
    if not _INSTALLED:
        sys.addaudithook(_audit)
        _INSTALLED = True
    _ARMED = _Armed(kill, rank, root, example_dir, pids)
    try:
        yield
    finally:
        _ARMED = None


def die(kill: Kill, rank: int, example_dir: str, why: str) -> None:
    """Kill this rank (one of ``kill``'s) now; does not return."""
    kill_ranks(example_dir, {rank: os.getpid()}, f"{kill.describe()} (rank {rank}: {why})")
