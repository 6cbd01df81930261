"""Reproducers replay what failed: the checkpointer and model factory travel with them.

Each reproducer is written the way a failing `property_test` writes it (through
`dcprop.testing.check`), then run with plain `python` in another directory, as a user
would run it.
"""

import os
import subprocess
import sys

import helpers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcprop import pytest_plugin
from dcprop import specs as S
from dcprop.properties import make_hooks
from dcprop.repro import Missing, Pickled, carry, write_reproducer
from dcprop.testing import check, reproducers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_LINEAR = S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)),)))


def scenario(world_size):
    mesh = S.MeshSpec((world_size,), ("shard",))
    return S.Scenario(ONE_LINEAR, S.Topology(world_size, mesh, S.FSDP2Plan()))


def write_failing(runner, tmp_path, monkeypatch, property, scenario, **hooks):
    """Fail ``property`` in a Hypothesis test through ``check``, with the hooks made as
    ``property_test`` makes them; the reproducer it wrote."""
    monkeypatch.setattr(pytest_plugin, "repro_dir", str(tmp_path / "repros"))
    test_id = f"{property}-{tmp_path.name}"

    @settings(max_examples=1, database=None, deadline=None)
    @given(st.just(scenario))
    def test(scenario):
        check(runner, property, scenario, hooks=make_hooks(**hooks), test_id=test_id)

    with pytest.raises(AssertionError):
        test()
    [path] = reproducers.pop(test_id)
    return path


def replay(path, cwd):
    """``python path`` from ``cwd``, with only dcprop (not the tests) importable."""
    return subprocess.run(
        [sys.executable, path],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_checkpointer_object_travels_with_its_reproducer(dcprop_runner, tmp_path, monkeypatch):
    """An instance (no import name of its own) is carried by value, and the replay fails
    the way the test did, where running plain DCP instead would pass."""
    faulty = helpers.INJECTIONS["drop_key"]
    path = write_failing(
        dcprop_runner,
        tmp_path,
        monkeypatch,
        "roundtrip",
        scenario(1),
        checkpointer=faulty,
        model_factory=None,
    )
    with open(path) as f:
        assert "CHECKPOINTER = Pickled(" in f.read()
    result = replay(path, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: roundtrip" in result.stdout and "state after load" in result.stdout


def test_a_model_factory_travels_with_its_reproducer(dcprop_runner, tmp_path, monkeypatch):
    """A module-level function is carried by reference, with where it was imported from."""
    path = write_failing(
        dcprop_runner,
        tmp_path,
        monkeypatch,
        "ddp_parity",
        scenario(2),
        checkpointer=None,
        model_factory=helpers.double_grads_on_rank0,
    )
    with open(path) as f:
        text = f.read()
    assert "MODEL_FACTORY = 'helpers:double_grads_on_rank0'" in text
    assert repr(os.path.dirname(helpers.__file__)) in text  # IMPORT_PATHS
    result = replay(path, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "single-process reference" in result.stdout


def test_what_cannot_be_carried_makes_the_reproducer_refuse(tmp_path):
    """A lambda can be neither imported nor pickled: the replay says so and never passes."""
    path = write_reproducer(
        str(tmp_path), "roundtrip", scenario(1), model_factory=lambda *args: None
    )
    result = replay(path, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CANNOT REPLAY" in result.stdout and "model factory" in result.stdout
    assert "PASS" not in result.stdout


def local_class_instance():
    class Local(type(helpers.INJECTIONS["drop_key"])):
        pass

    return Local()


@pytest.mark.parametrize(
    ("obj", "carried"),
    [
        (None, None),
        ("helpers:DropKey", "helpers:DropKey"),
        (helpers.double_grads_on_rank0, "helpers:double_grads_on_rank0"),
        (helpers.DropKey, "helpers:DropKey"),
        (helpers.INJECTIONS["drop_key"], Pickled),
        (lambda *args: None, Missing),
        (local_class_instance(), Missing),
    ],
    ids=["default", "reference", "function", "class", "instance", "lambda", "local-class"],
)
def test_how_each_object_is_carried(obj, carried):
    value, paths = carry(obj, "checkpointer")
    if isinstance(carried, type):
        assert isinstance(value, carried)
    else:
        assert value == carried
    if isinstance(value, Pickled):
        assert type(value.load()) is type(obj)
    if isinstance(value, (str, Pickled)):
        assert paths == [os.path.dirname(helpers.__file__)]
