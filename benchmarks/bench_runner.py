"""Runner overhead, side by side in one run (not a test).

    python benchmarks/bench_runner.py [--examples N] [--spawn-examples M]

For world sizes 2 and 4, a round-trip example (small FSDP2 model: train a step, DCP
save, perturb, load, compare) is run three ways:

* spawn: a fresh set of rank processes per example (what MultiProcessTestCase does);
* pool: dcprop's persistent pool, timed at the controller;
* bare: the example body alone, timed inside the ranks.

It prints examples per second and the ratios pool/bare (overhead) and pool/spawn.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dcprop.runner import Pool
from dcprop.specs import (
    Activation,
    Block,
    FSDP2Plan,
    Linear,
    MeshSpec,
    ModelSpec,
    OptimizerSpec,
    Scenario,
    Topology,
)

MODEL = ModelSpec(Block((("fc0", Linear(16, 32)), ("act", Activation()), ("fc1", Linear(32, 8)))))


def scenario(world: int) -> Scenario:
    return Scenario(
        MODEL,
        Topology(world, MeshSpec((world,), ("shard",)), FSDP2Plan()),
        optimizer=OptimizerSpec("adam"),
    )


def timed_body(ctx, s):
    """The example body, timed inside the rank."""
    from dcprop.properties.roundtrip import roundtrip

    started = time.perf_counter()
    roundtrip(ctx, s)
    return time.perf_counter() - started


def measure(world: int, examples: int, spawn_examples: int) -> dict[str, float]:
    # by module reference: the ranks cannot import this script's __main__
    timed_body = "bench_runner:timed_body"
    s = scenario(world)
    with Pool(world) as pool:
        pool.run(timed_body, s, meshes=s.meshes)  # warm-up, as every first example pays
        bare, started = [], time.perf_counter()
        for _ in range(examples):
            bare.append(max(pool.run(timed_body, s, meshes=s.meshes).values()))
        pool_seconds = (time.perf_counter() - started) / examples
    started = time.perf_counter()
    for _ in range(spawn_examples):
        with Pool(world) as fresh:
            fresh.run(timed_body, s, meshes=s.meshes)
    spawn_seconds = (time.perf_counter() - started) / spawn_examples
    return {"bare": statistics.mean(bare), "pool": pool_seconds, "spawn": spawn_seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--spawn-examples", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{'world':>5} {'bare ex/s':>10} {'pool ex/s':>10} {'spawn ex/s':>10} "
        f"{'pool/bare cost':>15} {'pool vs spawn':>14}"
    )
    for world in (2, 4):
        m = measure(world, args.examples, args.spawn_examples)
        print(
            f"{world:>5} {1 / m['bare']:>10.2f} {1 / m['pool']:>10.2f} {1 / m['spawn']:>10.3f} "
            f"{m['pool'] / m['bare']:>14.2f}x {m['spawn'] / m['pool']:>13.1f}x"
        )


if __name__ == "__main__":
    main()
