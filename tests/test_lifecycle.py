"""The lifecycle property: programs of train, freeze, save, load, restart and crash
steps against a single-process reference."""

import checkpointer_helpers
import lifecycle_injections as inj
import pytest
from hypothesis import example, find, given, settings
from hypothesis import strategies as st

import dcprop.specs as S
from dcprop import serialization
from dcprop import strategies as dst
from dcprop.errors import ExampleFailure, SpecError
from dcprop.properties import run_and_match, run_property
from dcprop.properties._harness import Hooks
from dcprop.repro import pretty

FSDP2 = S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan())
ONE = S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan())
MLP = S.ModelSpec(
    S.Block((("fc0", S.Linear(3, 4)), ("act", S.Activation()), ("fc1", S.Linear(4, 2))))
)
ADAM = S.OptimizerSpec("adam", scheduler=S.SchedulerSpec())

# The seeds' fine-tuning scenario (PyTorch's test/distributed/checkpoint/e2e/
# test_fine_tuning.py): pretrain, load the pretrained part as a
# frozen submodule, train on top, save without the frozen parameters, restart, resume.
FINE_TUNING = S.Scenario(
    S.ModelSpec(
        S.Block(
            (
                ("pretrain", S.Block((("fc0", S.Linear(3, 4)), ("fc1", S.Linear(4, 4))))),
                ("act", S.Activation()),
                ("head", S.Linear(4, 2)),
            )
        )
    ),
    FSDP2,
    # SGD: Adam's moments of the pretrained part meet dsd-frozen-optim-state-dropped
    optimizer=S.OptimizerSpec(scheduler=S.SchedulerSpec()),
    program=(
        S.Freeze(("head.bias", "head.weight")),
        S.Train(2),
        S.Save("c0"),
        S.Restart(FSDP2, "c0"),
        S.Unfreeze(("head.bias", "head.weight")),
        S.Freeze(
            ("pretrain.fc0.bias", "pretrain.fc0.weight", "pretrain.fc1.bias", "pretrain.fc1.weight")
        ),
        S.Train(2),
        S.Save("c1", S.StateDictSpec(ignore_frozen_params=True)),
        S.Restart(ONE, "c1"),
        S.Train(2),
    ),
)


def test_program_specs_round_trip_and_reject_bad_programs():
    assert serialization.loads(serialization.dumps(FINE_TUNING)) == FINE_TUNING
    assert eval(repr(FINE_TUNING), vars(S)) == FINE_TUNING
    assert FINE_TUNING.world_size == 2 and FINE_TUNING.meshes == (FSDP2.mesh, ONE.mesh)
    with pytest.raises(SpecError, match="program\\[0\\]"):
        S.Scenario(MLP, FSDP2, program=(S.Load("c0"),))
    with pytest.raises(SpecError, match="in flight"):
        S.Scenario(MLP, FSDP2, program=(S.Save("c0", async_=True), S.Load("c0")))


@settings(max_examples=3, deadline=None, database=None, derandomize=True)
@example(scenario=FINE_TUNING).via("the seeds' fine-tuning scenario (seed 000)")
@given(scenario=dst.scenarios("lifecycle", world_sizes=(1, 2), max_layers=2, max_dim=4))
def test_lifecycle_holds_on_stock_torch(dcprop_runner, scenario):
    failed = run_and_match(dcprop_runner, "lifecycle", scenario)
    assert failed is None or failed.known is not None, failed and failed.failure


def test_the_seed_fine_tuning_program_holds(dcprop_runner):
    results = run_property(dcprop_runner, "lifecycle", FINE_TUNING)
    assert len(results[0]["losses"]) == 6


ASYNC = (
    S.Train(),
    S.Save("c0", async_=True),
    S.Train(2),  # training goes on while c0 is in flight
    S.Wait(),
    S.Load("c0"),
    S.Save("c1", async_=True),
    S.Crash(ONE, "c0"),  # c1 is lost
    S.Train(),
)


@pytest.mark.parametrize("checkpointer", [None, checkpointer_helpers.AppStateDCP()])
def test_async_saves_restarts_and_an_app_state_checkpointer(dcprop_runner, checkpointer):
    scenario = S.Scenario(MLP, FSDP2, optimizer=ADAM, program=ASYNC)
    hooks = None if checkpointer is None else Hooks(checkpointer=checkpointer)
    results = run_property(dcprop_runner, "lifecycle", scenario, hooks=hooks)
    assert len(results[0]["losses"]) == 4


def test_a_restart_on_a_larger_world_waits_for_the_save_in_flight(dcprop_runner):
    """Ranks the saving job did not hold load only once its save is complete (the
    campaign saw them read a checkpoint without its .metadata yet)."""
    program = (S.Train(), S.Save("c0", async_=True), S.Restart(FSDP2, "c0"), S.Train())
    results = run_property(dcprop_runner, "lifecycle", S.Scenario(MLP, ONE, program=program))
    assert len(results[1]["losses"]) == 1


