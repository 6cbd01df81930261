"""A pool rank: joins the default process group once, then runs tasks until told to stop.

Started by :class:`dcprop.runner.pool.Pool` as ``python -m dcprop.runner.worker``
with one end of a socket pair as its channel.  It never outlives the controller:
the kernel kills it when the parent dies (``PR_SET_PDEATHSIG``), and a watchdog
thread does the same where that is unavailable.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import os
import pickle
import signal
import sys
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Connection

__all__ = ["backend_for", "main"]


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pg-timeout", type=float, default=120.0)
    parser.add_argument("--stacks", required=True)
    args = parser.parse_args(argv)

    _die_with_parent()
    stacks = open(args.stacks, "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    conn = Connection(args.fd)
    sys.path[:] = conn.recv()  # the controller's import path, so tasks unpickle here too

    import torch
    import torch.distributed as dist

    from dcprop.checkpointer import close_live
    from dcprop.runner.execute import execute, harness_error
    from dcprop.runner.preflight import preflight
    from dcprop.runner.worlds import Worlds

    backend, device_type = backend_for(args.device, args.world_size)
    if device_type == "cuda":
        torch.cuda.set_device(args.rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend,
        store=dist.FileStore(args.store, args.world_size),
        rank=args.rank,
        world_size=args.world_size,
        timeout=timedelta(seconds=args.pg_timeout),
    )
    worlds = Worlds(device_type)
    problem = preflight(os.path.dirname(args.store))
    conn.send(
        ("ready", {"rank": args.rank, "backend": backend, "device": str(device), "error": problem})
    )
    while True:
        try:
            name, payload = conn.recv()
        except EOFError:
            break
        if name == "shutdown":
            break
        started = time.perf_counter()
        try:
            task = pickle.loads(payload)
        except Exception as e:  # e.g. the user's checkpointer does not import on this rank
            outcome = harness_error(args.rank, e, started)
        else:
            outcome = execute(task, worlds, device)
        try:
            conn.send(("outcome", outcome))
        except Exception as e:  # an unpicklable return value
            conn.send(("outcome", harness_error(args.rank, e, started)))
    close_live()  # the checkpointers' teardown: os._exit skips atexit
    stacks.close()
    os._exit(0)  # skip interpreter teardown: torch's exit hooks can abort a rank late


if __name__ == "__main__":
    main()
