"""The ``dcprop`` command: ``dcprop check`` runs a campaign, ``dcprop repro`` replays one.

Exit codes: 0 no new failure (known upstream bugs and documented limitations of the
checkpointer are listed, not counted, unless ``--strict``); 1 failures found, each
shrunk and written as a reproducer; 2 bad usage or set-up, with a message that says
what to change.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import time
from typing import Any

from dcprop import __version__, recipes
from dcprop.errors import DcpropError, UsageError
from dcprop.properties import PROPERTY_NAMES
from dcprop.runner import resolve_device

__all__ = ["main"]

DEFAULT_WORLD_SIZE = 4
#: ranks per CPU core beyond which `dcprop check` asks for --oversubscribe
RANKS_PER_CORE = 2
DEFAULT_DURATION = 180.0  # seconds: the default campaign is sized by time
DEFAULT_DATABASE = os.path.join(".hypothesis", "examples")  # where Hypothesis keeps its own


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcprop", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dcprop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run properties over generated scenarios")
    _add_what_options(check)
    _add_budget_options(check)
    _add_output_options(check)
    repro = sub.add_parser("repro", help="run a reproducer script written by dcprop check")
    repro.add_argument("file")
    return parser


def _add_what_options(check: argparse.ArgumentParser) -> None:
    """What the campaign tests: properties, worlds, scenarios, checkpointer."""
    check.add_argument(
        "--properties",
        default=None,
        help="comma-separated properties (default: the recipe's, or all)",
    )
    check.add_argument(
        "--world-size",
        type=int,
        default=DEFAULT_WORLD_SIZE,
        help=f"largest world size; scenarios use 1..N ranks (default {DEFAULT_WORLD_SIZE})",
    )
    check.add_argument(
        "--recipe",
        default=None,
        help="a recipe shipped in dcprop/recipes/ (its name), or a path to a JSON file",
    )
    check.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="leave a region of scenarios out, to step past a bug already known (repeat it "
        "for more): plan=KIND, job=sub-world, layout=uneven, frozen=some, or a state-dict "
        "option's value such as broadcast_from_rank0=true; a recipe's exclude adds to these",
    )
    check.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    check.add_argument(
        "--checkpointer",
        default=None,
        help="the checkpointer to test: dcp (default), torch_checkpointing, "
        "or module:attr of your own",
    )
    check.add_argument(
        "--checkpoint-root",
        default=None,
        metavar="DIR",
        help="where examples write checkpoints (default: $DCPROP_CHECKPOINT_ROOT, else the temp "
        "directory); under torchrun across hosts, a directory every host mounts",
    )
    check.add_argument(
        "--oversubscribe",
        action="store_true",
        help=f"allow --world-size above {RANKS_PER_CORE} ranks per CPU core (refused by default)",
    )


def _add_budget_options(check: argparse.ArgumentParser) -> None:
    """How long the campaign runs and what it remembers."""
    check.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help="examples per property (default: the recipe's, or as many as --duration allows)",
    )
    check.add_argument(
        "--duration",
        default=None,
        metavar="TIME",
        help="time for the whole campaign, shared between the properties: 90s, 5m, 1h or "
        f"seconds (default: the recipe's, or {DEFAULT_DURATION:g}s when no example count is "
        "given); a failure found in time is still shrunk",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        help="seconds an example may take before it counts as a hang",
    )
    check.add_argument(
        "--shrink-seconds",
        type=float,
        default=60.0,
        help="seconds spent shrinking a failure before reporting the smallest so far (default 60)",
    )
    check.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    check.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        metavar="DIR",
        help="Hypothesis example database: a re-run replays the last failures first "
        f"(default {DEFAULT_DATABASE})",
    )
    check.add_argument(
        "--no-database",
        dest="database",
        action="store_const",
        const=None,
        help="keep no example database",
    )


def _add_output_options(check: argparse.ArgumentParser) -> None:
    """What the campaign writes and how it counts known bugs."""
    check.add_argument("--report", default=None, help="write a JSON report here")
    check.add_argument(
        "--repro-dir",
        default="dcprop-repros",
        help="where reproducers of failures go (default ./dcprop-repros)",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="count known upstream bugs and documented limitations as failures (exit 1)",
    )
    check.add_argument(
        "--add-to-corpus",
        default=None,
        metavar="DIR",
        help="also save each new failure as a corpus entry in DIR",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # `--checkpointer my_ckpt:C` names a module in the working directory, as `python -m`,
    # uvicorn and celery accept; the rank processes inherit this path
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if args.command == "repro":
            return _repro(args.file)
        return _check(args)
    except UsageError as e:
        print(f"dcprop: error: {e}", file=sys.stderr)
        return 2
    except DcpropError as e:
        print(f"dcprop: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _repro(path: str) -> int:
    if not os.path.isfile(path):
        raise UsageError(f"no reproducer at {path!r}")
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    recipe = recipes.load(args.recipe) if args.recipe else {}
    if args.properties is not None:
        names = args.properties.split(",")
    else:
        names = recipe.get("properties") or list(PROPERTY_NAMES)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in PROPERTY_NAMES]
    if unknown or not names:
        raise UsageError(
            f"--properties: unknown {unknown or names}; choose from {', '.join(PROPERTY_NAMES)}"
        )
    if args.world_size < 1:
        raise UsageError(f"--world-size {args.world_size}: needs at least 1 rank")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be positive")
    if args.shrink_seconds < 0:
        raise UsageError(f"--shrink-seconds {args.shrink_seconds}: must be 0 or more")
    device = resolve_device(args.device, option="--device")
    _check_world_size(args.world_size, args.oversubscribe)
    _check_report_path(args.report)
    world_sizes = [
        w for w in recipe.get("world_sizes", range(1, args.world_size + 1)) if w <= args.world_size
    ]
    if not world_sizes:
        raise UsageError(
            f"--world-size {args.world_size} is below every world size of recipe "
            f"{args.recipe!r} ({recipe.get('world_sizes')})"
        )
    max_examples = (
        args.max_examples if args.max_examples is not None else recipe.get("max_examples", 8)
    )
    if max_examples < 0:
        raise UsageError(f"--max-examples {max_examples}: must be 0 or more")
    return {
        "properties": names,
        "device": device,
        "world_sizes": tuple(world_sizes),
        "max_examples": max_examples,
        "recipe": recipe,
        "exclude": _exclusions(args, recipe),
    }


def _exclusions(args: argparse.Namespace, recipe: dict[str, Any]) -> tuple[str, ...]:
    """The recipe's exclusions and ``--exclude``'s, each word once."""
    from hypothesis.errors import InvalidArgument

    from dcprop.strategies import parse_exclusions

    try:
        words = parse_exclusions(recipe.get("exclude", []), f"recipe {args.recipe!r}: exclude")
        words += parse_exclusions(args.exclude, "--exclude")
    except InvalidArgument as e:
        raise UsageError(str(e)) from None
    return tuple(dict.fromkeys(words))


def _strategy(prop: str, cfg: dict[str, Any], job_world_size: int | None = None) -> Any:
    """The scenarios ``prop`` draws in this campaign; arguments (a recipe's, the
    exclusions) that leave it nothing to draw are bad usage."""
    from hypothesis.errors import InvalidArgument

    from dcprop import strategies as dst

    kwargs = dict(cfg["recipe"].get("scenario_kwargs", {}).get(prop, {}))
    if job_world_size is not None:
        kwargs.setdefault("job_world_size", job_world_size)
    try:
        strategy = dst.scenarios(
            prop,
            world_sizes=cfg["world_sizes"],
            device=cfg["device"],
            exclude=cfg["exclude"],
            **kwargs,
        )
        strategy.validate()
        return strategy
    except InvalidArgument as e:
        fix = f"; change the exclusions, or leave {prop} out with --properties"
        raise UsageError(f"{e}{fix if cfg['exclude'] else ''}") from None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _threads_per_rank(world_size: int) -> None:
    """Share the cores between the ranks of the largest job.  Each rank is a process,
    and torch gives every process one intra-op thread per core; on 2 cores a 4-rank
    example then ran 3x slower than with one thread per rank (OpenMP threads spin
    while they wait: benchmarks/bench_campaign.py, section worlds).  The fork server
    the ranks come from reads OMP_NUM_THREADS when it imports torch; a user's value
    wins."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // world_size)))


