"""torchrun as users run it: reproducers start their job's layout, and two torchrun
agents (two "hosts" on this machine, each with its own temp directory) form one job
that writes its checkpoints under a shared checkpoint root."""

import contextlib
import json
import os
import shlex
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


# ---- two hosts, one job -----------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_mounts():
    """Whether this machine lets a process have mounts of its own (Linux, as root)."""
    try:
        probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30)
    except OSError:
        return False
    return probe.returncode == 0


PRIVATE_MOUNTS = _private_mounts()


def _on_its_own_disk(command, folders):
    """``command`` in a mount namespace of its own in which each of ``folders`` is a
    fresh tmpfs: what it writes there no other process sees, as on another host."""
    mounts = "".join(f"mount -t tmpfs node {shlex.quote(str(f))} && " for f in folders)
    script = f'{mounts}exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command]


def two_agents(args, tmp_path, *, env=None, hidden=(), timeout=180):
    """Run ``args`` (what follows torchrun's own options) under two torchrun agents on
    this machine that form one job of two ranks, as two hosts would: c10d rendezvous,
    one rank each, each with a temp directory that the other cannot see (where the
    machine allows private mounts; ``hidden``: folders the second host does not see
    either).  The agents' exit codes and output; they and their ranks are killed
    whatever happens."""
    endpoint = f"127.0.0.1:{_free_port()}"
    run_id = uuid.uuid4().hex[:8]
    agents = []
    try:
        for node in range(2):
            tmp = tmp_path / f"node{node}-tmp"
            tmp.mkdir(exist_ok=True)
            command = [
                *TORCHRUN,
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                f"--rdzv-id={run_id}",
                *args,
            ]
            if PRIVATE_MOUNTS:
                command = _on_its_own_disk(command, [tmp, *(hidden if node else ())])
            agents.append(
                subprocess.Popen(
                    command,
                    cwd=tmp_path,
                    env=_env(TMPDIR=str(tmp), **(env or {})),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
        outputs = [a.communicate(timeout=timeout)[0] for a in agents]
        return [a.returncode for a in agents], outputs
    finally:
        for agent in agents:
            _stop(agent)


def _stop(agent):
    """End an agent still running, and its ranks: torchrun starts each rank in a session
    of its own, so killing the agent's process group would leave them behind."""
    if agent.poll() is not None:
        return
    family = _descendants(agent.pid)
    os.killpg(agent.pid, signal.SIGKILL)
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.wait()


def _descendants(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return [pid for child in children for pid in (child, *_descendants(child))]


def _check(tmp_path, *args):
    """`dcprop check` on world size 2 only: torchrun's ranks cannot be restarted, so a
    known deadlock on a sub-world would end the run."""
    recipe = tmp_path / "two.json"
    recipe.write_text(json.dumps({"world_sizes": [2]}))
    return ["-m", "dcprop.cli", "check", "--recipe", str(recipe), "--world-size", "2", *args]


def _driver(outputs):
    """The output of the agent whose rank 0 drove the run (either may host rank 0)."""
    [out] = [out for out in outputs if "coverage (examples per kind)" in out]
    return out


def test_two_torchrun_agents_form_one_job(tmp_path):
    """Checkpoints go under the shared root, not a node's temp directory: reshard reads
    what every rank of the other topology saved.  A failure found in that mode is
    written as a reproducer that replays on two agents."""
    shared = tmp_path / "shared"
    shared.mkdir()
    report = tmp_path / "report.json"
    common = ["--no-database", "--checkpoint-root", str(shared), "--report", str(report)]
    codes, outputs = two_agents(
        _check(tmp_path, "--properties", "reshard", "--max-examples", "2", *common), tmp_path
    )
    assert codes == [0, 0], "\n----\n".join(out[-3000:] for out in outputs)
    reshard = json.loads(report.read_text())["properties"]["reshard"]
    assert reshard["checked"] >= 1 and not reshard["failures"], reshard
    assert not os.listdir(shared), "the run left checkpoints behind"

    codes, outputs = two_agents(
        _check(
            tmp_path,
            *("--properties", "roundtrip", "--max-examples", "1", "--shrink-seconds", "5"),
            *("--checkpointer", "helpers:DropKey", "--repro-dir", str(tmp_path / "repros")),
            *common,
        ),
        tmp_path,
    )
    out = _driver(outputs)
    assert "FAILED roundtrip" in out, out[-3000:]
    # the follower's host fails too, at once (not after torchrun's 5-minute exit barrier)
    assert all(codes), "\n----\n".join(out[-3000:] for out in outputs)
    [failure] = json.loads(report.read_text())["properties"]["roundtrip"]["failures"]
    codes, outputs = two_agents(
        [failure["reproducer"]], tmp_path, env={"DCPROP_CHECKPOINT_ROOT": str(shared)}
    )
    replayed = [out for out in outputs if "FAIL: roundtrip" in out]
    assert replayed and "state after load" in replayed[0], "\n----\n".join(outputs)
    assert all(codes), codes


def test_a_job_across_hosts_needs_a_shared_checkpoint_root(tmp_path):
    """Node-local temp directories are not shared: without a checkpoint root every rank
    stops at once with a usage error that says what to give, and both agents fail."""
    codes, outputs = two_agents(_check(tmp_path, "--max-examples", "1"), tmp_path)
    for out in outputs:
        assert "dcprop: error: torchrun's job spans hosts (2 ranks, 1 on this one)" in out, out
        assert "a directory every host mounts" in out, out[-3000:]
    assert all(codes), codes


@pytest.mark.skipif(not PRIVATE_MOUNTS, reason="needs private mounts (unshare --mount)")
def test_a_checkpoint_root_one_host_cannot_see_stops_every_rank(tmp_path):
    """The second host has its own, empty, disk where the first has the checkpoint root."""
    root = tmp_path / "not-shared"
    root.mkdir()
    codes, outputs = two_agents(
        _check(tmp_path, "--max-examples", "1", "--checkpoint-root", str(root)),
        tmp_path,
        hidden=[root],
    )
    for out in outputs:
        assert "do not see" in out and "made on rank 0's host" in out, out[-3000:]
    assert all(codes), codes
    assert not os.listdir(root), "rank 0 left its directory behind"
