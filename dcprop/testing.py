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

from collections.abc import Callable
from typing import Any

from hypothesis import event, given, reject

from dcprop.campaign import is_final_replay, record_events, signature_error
from dcprop.errors import ExampleFailure, ExampleSkipped
from dcprop.known_bugs import match_known
from dcprop.properties import property_ref, run_property
from dcprop.specs import Scenario

__all__ = ["check", "property_test", "reproducers"]

#: test id -> the reproducer of each distinct failure its final replays raised (the
#: plugin's terminal summary lists them)
reproducers: dict[str, list[str]] = {}


def _hooks(checkpointer: Any, model_factory: Any) -> Any:
    from dcprop.repro import hooks_for

    return hooks_for(checkpointer, model_factory)


def check(
    runner: Any,
    property: str,
    scenario: Scenario,
    *,
    hooks: Any = None,
    test_id: str | None = None,
    checkpointer_ref: str | None = None,
    strict: bool = False,
) -> None:
    """Run ``property`` on ``scenario`` inside a Hypothesis test: record coverage events,
    and on failure raise (one exception type per failure signature, so Hypothesis
    keeps distinct bugs apart) after writing the shrunk example's reproducer.  A known
    upstream bug (:mod:`dcprop.known_bugs`) passes as an event unless ``strict``.

    The reproducer carries ``hooks``' checkpointer and model factory, the
    checkpointer as ``checkpointer_ref`` (``"module:attr"``) where it was given so."""
    record_events(scenario)
    try:
        run_property(runner, property, scenario, hooks=hooks)
    except ExampleSkipped as e:
        event(f"skipped: {e}")
        reject()  # not a failure: this runner cannot run the example as drawn
    except ExampleFailure as failure:
        known = match_known(failure, scenario)
        if known is not None and not strict:
            event(f"known upstream bug: {known.id}")  # reported, as dcprop check does
            return
        if is_final_replay():
            from dcprop.pytest_plugin import repro_dir
            from dcprop.repro import write_reproducer

            path = write_reproducer(
                repro_dir,
                property,
                scenario,
                error=str(failure),
                checkpointer=checkpointer_ref or getattr(hooks, "checkpointer", None),
                model_factory=getattr(hooks, "model_factory", None),
            )
            found = reproducers.setdefault(test_id or property, [])
            if path not in found:
                found.append(path)
        raise signature_error(failure) from None


def property_test(
    property: str,
    *,
    checkpointer: Any = None,
    model_factory: Callable[..., Any] | None = None,
    strict: bool = False,
    **scenario_kwargs: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """Decorate ``fn(scenario)`` into a pytest test of ``property`` over random scenarios.

    ``checkpointer``: a Checkpointer object or ``"module:attr"`` (default: DCP).
    ``model_factory``: ``(model_spec, seed, device, frozen) -> nn.Module`` (default:
    dcprop's builder).  ``strict``: fail on known upstream bugs too.  Other keyword
    arguments go to ``dcprop.strategies.scenarios``.
    Both hooks must be importable module-level objects: they travel to the ranks.
    """
    from dcprop.strategies import scenarios

    property_ref(property)
    strategy = scenarios(property, **scenario_kwargs)
    ref = checkpointer if isinstance(checkpointer, str) else None

    def decorate(fn: Callable[..., Any]) -> Any:
        def test(dcprop_runner: Any, scenario: Scenario) -> None:
            fn(scenario)
            check(
                dcprop_runner,
                property,
                scenario,
                hooks=_hooks(checkpointer, model_factory),
                test_id=f"{fn.__module__}.{fn.__qualname__}",
                checkpointer_ref=ref,
                strict=strict,
            )

        for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
            setattr(test, attr, getattr(fn, attr))
        return given(scenario=strategy)(test)

    return decorate