def _check_world_size(world_size: int, oversubscribe: bool) -> None:
    """Each rank is a process that computes: far more ranks than cores make every
    example slow enough to time out, so that is refused unless asked for (the default
    of 4 ranks is always allowed).  Under torchrun the launcher chose the processes."""
    from dcprop.runner import under_torchrun

    cores = _cores()
    limit = max(DEFAULT_WORLD_SIZE, RANKS_PER_CORE * cores)
    if oversubscribe or under_torchrun() or world_size <= limit:
        return
    raise UsageError(
        f"--world-size {world_size}: {world_size} ranks on {cores} CPU core(s) is more than "
        f"{limit} ({RANKS_PER_CORE} per core, and never fewer than {DEFAULT_WORLD_SIZE}); "
        f"use --world-size {limit} or less, or add --oversubscribe"
    )


def _check_report_path(path: str | None) -> None:
    """Before the campaign, not after it: a report that cannot be written loses the run."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--report {path}: the directory {folder} does not exist; create it")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise UsageError(f"--report {path}: cannot write a file there; choose another path")


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``"90s"``, ``"5m"``, ``"1h"`` or plain seconds -> seconds."""
    text = str(text).strip()
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UsageError(f"--duration {text!r}: give a positive time such as 90s, 5m or 1h")
    return seconds


