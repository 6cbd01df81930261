"""What stock DCP leaves when ranks are killed mid-save (not a test): the table in
docs/kills.md.

    python benchmarks/measure_kills.py

For each kill, on a 2-rank FSDP2 job with each storage layout: the first task of a
``durability`` example (save ``previous``, train a step, save ``killed`` under the
kill), then, on fresh ranks, what is on disk and what loading each checkpoint with
``dcp.load`` does: the previous checkpoint intact (loads, bitwise equal)?  The killed
save detected as incomplete (no ``.metadata``)?  Loading it: raises (which error), or
loads (equal to what was saved, or not)?
"""

from __future__ import annotations

import os
import shutil
import time

from dcprop import specs as S
from dcprop.errors import InjectedKill
from dcprop.properties.durability import SAVE
from dcprop.runner import Pools

MODEL = S.ModelSpec(S.Block((("fc0", S.Linear(4, 4)), ("fc1", S.Linear(4, 4)))))
KILLS = [
    S.Kill(),
    S.Kill(ranks=(1,)),
    S.Kill(writes=1),
    S.Kill(ranks=(0, 1), writes=1),
    S.Kill(at="metadata"),
    S.Kill(ranks=(1,), at="metadata"),
    S.Kill(ranks=(0, 1), at="saved"),
    S.Kill(ranks=(0, 1), at="in_flight"),
    S.Kill(ranks=(1,), at="in_flight"),
]
STORAGES = [
    S.StorageSpec(),
    S.StorageSpec(single_file_per_rank=False),
    S.StorageSpec(thread_count=2),
]


def inspect(ctx, scenario, phase):
    """On fresh ranks: what the killed save left, and what loading each checkpoint does."""
    from dcprop.compare import local_values, mismatches
    from dcprop.properties import _durability as D
    from dcprop.properties._harness import load_template_overrides
    from dcprop.runner.execute import root_cause

    root = os.path.join(ctx.runner_dir, phase)
    job = D._trained(ctx, scenario, root, D.DEFAULT_HOOKS)
    expected = {D.PREVIOUS: local_values(job.state())}
    job.train_step()
    expected[D.KILLED] = local_values(job.state())
    files = sorted(os.listdir(job.checkpoint_dir(D.KILLED)))
    out = {"files": files}
    for name in (D.PREVIOUS, D.KILLED):
        target = job.state(**load_template_overrides(job.topology.state_dict))
        try:
            job.load(target, name, step=scenario.training.steps + (name == D.KILLED))
            job.apply(target)
        except BaseException as e:
            cause, _ = root_cause(e)
            out[name] = f"raises `{type(cause).__name__}: {str(cause).split(';')[0][:60]}`"
            continue
        differ = mismatches(expected[name], local_values(job.state()))
        out[name] = f"loads, {len(differ)} entries differ" if differ else "loads, bitwise equal"
    ctx.agree(True, "inspecting")
    if ctx.rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    print("| kill | storage | killed save's files | previous | load of killed |")
    print("| --- | --- | --- | --- | --- |")
    started = time.perf_counter()
    with Pools(2) as pools:
        for storage in STORAGES:
            for kill in KILLS:
                row(pools, kill, storage)
    print(f"\n{len(STORAGES) * len(KILLS)} kills in {time.perf_counter() - started:.1f}s")


def row(pools: Pools, kill: S.Kill, storage: S.StorageSpec) -> None:
    mesh = S.MeshSpec((2,), ("shard",))
    scenario = S.Scenario(MODEL, S.Topology(2, mesh, S.FSDP2Plan()), storage=storage, kill=kill)
    phase = f"durability-measure-{abs(hash((kill, storage)))}"
    try:
        pools.run(SAVE, scenario, phase, world_size=2, meshes=scenario.meshes)
        raise SystemExit(f"{kill!r}: no rank died")
    except InjectedKill:
        pass
    # the ranks import this file by its name (the controller's sys.path holds its folder)
    out = pools.run("measure_kills:inspect", scenario, phase, world_size=2, meshes=scenario.meshes)
    out = out[0]
    data = [f for f in out["files"] if f.endswith(".distcp")]
    rest = [f for f in out["files"] if f not in data]
    files = ", ".join([f"{len(data)} data files", *rest])
    layout = repr(storage).removeprefix("StorageSpec(").removesuffix(")") or "default"
    print(f"| `{kill!r}` | {layout} | {files} | {out['previous']} | {out['killed']} |")


if __name__ == "__main__":
    main()
