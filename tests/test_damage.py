"""Damage to saved checkpoints and async saves raced by training: the specs, doing the
damage to real files, ``loud_failure`` and ``async_isolation`` on stock DCP, DCP's
documented limitations, and two injected checkpointer bugs, each caught and shrunk."""

import json
import os
import subprocess
import sys

import attrs
import checkpointer_helpers
import damage_injections
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import dcprop.specs as S
from dcprop import strategies as dst
from dcprop.campaign import known_totals, run_campaign
from dcprop.damage import damage, data_files, tensor_ranges
from dcprop.errors import ExampleFailure, HarnessError, SpecError
from dcprop.limitations import Limitation, match_limitation
from dcprop.properties import run_and_match
from dcprop.properties._harness import Hooks
from dcprop.serialization import dumps, loads
from dcprop.testing import property_test

MODEL = S.ModelSpec(S.Block((("fc0", S.Linear(3, 4)),)))
BASE = S.Scenario(
    MODEL,
    S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan()),
    optimizer=S.OptimizerSpec("adam"),
)

#: the smallest scenario: one rank, FSDP2, one Linear(1, 1)
SMALLEST = S.Scenario(
    S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)),))),
    S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()),
)


# --- specs and strategies ---------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        S.RemoveFile(3),
        S.Truncate("metadata", keep=0.5),
        S.Truncate(index=2, keep=0.25),
        S.FlipTensorByte(1, 0.75, 0x80),
        S.FlipMetadataByte(0.5, 0xFF),
        S.StaleFile(1),
        S.MutateInFlight("state_dict"),
    ],
)
def test_a_damage_spec_round_trips_through_repr_and_json(spec):
    scenario = attrs.evolve(BASE, damage=spec)
    assert eval(repr(scenario), vars(S)) == scenario
    assert loads(dumps(scenario)) == scenario


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: S.Truncate(keep=1.0), r"keep=1.0: must be < 1.0"),
        (lambda: S.Truncate("metadata", index=1), r"index=1: a checkpoint has one metadata"),
        (lambda: S.Truncate("index"), r"target='index': expected one of"),
        (lambda: S.FlipTensorByte(mask=0), r"mask=0: must be >= 1"),
        (lambda: S.RemoveFile(-1), r"index=-1: must be >= 0"),
        (lambda: S.MutateInFlight("save"), r"how='save': expected one of"),
        (lambda: attrs.evolve(BASE, damage="remove"), r"damage='remove': expected RemoveFile"),
    ],
)
def test_a_bad_damage_spec_is_a_spec_error_naming_the_field(make, match):
    with pytest.raises(SpecError, match=match):
        make()


def test_damage_strategies_shrink_to_the_simplest_fault():
    assert find(dst.damages(), lambda d: True) == S.RemoveFile()
    assert find(dst.damages(), lambda d: isinstance(d, S.FlipTensorByte)) == S.FlipTensorByte()
    assert find(dst.mutations(), lambda m: True) == S.MutateInFlight()
    assert repr(dst.damages(kinds=("stale",))) == "damages(kinds=('stale',))"
    with pytest.raises(InvalidArgument, match=r"kinds=\('rot',\) has unknown entries"):
        dst.damages(kinds=("rot",)).validate()


@settings(max_examples=5, database=None, deadline=None)
@given(st.data())
def test_only_the_fault_properties_draw_their_fault(data):
    assert data.draw(dst.scenarios("roundtrip")).damage is None
    assert isinstance(data.draw(dst.scenarios("loud_failure")).damage, S.FILE_DAMAGES)
    assert isinstance(data.draw(dst.scenarios("async_isolation")).damage, S.MutateInFlight)


# --- damage on real files ----------------------------------------------------------------
single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _saved(tmp_path):
    values = {"w": torch.arange(8, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float64)}
    path = str(tmp_path / "ckpt")
    dcp.save(values, checkpoint_id=path, no_dist=True)
    return values, path


def _loaded(path, values):
    target = {k: torch.zeros_like(v) for k, v in values.items()}
    dcp.load(target, checkpoint_id=path, no_dist=True)
    return target


