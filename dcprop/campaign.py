"""Campaigns: a property over many generated scenarios, driven by Hypothesis.

Shared by ``dcprop check`` and the pytest helpers.  A failure that matches a
known upstream bug is counted and the search goes on (it is not shrunk unless
``strict``); such an example checked nothing past the bug, so the report says how
many examples each known bug stopped, and how every example ended (see
:data:`ENDINGS`).  Any other failure is shrunk by Hypothesis to a minimal scenario
and written out as a reproducer, each distinct failure (signature) on its own.  A
failure seen with a user's checkpointer is replayed with plain DCP to say whose bug
it is (:func:`blame`).  A campaign is sized by examples, by time, or both; with an
example database, a re-run replays the last failures first.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import HealthCheck, Phase, event, given, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky, Unsatisfiable

from dcprop import specs as S
from dcprop.checkpointer import DCPCheckpointer
from dcprop.errors import (
    ExampleFailure,
    ExampleSkipped,
    RankCrashed,
    RankTimeout,
    carry_runner_errors,
    headline,
    reraise_carried,
)
from dcprop.known_bugs import KNOWN_BUGS, KnownBug, describe, match_known
from dcprop.limitations import Limitation
from dcprop.properties import run_and_match, run_property
from dcprop.strategies._scenarios import uneven_layout

__all__ = [
    "CHECKED_ENDINGS",
    "ENDINGS",
    "Blame",
    "PropertyReport",
    "blame",
    "describe_scenario",
    "known_totals",
    "run_campaign",
    "signature_error",
]


#: How an example can end.  Only the first two reached the property's checks.
ENDINGS = (
    "held",  # every check of the property passed
    "check failed",  # a check of the property failed (a PropertyFailure): a new failure
    "known bug",  # a known upstream bug stopped it: it checked nothing past the bug
    "limitation",  # damage the checkpointer documents it cannot detect loaded silently
    "error",  # a new failure before the checks: an exception in the code under test
    "hang",  # a new hang: ranks did not finish within the timeout
    "crash",  # a new crash: a rank process died
    "skipped",  # the runner cannot run it as described (torchrun's world is another size)
)
CHECKED_ENDINGS = ENDINGS[:2]


@attrs.define
class PropertyReport:
    """One property's campaign.  ``known`` has an entry per known upstream bug met:
    the bug, the first failure and scenario it was seen in, and ``examples``, how
    many examples ended in it (and so checked nothing past it).  ``ended`` counts
    examples by how they ended (:data:`ENDINGS`); ``coverage`` counts them per
    category of :func:`describe_scenario`.  ``phase`` is where the campaign is:
    generating, shrinking, replaying or done."""

    name: str
    examples: int = 0
    seconds: float = 0.0
    failures: list[dict[str, Any]] = attrs.field(factory=list)
    known: list[dict[str, Any]] = attrs.field(factory=list)
    # as ``known``, per documented limitation of the checkpointer (dcprop.limitations)
    limitations: list[dict[str, Any]] = attrs.field(factory=list)
    shrink_stopped: bool = False  # the shrink budget ran out: the failure may shrink further
    ended: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(ENDINGS, 0))
    coverage: dict[str, dict[str, int]] = attrs.field(factory=dict)
    phase: str = "generating"
    out_of_time: bool = False  # the time budget ended generation
    first_failure_at: int | None = None  # the example that first found a new failure
    first_failure_seconds: float | None = None
    steered: dict[str, int] = attrs.field(factory=dict)  # draws skipped, per confirmed bug
    flaky: list[str] = attrs.field(factory=list)  # signatures that did not fail again
    duration: float | None = None  # the property's share of the time budget (None: no limit)

    @property
    def checked(self) -> int:
        """Examples that reached the property's checks (held, or failed one)."""
        return sum(self.ended[e] for e in CHECKED_ENDINGS)

    def cover(self, scenario: S.Scenario) -> None:
        for category, values in describe_scenario(scenario).items():
            seen = self.coverage.setdefault(category, {})
            for value in (values,) if isinstance(values, str) else values:
                seen[value] = seen.get(value, 0) + 1

    @property
    def known_examples(self) -> int:
        """Examples that ended in a known bug: they checked nothing past it."""
        return sum(k["examples"] for k in self.known)

    @property
    def limitation_examples(self) -> int:
        """Examples that ended in a documented limitation of the checkpointer."""
        return sum(k["examples"] for k in self.limitations)

    def count_known(self, bug: KnownBug, failure: ExampleFailure, scenario: S.Scenario) -> None:
        """Count an example that ended in ``bug`` (a known bug, or a limitation)."""
        entries = self.limitations if isinstance(bug, Limitation) else self.known
        entry = next((k for k in entries if k["id"] == bug.id), None)
        if entry is None:
            entry = {
                **describe(bug),
                "examples": 0,
                "error": failure.signature,
                "scenario": _json(scenario),
            }
            entries.append(entry)
        entry["examples"] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "seconds": round(self.seconds, 3),
            "failures": self.failures,
            "known_examples": self.known_examples,
            "known": self.known,
            "limitation_examples": self.limitation_examples,
            "limitations": self.limitations,
            "shrink_stopped": self.shrink_stopped,
            "out_of_time": self.out_of_time,
            "checked": self.checked,
            # the rest were stopped before the checks: see "ended" and "known"
            "checked_share": round(self.checked / self.examples, 3) if self.examples else None,
            "ended": self.ended,
            "first_failure_at": self.first_failure_at,
            "first_failure_seconds": self.first_failure_seconds,
            "coverage": self.coverage,
            "steered": self.steered,
            "duration": None if self.duration is None else round(self.duration, 3),
        }