def _budget(args: argparse.Namespace, cfg: dict[str, Any]) -> tuple[int, float | None]:
    """Examples per property and seconds for the whole campaign (None: no limit).  A
    campaign with no example count and no duration runs for DEFAULT_DURATION."""
    recipe = cfg["recipe"]
    given = args.duration if args.duration is not None else recipe.get("duration")
    duration = None if given is None else parse_duration(given)
    counted = args.max_examples is not None or "max_examples" in recipe
    if not counted:
        return UNLIMITED_EXAMPLES, DEFAULT_DURATION if duration is None else duration
    return cfg["max_examples"], duration


UNLIMITED_EXAMPLES = 10**6  # a campaign sized by time: Hypothesis stops at the deadline


def _explicit(recipe: dict[str, Any], prop: str, world: int) -> tuple[Any, ...]:
    from dcprop.serialization import from_json

    out = []
    for entry in recipe.get("examples", []):
        if entry["property"] == prop:
            scenario = from_json(entry["scenario"])
            if scenario.world_size > world:
                raise UsageError(
                    f"recipe example for {prop} needs {scenario.world_size} ranks; "
                    f"raise --world-size to at least {scenario.world_size}"
                )
            out.append(scenario)
    return tuple(out)


def _check(args: argparse.Namespace) -> int:
    from dcprop.properties import make_hooks
    from dcprop.runner import make_runner, under_torchrun

    cfg = _settings(args)
    hooks = make_hooks(args.checkpointer)
    explicit = {p: _explicit(cfg["recipe"], p, args.world_size) for p in cfg["properties"]}
    for prop in cfg["properties"]:
        _strategy(prop, cfg)  # bad arguments are refused before the ranks start
    largest = max([*cfg["world_sizes"], *(s.world_size for v in explicit.values() for s in v)])
    _threads_per_rank(largest)
    runner = make_runner(
        largest, device=cfg["device"], timeout=args.timeout, checkpoint_root=args.checkpoint_root
    )
    if under_torchrun() and not runner.is_driver:
        return runner.follow()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run cleanup on `kill`
    started = time.perf_counter()
    exit_code = 2  # unless the campaign ends: torchrun's followers exit with it too
    try:
        reports = _campaign(args, cfg, runner, hooks, explicit)
        exit_code = 1 if any(r.failures for r in reports) else 0
    finally:
        runner.close(exit_code)
    _print_results(args, cfg, reports, time.perf_counter() - started)
    return exit_code


def _campaign(
    args: argparse.Namespace, cfg: dict[str, Any], runner: Any, hooks: Any, explicit: Any
) -> list[Any]:
    """Each property in turn, for its share of the time, under the live view."""
    from dcprop.campaign import run_campaign
    from dcprop.progress import Progress
    from dcprop.runner import under_torchrun

    max_examples, duration = _budget(args, cfg)
    deadline = None if duration is None else time.monotonic() + duration
    reports = []
    with Progress(cfg["properties"], sys.stdout, deadline) as progress:
        for i, prop in enumerate(cfg["properties"]):
            job = runner.world_size if under_torchrun() else None
            report = run_campaign(
                runner,
                prop,
                _strategy(prop, cfg, job_world_size=job),
                max_examples=max_examples,
                seed=args.seed,
                hooks=hooks,
                strict=args.strict,
                on_example=progress.update,
                on_failure=_failure_writer(args, prop),
                explicit=explicit[prop],
                shrink_seconds=args.shrink_seconds,
                duration=_share(duration, deadline, len(cfg["properties"]), i),
                database=args.database,
            )
            progress.done(report)
            reports.append(report)
    return reports


def _failure_writer(args: argparse.Namespace, prop: str) -> Any:
    """Writes a failure's reproducer (and corpus entry, with --add-to-corpus)."""
    from dcprop.corpus import add_failure
    from dcprop.repro import write_reproducer

    def write(scenario: Any, failure: Any, whose: Any) -> str:
        path = write_reproducer(
            args.repro_dir,
            prop,
            scenario,
            error=str(failure),
            checkpointer=args.checkpointer,
            blame=whose.sentence() if whose else "",
        )
        if args.add_to_corpus:
            add_failure(
                args.add_to_corpus, prop, scenario, failure, checkpointer=args.checkpointer or "dcp"
            )
        return path

    return write


