"""Campaign cost, reported as ratios measured side by side in one run (not a test).

    python3 benchmarks/bench_campaign.py [--sections startup,overhead,bugs,worlds,sizes,jobs]
        [--duration 180] [--worlds 1,2,4,8] [--threads 1,2] [--repeat 5] [--profile]

startup   Pool start-up and restart per world size (fork server, fork + rendezvous).
overhead  The default campaign (``dcprop check --no-database --seed 0 --duration D``,
          run in this process through the CLI) against the bare bodies of the same
          examples: every scenario the campaign ran, run again directly on the
          campaign's already-started pools, without Hypothesis, matching, events,
          database or progress.  Rows with and without the examples that ended in a
          known bug.  ``--profile`` adds the controller's own time by function;
          ``--preload torch._dynamo`` measures a fork server that imports it once.
bugs      Each injected bug of the test suite: seconds to the first failure and to
          the shrunk report, by ``dcprop check`` itself (checkpointers) or by
          ``run_campaign`` on the default strategy (model factories: the CLI takes
          no model factory).
worlds    One roundtrip example (FSDP2 over all ranks, ~10^4 parameters) at each
          world size, per thread setting: ranks are processes that share the
          machine's cores by time-slicing; each sets ``torch.set_num_threads(t)``.
sizes     One roundtrip example at world size 2 for models of 10^2 .. 10^6
          parameters, per thread setting.
jobs      Properties side by side: two ``dcprop check`` processes on disjoint
          properties against one process on all of them, same wall-clock budget.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the injected bugs live in tests/helpers.py
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

from dcprop import specs as S
from dcprop.errors import ExampleFailure, RankTimeout
from dcprop.properties import PROPERTIES, property_ref
from dcprop.runner import Pool, Pools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECTIONS = ("startup", "overhead", "bugs", "worlds", "sizes", "jobs")


def ping(ctx: object) -> int:
    return 0


def threaded(ctx: Any, threads: int, prop: str, scenario: S.Scenario) -> Any:
    """``prop`` on ``threads`` intra-op threads (the runner restores the count after)."""
    import torch

    from dcprop.runner.execute import resolve

    torch.set_num_threads(threads)
    return resolve(property_ref(prop))(ctx, scenario)


# --- start-up ------------------------------------------------------------------------
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


# --- the campaign against its bare examples ------------------------------------------
class Recording:
    """The CLI's runner, recording each example it runs and the seconds it took; its
    pools outlive the campaign so that the bare examples run on started ranks."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pools, name)

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        ended, hung = "ok", False
        try:
            return self.pools.run(fn, *args, **kwargs)
        except ExampleFailure as failure:
            from dcprop.known_bugs import match_known

            ended = "known bug" if match_known(failure, args[0]) else "failed"
            hung = isinstance(failure, RankTimeout)
            raise
        finally:
            seconds = time.perf_counter() - started
            self.calls.append(
                dict(fn=fn, args=args, kwargs=kwargs, seconds=seconds, ended=ended, hung=hung)
            )

    def close(self) -> None:
        pass  # closed by the benchmark, after the bare examples


