"""Replay the regression corpus: fixed bugs stay fixed, known upstream bugs still fail."""

import json
import os

import pytest

from dcprop.checkpointer import load_checkpointer
from dcprop.corpus import load_entries, write_entry
from dcprop.errors import ExampleFailure, SpecError
from dcprop.known_bugs import KNOWN_BUGS, match_known
from dcprop.properties import run_property
from dcprop.properties._harness import Hooks
from dcprop.runner import Pools

CORPUS = os.path.join(os.path.dirname(__file__), os.pardir, "strategies", "corpus")
ENTRIES = load_entries(CORPUS)


def test_every_known_bug_has_a_reproducer_in_the_corpus():
    assert {e.known_bug for e in ENTRIES if e.known_bug} == {b.id for b in KNOWN_BUGS}


def _hooks(entry):
    """The entry's checkpointer (None: DCP); an adapter's library must be installed."""
    if entry.checkpointer == "dcp":
        return None
    pytest.importorskip(entry.checkpointer)
    return Hooks(checkpointer=load_checkpointer(entry.checkpointer))


@pytest.fixture(scope="module")
def tmpfs_runner(dcprop_runner):
    """Pools whose checkpoints live on tmpfs, where torch_checkpointing falls back from
    O_DIRECT: its bugs past tc-direct-io-buffered-write show there."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with Pools(dcprop_runner.world_size, tmp_root="/dev/shm") as pools:
        yield pools


def _runner(request, entry):
    if entry.checkpointer == "torch_checkpointing" and entry.known_bug != (
        "tc-direct-io-buffered-write"  # needs a file system that accepts O_DIRECT (ext4, xfs)
    ):
        return request.getfixturevalue("tmpfs_runner")
    return request.getfixturevalue("dcprop_runner")


@pytest.mark.parametrize("entry", ENTRIES, ids=[os.path.basename(e.path) for e in ENTRIES])
def test_corpus_entry(request, entry):
    hooks = _hooks(entry)
    dcprop_runner = _runner(request, entry)
    if entry.expect == "pass":
        run_property(dcprop_runner, entry.property, entry.scenario, hooks=hooks)
        return
    with pytest.raises(ExampleFailure) as info:
        # hangs are among the known bugs: a short timeout keeps the replay cheap
        run_property(dcprop_runner, entry.property, entry.scenario, hooks=hooks, timeout=10)
    failure = info.value
    assert failure.signature == entry.signature, (
        f"{entry.path} should fail with {entry.signature!r}, got {failure.signature!r}; if "
        "upstream fixed the bug, mark the entry 'pass'"
    )
    known = match_known(failure, entry.scenario)
    assert (known and known.id) == entry.known_bug, (
        f"{entry.path}: the replay is {known and known.id!r}, not {entry.known_bug!r}"
    )


def test_an_entry_that_expects_a_failure_names_its_signature(tmp_path):
    entry = ENTRIES[0]
    with pytest.raises(ValueError, match="needs the failure's signature"):
        write_entry(str(tmp_path), entry.property, entry.scenario, expect="fail")
    path = write_entry(
        str(tmp_path), entry.property, entry.scenario, expect="fail", signature="ValueError: x"
    )
    with open(path) as f:
        data = json.load(f)
    del data["signature"]
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(SpecError, match="names no failure signature"):
        load_entries(str(tmp_path))


def test_the_readme_lists_every_known_bug():
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")) as f:
        readme = f.read()
    assert [b.id for b in KNOWN_BUGS if f"| `{b.id}` |" not in readme] == []


def test_add_to_corpus_stores_the_signature(tmp_path):
    """`dcprop check --add-to-corpus` writes what the replay must fail with."""
    from dcprop.cli import _add_to_corpus
    from dcprop.runner.messages import Outcome
    from dcprop.runner.pool import failure_from_outcomes

    entry = next(e for e in ENTRIES if e.known_bug == "dsd-full-osd-stateless-optimizer")
    outcome = Outcome(
        0,
        "error",
        error_type="AssertionError",
        message="Expected device to be set",
        signature=entry.signature,
    )
    failure = failure_from_outcomes({0: outcome})
    _add_to_corpus(str(tmp_path), entry.property, entry.scenario, failure, entry.checkpointer)
    [written] = load_entries(str(tmp_path))
    assert written.signature == entry.signature and written.expect == entry.expect


def test_an_entry_names_its_checkpointer_by_short_name(tmp_path):
    entry = next(e for e in ENTRIES if e.checkpointer == "torch_checkpointing")
    path = write_entry(
        str(tmp_path),
        entry.property,
        entry.scenario,
        expect=entry.expect,
        signature=entry.signature,
        checkpointer="torch_checkpointing",
    )
    [written] = load_entries(str(tmp_path))
    assert written.checkpointer == "torch_checkpointing"
    assert [e.checkpointer for e in load_entries(CORPUS) if e.path.endswith("6aa7121ae5.json")] == [
        "dcp"
    ]
    with open(path) as f:
        data = json.load(f)
    data["checkpointer"] = "mypkg.ckpt:Mine"  # replays only where mypkg imports
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(SpecError, match=r"'mypkg\.ckpt:Mine' is not one of 'dcp', 'torch_che"):
        load_entries(str(tmp_path))