def _print_results(
    args: argparse.Namespace, cfg: dict[str, Any], reports: list[Any], seconds: float
) -> None:
    from dcprop.campaign import known_totals, write_report
    from dcprop.progress import coverage_lines

    print("\ncoverage (examples per kind):")
    print("\n".join(coverage_lines(reports)))
    _summary(reports, seconds)
    if cfg["exclude"]:  # a clean run must not hide what it never tried
        print(f"excluded (never drawn): {', '.join(cfg['exclude'])}")
    if args.report:
        write_report(args.report, reports, _report_settings(args, cfg))
    for r in reports:
        for f in r.failures:
            print(f"FAILED {r.name}: {f['error']}\n  reproducer: {f['reproducer']}")
            if "blame" in f:
                print(f"  whose bug: {f['blame']['summary']}")
            if r.shrink_stopped:
                print(f"  (shrinking stopped after --shrink-seconds {args.shrink_seconds:g})")
    for bug in known_totals(reports):
        where = ", ".join(f"{p} {n}" for p, n in bug["properties"].items())
        print(
            f"KNOWN upstream bug {bug['id']}: {_examples(bug['examples'])} ({where}) ended in it "
            f"and checked nothing past it: {bug['title']}"
        )
    for limit in known_totals(reports, "limitations"):
        where = ", ".join(f"{p} {n}" for p, n in limit["properties"].items())
        print(
            f"LIMITATION {limit['id']}: {_examples(limit['examples'])} ({where}) met damage "
            f"the checkpointer cannot detect: {limit['title']}"
        )


def _share(duration: float | None, deadline: float | None, count: int, i: int) -> float | None:
    """The time the ``i``-th of ``count`` properties gets (None: no limit): an equal
    share of the time left, and never less than half of its planned share.  An
    example runs to its end even past the deadline, so one hang (it costs --timeout)
    would otherwise leave the properties after it no time at all."""
    if duration is None or deadline is None:
        return None
    left = max(0.0, deadline - time.monotonic())
    return max(left / (count - i), duration / count / 2)


def _examples(n: int) -> str:
    return f"{n} example" + ("" if n == 1 else "s")


def _summary(reports: list[Any], seconds: float) -> None:
    from dcprop.campaign import CHECKED_ENDINGS

    """A table of examples, those that reached the property's checks, failures, and
    examples that ended in a known bug (those checked nothing past the bug, so they
    are not passes), with what stopped the others."""
    print(
        f"\n{'property':<16} {'examples':>8} {'checked':>8} {'failures':>8} {'known':>5} "
        f"{'seconds':>8}  stopped before the checks"
    )
    for r in reports:
        stopped = ", ".join(
            f"{ending} {n}" for ending, n in r.ended.items() if n and ending not in CHECKED_ENDINGS
        )
        print(
            f"{r.name:<16} {r.examples:>8} {r.checked:>8} {len(r.failures):>8} "
            f"{r.known_examples:>5} {r.seconds:>8.1f}  {stopped or '-'}"
        )
    known = sum(r.known_examples for r in reports)
    print(
        f"{'total':<16} {sum(r.examples for r in reports):>8} "
        f"{sum(r.checked for r in reports):>8} "
        f"{sum(len(r.failures) for r in reports):>8} {known:>5} {seconds:>8.1f}"
    )
    if known:
        print(f"({_examples(known)} ended in a known upstream bug and checked nothing past it)")
    limited = sum(r.limitation_examples for r in reports)
    if limited:
        print(
            f"({_examples(limited)} loaded damage that the checkpointer documents it cannot "
            "detect: a limitation, not a pass; --strict fails them)"
        )
    steered = sum(n for r in reports for n in r.steered.values())
    if steered:
        print(
            f"({steered} drawn examples certain to end in a known bug met before were "
            "skipped; --strict runs them)"
        )


def _report_settings(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """What the report records of how the campaign was run."""
    max_examples, duration = _budget(args, cfg)
    return {
        "device": cfg["device"],
        "world_size": args.world_size,
        "seed": args.seed,
        "exclude": list(cfg["exclude"]),  # regions never drawn
        # the campaign's budget, as given or defaulted: what a re-run needs to match it
        "budget": {
            "duration": duration,
            "max_examples": None if max_examples == UNLIMITED_EXAMPLES else max_examples,
            "shrink_seconds": args.shrink_seconds,
            "world_sizes": list(cfg["world_sizes"]),
            "threads_per_rank": os.environ.get("OMP_NUM_THREADS"),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