def overhead(duration: float, profile: bool) -> None:
    import dcprop.runner
    from dcprop import cli

    pools = Pools(cli.DEFAULT_WORLD_SIZE, timeout=20.0)
    recording = Recording(pools)
    real = dcprop.runner.make_runner
    dcprop.runner.make_runner = lambda *a, **k: recording  # type: ignore[assignment]
    report = os.path.join(tempfile.mkdtemp(prefix="bench-campaign-"), "report.json")
    argv = ["check", "--no-database", "--seed", "0", "--duration", f"{duration:g}"]
    argv += ["--report", report, "--repro-dir", os.path.dirname(report)]
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    try:
        out = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(out):
            if profiler:
                profiler.enable()
            code = cli.main(argv)
            if profiler:
                profiler.disable()
        wall = time.perf_counter() - started
        bare = [_bare(pools, call) for call in recording.calls]
    finally:
        dcprop.runner.make_runner = real  # type: ignore[assignment]
        pools.close()
    with open(report) as f:
        props = json.load(f)["properties"]
    shutil.rmtree(os.path.dirname(report))
    calls = recording.calls
    steered = sum(sum(p["steered"].values()) for p in props.values())
    print(
        f"\nthe default campaign (dcprop check {' '.join(argv[1:6])}), exit {code}, "
        f"{wall:.1f}s wall, {len(calls)} examples, {steered} draws steered past "
        "confirmed known bugs"
    )
    print(
        f"{'examples':<28} {'n':>5} {'campaign s':>10} {'in runner s':>11} {'bare s':>8} "
        f"{'campaign ex/s':>13} {'bare ex/s':>9} {'ratio':>6}"
    )
    in_runner = sum(c["seconds"] for c in calls)
    controller = wall - in_runner  # generation, matching, events, progress, reports
    for label, keep in (
        ("all", lambda c: True),
        ("without known-bug examples", lambda c: c["ended"] != "known bug"),
    ):
        chosen = [i for i, c in enumerate(calls) if keep(c)]
        ran = sum(calls[i]["seconds"] for i in chosen)
        # the controller's time is shared by every example, known bug or not
        spent = ran + controller * len(chosen) / max(1, len(calls))
        again = sum(bare[i] for i in chosen)
        n = len(chosen)
        print(
            f"{label:<28} {n:>5} {spent:>10.1f} {ran:>11.1f} {again:>8.1f} "
            f"{n / spent:>13.2f} {n / again:>9.2f} {again / spent:>6.0%}"
        )
    print(
        f"controller time outside the runner: {controller:.1f}s ({controller / wall:.0%}); "
        f"inside it, {pools.starts} pool starts ({pools.restarts} restarts after a hang or "
        "crash), which the bare examples, on started pools, do not pay"
    )
    hangs = [c for c in calls if c["hung"]]
    print(
        f"examples that hung: {len(hangs)}, {sum(c['seconds'] for c in hangs):.1f}s in the "
        f"runner ({sum(c['ended'] == 'known bug' for c in hangs)} of them known deadlocks)"
    )
    print(
        f"\n{'property':<16} {'examples':>8} {'checked':>8} {'known':>6} {'steered':>8} "
        f"{'seconds':>8} {'ex/s':>6}  stopped before the checks"
    )
    for name, p in props.items():
        stopped = ", ".join(
            f"{e} {n}" for e, n in p["ended"].items() if n and e not in ("held", "check failed")
        )
        print(
            f"{name:<16} {p['examples']:>8} {p['checked']:>8} {p['known_examples']:>6} "
            f"{sum(p['steered'].values()):>8} {p['seconds']:>8.1f} "
            f"{p['examples'] / max(p['seconds'], 1e-9):>6.2f}  {stopped or '-'}"
        )
    if profiler:
        _print_profile(profiler)


def _bare(pools: Pools, call: dict[str, Any]) -> float:
    started = time.perf_counter()
    with contextlib.suppress(ExampleFailure):
        pools.run(call["fn"], *call["args"], **call["kwargs"])
    return time.perf_counter() - started


def _print_profile(profiler: Any) -> None:
    import pstats

    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative").print_stats(r"dcprop|hypothesis|rich|pickle", 40)
    print("\ncontroller profile (cumulative, dcprop/hypothesis/rich/pickle functions):")
    print(stream.getvalue())


# --- injected bugs -------------------------------------------------------------------
CHECKPOINTER_BUGS = [
    # (checkpointer in tests/helpers.py, property it is caught by)
    ("DropKey", "roundtrip"),
    ("CorruptOneElement", "roundtrip"),
    ("CorruptOneElement", "submesh_layout"),
    ("SkipStepCount", "roundtrip"),
    ("WrongOffsets", "reshard"),
    ("DropBuffers", "roundtrip"),
    ("ZeroFrozen", "roundtrip"),
    ("KeepLiveLR", "roundtrip"),
    ("KeepLiveScheduler", "roundtrip"),
    ("ZeroAsNaN", "roundtrip"),
    ("ZeroAsNegativeZero", "roundtrip"),
]
MODEL_BUGS = [("without_running_mean", "roundtrip"), ("double_grads_on_rank0", "ddp_parity")]


