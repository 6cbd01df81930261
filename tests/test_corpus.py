"""Replay the regression corpus: fixed bugs stay fixed, known upstream bugs still fail."""

import os

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
        known = match_known(info.value.signature)
        assert known is not None and known.id == entry.known_bug, (
            f"{entry.path} should still fail with upstream bug {entry.known_bug}, got "
            f"{info.value.signature!r}; if upstream fixed it, mark the entry 'pass'"
        )
