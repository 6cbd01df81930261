"""Property-testing your own checkpointer or trainer from pytest, in a few lines.

>>> from dcprop.testing import property_test
>>> @property_test("roundtrip", world_sizes=(2, 4), checkpointer="mypkg.ckpt:MyCheckpointer")
... def test_my_checkpointer_round_trips(scenario):
...     pass  # optional: hypothesis.assume(...) or checks on the scenario itself

The test takes the session's ``dcprop_runner`` fixture, draws scenarios with
:func:`dcprop.strategies.scenarios`, records what it covered as Hypothesis events
(see ``--hypothesis-show-statistics``), and on failure writes a reproducer that the
plugin lists at the end of the run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, event, given, reject, settings

from dcprop.campaign import blame, is_final_replay, record_events, signature_error
from dcprop.errors import ExampleFailure, ExampleSkipped, carry_runner_errors, reraise_carried
from dcprop.limitations import Limitation
from dcprop.properties import make_hooks, property_ref, run_and_match
from dcprop.runner import Runner
from dcprop.specs import Scenario

if TYPE_CHECKING:
    from dcprop.properties._harness import Hooks

__all__ = ["check", "property_test", "reproducers"]

#: test id -> the reproducer of each distinct failure its final replays raised (the
#: plugin's terminal summary lists them)
reproducers: dict[str, list[str]] = {}


def check(
    runner: Runner,
    property: str,
    scenario: Scenario,
    *,
    hooks: Hooks | None = None,
    test_id: str | None = None,
    checkpointer_ref: str | None = None,
    strict: bool = False,
    exclude: tuple[str, ...] = (),
) -> None:
    """Run ``property`` on ``scenario`` inside a Hypothesis test: record coverage events,
    and on failure raise (one exception type per failure signature, so Hypothesis
    keeps distinct bugs apart) after writing the shrunk example's reproducer.  A known
    upstream bug (:mod:`dcprop.known_bugs`), or a documented limitation of the
    checkpointer (:mod:`dcprop.limitations`), passes as an event unless ``strict``.  A
    failure seen with a checkpointer other than DCP's is replayed with plain DCP, and
    the message and the reproducer say what DCP does (:func:`dcprop.campaign.blame`).

    The reproducer carries ``hooks``' checkpointer and model factory, the
    checkpointer as ``checkpointer_ref`` (``"module:attr"``) where it was given so.
    ``exclude``: the regions the search left out (events, and the failure message,
    say so, so that a run never hides them)."""
    record_events(scenario)
    for word in exclude:
        event(f"excluded (never drawn): {word}")
    try:
        with carry_runner_errors():  # the pool or the harness failed: not the example
            failed = run_and_match(runner, property, scenario, hooks=hooks)
    except ExampleSkipped as e:
        event(f"skipped: {e}")
        reject()  # not a failure: this runner cannot run the example as drawn
    if failed is None:
        return
    if failed.known is not None and not strict:
        event(f"{_kind_of(failed.known)}: {failed.known.id}")  # as dcprop check reports it
        return
    if not is_final_replay():
        raise signature_error(failed.failure) from None
    with carry_runner_errors():
        whose = blame(runner, property, scenario, failed.failure, hooks)
    note = whose.sentence() if whose else ""
    path = _write_reproducer(property, scenario, failed.failure, hooks, checkpointer_ref, note)
    found = reproducers.setdefault(test_id or property, [])
    if path not in found:
        found.append(path)
    notes = [f"Whose bug: {note}"] if note else []
    if exclude:
        notes.append(f"Excluded (never drawn): {', '.join(exclude)}")
    raise signature_error(failed.failure, note="\n".join(notes)) from None


def _write_reproducer(
    property: str,
    scenario: Scenario,
    failure: ExampleFailure,
    hooks: Hooks | None,
    checkpointer_ref: str | None,
    blame: str,
) -> str:
    """The shrunk example's reproducer, in the plugin's directory: its path."""
    from dcprop.pytest_plugin import repro_dir
    from dcprop.repro import write_reproducer

    return write_reproducer(
        repro_dir,
        property,
        scenario,
        error=str(failure),
        checkpointer=checkpointer_ref or getattr(hooks, "checkpointer", None),
        model_factory=getattr(hooks, "model_factory", None),
        blame=blame,
    )


def property_test(
    property: str,
    *,
    checkpointer: Any = None,
    model_factory: Callable[..., Any] | None = None,
    strict: bool = False,
    exclude: Any = (),
    **scenario_kwargs: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """Decorate ``fn(scenario)`` into a pytest test of ``property`` over random scenarios.

    ``checkpointer``: a Checkpointer object or ``"module:attr"`` (default: DCP).
    ``model_factory``: ``(model_spec, seed, device, frozen) -> nn.Module`` (default:
    dcprop's builder).  ``strict``: fail on known upstream bugs too.  ``exclude``:
    regions of scenarios never drawn, to step past a bug already known, such as
    ``("plan=submesh", "broadcast_from_rank0=true")`` (see
    :data:`dcprop.strategies.EXCLUSIONS`).  Other keyword arguments go to
    ``dcprop.strategies.scenarios``.
    Both hooks must be importable module-level objects: they travel to the ranks.
    """
    from dcprop.strategies import parse_exclusions, scenarios

    property_ref(property)
    strategy = scenarios(property, exclude=exclude, **scenario_kwargs)
    strategy.validate()  # bad arguments are refused here, not in the search
    excluded = parse_exclusions(exclude)
    ref = checkpointer if isinstance(checkpointer, str) else None

    # built once, before the search: a checkpointer that does not import is bad input
    # (UsageError), which must not be shrunk as if it were a failing example
    hooks = functools.cache(lambda: make_hooks(checkpointer, model_factory))

    def decorate(fn: Callable[..., Any]) -> Any:
        def test(dcprop_runner: Runner, scenario: Scenario) -> None:
            fn(scenario)
            check(
                dcprop_runner,
                property,
                scenario,
                hooks=hooks(),
                test_id=f"{fn.__module__}.{fn.__qualname__}",
                checkpointer_ref=ref,
                strict=strict,
                exclude=excluded,
            )

        _name_after(test, fn, property)
        return _distributed(given(scenario=strategy)(test), prepare=hooks)

    return decorate


def _name_after(test: Callable[..., Any], fn: Callable[..., Any], property: str) -> None:
    """Give ``test`` the user's ``fn``'s name, and a Hypothesis digest of its own."""
    for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
        setattr(test, attr, getattr(fn, attr))
    # Hypothesis derives a test's derandomized seed and database key from its source,
    # the same for every property test: tell each apart by what it checks
    test._hypothesis_internal_add_digest = (  # type: ignore[attr-defined]
        f"{property} {fn.__module__}.{fn.__qualname__}".encode()
    )


def _distributed(given_test: Any, prepare: Callable[[], Any]) -> Any:
    """``given_test`` under the settings it runs with (the user's ``@settings`` on the
    result, else the profile current when it runs), less what a distributed example
    cannot meet: a deadline (an example takes seconds; the first also starts the pool)
    and the too-slow health check.

    Hypothesis freezes a settings object's values when it is made, and refuses a second
    ``@settings`` on one test; so the merge happens at call time, in a wrapper that
    hands on to ``given_test`` what Hypothesis' decorators (``@settings``, ``@example``,
    ``@seed``) recorded on it.  A RunnerError ends the search unshrunk and is raised as
    itself (see ``carry_runner_errors``).  ``prepare`` runs first, outside the search."""

    @functools.wraps(given_test)
    def run(*args: Any, **kwargs: Any) -> None:
        prepare()
        recorded = vars(run)
        for name, value in recorded.items():
            if name.startswith(_RECORDED_BY_HYPOTHESIS):
                setattr(given_test, name, value)
        chosen = (
            recorded["_hypothesis_internal_use_settings"]
            if recorded.get("_hypothesis_internal_settings_applied")
            else settings()  # the current profile's values
        )
        given_test._hypothesis_internal_use_settings = settings(
            chosen,
            deadline=None,
            suppress_health_check=(*chosen.suppress_health_check, HealthCheck.too_slow),
        )
        with reraise_carried():
            given_test(*args, **kwargs)

    return run


_RECORDED_BY_HYPOTHESIS = ("_hypothesis_internal_", "hypothesis_explicit_examples")


def _kind_of(known: Any) -> str:
    return "limitation" if isinstance(known, Limitation) else "known upstream bug"
