"""Starting rank processes from a fork server that has imported torch once.

A fresh interpreter spends seconds importing torch and the distributed modules;
on a small machine, starting a 4-rank pool that way costs more than many
examples.  Ranks are therefore forked from a :mod:`multiprocessing` fork server
that preloaded those modules (no threads and no process group yet, so the fork is
safe; CUDA is initialised only in the ranks).  A restart after a hang costs a
fork and a process-group rendezvous, not an import.

:class:`RankProcess` gives the pool the part of ``subprocess.Popen`` it uses.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["PRELOAD", "RankProcess"]

#: imported once in the fork server; every rank inherits them
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.nn.parallel",
    # FSDP2 and DTensor import it on a rank's first example: 1.4 to 4.5 s per rank after
    # every pool start (benchmarks/bench_campaign.py --preload); it starts no thread
    "torch._dynamo",
    "dcprop.runner.worker",
    "dcprop.runner.execute",
    "dcprop.properties._harness",
]

_context: Any = None


def _fork_server() -> Any:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _rank_main(channel: socket.socket, argv: list[str], log: str, controller: int) -> None:
    """The rank process: output to ``log``, then the worker's main loop."""
    # like a job's rank, it may start processes of its own (an async checkpoint writer)
    multiprocessing.current_process().daemon = False
    # A rank ends with os._exit, which skips the clean-up of temp files made in it (by
    # multiprocessing, a writer process, a user's checkpointer): keep them inside the
    # pool's own directory, which the controller removes (or the next pool, after a
    # hard kill).
    os.environ["TMPDIR"] = tempfile.tempdir = os.path.dirname(log)
    # and multiprocessing's own temp dir, where the fork server had already made one
    multiprocessing.current_process()._config.pop("tempdir", None)  # type: ignore[attr-defined]
    _exit_with(controller)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    from dcprop.runner.worker import main

    main([*argv, "--fd", str(channel.detach())])


def _exit_with(controller: int) -> None:
    """Exit when the controller is gone.  The worker's own guard watches its parent,
    which here is the fork server, and the fork server lives as long as its children
    do (they hold its liveness pipe): so watch the controller itself."""

    def watch() -> None:
        while True:
            try:
                os.kill(controller, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.5)

    threading.Thread(target=watch, name="dcprop-controller-watch", daemon=True).start()


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """multiprocessing re-runs the parent's ``__main__`` in each child unless its spec
    is named ``__main__``; a rank must not run the controller's script (a user's
    test file without a ``__main__`` guard would start a campaign in every rank)."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = spec


class RankProcess:
    """A rank forked from the fork server, with ``Popen``'s ``pid``, ``poll``,
    ``wait`` and ``kill``."""

    def __init__(self, channel: socket.socket, argv: list[str], log: str) -> None:
        self._proc = _fork_server().Process(
            target=_rank_main,
            args=(channel, argv, log, os.getpid()),
            name="dcprop-rank",
            daemon=True,
        )
        with _main_not_rerun():
            self._proc.start()

    @property
    def pid(self) -> int:
        return int(self._proc.pid or 0)

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired("dcprop rank", timeout or 0.0)
        return self._proc.exitcode

    def kill(self) -> None:
        self._proc.kill()
