"""torchrun as users run it: reproducers start their job's layout, and two torchrun
agents (two "hosts" on this machine, each with its own temp directory) form one job
that writes its checkpoints under a shared checkpoint root."""

import json
import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from dcprop import specs as S
from dcprop.repro import write_reproducer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ONE_LINEAR = S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)),)))


def _env(**extra):
    """This checkout's dcprop and the test helpers, importable from any directory."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]), **extra)


# ---- a reproducer starts its job --------------------------------------------------------
def test_a_reproducer_starts_its_job_not_its_model_world(tmp_path):
    """A model on rank 0 of a two-rank job: the reproducer's ranks have a default group
    of two under `python`, `dcprop repro` and the torchrun line it prints.  A checkpointer
    that fails only where the job is larger than the model shows which layout ran."""
    scenario = S.Scenario(
        ONE_LINEAR, S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()), job_world_size=2
    )
    path = write_reproducer(
        str(tmp_path / "repros"),
        "roundtrip",
        scenario,
        checkpointer="helpers:AssumesTheModelIsTheJob",
    )
    with open(path) as f:
        assert "torchrun --nproc-per-node 2 " in f.read()
    launches = {
        "python": [sys.executable, path],
        "dcprop repro": [sys.executable, "-m", "dcprop.cli", "repro", path],
        "torchrun": [*TORCHRUN, "--standalone", "--nproc-per-node", "2", path],
    }
    for how, command in launches.items():
        # only dcprop on the path: the reproducer itself says where helpers.py is
        result = subprocess.run(
            command,
            cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = result.stdout + result.stderr
        assert result.returncode == 1, f"{how}: {out[-3000:]}"
        assert "the default group has 2 ranks, the model's 1" in result.stdout, f"{how}: {out}"
