"""What a hang costs, with and without early hang detection (not a test).

    python benchmarks/bench_hangs.py [--timeout 20] [--repeat 3]

1. Time to the verdict for the known sub-world deadlock (the corpus entry of
   ``dsd-broadcast-default-group``: a model on one rank of a two-rank job loads with
   ``broadcast_from_rank0``), on a warm pool, with ``detect_hangs`` off (the verdict
   waits for the timeout) and on.  Both must give the same signature and known bug.
2. The restart after a hang, per pool size: the time to the verdict of a certain
   hang (0.3 s of work before it, then detection, stacks and killing the ranks) and
   the restart the next example pays, against the pool's first start.  A pool of one
   rank has no peer to leave a collective, so there a crash stands in for the hang:
   the restart is the same.
3. What the detection costs a healthy example: round-trip examples per second
   (``bench_runner``'s scenario, two ranks) with it off and on, interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_runner import scenario

from dcprop.corpus import load_entries
from dcprop.errors import ExampleFailure
from dcprop.known_bugs import match_known
from dcprop.properties import run_property
from dcprop.runner import Pool, Pools

CORPUS = os.path.join(os.path.dirname(__file__), os.pardir, "strategies", "corpus")
BUG = "dsd-broadcast-default-group"


def leave_early(ctx):
    """Rank 0 returns at once; the others join a collective after some work, and the
    hang is certain.  On a single rank: a crash."""
    import torch
    import torch.distributed as dist

    if ctx.world_size == 1:
        os._exit(3)
    if ctx.rank > 0:
        time.sleep(0.3)
        dist.all_reduce(torch.zeros(1))


def verdict_seconds(timeout: float, detect: bool, repeat: int) -> tuple[list[float], str, str]:
    entry = next(e for e in load_entries(CORPUS) if e.known_bug == BUG)
    times, signature, known = [], "", ""
    with Pools(4, timeout=timeout, detect_hangs=detect) as runner:
        for _ in range(repeat):
            runner.pool(entry.scenario.job_world).start()  # a warm pool, as in a campaign
            started = time.perf_counter()
            try:
                run_property(runner, entry.property, entry.scenario)
            except ExampleFailure as failure:
                times.append(time.perf_counter() - started)
                signature = failure.signature
                bug = match_known(failure, entry.scenario)
                known = bug.id if bug else "NEW"
            else:
                raise SystemExit(f"{entry.path} passed: has upstream fixed {BUG}?")
    return times, signature, known


def restart_seconds(world: int, repeat: int) -> tuple[float, float, float]:
    """(first start, hang to verdict, restart after it), medians in seconds."""
    first, verdict, restart = [], [], []
    for _ in range(repeat):
        with Pool(world, timeout=60) as pool:
            started = time.perf_counter()
            pool.start()
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            try:
                pool.run("bench_hangs:leave_early")
            except ExampleFailure:
                verdict.append(time.perf_counter() - started)
            started = time.perf_counter()
            pool.start()
            restart.append(time.perf_counter() - started)
    return statistics.median(first), statistics.median(verdict), statistics.median(restart)


def healthy_examples_per_second(detect: bool, examples: int) -> float:
    with Pool(2, detect_hangs=detect) as pool:
        run_property(pool, "roundtrip", scenario(2))  # start, warm up
        started = time.perf_counter()
        for _ in range(examples):
            run_property(pool, "roundtrip", scenario(2))
        return examples / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=20.0, help="hang timeout (s)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--examples", type=int, default=30, help="healthy examples per run")
    args = parser.parse_args()

    print(f"time to verdict, {BUG} corpus entry (timeout {args.timeout:.0f}s, warm pool)")
    print(f"{'detection':<10} {'median s':>9} {'min s':>7}  signature -> known bug")
    for detect in (False, True):
        times, signature, known = verdict_seconds(args.timeout, detect, args.repeat)
        print(
            f"{'on' if detect else 'off':<10} {statistics.median(times):>9.2f} "
            f"{min(times):>7.2f}  {signature} -> {known}"
        )
    print("\nrestart after a hang, medians in seconds")
    print(f"{'ranks':<6} {'first start':>12} {'verdict':>8} {'restart':>8}")
    for world in (1, 2, 4):
        first, verdict, restart = restart_seconds(world, args.repeat)
        print(f"{world:<6} {first:>12.2f} {verdict:>8.2f} {restart:>8.2f}")
    print(
        f"\nhealthy round-trip examples per second, 2 ranks, {args.examples} examples, "
        f"median of {args.repeat} interleaved runs"
    )
    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.repeat):  # interleaved, in turns first: the machine's load drifts
        for detect in (False, True) if i % 2 == 0 else (True, False):
            rates[detect].append(healthy_examples_per_second(detect, args.examples))
    off, on = (statistics.median(rates[d]) for d in (False, True))
    print(f"off {off:.2f}  on {on:.2f}  on/off {on / off:.3f}")


if __name__ == "__main__":
    main()
