"""The campaign loop under `dcprop check`: shrink budget, known bugs, failure records."""

import os

import attrs
import helpers
from hypothesis import strategies as st

from dcprop import strategies as dst
from dcprop.campaign import certain_known_bug, known_totals, run_campaign
from dcprop.corpus import load_entries
from dcprop.properties._harness import Hooks

SMALL = dict(world_sizes=(1, 2), max_layers=2, max_dim=6)
CORPUS = os.path.join(os.path.dirname(__file__), os.pardir, "strategies", "corpus")


def _campaign(runner, **kwargs):
    return run_campaign(
        runner,
        "roundtrip",
        dst.scenarios("roundtrip", **SMALL),
        max_examples=20,
        seed=3,
        hooks=Hooks(checkpointer=helpers.INJECTIONS["drop_key"]),
        **kwargs,
    )


def test_an_exhausted_shrink_budget_still_reports_the_failure(dcprop_runner):
    """With no time to shrink, the first failure found is replayed and reported."""
    report = _campaign(dcprop_runner, shrink_seconds=0)
    assert report.shrink_stopped and len(report.failures) == 1
    assert "PropertyFailure" in report.failures[0]["signature"]
    shrunk = _campaign(dcprop_runner)
    assert not shrunk.shrink_stopped and len(shrunk.failures) == 1
    # shrinking ran examples that the stopped campaign did not
    assert shrunk.examples > report.examples


def test_known_bugs_are_counted_per_example(dcprop_runner):
    """Each example that ends in a known bug is counted: it checked nothing past the bug."""
    bug = "dsd-full-osd-stateless-optimizer"
    entry = next(e for e in load_entries(CORPUS) if e.known_bug == bug)
    report = run_campaign(
        dcprop_runner,
        entry.property,
        dst.scenarios(entry.property, **SMALL),
        max_examples=0,
        explicit=(entry.scenario,) * 3,
    )
    assert report.failures == [] and report.examples == 3
    assert [(k["id"], k["examples"]) for k in report.known] == [(bug, 3)]
    assert report.known_examples == 3 and report.to_json()["known_examples"] == 3
    assert report.to_json()["checked_share"] == 0  # none reached the property's checks
    assert known_totals([report, report])[0]["examples"] == 6


def test_a_rerun_replays_the_last_failure_first(dcprop_runner, tmp_path):
    """With an example database, the failure a campaign found is the next campaign's
    first example, whatever its seed."""

    def campaign(seed, database):
        return run_campaign(
            dcprop_runner,
            "roundtrip",
            dst.scenarios("roundtrip", **SMALL),
            max_examples=30,
            seed=seed,
            hooks=Hooks(checkpointer=helpers.INJECTIONS["zero_frozen"]),
            shrink_seconds=1,
            database=database,
        )

    assert campaign(1, None).first_failure_at > 1  # seed 1 alone finds it later
    assert campaign(0, str(tmp_path)).failures
    again = campaign(1, str(tmp_path))
    assert again.first_failure_at == 1 and again.failures


def test_a_campaign_ends_when_its_time_is_up(dcprop_runner):
    report = run_campaign(
        dcprop_runner,
        "ddp_parity",
        dst.scenarios("ddp_parity", **SMALL),
        max_examples=10**6,
        duration=3.0,
    )
    assert report.out_of_time and report.examples > 0 and report.phase == "done"
    assert report.checked + report.ended["known bug"] == report.examples
    assert sum(report.coverage["plan"].values()) == report.examples
    data = report.to_json()
    assert data["duration"] == 3.0
    assert data["checked_share"] == round(report.checked / report.examples, 3)


def test_a_confirmed_known_bug_is_not_paid_for_again(dcprop_runner):
    """A draw certain to end in a known bug met before is skipped and counted."""
    bug = "dsd-broadcast-default-group"
    entry = next(e for e in load_entries(CORPUS) if e.known_bug == bug)
    assert certain_known_bug(entry.scenario, {bug}) == bug
    assert certain_known_bug(entry.scenario, set()) is None
    own_world = attrs.evolve(entry.scenario, job_world_size=None)
    assert certain_known_bug(own_world, {bug}) is None
    report = run_campaign(
        dcprop_runner,
        entry.property,
        st.just(entry.scenario),
        max_examples=3,
        confirmed={bug},
    )
    assert report.examples == 0 and report.steered[bug] >= 1
