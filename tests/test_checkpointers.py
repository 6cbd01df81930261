"""The checkpointer hooks on real pools: the Stateful (app state) protocol, the per-rank
lifecycle, short names, and the torch_checkpointing adapter."""

import os
import subprocess
import sys

import attrs
import pytest
from checkpointer_helpers import (
    TC_BUFFERED,
    AppStateDCP,
    CountsLifecycle,
    ForgetsTrainState,
    SkipsOptimizer,
)

from dcprop import specs as S
from dcprop.checkpointer import DCPCheckpointer, load_checkpointer
from dcprop.checkpointers.torch_checkpointing import TorchCheckpointing
from dcprop.errors import ExampleFailure, UsageError
from dcprop.properties import run_property
from dcprop.properties._harness import Hooks
from dcprop.runner import Pools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FSDP2 = S.Scenario(
    S.ModelSpec(S.Block((("fc0", S.Linear(2, 3)), ("fc1", S.Linear(3, 2))))),
    S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan()),
    optimizer=S.OptimizerSpec("adam", scheduler=S.SchedulerSpec()),
)
RESHARD = S.Scenario(
    FSDP2.model,
    FSDP2.save,
    load=S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()),
    optimizer=FSDP2.optimizer,
)


def test_app_state_checkpointer_passes_roundtrip_and_reshard(dcprop_runner):
    hooks = Hooks(checkpointer=AppStateDCP())
    assert run_property(dcprop_runner, "roundtrip", FSDP2, hooks=hooks)
    assert run_property(dcprop_runner, "reshard", RESHARD, hooks=hooks)


@pytest.mark.parametrize(
    "checkpointer, match",
    [
        (ForgetsTrainState(), r"train state loaded from 'ckpt' has step 0, saved at step 1"),
        (SkipsOptimizer(), r"never called load_state_dict of \['optim'\]"),
    ],
)
def test_app_state_checkpointer_bugs_are_caught(dcprop_runner, checkpointer, match):
    with pytest.raises(ExampleFailure, match=match):
        run_property(dcprop_runner, "roundtrip", FSDP2, hooks=Hooks(checkpointer=checkpointer))


def test_setup_and_close_run_once_per_rank_per_pool_life(tmp_path):
    hooks = Hooks(checkpointer=CountsLifecycle(str(tmp_path)))
    with Pools(2) as pools:
        for _ in range(3):  # three examples, each with a save and a load
            assert run_property(pools, "roundtrip", FSDP2, hooks=hooks)
        assert sorted(f.split("-pid")[0] for f in os.listdir(tmp_path)) == [
            "setup-rank0",
            "setup-rank1",
        ]
    assert sorted(f.split("-pid")[0] for f in os.listdir(tmp_path)) == [
        "close-rank0",
        "close-rank1",
        "setup-rank0",
        "setup-rank1",
    ]


def test_short_names_and_references_resolve():
    assert isinstance(load_checkpointer("dcp"), DCPCheckpointer)
    assert isinstance(load_checkpointer("torch_checkpointing"), TorchCheckpointing)
    assert isinstance(load_checkpointer("dcprop.checkpointer:DCPCheckpointer"), DCPCheckpointer)
    with pytest.raises(UsageError, match="'dcp' or 'torch_checkpointing'"):
        load_checkpointer("dcpp")


# A finder ahead of every other that refuses torch_checkpointing: the library is not installed.
_HIDDEN = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch_checkpointing":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from dcprop.checkpointer import load_checkpointer
load_checkpointer("torch_checkpointing")
"""


def test_missing_library_names_the_extra():
    result = subprocess.run(
        [sys.executable, "-c", _HIDDEN], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "UsageError" in result.stderr
    assert "pip install 'dcprop[torch-checkpointing]'" in result.stderr


@pytest.fixture(scope="module")
def tmpfs_pools():
    """Pools whose checkpoints live on tmpfs, which refuses O_DIRECT at open: there the
    library's own fallback applies and tc-direct-io-buffered-write does not."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with Pools(1, tmp_root="/dev/shm") as pools:
        yield pools


ONE_RANK = S.Scenario(  # a job of two or more ranks meets tc-metadata-gather-cuda on CPU
    FSDP2.model,
    S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()),
    optimizer=FSDP2.optimizer,
)
FINETUNE = S.Scenario(
    S.ModelSpec(
        S.Block(
            (
                ("pretrain", S.Block((("fc0", S.Linear(1, 1)),))),
                ("act", S.Activation()),
                ("head", S.Linear(1, 1)),
            )
        )
    ),
    S.Topology(
        1,
        S.MeshSpec((1,), ("shard",)),
        S.FSDP2Plan(),
        state_dict=S.StateDictSpec(
            ignore_frozen_params=True, keep_submodule_prefixes=False, submodules=("pretrain",)
        ),
    ),
    frozen=("pretrain.fc0.bias", "pretrain.fc0.weight"),
    pretrained="pretrain",
)


@pytest.mark.parametrize("async_save", [False, True])
def test_torch_checkpointing_round_trips(tmpfs_pools, async_save):
    """The async save starts a writer process from the rank (ranks used to be daemonic
    processes, which may not have children)."""
    pytest.importorskip("torch_checkpointing")
    scenario = attrs.evolve(ONE_RANK, storage=S.StorageSpec(async_save=async_save))
    hooks = Hooks(checkpointer=load_checkpointer("torch_checkpointing"))
    assert run_property(tmpfs_pools, "roundtrip", scenario, hooks=hooks)
    assert run_property(tmpfs_pools, "finetune_resume", FINETUNE, hooks=hooks)


def test_torch_checkpointing_without_direct_io_round_trips_anywhere(dcprop_runner):
    pytest.importorskip("torch_checkpointing")
    assert run_property(dcprop_runner, "roundtrip", ONE_RANK, hooks=Hooks(checkpointer=TC_BUFFERED))