@single_process
def test_a_tensor_byte_flip_lands_in_that_tensors_data(tmp_path):
    """Through DCP's metadata and the torch.save archive, never in a header: the load
    succeeds and exactly one element of the chosen tensor changes, by the mask."""
    values, path = _saved(tmp_path)
    ranges = tensor_ranges(path)
    assert [length for _, _, length in ranges] == [3 * 8, 8 * 4]  # "b" then "w"
    damage(S.FlipTensorByte(entry=1, at=0.5, mask=0x80), path)
    loaded = _loaded(path, values)
    assert torch.equal(loaded["b"], values["b"])
    changed = (loaded["w"] != values["w"]).nonzero().flatten().tolist()
    assert len(changed) == 1 and 4 * changed[0] <= 16 < 4 * (changed[0] + 1)


@single_process
@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (S.RemoveFile(), FileNotFoundError),
        (S.Truncate(), EOFError),
        (S.Truncate("metadata", keep=0.5), Exception),
    ],
)
def test_file_damage_makes_a_single_process_load_raise(tmp_path, spec, error):
    values, path = _saved(tmp_path)
    files = data_files(path)
    assert files and ".metadata" not in files
    damage(spec, path)
    with pytest.raises(BaseException) as info:  # DCP wraps errors in a BaseException
        _loaded(path, values)
    assert isinstance(info.value, error) or error.__name__ in str(info.value)


def test_a_layout_without_dcp_metadata_is_damaged_in_its_data_files(tmp_path):
    """A checkpointer of one's own: "the metadata" is data file 0, a tensor flip a byte."""
    (tmp_path / "b.bin").write_bytes(bytes(16))
    (tmp_path / "a.bin").write_bytes(bytes(100))
    assert damage(S.Truncate("metadata", keep=0.5), str(tmp_path)) == "truncated a.bin to 50 bytes"
    assert damage(S.FlipMetadataByte(0.5, 0xFF), str(tmp_path)).startswith(
        "flipped byte 25 of a.bin"
    )
    assert damage(S.FlipTensorByte(1, 0.5, 3), str(tmp_path)) == "flipped byte 8 of b.bin with 0x03"
    assert (tmp_path / "a.bin").read_bytes()[25] == 0xFF and (tmp_path / "b.bin").read_bytes()[
        8
    ] == 3


@single_process
def test_a_stale_file_is_copied_from_the_older_checkpoint(tmp_path):
    values, older = _saved(tmp_path / "old")
    newer = {k: v + 1 for k, v in values.items()}
    path = str(tmp_path / "new")
    dcp.save(newer, checkpoint_id=path, no_dist=True)
    damage(S.StaleFile(), path, older)
    assert torch.equal(_loaded(path, values)["w"], values["w"])  # the old values, silently


# --- the properties on stock DCP --------------------------------------------------------
def _run(runner, prop, damage_spec, hooks=None, scenario=BASE):
    return run_and_match(runner, prop, attrs.evolve(scenario, damage=damage_spec), hooks=hooks)


@pytest.mark.parametrize(
    "spec", [S.RemoveFile(1), S.Truncate(keep=0.5), S.Truncate("metadata"), S.FlipMetadataByte()]
)
def test_dcp_raises_on_damage_it_can_see(dcprop_runner, spec):
    assert _run(dcprop_runner, "loud_failure", spec) is None


@pytest.mark.parametrize(
    ("spec", "limitation"),
    [(S.FlipTensorByte(mask=0x80), "dcp-no-checksums"), (S.StaleFile(), "dcp-stale-data-file")],
)
def test_damage_dcp_cannot_see_is_its_documented_limitation(dcprop_runner, spec, limitation):
    failed = _run(dcprop_runner, "loud_failure", spec)
    assert isinstance(failed.known, Limitation) and failed.known.id == limitation
    assert "loaded without an error" in str(failed.failure)