def known_totals(reports: list[PropertyReport], what: str = "known") -> list[dict[str, Any]]:
    """Each known bug met in ``reports`` (``what="limitations"``: each documented
    limitation): the bug, how many examples ended in it, and how many of those per
    property."""
    totals: dict[str, dict[str, Any]] = {}
    for r in reports:
        for k in getattr(r, what):
            bug = {f: k[f] for f in ("id", "title", "related")}
            total = totals.setdefault(k["id"], {**bug, "examples": 0, "properties": {}})
            total["examples"] += k["examples"]
            total["properties"][r.name] = k["examples"]
    return list(totals.values())


def describe_scenario(scenario: S.Scenario) -> dict[str, str | tuple[str, ...]]:
    """Categories worth counting: what a run covered (for ``hypothesis.event``).  A
    category with several values (the step kinds of a program) counts each once."""
    save, load = scenario.save, scenario.load_topology
    out: dict[str, str | tuple[str, ...]] = {
        "plan": save.plan_kind if save == load else f"{save.plan_kind} -> {load.plan_kind}",
        "mesh": str(save.mesh.shape)
        if save.mesh == load.mesh
        else f"{save.mesh.shape} -> {load.mesh.shape}",
        "layout": "uneven" if uneven_layout(scenario) else "even",
        "frozen": "some frozen" if scenario.frozen else "none frozen",
        "state dict": "full" if save.state_dict.full_state_dict else "sharded",
        "worlds": str(save.world_size)
        if save.world_size == load.world_size
        else f"{save.world_size} -> {load.world_size}",
        "job": "own world"
        if scenario.job_world_size is None
        else f"sub-world of {scenario.job_world_size}",
        "options": _options(save.state_dict),
        "model": _model_features(scenario),
    }
    if scenario.damage is not None:
        out["damage"] = _damage_kind(scenario.damage)
    if scenario.kill is not None:
        out["kill"] = scenario.kill.at + (
            f" after {scenario.kill.writes}" if scenario.kill.writes else ""
        )
    if scenario.program:  # a program's saves choose their own state-dict options
        saves = [step.state_dict for step in scenario.program if isinstance(step, S.Save)]
        out["state dict"] = tuple({"full" if o.full_state_dict else "sharded" for o in saves})
        out["options"] = tuple(dict.fromkeys(_options(o) for o in saves))
        out["program"] = f"{len(scenario.program)} steps"
        out["step kinds"] = tuple(dict.fromkeys(type(step).__name__ for step in scenario.program))
    return out


