"""The campaign loop under `dcprop check`: shrink budget, known bugs, failure records."""

import os

import helpers

from dcprop import strategies as dst
from dcprop.campaign import known_totals, run_campaign
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
    assert known_totals([report, report])[0]["examples"] == 6