def test_an_app_state_loaded_stale_is_the_same_limitation(dcprop_runner):
    """Through a trainer's manager on DCP, rank 1's stale file brings back an older train
    state step: a silently wrong load like any other, not a failure of its own."""
    hooks = Hooks(checkpointer=checkpointer_helpers.AppStateDCP())
    failed = _run(dcprop_runner, "loud_failure", S.StaleFile(1), hooks)
    assert failed.known.id == "dcp-stale-data-file" and "app state" in str(failed.failure)
    assert _run(dcprop_runner, "loud_failure", S.RemoveFile(), hooks) is None


def test_a_checkpointer_that_claims_integrity_gets_no_limitation(dcprop_runner):
    hooks = Hooks(checkpointer=damage_injections.ClaimsIntegrity())
    failed = _run(dcprop_runner, "loud_failure", S.FlipTensorByte(), hooks)
    assert failed.known is None and "verifies_integrity=True" in failed.failure.signature
    # the same failure met with DCP's own project is still not excused: it claimed
    failed.failure.checkpointer_project = "torch"
    assert match_limitation(failed.failure, attrs.evolve(BASE, damage=S.FlipTensorByte())) is None
    # a checkpointer of one's own that claims nothing inherits the limitation of DCP under it
    hooks = Hooks(checkpointer=damage_injections.NoCopyAsync())
    assert _run(dcprop_runner, "loud_failure", S.FlipTensorByte(), hooks).known.id == (
        "dcp-no-checksums"
    )


@pytest.mark.parametrize("how", S.MUTATIONS)
@pytest.mark.parametrize("full", [False, True])
def test_dcp_async_save_keeps_the_values_of_the_call(dcprop_runner, how, full):
    save = attrs.evolve(BASE.save, state_dict=S.StateDictSpec(full_state_dict=full))
    scenario = attrs.evolve(BASE, save=save)
    assert _run(dcprop_runner, "async_isolation", S.MutateInFlight(how), scenario=scenario) is None


def test_a_fault_property_without_its_fault_is_a_harness_error(dcprop_runner):
    for prop, wrong in (("loud_failure", S.MutateInFlight()), ("async_isolation", None)):
        with pytest.raises(HarnessError, match=f"UsageError: {prop} needs"):
            _run(dcprop_runner, prop, wrong)


def test_a_campaign_counts_limitations_apart(dcprop_runner):
    scenario = attrs.evolve(BASE, damage=S.FlipTensorByte())
    report = run_campaign(
        dcprop_runner,
        "loud_failure",
        dst.scenarios("loud_failure"),
        max_examples=0,
        explicit=(scenario, scenario),
    )
    assert report.failures == [] and report.known == []
    assert report.ended["limitation"] == 2 and report.limitation_examples == 2
    assert report.coverage["damage"] == {"FlipTensorByte": 2}
    assert report.to_json()["limitations"][0]["id"] == "dcp-no-checksums"
    assert known_totals([report], "limitations")[0]["examples"] == 2
    strict = run_campaign(
        dcprop_runner,
        "loud_failure",
        dst.scenarios("loud_failure"),
        max_examples=0,
        explicit=(scenario,),
        strict=True,
        shrink_seconds=0,
    )
    assert len(strict.failures) == 1 and strict.limitations == []