def _damage_kind(damage: S.Damage) -> str:
    """The kind of fault, as the coverage table counts it (no positions or masks)."""
    if isinstance(damage, S.Truncate):
        return f"Truncate {damage.target}"
    if isinstance(damage, S.MutateInFlight):
        return f"MutateInFlight {damage.how}"
    return type(damage).__name__


def _model_features(scenario: S.Scenario) -> str:
    """What the model holds beyond float32 weights, as one category: ``bf16``/``fp16``
    parameters, ``bool buffer``, ``non-persistent buffer``, ``skip`` (a branch some
    steps skip; ``unstepped at save`` where none has used it by the save)."""
    model = scenario.model
    dtypes = {getattr(layer, "dtype", "fp32") for _, layer in model.modules()} - {"fp32"}
    kinds = {type(layer) for _, layer in model.modules()}
    features = sorted(dtypes)
    features += ["bool buffer"] if S.Mask in kinds else []
    features += ["non-persistent buffer"] if model.non_persistent_buffers() else []
    if S.Skip in kinds:
        unstepped = model.idle_parameters(scenario.training.steps) - set(scenario.frozen)
        features.append("skip, unstepped at save" if unstepped else "skip")
    return ", ".join(features) or "plain"


def _options(options: S.StateDictSpec) -> str:
    """The state-dict options that differ from their defaults, as one category."""
    changed = [f"{name}={value!r}" for name, value in S.explicit_fields(options) if name]
    return ", ".join(changed) or "defaults"


def ending(failure: ExampleFailure, known: KnownBug | None) -> str:
    """How an example that raised ``failure`` ended (one of :data:`ENDINGS`)."""
    if isinstance(known, Limitation):
        return "limitation"
    if known is not None:
        return "known bug"
    if isinstance(failure, RankTimeout):
        return "hang"
    if isinstance(failure, RankCrashed):
        return "crash"
    return "check failed" if failure.signature.startswith("PropertyFailure") else "error"


def record_events(scenario: S.Scenario) -> None:
    for key, values in describe_scenario(scenario).items():
        for value in (values,) if isinstance(values, str) else values:
            event(f"{key}: {value}")


_FAILURE_TYPES: dict[str, type[ExampleFailure]] = {}


def signature_error(failure: ExampleFailure, note: str = "") -> ExampleFailure:
    """The same failure as an exception type of its own per signature, so Hypothesis
    counts different failures as different bugs and does not slip from one to
    another while shrinking.  ``note`` ends its message."""
    key = hashlib.sha1(failure.signature.encode()).hexdigest()[:8]
    cls = _FAILURE_TYPES.setdefault(
        key, type(f"PropertyFailed_{key}", (type(failure),), {"__module__": __name__})
    )
    message = f"{failure}\n\n{note}" if note else str(failure)
    return cls(message, outcomes=failure.outcomes, signature=failure.signature)


class _OutOfTime(BaseException):
    """Ends generation when the time budget is spent (a BaseException, so Hypothesis
    does not take it for a failure to shrink)."""


@reraise_carried()
def run_campaign(
    runner: Any,
    property: str,
    strategy: Any,
    *,
    max_examples: int,
    seed: int = 0,
    hooks: Any = None,
    strict: bool = False,
    on_example: Callable[[PropertyReport], None] | None = None,
    on_failure: Callable[[S.Scenario, ExampleFailure, Blame | None], str] | None = None,
    explicit: tuple[S.Scenario, ...] = (),
    shrink_seconds: float = 60.0,
    duration: float | None = None,
    database: str | None = None,
    confirmed: set[str] | None = None,
) -> PropertyReport:
    """Run ``property`` over ``explicit`` scenarios, then up to ``max_examples`` drawn
    from ``strategy`` for up to ``duration`` seconds (None: no time limit).
    ``on_failure(scenario, failure, blame)`` writes a reproducer and returns its path,
    for each distinct failure, shrunk, with what plain DCP does on its scenario
    (:func:`blame`).  ``database``: where Hypothesis keeps failing examples, replayed
    first next time.  ``confirmed``: known bugs this property has met (updated here);
    see :class:`_Campaign` for the budget and for skipping confirmed bugs."""
    campaign = _Campaign(
        runner,
        property,
        hooks,
        strict,
        on_example,
        on_failure,
        shrink_seconds,
        duration,
        set() if confirmed is None else confirmed,
        PropertyReport(property, duration=duration),
    )
    for scenario in explicit:
        try:
            campaign.attempt(scenario)
        except ExampleFailure as failure:
            campaign.record(scenario, failure)
    if max_examples > 0:
        campaign.search(strategy, max_examples, seed, database)
    return campaign.done()


