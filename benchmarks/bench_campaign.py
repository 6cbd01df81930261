"""Campaign cost, in one run (not a test).

    python benchmarks/bench_campaign.py [--worlds 1,2,4,8] [--seconds 30] [--properties ...]

1. Pool start-up and restart per world size: the fork server's one-time start, then
   a pool's start (fork + rendezvous), its first example, and a restart after a kill.
   Ranks share the machine's cores; each rank runs torch with one intra-op thread per
   core it would get (torch's default), so on 2 cores ranks time-slice.
2. Per property, a time-boxed campaign on the default strategy: examples per second,
   how many reached the property's checks, and how many draws were skipped because
   they were certain to end in a known bug already met (``strict`` turns that off).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dcprop import strategies as dst
from dcprop.campaign import run_campaign
from dcprop.properties import PROPERTIES
from dcprop.runner import Pool, Pools


def ping(ctx: object) -> int:
    return 0


def startup(worlds: list[int]) -> None:
    started = time.perf_counter()
    with Pool(1) as warm:
        warm.start()  # starts the fork server
    print(f"fork server + first 1-rank pool: {time.perf_counter() - started:.2f}s")
    print(f"{'world':>5} {'start s':>8} {'1st example s':>14} {'restart s':>10}")
    for world in worlds:
        with Pool(world) as pool:
            t = time.perf_counter()
            pool.start()
            start = time.perf_counter() - t
            t = time.perf_counter()
            pool.run("bench_campaign:ping")
            first = time.perf_counter() - t
            pool._kill()  # what a hang or crash does before the restart
            t = time.perf_counter()
            pool.start()
            restart = time.perf_counter() - t
        print(f"{world:>5} {start:>8.2f} {first:>14.2f} {restart:>10.2f}")


def campaigns(properties: list[str], seconds: float, strict: bool) -> None:
    print(f"\ncampaigns of {seconds:g}s per property, world sizes 1-4, strict={strict}")
    print(
        f"{'property':<16} {'examples':>8} {'ex/s':>6} {'checked':>8} {'known':>6} {'skipped':>8}"
    )
    with Pools(4, timeout=20.0) as runner:
        for prop in properties:
            r = run_campaign(
                runner,
                prop,
                dst.scenarios(prop),
                max_examples=10**6,
                seed=7,
                strict=strict,
                duration=seconds,
            )
            print(
                f"{prop:<16} {r.examples:>8} {r.examples / r.seconds:>8.2f} {r.checked:>8} "
                f"{r.known_examples:>8} {sum(r.steered.values()):>8}"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--properties", default=",".join(PROPERTIES))
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args()
    startup([int(w) for w in args.worlds.split(",")])
    campaigns(args.properties.split(","), args.seconds, args.strict)


if __name__ == "__main__":
    main()