def test_dcp_check_reports_limitations_apart(tmp_path):
    """The command's summary and report count each limitation, and it exits 0."""
    scenario = attrs.evolve(SMALLEST, damage=S.FlipTensorByte())
    example = {"property": "loud_failure", "scenario": json.loads(dumps(scenario))}
    recipe = tmp_path / "limits.json"
    recipe.write_text(json.dumps({"properties": ["loud_failure"], "examples": [example] * 2}))
    report = tmp_path / "report.json"
    args = ["--recipe", str(recipe), "--world-size", "1", "--max-examples", "0", "--no-database"]
    args += ["--report", str(report), "--repro-dir", str(tmp_path / "repros")]
    result = _dcprop_check(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LIMITATION dcp-no-checksums: 2 examples (loud_failure 2) met damage" in result.stdout
    assert "limitation 2" in result.stdout  # the summary's "stopped before the checks"
    data = json.loads(report.read_text())
    assert data["properties"]["loud_failure"]["limitation_examples"] == 2
    assert [(k["id"], k["examples"]) for k in data["limitations"]] == [("dcp-no-checksums", 2)]
    assert data["known"] == [] and data["failures"] == 0  # --strict: see the campaign test


def _dcprop_check(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    command = [sys.executable, "-m", "dcprop.cli", "check", *args]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


# --- injected bugs: caught by a search, and shrunk ----------------------------------------
FIND = settings(max_examples=40, deadline=None, database=None, derandomize=True)
SMALL = dict(world_sizes=(1, 2), max_layers=2, max_dim=6)


def _fails(runner, prop, hooks):
    def predicate(scenario):
        try:
            failed = run_and_match(runner, prop, scenario, hooks=hooks, timeout=10)
        except ExampleFailure:  # pragma: no cover - run_and_match returns failures
            return False
        return (
            failed is not None
            and failed.known is None
            and ("PropertyFailure" in failed.failure.signature)
        )

    return predicate


def test_an_async_save_that_does_not_stage_is_caught_and_shrunk(dcprop_runner):
    hooks = Hooks(checkpointer=damage_injections.NoCopyAsync())
    found = find(
        dst.scenarios("async_isolation", **SMALL),
        _fails(dcprop_runner, "async_isolation", hooks),
        settings=FIND,
    )
    print(f"NoCopyAsync / async_isolation shrunk to: {found!r}")
    assert found == attrs.evolve(SMALLEST, damage=S.MutateInFlight())


def test_a_checkpointer_that_claims_integrity_but_does_not_check_is_caught_and_shrunk(
    dcprop_runner,
):
    hooks = Hooks(checkpointer=damage_injections.ClaimsIntegrity())
    found = find(
        dst.scenarios("loud_failure", **SMALL),
        _fails(dcprop_runner, "loud_failure", hooks),
        settings=FIND,
    )
    print(f"ClaimsIntegrity / loud_failure shrunk to: {found!r}")
    # the first kind of damage that DCP cannot see, at the start of the first tensor
    assert found == attrs.evolve(SMALLEST, damage=S.FlipTensorByte())


def test_known_bugs_on_different_ranks_are_known_together(dcprop_runner):
    """Found by test_loud_failure: rank 0 strictly loads rank 0's experts only
    (dsd-broadcast-submesh-params), rank 1 asserts on SGD's empty optimizer state
    (dsd-full-osd-stateless-optimizer); plain roundtrip meets the same pair."""
    experts = S.Experts(
        tuple(S.Sequential((S.Linear(2, 2), S.Activation(), S.Linear(2, 2))) for _ in range(2))
    )
    scenario = S.Scenario(
        S.ModelSpec(
            S.Block((("embed", S.Embedding(2, 2)), ("fc0", S.Linear(2, 2)), ("experts", experts)))
        ),
        S.Topology(
            2,
            S.MeshSpec((1, 2), ("shard", "ep")),
            S.FSDP2Plan(experts=S.ExpertParallel("experts")),
            state_dict=S.StateDictSpec(full_state_dict=True, broadcast_from_rank0=True),
        ),
    )
    failed = run_and_match(dcprop_runner, "roundtrip", scenario)
    assert failed.known.id == "dsd-broadcast-submesh-params+dsd-full-osd-stateless-optimizer"
    # with a fault the checkpointer's load detects first, loud_failure holds
    assert _run(dcprop_runner, "loud_failure", S.RemoveFile(), scenario=scenario) is None
    failed = _run(dcprop_runner, "loud_failure", S.FlipTensorByte(), scenario=scenario)
    assert "+" in failed.known.id


# --- both properties over generated scenarios: a few, derandomized (the fixed tests above
# --- cover each fault kind; campaigns and the nightly profile search further) ------------
FEW = settings(max_examples=8, derandomize=True, database=None)


@FEW
@property_test("loud_failure", world_sizes=(1, 2, 3, 4))
def test_loud_failure(scenario):
    pass


@FEW
@property_test("async_isolation", world_sizes=(1, 2, 3, 4))
def test_async_isolation(scenario):
    pass