def test_frozen_optimizer_state_dropped_at_load_is_the_known_torch_bug(dcprop_runner):
    program = (S.Train(2), S.Save("c0"), S.Freeze(("fc0.bias",)), S.Train(), S.Load("c0"))
    failed = run_and_match(
        dcprop_runner, "lifecycle", S.Scenario(MLP, FSDP2, optimizer=ADAM, program=program)
    )
    assert failed is not None and failed.known.id == "dsd-frozen-optim-state-dropped"
    assert "at program[4] Load('c0')" in str(failed.failure)


FIND = settings(max_examples=40, deadline=None, database=None, derandomize=True)
SMALL = dict(world_sizes=(1, 2), max_layers=2, max_dim=4)
TWO_SAVES = (S.Train(), S.Save("c0"), S.SetLR(0.5), S.Train(), S.Save("c1"), S.Load("c1"))

# (injection, a program it fails, the key the failure names, what a drawn scenario
# needs for the fault to show, examples the search may try)
INJECTIONS = {
    "scheduler": (inj.ForgetsScheduler(), (S.Train(), S.Save("c0"), S.Train(), S.Load("c0")),
                  "scheduler/", lambda s: s.optimizer.scheduler is not None, 100),
    "rng": (inj.RNGOfRankZero(), (S.Save("c0"), S.Load("c0")), "train/rng_rank1",
            lambda s: s.world_size > 1, 40),
    "pairing": (inj.OptimizerOfFirstSave(), TWO_SAVES, "optim/param_groups[0]/lr", None, 150),
}  # fmt: skip


@pytest.mark.parametrize("name", INJECTIONS)
def test_lifecycle_catches_a_broken_checkpointer(dcprop_runner, name):
    checkpointer, program, key, _, _ = INJECTIONS[name]
    scenario = S.Scenario(MLP, FSDP2, optimizer=ADAM, program=program)
    with pytest.raises(ExampleFailure, match="PropertyFailure") as info:
        run_property(dcprop_runner, "lifecycle", scenario, hooks=Hooks(checkpointer=checkpointer))
    assert key in str(info.value) and f"at program[{len(program) - 1}]" in str(info.value)


def _strategy(name):
    """Whole scenarios; for the pairing fault, programs alone on one model and optimizer
    (it shows only after two saves that differ and a load of the later one, which whole
    scenarios did not reach in 400 derandomized examples)."""
    if name != "pairing":
        return dst.scenarios("lifecycle", **SMALL)
    programs = dst.lifecycles(MLP, FSDP2, restarts=st.sampled_from([FSDP2, ONE]))
    return programs.map(lambda program: S.Scenario(MLP, FSDP2, optimizer=ADAM, program=program))


@pytest.mark.slow
@pytest.mark.parametrize("name", INJECTIONS)
def test_lifecycle_injection_is_found_and_shrunk(dcprop_runner, name):
    checkpointer, _, _, want, examples = INJECTIONS[name]
    hooks = Hooks(checkpointer=checkpointer)

    def caught(scenario):
        if want is not None and not want(scenario):
            return False
        failed = run_and_match(dcprop_runner, "lifecycle", scenario, hooks=hooks, timeout=20)
        if failed is None or failed.known is not None or "PropertyFailure" not in str(failed):
            return False
        # the fault's doing only where plain DCP holds (not a torch bug met another way)
        return run_and_match(dcprop_runner, "lifecycle", scenario, timeout=20) is None

    found = find(_strategy(name), caught, settings=settings(FIND, max_examples=examples))
    print(f"{type(checkpointer).__name__} shrunk to: {found!r}")
    assert len(found.program) <= 6
    assert isinstance(found.program[-1], (S.Load, S.Restart, S.Crash))