def bugs(duration: float, only: list[str] | None) -> None:
    print(
        f"\ninjected bugs: seconds to the first failure and to the shrunk report "
        f"(default strategy, world sizes 1-4, seed 0, --duration {duration:g}s, "
        "--shrink-seconds 60)"
    )
    print(
        f"{'bug':<22} {'property':<15} {'by':<13} {'examples':>8} {'1st failure s':>13} "
        f"{'shrunk s':>9} {'process s':>9}  shrunk to"
    )
    for name, prop in CHECKPOINTER_BUGS + MODEL_BUGS:
        if only and name not in only:
            continue
        if (name, prop) in MODEL_BUGS:
            row = _model_bug(name, prop, duration)
        else:
            row = _checkpointer_bug(name, prop, duration)
        print(
            f"{name:<22} {prop:<15} {row['by']:<13} {row['examples']:>8} "
            f"{_seconds(row['first']):>13} {_seconds(row['shrunk']):>9} "
            f"{_seconds(row.get('process')):>9}  {row['scenario']}"
        )


def _seconds(value: float | None) -> str:
    return "not found" if value is None else f"{value:.1f}"


def _checkpointer_bug(name: str, prop: str, duration: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-campaign-") as folder:
        report = os.path.join(folder, "report.json")
        argv = [sys.executable, "-m", "dcprop.cli", "check", "--checkpointer"]
        argv += [f"tests.helpers:{name}", "--properties", prop, "--no-database", "--seed", "0"]
        argv += ["--duration", f"{duration:g}", "--report", report, "--repro-dir", folder]
        started = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
        process = time.perf_counter() - started
        with open(report) as f:
            p = json.load(f)["properties"][prop]
    return _bug_row("dcprop check", p, process)


def _model_bug(name: str, prop: str, duration: float) -> dict[str, Any]:
    import helpers

    from dcprop import strategies as dst
    from dcprop.campaign import run_campaign
    from dcprop.properties._harness import Hooks

    factory = getattr(helpers, name)
    with Pools(4, timeout=20.0) as pools:
        started = time.perf_counter()
        r = run_campaign(
            pools,
            prop,
            dst.scenarios(prop, world_sizes=(1, 2, 3, 4)),
            max_examples=10**6,
            seed=0,
            hooks=Hooks(model_factory=factory),
            duration=duration,
        )
        process = time.perf_counter() - started
    return _bug_row("run_campaign", r.to_json(), process)


def _bug_row(by: str, p: dict[str, Any], process: float) -> dict[str, Any]:
    failure = p["failures"][0] if p["failures"] else None
    scenario = "-"
    if failure is not None:
        from dcprop.serialization import from_json

        s = from_json(failure["scenario"])
        plan = s.save.plan_kind
        scenario = f"{s.world_size} ranks {plan}, {len(s.model.parameter_names())} params"
    return dict(
        by=by,
        examples=p["examples"],
        first=p["first_failure_seconds"],
        shrunk=p["seconds"] if failure else None,
        process=process,
        scenario=scenario,
    )


# --- how one example's cost grows -----------------------------------------------------
def sized_model(parameters: int) -> S.ModelSpec:
    """A two-Linear model of about ``parameters`` parameters."""
    width = max(2, round((parameters / 2) ** 0.5))
    return S.ModelSpec(S.Block((("fc0", S.Linear(width, width)), ("fc1", S.Linear(width, width)))))


def parameter_count(model: S.ModelSpec) -> int:
    return sum(math.prod(shape) for shape in model.parameters().values())


def fsdp_scenario(model: S.ModelSpec, world: int) -> S.Scenario:
    return S.Scenario(
        model,
        S.Topology(world, S.MeshSpec((world,), ("shard",)), S.FSDP2Plan()),
        optimizer=S.OptimizerSpec("adam"),
        training=S.TrainingSpec(batch_size=2),
    )


def per_example(pools: Pools, scenario: S.Scenario, threads: int, repeat: int) -> float:
    """Median seconds of one roundtrip example (after one warm-up example)."""
    times = []
    for i in range(repeat + 1):
        started = time.perf_counter()
        pools.run(
            "bench_campaign:threaded",
            threads,
            "roundtrip",
            scenario,
            world_size=scenario.world_size,
            meshes=scenario.meshes,
            seed=scenario.seed,
        )
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def worlds_table(worlds: list[int], threads: list[int], repeat: int) -> None:
    model = sized_model(10**4)
    print(
        f"\none roundtrip example (FSDP2 over all ranks, adam, {parameter_count(model)} "
        f"parameters), median of {repeat}, on {_cores()} cores; each rank is a process "
        "and the OS time-slices them over the cores"
    )
    _grid("world", worlds, threads, lambda w: (w, fsdp_scenario(model, w)), repeat)


def sizes_table(sizes: list[int], threads: list[int], repeat: int) -> None:
    print(
        f"\none roundtrip example at world size 2 (FSDP2, adam) by model size, median of {repeat}"
    )
    _grid("params", sizes, threads, lambda n: (2, fsdp_scenario(sized_model(n), 2)), repeat)


def _grid(label: str, keys: list[int], threads: list[int], make: Any, repeat: int) -> None:
    print(f"{label:>8} " + " ".join(f"{f'{t} thr/rank s':>13}" for t in threads))
    with Pools(max(make(k)[0] for k in keys), timeout=120.0) as pools:
        for key in keys:
            _, scenario = make(key)
            row = [per_example(pools, scenario, t, repeat) for t in threads]
            shown = parameter_count(scenario.model) if label == "params" else key
            print(f"{shown:>8} " + " ".join(f"{s:>13.3f}" for s in row))


def _cores() -> int:
    return len(os.sched_getaffinity(0))


# --- properties side by side ----------------------------------------------------------
def jobs(duration: float) -> None:
    halves = [["roundtrip", "reshard"], ["ddp_parity", "finetune_resume", "submesh_layout"]]
    print(
        f"\nproperties side by side: {duration:g}s of wall clock, one process on all five "
        "properties against two at once"
    )
    one = _processes([list(PROPERTIES)], duration)
    two = _processes(halves, duration)
    for label, (examples, wall) in (("1 process", one), ("2 processes", two)):
        print(f"{label:<12} {examples:>5} examples in {wall:6.1f}s  {examples / wall:5.2f} ex/s")


def _processes(groups: list[list[str]], duration: float) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(prefix="bench-campaign-") as folder:
        started = time.perf_counter()
        procs = []
        for i, props in enumerate(groups):
            report = os.path.join(folder, f"report{i}.json")
            argv = [sys.executable, "-m", "dcprop.cli", "check", "--no-database", "--seed", "0"]
            argv += ["--properties", ",".join(props), "--duration", f"{duration:g}"]
            argv += ["--report", report, "--repro-dir", folder]
            procs.append((report, subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)))
        examples = 0
        for report, proc in procs:
            proc.wait()
            with open(report) as f:
                examples += sum(p["examples"] for p in json.load(f)["properties"].values())
        return examples, time.perf_counter() - started


