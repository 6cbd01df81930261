"""`dcprop.testing.property_test` under the user's own Hypothesis settings and seeds."""

import os
import subprocess
import sys
import textwrap

import helpers
import pytest
from hypothesis import HealthCheck, assume, example, settings
from hypothesis.errors import InvalidArgument, Unsatisfiable

from dcprop import pytest_plugin
from dcprop.testing import property_test, reproducers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

README_EXAMPLE = textwrap.dedent("""
    from hypothesis import settings

    from dcprop.testing import property_test


    @settings(max_examples=3)
    @property_test("roundtrip", world_sizes=(1, 2), max_layers=2)
    def test_my_checkpointer(scenario):
        pass
""")


def test_the_readme_example_passes_under_plain_pytest(tmp_path):
    """As a user runs it: a project of its own, a plain test file, plain pytest, no
    dcprop profile (so Hypothesis' 200 ms deadline), only a `@settings` of its own."""
    (tmp_path / "test_mine.py").write_text(README_EXAMPLE)
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--dcprop-world-size=2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "1 passed" in result.stdout


def test_a_profile_loaded_after_the_test_was_defined_applies(dcprop_runner):
    seen = []

    @property_test("roundtrip", world_sizes=(1,), max_layers=1)
    def test(scenario):
        seen.append(scenario)

    # a deadline no distributed example meets: property_test lifts it, keeps the rest
    settings.register_profile("dcprop-test-later", max_examples=2, deadline=1, database=None)
    previous = settings.get_current_profile_name()
    settings.load_profile("dcprop-test-later")
    try:
        test(dcprop_runner=dcprop_runner)
    finally:
        settings.load_profile(previous)
    assert len(seen) == 2


def _first_scenarios(test, seen, count=3):
    with pytest.raises(Unsatisfiable):
        settings(
            derandomize=True,
            database=None,
            max_examples=count,
            suppress_health_check=[HealthCheck.filter_too_much],
        )(test)(dcprop_runner=None)
    return seen[:count]


def test_each_property_test_draws_its_own_derandomized_sequence():
    """Hypothesis derives a derandomized seed from the test's source, and every
    property_test wraps the same inner function: without more, all draw one sequence."""
    first, second = [], []

    @property_test("roundtrip", world_sizes=(1, 2), max_layers=2)
    def test_one(scenario):
        first.append(scenario)
        assume(False)  # only the drawing matters here: no example runs

    @property_test("roundtrip", world_sizes=(1, 2), max_layers=2)
    def test_two(scenario):
        second.append(scenario)
        assume(False)

    assert _first_scenarios(test_one, first) != _first_scenarios(test_two, second)
    # and the same test draws the same sequence again
    again = []

    @property_test("roundtrip", world_sizes=(1, 2), max_layers=2)
    def test_one(scenario):  # the same name and property as the first
        again.append(scenario)
        assume(False)

    assert _first_scenarios(test_one, again) == first[:3]


def test_hypothesis_decorators_on_a_property_test_apply():
    """`@example` and `@settings` put on a property test reach the search it runs."""
    seen = []

    @settings(max_examples=1, database=None, suppress_health_check=[HealthCheck.filter_too_much])
    @example(scenario="an explicit example")
    @property_test("roundtrip", world_sizes=(1,))
    def test(scenario):
        seen.append(scenario)
        assume(False)

    with pytest.raises(Unsatisfiable):
        test(dcprop_runner=None)
    assert seen[0] == "an explicit example"


def test_a_checkpointer_that_does_not_import_is_bad_input_not_a_failing_example():
    """Resolved once, before the search: a UsageError, never an example to shrink."""
    from dcprop.errors import UsageError

    @property_test("roundtrip", world_sizes=(1,), checkpointer="no_such_module_dcprop:Ckpt")
    def test_mine(scenario):
        raise AssertionError("no example may run")

    with pytest.raises(UsageError, match="no_such_module_dcprop"):
        test_mine(dcprop_runner=None)


def test_a_property_test_draws_nothing_it_excludes():
    seen = []

    @property_test(
        "roundtrip", world_sizes=(1, 2), exclude=("plan=fsdp2", "broadcast_from_rank0=true")
    )
    def test_mine(scenario):
        seen.append(scenario)
        assume(False)

    drawn = _first_scenarios(test_mine, seen, count=20)
    assert len(drawn) == 20
    assert all(s.save.plan_kind != "fsdp2" for s in drawn)
    assert not any(s.save.state_dict.broadcast_from_rank0 for s in drawn)


def test_an_unknown_exclusion_is_refused_when_the_test_is_defined():
    with pytest.raises(InvalidArgument, match="exclude='plan=expert' is not a region"):
        property_test("roundtrip", exclude=["plan=expert"])


def _reproducers_of(name):
    return reproducers.pop(next(test for test in reproducers if test.endswith(f".{name}")))


def test_a_failure_says_whose_bug_it_is_and_what_was_excluded(dcprop_runner, tmp_path, monkeypatch):
    """DropKey fails where plain DCP passes: the checkpointer's bug, in the failure
    message and in the reproducer's header."""
    monkeypatch.setattr(pytest_plugin, "repro_dir", str(tmp_path))

    @settings(max_examples=3, database=None, derandomize=True)
    @property_test(
        "roundtrip",
        world_sizes=(1,),
        max_layers=1,
        checkpointer=helpers.INJECTIONS["drop_key"],
        exclude=["plan=ddp"],
    )
    def test_drop_key(scenario):
        pass

    with pytest.raises(AssertionError) as e:
        test_drop_key(dcprop_runner=dcprop_runner)
    assert "Whose bug: plain DCP passes: the checkpointer's bug" in str(e.value)
    assert "Excluded (never drawn): plan=ddp" in str(e.value)
    [path] = _reproducers_of("test_drop_key")
    with open(path) as f:
        assert "Whose bug: plain DCP passes: the checkpointer's bug" in f.read()


def test_each_distinct_failure_has_its_own_reproducer(dcprop_runner, tmp_path, monkeypatch):
    """Two bugs in two regions (a job of one rank, a job of two): two failures, each
    with its own shrunk scenario and reproducer."""
    monkeypatch.setattr(pytest_plugin, "repro_dir", str(tmp_path))

    @settings(max_examples=30, database=None, derandomize=True)
    @property_test("roundtrip", world_sizes=(1, 2), max_layers=1, checkpointer="helpers:TwoFaults")
    def test_two_faults(scenario):
        pass

    with pytest.raises(Exception) as e:  # Hypothesis raises a group of the failures
        test_two_faults(dcprop_runner=dcprop_runner)
    failures = getattr(e.value, "exceptions", ())
    assert sorted(f.signature.split(":")[0] for f in failures) == ["OSError", "ValueError"]
    assert all("Whose bug: plain DCP passes" in str(f) for f in failures)
    assert len(_reproducers_of("test_two_faults")) == 2 == len(os.listdir(tmp_path))
