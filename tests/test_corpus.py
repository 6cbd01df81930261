"""Replay the regression corpus: fixed bugs stay fixed, known upstream bugs still fail."""

import os

import attrs
import pytest

from dcprop.corpus import load_entries
from dcprop.errors import ExampleFailure
from dcprop.known_bugs import KNOWN_BUGS, match_known
from dcprop.properties import run_property

CORPUS = os.path.join(os.path.dirname(__file__), os.pardir, "strategies", "corpus")
ENTRIES = load_entries(CORPUS)


def test_every_known_bug_has_a_reproducer_in_the_corpus():
    assert {e.known_bug for e in ENTRIES if e.known_bug} == {b.id for b in KNOWN_BUGS}


@pytest.mark.parametrize("entry", ENTRIES, ids=[os.path.basename(e.path) for e in ENTRIES])
def test_corpus_entry(dcprop_runner, entry):
    if entry.expect == "pass":
        run_property(dcprop_runner, entry.property, entry.scenario)
        return
    with pytest.raises(ExampleFailure) as info:
        # hangs are among the known bugs: a short timeout keeps the replay cheap
        run_property(dcprop_runner, entry.property, entry.scenario, timeout=10)
    if entry.known_bug:
        known = match_known(info.value.signature, entry.scenario)
        assert known is not None and known.id == entry.known_bug, (
            f"{entry.path} should still fail with upstream bug {entry.known_bug}, got "
            f"{info.value.signature!r}; if upstream fixed it, mark the entry 'pass'"
        )


def test_a_known_signature_outside_the_bugs_scenarios_is_a_new_failure():
    """Known bugs match on signature *and* scenario, so a look-alike stays visible."""
    entry = next(e for e in ENTRIES if e.known_bug == "dsd-ignore-frozen-tied-alias")
    signature = (
        "PropertyFailure: ignore_frozen_params=True but the model state dict on rank N holds "
        "frozen parameters ['model<path>'] @ _check_frozen_absent"
    )
    assert match_known(signature, entry.scenario).id == "dsd-ignore-frozen-tied-alias"
    untied = attrs.evolve(entry.scenario, model=attrs.evolve(entry.scenario.model, ties=()))
    assert match_known(signature, untied) is None


def test_the_readme_lists_every_known_bug():
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")) as f:
        readme = f.read()
    assert [b.id for b in KNOWN_BUGS if f"| `{b.id}` |" not in readme] == []
