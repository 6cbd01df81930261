"""The campaign loop under `dcprop check`: shrink budget, known bugs, failure records."""

import helpers

from dcprop import strategies as dst
from dcprop.campaign import run_campaign
from dcprop.properties._harness import Hooks

SMALL = dict(world_sizes=(1, 2), max_layers=2, max_dim=6)


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