@attrs.define
class _Campaign:
    """One property's campaign: the budget, each example's ending, and the failures.

    A drawn scenario certain to end in a ``confirmed`` known bug is skipped and counted
    in ``steered`` instead of paying for the bug again, unless ``strict``.  Not shared
    between properties: each calls other APIs, so a bug met in one is not certain in
    another (ddp_parity never loads a state dict).

    The time budget ends generation only: a failure found in time is still shrunk,
    for ``shrink_seconds`` counted from the first failure (the search for further
    distinct failures, which Hypothesis goes on with for up to ten seconds, falls
    within it); after that every candidate passes, so Hypothesis replays the smallest
    failure found so far (alone it would go on for up to five minutes)."""

    runner: Any
    property: str
    hooks: Any
    strict: bool
    on_example: Callable[[PropertyReport], None] | None
    on_failure: Callable[[S.Scenario, ExampleFailure, Blame | None], str] | None
    shrink_seconds: float
    duration: float | None
    confirmed: set[str]
    report: PropertyReport
    started: float = attrs.field(factory=time.perf_counter)
    found_at: float | None = None  # when the first new failure was found
    # each distinct failure (signature): as Hypothesis replays it shrunk at the end, and
    # its last example (what a Flaky search is reported from)
    finals: dict[str, tuple[S.Scenario, ExampleFailure]] = attrs.field(factory=dict)
    seen: dict[str, tuple[S.Scenario, ExampleFailure]] = attrs.field(factory=dict)

    def attempt(self, scenario: S.Scenario) -> None:
        """Run one example, unless the budget says otherwise; raise its failure as a
        type of its own per signature, unless it is a known bug (counted)."""
        if not self._within_budget():
            return  # counts as passing, so Hypothesis keeps what it has
        report = self.report
        report.examples += 1
        report.cover(scenario)
        try:
            self._run(scenario)
        finally:
            report.seconds = time.perf_counter() - self.started
            if self.on_example:
                self.on_example(report)

    def _within_budget(self) -> bool:
        now = time.perf_counter()
        if self.found_at is None:
            if self.duration is not None and now - self.started > self.duration:
                self.report.out_of_time = True
                raise _OutOfTime
            return True
        if now - self.found_at > self.shrink_seconds and not is_final_replay():
            self.report.shrink_stopped = True
            return False
        self.report.phase = "replaying" if is_final_replay() else "shrinking"
        return True

    def _run(self, scenario: S.Scenario) -> None:
        report = self.report
        try:
            with carry_runner_errors():  # the pool or the harness failed: not the example
                failed = run_and_match(self.runner, self.property, scenario, hooks=self.hooks)
        except ExampleSkipped:
            report.ended["skipped"] += 1
            return
        if failed is None:
            report.ended["held"] += 1
            return
        failure, known = failed
        report.ended[ending(failure, known)] += 1
        if known is not None and not self.strict:
            report.count_known(known, failure, scenario)
            self.confirmed.add(known.id)
            return
        if self.found_at is None:
            self.found_at = time.perf_counter()
            report.first_failure_at = report.examples
            report.first_failure_seconds = round(self.found_at - self.started, 3)
        raise signature_error(failure) from None

    def record(self, scenario: S.Scenario, failure: ExampleFailure) -> None:
        whose = blame(self.runner, self.property, scenario, failure, self.hooks)
        _record(self.report, scenario, failure, self.on_failure, whose)

    def search(self, strategy: Any, max_examples: int, seed: int, database: str | None) -> None:
        """Hypothesis' search over ``strategy``; then each distinct failure, recorded."""
        test = self._hypothesis_test(strategy, max_examples, seed, database)
        try:
            test()
        except (_OutOfTime, Unsatisfiable):
            pass  # out of time, or every draw was certain to end in a confirmed known bug
        except Flaky as error:
            # a failure that did not fail again the same way is still a failure of the
            # code under test: report what was seen, marked flaky, not a crash of dcprop
            for signature in _flaky_signatures(error) or list(self.seen):
                if signature in self.seen and signature not in self.finals:
                    self.report.flaky.append(signature)
                    self.finals[signature] = self.seen[signature]
        except Exception as error:
            if not _failures_only(error):
                raise
        for shrunk, final in self.finals.values():
            self.record(shrunk, final)

    def _hypothesis_test(
        self, strategy: Any, max_examples: int, seed: int, database: str | None
    ) -> Callable[[], None]:
        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None if database is None else DirectoryBasedExampleDatabase(database),
            derandomize=False,
            report_multiple_bugs=True,
            print_blob=False,
            phases=(Phase.reuse, Phase.generate, Phase.shrink),
            suppress_health_check=(HealthCheck.too_slow, HealthCheck.filter_too_much),
        )
        @hypothesis_seed(seed)  # under @settings: @seed alone would turn the database off
        @given(strategy)
        def search(scenario: S.Scenario) -> None:
            self._draw(scenario)

        # the database keys examples by test function: one key per property
        search.hypothesis.inner_test._hypothesis_internal_add_digest = self.property.encode()  # type: ignore[attr-defined]
        return search  # type: ignore[no-any-return]

    def _draw(self, scenario: S.Scenario) -> None:
        bug = None if self.strict else certain_known_bug(scenario, self.confirmed)
        if bug is not None:
            self.report.steered[bug] = self.report.steered.get(bug, 0) + 1
            reject()
        record_events(scenario)
        try:
            self.attempt(scenario)
        except ExampleFailure as failure:
            self.seen[failure.signature] = (scenario, failure)
            if is_final_replay():
                self.finals[failure.signature] = (scenario, failure)
            raise

    def done(self) -> PropertyReport:
        self.report.phase = "done"
        self.report.seconds = time.perf_counter() - self.started
        return self.report


