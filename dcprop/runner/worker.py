"""A pool rank: joins the default process group once, then runs tasks until told to shut down.

Started by :class:`dcprop.runner.pool.Pool` as ``python -m dcprop.runner.worker``
with one end of a socket pair as its channel.  It never outlives the controller:
the kernel kills it when the parent dies (``PR_SET_PDEATHSIG``), and a watchdog
thread does the same where that is unavailable.

While a task runs, a second thread samples the main thread's stack
(:class:`CollectiveWatch`) and tells the controller when it has stood in one gloo
collective for a while, so the controller can see a certain hang long before the
timeout (see :func:`dcprop.runner.pool.certain_hang`).
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import linecache
import os
import pickle
import signal
import sys
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dcprop.runner.worlds import Worlds

__all__ = ["CollectiveWatch", "backend_for", "main", "rank_device"]

SAMPLE_INTERVAL = 0.2  # seconds between samples of the main thread's stack
SETTLE = 1.0  # how long a rank must stand in one collective before it is reported

# The group collectives of torch.distributed (the functions that issue the work and
# wait for it); point-to-point calls are left out: their group names ranks that take
# no part in them.
_COLLECTIVES = frozenset(
    {
        "all_gather",
        "all_gather_coalesced",
        "all_gather_into_tensor",
        "all_gather_single",
        "_all_gather_base",
        "all_reduce",
        "all_reduce_coalesced",
        "all_to_all",
        "all_to_all_single",
        "barrier",
        "broadcast",
        "gather",
        "reduce",
        "reduce_scatter",
        "reduce_scatter_single",
        "reduce_scatter_tensor",
        "_reduce_scatter_base",
        "scatter",
    }
)


def _die_with_parent() -> None:
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="dcprop-parent-watch", daemon=True).start()


class CollectiveWatch:
    """Samples the main thread while a task runs; reports ``("blocked", Blocked)`` at
    each sample once it has stood in the same collective for :data:`SETTLE` seconds,
    and ``("moved", task)`` when it leaves one it was reported in.

    A collective is identified by its group and the group's sequence number on this
    rank (gloo counts every operation a group issues), so a loop of barriers is many
    collectives, not one.  The sequence number is read inside the collective's frame:
    a sample that saw the rank outside that frame, or inside it with a lower number,
    proves the collective was issued later, which is what ``Blocked.entered_after``
    records.  Messages share the rank's connection with the main thread's outcome
    under one lock, and none is sent for a task whose outcome is on its way.
    """

    def __init__(self, conn: Connection, rank: int) -> None:
        self._conn, self._rank = conn, rank
        self._lock = threading.Lock()
        self._task: tuple[int, float] | None = None  # (id, start) of the running task
        threading.Thread(
            target=self.watch_main_thread, name="dcprop-collective-watch", daemon=True
        ).start()

    def begin(self, task: int) -> None:
        with self._lock:
            self._task = (task, time.monotonic())

    def end(self) -> None:
        """Called before the outcome is sent: nothing more is reported for this task."""
        with self._lock:
            self._task = None

    def _send(self, task: int, message: tuple[str, Any]) -> None:
        with self._lock:
            if self._task is not None and self._task[0] == task:
                self._conn.send(message)

    def watch_main_thread(self) -> None:
        from dcprop.runner.messages import Blocked

        main = threading.main_thread().ident
        current = -1
        key: Any = None
        last = first = 0.0  # the previous sample; the first sample of the current key
        entered_after = 0.0
        reported = False
        while True:
            time.sleep(SAMPLE_INTERVAL)
            task = self._task
            if task is None:
                continue
            if task[0] != current:
                current, key, last, reported = task[0], None, task[1], False
            frame = sys._current_frames().get(main)  # type: ignore[arg-type]
            now = time.monotonic()
            new_key, blocked = _standing_in(frame) if frame is not None else (None, None)
            del frame
            if new_key != key:
                key, entered_after, first = new_key, last, now
            last = now
            if blocked is not None and now - first >= SETTLE:
                op, ranks = blocked
                self._send(
                    current, ("blocked", Blocked(current, self._rank, op, ranks, entered_after))
                )
                reported = True
            elif reported and blocked is None:
                self._send(current, ("moved", current))
                reported = False


def _standing_in(frame: FrameType) -> tuple[Any, tuple[str, tuple[int, ...]] | None]:
    """(key, blocked) for the main thread's innermost frame: ``key`` names the
    collective it is inside (its group and that group's sequence number), or is None
    outside any; ``blocked`` is (collective, the group's global ranks) when the
    thread waits for the collective's work to finish."""
    import torch.distributed as dist

    f: FrameType | None = frame
    while f is not None:
        code = f.f_code
        if code.co_name in _COLLECTIVES and code.co_filename.endswith("distributed_c10d.py"):
            break
        f = f.f_back
    if f is None:
        return None, None
    group = f.f_locals.get("group")
    if not isinstance(group, dist.ProcessGroup):  # not resolved yet: nothing issued
        return (code.co_name, None), None
    try:
        sequence = group._get_sequence_number_for_group()  # type: ignore[attr-defined]
        key = (group.group_name, sequence)
    except RuntimeError:
        return (code.co_name, None), None
    if f is not frame or ".wait()" not in linecache.getline(code.co_filename, f.f_lineno):
        return key, None
    return key, (code.co_name, tuple(dist.get_process_group_ranks(group)))


def backend_for(device: str, world_size: int) -> tuple[str, str]:
    """(backend string, device) for a pool of ``world_size`` ranks on ``device``.

    NCCL needs one GPU per rank; with fewer GPUs than ranks, ranks share GPUs and
    collectives go through gloo, which accepts CUDA tensors.
    """
    if device == "cpu":
        return "gloo", "cpu"
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError("device='cuda' but torch sees no CUDA device")
    if count >= world_size:
        return "cpu:gloo,cuda:nccl", "cuda"
    return "cpu:gloo,cuda:gloo", "cuda"


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """This rank's device: the CPU, or a GPU of its host (shared round-robin where the
    host has fewer GPUs than ranks), made current."""
    import torch

    if device_type != "cuda":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    _die_with_parent()
    stacks = open(args.stacks, "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    conn = Connection(args.fd)
    sys.path[:] = conn.recv()  # the controller's import path, so tasks unpickle here too
    from dcprop.checkpointer import close_live
    from dcprop.runner.worlds import Worlds

    backend, device = _join(args)
    conn.send(("ready", _start_up_report(args, backend, device)))
    # NCCL collectives return before they finish, so only gloo's waits say where a rank is
    watch = (
        CollectiveWatch(conn, args.rank)
        if args.watch_collectives and "nccl" not in backend
        else None
    )
    _serve(conn, args.rank, Worlds(device.type), device, watch)
    close_live()  # the checkpointers' teardown: os._exit skips atexit
    stacks.close()
    os._exit(0)  # skip interpreter teardown: torch's exit hooks can abort a rank late


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pg-timeout", type=float, default=120.0)
    parser.add_argument("--stacks", required=True)
    parser.add_argument("--watch-collectives", action="store_true")
    return parser.parse_args(argv)


def _join(args: argparse.Namespace) -> tuple[str, torch.device]:
    """Join the pool's default process group; (its backend, this rank's device)."""
    import torch.distributed as dist

    backend, device_type = backend_for(args.device, args.world_size)
    device = rank_device(device_type, args.rank)
    dist.init_process_group(
        backend,
        store=dist.FileStore(args.store, args.world_size),
        rank=args.rank,
        world_size=args.world_size,
        timeout=timedelta(seconds=args.pg_timeout),
    )
    return backend, device


def _start_up_report(
    args: argparse.Namespace, backend: str, device: torch.device
) -> dict[str, Any]:
    from dcprop.runner.preflight import preflight

    problem = preflight(os.path.dirname(args.store))
    return {"rank": args.rank, "backend": backend, "device": str(device), "error": problem}


def _serve(
    conn: Connection,
    rank: int,
    worlds: Worlds,
    device: torch.device,
    watch: CollectiveWatch | None,
) -> None:
    """Run each task the controller sends, until it says ``shutdown`` or goes away."""
    from dcprop.runner.execute import execute, harness_error

    while True:
        try:
            name, payload = conn.recv()
        except EOFError:
            return
        if name == "shutdown":
            return
        started = time.perf_counter()
        try:
            task = pickle.loads(payload)
        except Exception as e:  # e.g. the user's checkpointer does not import on this rank
            outcome = harness_error(rank, e, started)
        else:
            if watch is not None:
                watch.begin(task.id)
            outcome = execute(task, worlds, device)
        if watch is not None:
            watch.end()
        try:
            conn.send(("outcome", outcome))
        except Exception as e:  # an unpicklable return value
            conn.send(("outcome", harness_error(rank, e, started)))


if __name__ == "__main__":
    main()
