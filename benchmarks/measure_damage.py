"""What stock DCP does under each kind of damage to a completed checkpoint.

Runs ``loud_failure`` over fixed scenarios (FSDP2 on 2 ranks, Adam, one of each damage
spec below) and prints, per damage, whether the load raised (and what), loaded values
equal to those saved, or loaded different values silently.

    PYTHONPATH=. python3 benchmarks/measure_damage.py [--world-size 2]
"""

from __future__ import annotations

import argparse
import collections
import re

import attrs

from dcprop import specs as S
from dcprop.errors import ExampleFailure
from dcprop.known_bugs import match_known
from dcprop.limitations import match_limitation
from dcprop.properties import run_property
from dcprop.runner import Pools

BASE = S.Scenario(
    S.ModelSpec(
        S.Block((("fc0", S.Linear(4, 6)), ("act", S.Activation()), ("fc1", S.Linear(6, 4))))
    ),
    S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan()),
    optimizer=S.OptimizerSpec("adam"),
)
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9375)
DAMAGES = (
    *(S.RemoveFile(i) for i in (0, 1)),
    *(S.Truncate("data", i, k) for i in (0, 1) for k in FRACTIONS),
    *(S.Truncate("metadata", keep=k) for k in FRACTIONS),
    *(S.FlipMetadataByte(at / 16, m) for at in range(16) for m in (1, 0x80)),
    *(S.FlipTensorByte(e, at, m) for e in range(6) for at in (0.0, 0.5) for m in (1, 0x80)),
    *(S.StaleFile(i) for i in (0, 1)),
)


def outcome(runner: Pools, scenario: S.Scenario) -> str:
    try:
        results = run_property(runner, "loud_failure", scenario)
    except ExampleFailure as failure:
        if "PropertyFailure" not in failure.signature:
            return f"failed: {failure.signature}"
        known = match_known(failure, scenario) or match_limitation(failure, scenario)
        return f"silently wrong [{known.id if known else 'new failure'}]"
    raised = results[0]["raised"]
    if raised is None:
        return "loaded intact"
    return (
        "raised " + re.sub(r"rank \d+: ", "", raised).split(":")[0] + (")" if "(" in raised else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with Pools(args.world_size) as runner:
        for damage in DAMAGES:
            result = outcome(runner, attrs.evolve(BASE, damage=damage))
            print(f"{damage!r:60} {result}", flush=True)
            kind = type(damage).__name__ + (
                f"({damage.target})" if isinstance(damage, S.Truncate) else ""
            )
            table[kind][result] += 1
    print("\n| damage | specs | outcomes (count) |\n| --- | --- | --- |")
    for kind, counts in table.items():
        shown = ", ".join(f"{what}: {n}" for what, n in counts.most_common())
        print(f"| {kind} | {sum(counts.values())} | {shown} |")


if __name__ == "__main__":
    main()