def write_report(path: str, reports: list[PropertyReport], settings: dict[str, Any]) -> None:
    """The campaign's JSON report at ``path`` (written whole or not at all): versions,
    ``settings`` (how it was run), each property's report, and the known bugs met."""
    import torch

    from dcprop import __version__

    data = {
        "dcprop_version": __version__,
        "torch_version": torch.__version__,
        **settings,
        "properties": {r.name: r.to_json() for r in reports},
        # each distinct failure (signature) of each property, shrunk, with its reproducer
        "failures": sum(len(r.failures) for r in reports),
        # per bug: how many examples ended in it (they checked nothing past the bug)
        "known": known_totals(reports),
        # per documented limitation: how many examples loaded damage it cannot detect
        "limitations": known_totals(reports, "limitations"),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def certain_known_bug(scenario: S.Scenario, confirmed: set[str]) -> str | None:
    """The id of a confirmed known bug that ``scenario`` is certain to end in, if any."""
    return next(
        (
            b.id
            for b in KNOWN_BUGS
            if b.id in confirmed and b.certain_in is not None and b.certain_in(scenario)
        ),
        None,
    )


def is_final_replay() -> bool:
    """True in Hypothesis' final replay of the minimal failing example (and outside
    Hypothesis, where every run is final)."""
    try:
        from hypothesis.control import current_build_context

        return bool(getattr(current_build_context(), "is_final", True))
    except Exception:
        return True


def _json(scenario: S.Scenario) -> Any:
    from dcprop.serialization import to_json

    return to_json(scenario)


def _flaky_signatures(error: Flaky) -> list[str]:
    """The signatures of the failures a Flaky search saw (its first failures)."""
    inner = getattr(error, "exceptions", None) or ()
    return [e.signature for e in inner if isinstance(e, ExampleFailure)]


def _failures_only(error: BaseException) -> bool:
    """True for what a search raises when examples failed: one failure, or Hypothesis'
    group of the distinct ones (not a failure that did not fail again: Flaky)."""
    if isinstance(error, ExampleFailure):
        return True
    if isinstance(error, Flaky):
        return False
    inner = getattr(error, "exceptions", None)
    return inner is not None and all(_failures_only(e) for e in inner)


def _record(
    report: PropertyReport,
    scenario: S.Scenario,
    failure: ExampleFailure,
    on_failure: Callable[[S.Scenario, ExampleFailure, Blame | None], str] | None,
    whose: Blame | None,
) -> None:
    entry: dict[str, Any] = {
        "error": headline(str(failure)),
        "signature": failure.signature,
        "scenario": _json(scenario),
        "reproducer": None,
    }
    if failure.signature in report.flaky:
        entry["error"] = f"flaky (did not fail the same way again): {entry['error']}"
        entry["flaky"] = True
    known = match_known(failure, scenario)
    if known is not None:
        entry["known_bug"] = known.id
    if whose is not None:
        entry["blame"] = whose.to_json()
    if on_failure is not None:
        entry["reproducer"] = on_failure(scenario, failure, whose)
    report.failures.append(entry)


#: What plain DCP can do on the scenario of a failure seen with a user's checkpointer,
#: and what that says about whose bug the failure is.
PLAIN_DCP = {
    "passes": "the checkpointer's bug",
    "fails the same way": "not the checkpointer's bug: torch's (DCP's)",
    "fails differently": "undecided: DCP fails here too, in another way",
}


@attrs.frozen
class Blame:
    """Whose bug a failure seen with a user's checkpointer is: what plain DCP does on
    the same scenario (one of :data:`PLAIN_DCP`), and DCP's own failure signature
    where it fails."""

    checkpointer: str  # the checkpointer's class, by import path
    plain_dcp: str
    signature: str | None = None
    known_bug: str | None = None  # the known upstream bug DCP's own failure is, if any

    @property
    def verdict(self) -> str:
        return PLAIN_DCP[self.plain_dcp]

    def sentence(self) -> str:
        """One line for a summary, a failure message or a reproducer's header."""
        differently = f" ({self.signature})" if self.plain_dcp == "fails differently" else ""
        known = f" (known upstream bug {self.known_bug})" if self.known_bug else ""
        return f"plain DCP {self.plain_dcp}{differently}{known}: {self.verdict}"

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpointer": self.checkpointer,
            "plain_dcp": self.plain_dcp,
            "plain_dcp_signature": self.signature,
            "plain_dcp_known_bug": self.known_bug,
            "verdict": self.verdict,
            "summary": self.sentence(),
        }


def blame(
    runner: Any, property: str, scenario: S.Scenario, failure: ExampleFailure, hooks: Any
) -> Blame | None:
    """Replay a failure's ``scenario`` with plain DCP in place of the user's checkpointer
    (the same property, model factory and runner) and say what DCP does: a failure it
    shows too, with the same signature, is not the checkpointer's bug.  None where the
    failure ran with DCP itself."""
    checkpointer = getattr(hooks, "checkpointer", None)
    if checkpointer is None or type(checkpointer) is DCPCheckpointer:
        return None
    name = f"{type(checkpointer).__module__}.{type(checkpointer).__qualname__}"
    try:
        plain = attrs.evolve(hooks, checkpointer=DCPCheckpointer())
        run_property(runner, property, scenario, hooks=plain)
    except ExampleFailure as dcp:
        same = dcp.signature == failure.signature
        known = match_known(dcp, scenario)
        return Blame(
            name,
            "fails the same way" if same else "fails differently",
            dcp.signature,
            None if known is None else known.id,
        )
    return Blame(name, "passes")