def test_the_reproducer_prints_the_program_and_replays_it(dcprop_runner, tmp_path, monkeypatch):
    from test_repro import replay, write_failing

    scenario = S.Scenario(MLP, FSDP2, program=(S.Train(), S.Save("c0"), S.Load("c0")))
    checkpointer = inj.RNGOfRankZero()
    path = write_failing(
        dcprop_runner, tmp_path, monkeypatch, "lifecycle", scenario, checkpointer=checkpointer
    )
    with open(path) as f:
        text = f.read()
    assert (
        "    program=(\n        Train(),\n        Save('c0'),\n        Load('c0'),\n    )," in text
    )
    result = replay(path, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: lifecycle" in result.stdout and "at program[2] Load('c0')" in result.stdout


def test_a_restart_in_another_dtype_loads_the_saved_values_cast(dcprop_runner):
    """fp32 saved, loaded into bf16 (each value rounded as a copy_ rounds it), trained,
    saved in bf16 and loaded back into fp32 (exactly)."""
    program = (
        S.Train(2),
        S.Save("c0"),
        S.Restart(FSDP2, "c0", dtype="bf16"),
        S.Train(),
        S.Save("c1"),
        S.Restart(ONE, "c1"),
        S.Train(),
    )
    scenario = S.Scenario(MLP, FSDP2, optimizer=ADAM, program=program)
    results = run_property(dcprop_runner, "lifecycle", scenario)
    assert len(results[0]["losses"]) == 4
    hooks = Hooks(checkpointer=inj.SkipsOtherDtypes())
    with pytest.raises(ExampleFailure, match="PropertyFailure") as info:
        run_property(dcprop_runner, "lifecycle", scenario, hooks=hooks)
    assert "model/fc0.weight" in str(info.value) and "at program[2]" in str(info.value)


WIDER = S.ModelSpec(
    S.Block((("fc0", S.Linear(3, 4)), ("act", S.Activation()), ("fc1", S.Linear(4, 3))))
)
EXTRA = S.ModelSpec(S.Block((*MLP.root.children, ("extra", S.Linear(2, 2)))))
MISSING = S.ModelSpec(S.Block(MLP.root.children[:2]))
CHANGES = {"wider": WIDER, "extra": EXTRA, "missing": MISSING}


def _into(model):
    return (S.Train(), S.Save("c0"), S.RestartInto(model, "c0"), S.Train())


def test_restart_into_a_changed_model_fails_loudly_or_loads_as_saved(dcprop_runner):
    """On stock DCP: a wider Linear or an extra layer fail naming the key, a missing
    layer loads the entries that remain (DCP reads exactly the keys asked for); each
    program then trains on in the job from before."""
    refused = {}
    for name, model in CHANGES.items():
        scenario = S.Scenario(MLP, FSDP2, optimizer=ADAM, program=_into(model))
        results = run_property(dcprop_runner, "lifecycle", scenario)
        assert len(results[0]["losses"]) == 2
        refused[name] = results[0]["refused"]
    print(refused)
    assert "Size mismatch" in refused["wider"][0] and "model.fc1.weight" in refused["wider"][0]
    assert "Missing key in checkpoint state_dict: model.extra.weight" in refused["extra"][0]
    assert refused["missing"] == [None]


def test_the_new_restarts_round_trip_and_reject_what_cannot_run():
    program = (S.Save("c0"), S.Restart(ONE, "c0", dtype="bf16"), S.RestartInto(EXTRA, "c0"))
    scenario = S.Scenario(MLP, FSDP2, program=program)
    assert serialization.loads(serialization.dumps(scenario)) == scenario
    assert eval(repr(scenario), vars(S)) == scenario
    assert "        RestartInto(\n            ModelSpec(" in pretty(scenario)  # the reproducer
    with pytest.raises(SpecError, match=r"program\[1\].*fp16.*eps"):
        S.Scenario(MLP, FSDP2, optimizer=ADAM, program=(S.Save("c0"), S.Restart(ONE, "c0", "fp16")))
    with pytest.raises(SpecError, match="same parameters"):
        S.Scenario(MLP, FSDP2, program=(S.Save("c0"), S.RestartInto(MLP.in_dtype("bf16"), "c0")))
    partial = S.Save("c0", S.StateDictSpec(ignore_frozen_params=True))
    with pytest.raises(SpecError, match="without frozen parameters"):
        S.Scenario(MLP, FSDP2, program=(partial, S.RestartInto(EXTRA, "c0")))


def test_restart_into_catches_a_load_that_skips_missing_keys(dcprop_runner):
    scenario = S.Scenario(MLP, FSDP2, optimizer=ADAM, program=_into(EXTRA))
    hooks = Hooks(checkpointer=inj.SkipsMissingKeys())
    with pytest.raises(ExampleFailure, match="PropertyFailure") as info:
        run_property(dcprop_runner, "lifecycle", scenario, hooks=hooks)
    assert "model/extra.weight" in str(info.value) and "at program[2]" in str(info.value)


def test_programs_draw_a_restart_into_a_changed_model_and_shrink_it_to_two_steps():
    found = find(
        dst.lifecycles(MLP, FSDP2),
        lambda program: any(isinstance(step, S.RestartInto) for step in program),
        settings=settings(FIND, max_examples=2000),
    )
    assert len(found) == 2 and found[0] == S.Save("c0")
    assert found[1].checkpoint == "c0" and found[1].model in (WIDER, EXTRA, MISSING)


SKIPPY = S.ModelSpec(S.Block((("fc0", S.Linear(1, 2)), ("skip1", S.Skip(S.Linear(2, 2))))))
SKIPPY_FROZEN = ("fc0.bias", "skip1.body.weight")


def test_a_program_trains_only_with_something_outside_every_skip_trainable():
    # found by a campaign: a Freeze left only a Skip body trainable, and the step that
    # skipped it had a loss without gradient (dcprop's strategy drew an invalid program)
    program = (S.Freeze(("fc0.weight",)), S.Train())
    with pytest.raises(SpecError, match=r"program\[1\] Train\(\): no parameter outside"):
        S.Scenario(SKIPPY, ONE, frozen=SKIPPY_FROZEN, program=program)


@settings(max_examples=30, deadline=None)
@given(dst.lifecycles(SKIPPY, ONE, frozen=SKIPPY_FROZEN))
def test_the_strategy_draws_no_train_without_a_trainable_parameter_outside_skips(program):
    S.Scenario(SKIPPY, ONE, frozen=SKIPPY_FROZEN, program=program)  # raises if invalid