@contextlib.contextmanager
def _section(name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    load = os.getloadavg()
    print(f"[{name}: {time.perf_counter() - started:.0f}s, load average {load[0]:.2f}]")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--duration", type=float, default=180.0, help="the default campaign's")
    parser.add_argument("--bug-duration", type=float, default=60.0)
    parser.add_argument("--bugs", default=None, help="comma-separated injected bugs (default all)")
    parser.add_argument("--jobs-duration", type=float, default=60.0)
    parser.add_argument("--worlds", default="1,2,4,8")
    parser.add_argument("--sizes", default="100,1000,10000,100000,1000000")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--preload",
        default="",
        help="comma-separated modules the fork server imports besides its own (to measure "
        "what importing them once, instead of in every rank after each start, saves)",
    )
    args = parser.parse_args()
    if args.preload:
        from dcprop.runner import spawn

        spawn.PRELOAD.extend(args.preload.split(","))
        print(f"fork server also preloads {args.preload}")
    sections = args.sections.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    print(f"{_cores()} cores, load average {os.getloadavg()[0]:.2f} at the start")
    if "startup" in sections:
        with _section("startup"):
            startup([int(w) for w in args.worlds.split(",")])
    if "overhead" in sections:
        with _section("overhead"):
            overhead(args.duration, args.profile)
    if "bugs" in sections:
        with _section("bugs"):
            bugs(args.bug_duration, args.bugs.split(",") if args.bugs else None)
    if "worlds" in sections:
        with _section("worlds"):
            worlds_table([int(w) for w in args.worlds.split(",")], threads, args.repeat)
    if "sizes" in sections:
        with _section("sizes"):
            sizes_table([int(n) for n in args.sizes.split(",")], threads, args.repeat)
    if "jobs" in sections:
        with _section("jobs"):
            jobs(args.jobs_duration)


if __name__ == "__main__":
    main()
