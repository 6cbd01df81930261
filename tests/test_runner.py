"""The pool: sub-worlds, isolation, failures as events, interrupts, torchrun mode."""

import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import helpers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky

import dcprop.specs as S
from dcprop.errors import (
    ExampleFailure,
    HarnessError,
    PoolExhausted,
    RankCrashed,
    RankTimeout,
    RunnerError,
    carry_runner_errors,
    reraise_carried,
)
from dcprop.properties import run_property
from dcprop.runner import Pool, Pools
from dcprop.runner.messages import Blocked
from dcprop.runner.pool import certain_hang
from dcprop.specs import MeshSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HERE = os.path.dirname(__file__)


def test_runs_on_every_rank(dcprop_runner):
    assert dcprop_runner.run(helpers.all_reduce_rank, 10) == {r: 46 for r in range(4)}


def test_sub_worlds_and_meshes(dcprop_runner):
    assert dcprop_runner.run(helpers.all_reduce_rank, 0, world_size=2) == {0: 1, 1: 1}
    assert dcprop_runner.run(helpers.all_reduce_rank, 0, world_size=3) == {0: 3, 1: 3, 2: 3}
    spec = MeshSpec((1, 3), ("a", "b"))
    out = dcprop_runner.run(helpers.mesh_ranks, spec, world_size=3, meshes=(spec,))
    assert out == {r: [0, 1, 2] for r in range(3)}
    # idle ranks stayed correct: the whole pool still works
    assert dcprop_runner.run(helpers.all_reduce_rank, 0) == {r: 6 for r in range(4)}


def test_the_default_group_is_the_examples_job(dcprop_runner):
    """Each example's default process group is its job: its own world unless it asks
    for a larger job, on whose first ranks it then runs (the others report idle)."""
    assert dcprop_runner.run(helpers.default_world, world_size=2) == {0: 2, 1: 2}
    spec = MeshSpec((3,), ("shard",))
    assert dcprop_runner.run(helpers.default_world, world_size=3, meshes=(spec,)) == {
        r: 3 for r in range(3)
    }
    on_sub_world = dcprop_runner.run(helpers.all_reduce_rank, 0, world_size=2, job_world_size=4)
    assert on_sub_world == {0: 1, 1: 1}
    assert dcprop_runner.run(helpers.default_world, world_size=2, job_world_size=4) == {0: 4, 1: 4}
    with pytest.raises(RunnerError, match="job_world_size=1 cannot hold an example of 2 ranks"):
        dcprop_runner.run(helpers.default_world, world_size=2, job_world_size=1)


def test_pools_restart_only_the_pool_that_hung():
    with Pools(2, timeout=4.0, grace=1.0) as pools:
        assert pools.run(helpers.all_reduce_rank, world_size=1) == {0: 0}
        one = pools.pool(1).pids()
        with pytest.raises(RankTimeout):
            pools.run(helpers.skip_barrier, 1, world_size=2)
        assert pools.run(helpers.all_reduce_rank, world_size=2) == {0: 1, 1: 1}
        assert pools.pool(1).pids() == one and pools.restarts == 1
        assert sorted(pools.pools) == [1, 2] and pools.examples == 3
    assert not pools.pool(1).started and not pools.pool(2).started


def test_a_pool_runs_only_jobs_of_its_size():
    with Pool(1) as pool, pytest.raises(RunnerError, match="job_world_size=2 needs a pool"):
        pool.run(helpers.all_reduce_rank, world_size=1, job_world_size=2)


def test_repeated_world_costs_no_new_groups(dcprop_runner):
    spec = MeshSpec((2, 2), ("x", "y"))
    dcprop_runner.run(helpers.mesh_ranks, spec, meshes=(spec,))
    before = dcprop_runner.run(helpers.observe_state)[0]["groups"]
    dcprop_runner.run(helpers.mesh_ranks, spec, meshes=(spec,))
    assert dcprop_runner.run(helpers.observe_state)[0]["groups"] == before


def test_examples_are_isolated(dcprop_runner):
    example_dirs = dcprop_runner.run(helpers.leave_state_behind, world_size=2)
    seen = dcprop_runner.run(helpers.observe_state, world_size=2)
    fresh = dcprop_runner.run(helpers.observe_state, world_size=2)
    for rank in (0, 1):
        assert seen[rank]["dtype"] == "torch.float32"
        assert not seen[rank]["deterministic"] and seen[rank]["hooks"] == 0
        assert seen[rank]["env"] is None
        assert seen[rank] == fresh[rank]  # same groups, same reseeded RNG draw
        assert not os.path.exists(example_dirs[rank])  # example dir removed


def test_example_dir_is_shared_and_removed(dcprop_runner):
    listing = dcprop_runner.run(helpers.write_file, world_size=3)
    assert listing[0] == ["rank0.txt", "rank1.txt", "rank2.txt"]


@pytest.fixture
def small_pool():
    pool = Pool(2, timeout=6.0, grace=2.0)
    yield pool
    pool.close()
    assert all(_gone(pid) for pid in pool.pids())


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_exception_reaches_controller_without_timeout(small_pool):
    small_pool.run(helpers.all_reduce_rank)
    started = time.monotonic()
    with pytest.raises(ExampleFailure) as info:
        small_pool.run(helpers.fail_on, 1)
    assert time.monotonic() - started < small_pool.timeout
    assert "rank(s) [1]" in str(info.value) and "deliberate failure on rank 1" in str(info.value)
    assert "Traceback" in str(info.value)
    assert info.value.signature.startswith("ValueError: deliberate failure on rank N")


def test_checkpoint_exception_is_identified_by_its_cause(small_pool):
    """DCP reports any rank's failure as one CheckpointException on every rank; the
    signature and headline name the wrapped cause, not the rank list."""
    with pytest.raises(ExampleFailure) as info:
        small_pool.run(helpers.load_missing_key_on, 1)
    assert info.value.signature == (
        "RuntimeError: Missing key in checkpoint state_dict: b. @ create_default_local_load_plan"
    )
    headline = str(info.value).splitlines()[0]
    assert "CheckpointException: RuntimeError: Missing key in checkpoint state_dict: b." in headline


@pytest.mark.parametrize(
    ("fn", "args", "cause"),
    [
        (helpers.unmet_precondition, (), "UsageError: this property needs a scenario"),
        ("helpers:no_such_property", (), "AttributeError"),
        (helpers.take, (helpers.RanksCannotImport(),), "No module named 'only_on_the_controller'"),
        (helpers.use_undeclared_mesh, (), "was not declared for this example"),
    ],
)
def test_harness_errors_are_not_example_failures(small_pool, fn, args, cause):
    """Unmet preconditions, unresolvable properties and objects the ranks cannot unpickle
    say nothing about the code under test: a HarnessError, never an ExampleFailure
    (an AssertionError, which Hypothesis would shrink and dcprop would write out)."""
    with pytest.raises(HarnessError) as info:
        small_pool.run(fn, *args)
    assert not isinstance(info.value, AssertionError)
    assert "harness failed on rank(s) [0, 1]" in str(info.value) and cause in str(info.value)
    assert small_pool.run(helpers.all_reduce_rank) == {0: 1, 1: 1}
    assert small_pool.restarts == 0


@pytest.mark.parametrize("prop", ["finetune_resume", "submesh_layout"])
def test_a_scenario_outside_a_propertys_precondition_is_a_harness_error(small_pool, prop):
    """finetune_resume needs a pretrained submodule, submesh_layout an expert plan."""
    model = S.ModelSpec(S.Block((("fc", S.Linear(4, 3)),)))
    scenario = S.Scenario(model, S.Topology(2, MeshSpec((2,), ("shard",)), S.FSDP2Plan()))
    with pytest.raises(HarnessError, match=f"UsageError: {prop} needs"):
        run_property(small_pool, prop, scenario)


def test_a_harness_error_ends_a_search_unshrunk(small_pool):
    """As dcprop's campaign and property tests run their examples: Hypothesis stops at
    the first harness error instead of shrinking it."""
    tried = []

    @reraise_carried()
    @settings(max_examples=20, database=None, deadline=None)
    @given(st.integers())
    def search(n):
        tried.append(n)
        with carry_runner_errors():
            small_pool.run(helpers.unmet_precondition)

    with pytest.raises(HarnessError):
        search()
    assert len(tried) == 1


def test_ranks_without_numpy_fail_the_start_up_check_once(tmp_path):
    """A `numpy` that does not import, first on the path of a fresh controller (whose
    fork server and ranks start without numpy), gives the environment of a CPU torch
    wheel without numpy."""
    blocked = tmp_path / "numpy"
    blocked.mkdir()
    (blocked / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n"
    )
    script = textwrap.dedent("""
        import helpers, pytest
        from dcprop.errors import RunnerError
        from dcprop.runner import Pool

        with Pool(2) as pool:
            with pytest.raises(RunnerError, match="install numpy: torch's object collectives"):
                pool.run(helpers.all_reduce_rank)
            with pytest.raises(RunnerError, match="install numpy"):  # not started again
                pool.run(helpers.all_reduce_rank)
            assert pool.starts == 1 and not pool.started
        print("refused once")
    """)
    path = os.pathsep.join([str(tmp_path), ROOT, os.path.dirname(__file__)])
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "refused once" in done.stdout, done.stderr[-3000:]


def test_hang_times_out_with_stacks_and_pool_recovers(small_pool):
    """Rank 1 computes (sleeps) while rank 0 waits for it: rank 1 may still join, so the
    hang is never certain and costs the timeout."""
    with pytest.raises(RankTimeout) as info:
        small_pool.run(helpers.skip_barrier, 1)
    message = str(info.value)
    assert message.startswith("timed out after 6s: rank(s) [0, 1] did not finish")
    assert "stacks at the timeout" in message and "certain" not in message
    assert "skip_barrier" in message  # where each rank stood
    assert small_pool.run(helpers.all_reduce_rank) == {0: 1, 1: 1}
    assert small_pool.restarts == 1


@pytest.mark.parametrize(
    ("fn", "args", "job", "where"),
    [
        # the sub-world deadlock of dsd-broadcast-default-group: idle ranks never join
        (
            helpers.barrier_on_the_default_group,
            (),
            4,
            "barrier over ranks [0, 1, 2, 3], left by [2, 3]",
        ),
        (helpers.return_early_on, (1,), 2, "all_reduce over ranks [0, 1], left by [1]"),
    ],
)
def test_a_certain_hang_ends_before_the_timeout(dcprop_runner, fn, args, job, where):
    """Ranks waiting in a collective that a rank which has already reported never
    joined: the verdict comes when that is certain, not after the 60s timeout, with
    the stacks and signature of any hang (known-bug matching and shrinking rely on them)."""
    with pytest.raises(RankTimeout) as info:
        dcprop_runner.run(fn, *args, world_size=2, job_world_size=job, timeout=60)
    message = str(info.value)
    assert message.startswith("hang certain before the 60s timeout: rank(s) ["), message
    assert where in message
    assert "stacks when the hang was certain" in message and fn.__name__ in message
    assert info.value.signature == (
        f"RankTimeout: ranks did not finish, waiting in {fn.__name__} (helpers.py)"
    )
    assert dcprop_runner.run(helpers.all_reduce_rank, world_size=job) == {
        r: sum(range(job)) for r in range(job)
    }


def test_a_slow_healthy_example_is_never_a_hang(dcprop_runner):
    """Rank 0 computes for 5s without a collective while rank 1 waits for it and the
    job's idle ranks have long reported: rank 0 may still join, so this is no hang."""
    out = dcprop_runner.run(
        helpers.compute_then_all_reduce_on, 0, 5.0, world_size=2, job_world_size=4, timeout=20
    )
    assert out == {0: 1, 1: 1}


def test_a_rank_killed_while_the_others_wait_is_a_crash_at_once():
    """The waiting ranks' collectives fail as their peer's sockets close, so the crash
    needs neither the timeout nor the grace period (both 60s here)."""
    with Pool(2, timeout=60.0, grace=60.0) as pool:
        with pytest.raises(RankCrashed) as info:
            pool.run(helpers.kill_self_on, 1)
        message = str(info.value)
        assert message.startswith("rank 1 killed by signal SIGKILL")
        assert "still running" not in message and "example failed on rank(s) [0]" in message
        assert pool.run(helpers.all_reduce_rank) == {0: 1, 1: 1}


def test_certain_hang_needs_every_running_rank_waiting_on_a_rank_that_left_first():
    wait = Blocked(task=0, rank=0, op="barrier", ranks=(0, 1, 2), entered_after=5.0)
    other = Blocked(task=0, rank=1, op="barrier", ranks=(0, 1, 2), entered_after=5.0)
    assert certain_hang([0, 1], {0: wait, 1: other}, {2: 4.0})
    assert not certain_hang([0, 1], {0: wait}, {2: 4.0})  # rank 1 computes: it may join
    assert not certain_hang([0, 1], {0: wait, 1: other}, {2: 6.0})  # 2 may have joined
    assert not certain_hang([0, 1], {0: wait, 1: other}, {})  # every member still running


def test_crash_is_reported_and_pool_restarts(small_pool):
    with pytest.raises(RankCrashed) as info:
        small_pool.run(helpers.exit_on, 1)
    assert "rank 1 exited with status 7" in str(info.value)
    assert small_pool.run(helpers.all_reduce_rank) == {0: 1, 1: 1}


def test_restart_budget():
    with Pool(1, timeout=2.0, max_restarts=1) as pool:
        for _ in range(2):
            with pytest.raises(RankCrashed):
                pool.run(helpers.exit_on, 0)
        with pytest.raises(PoolExhausted, match="max_restarts=1"):
            pool.run(helpers.all_reduce_rank)


def test_bad_arguments():
    with pytest.raises(RunnerError, match="world_size=0"):
        Pool(0)
    with Pool(1) as pool, pytest.raises(RunnerError, match="does not fit in a pool of 1"):
        pool.run(helpers.all_reduce_rank, world_size=2)
    with Pool(1) as pool, pytest.raises(RunnerError, match="cannot send"):
        pool.run(helpers.all_reduce_rank, lambda: None)


def test_same_example_same_outcome(dcprop_runner):
    first = dcprop_runner.run(helpers.observe_state, world_size=2)
    assert dcprop_runner.run(helpers.observe_state, world_size=2) == first


def test_flaky_outcome_surfaces_as_hypothesis_flaky(small_pool, tmp_path):
    marker = tmp_path / "seen"

    @settings(max_examples=1, database=None, deadline=None)
    @given(st.just(0))
    def prop(_):
        if not marker.exists():  # fails the first time only
            marker.write_text("x")
            small_pool.run(helpers.fail_on, 0)
        small_pool.run(helpers.all_reduce_rank)

    with pytest.raises(Flaky):
        prop()


INTERRUPTED = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {here!r})
    import helpers
    from dcprop.runner import Pool
    pool = Pool(2, timeout=60)
    pool.run(helpers.all_reduce_rank)
    print(" ".join(map(str, pool.pids())), pool.base_dir, flush=True)
    pool.run(helpers.sleep, 60)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_controller_leaves_nothing_behind(sig, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED.format(here=HERE)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline().split()
    pids, base = [int(p) for p in line[:-1]], line[-1]
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.wait(timeout=90)  # under load, stopping ranks and removing files takes a while
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), "rank processes outlived the controller"
    if sig == signal.SIGKILL:  # nothing could run in the controller: the next pool cleans up
        from dcprop.runner.pool import remove_stale_tempdirs

        assert remove_stale_tempdirs(str(tmp_path)) == [base]
    assert not glob.glob(os.path.join(str(tmp_path), "dcprop-*"))


TORCHRUN_SUITE = os.path.join(HERE, "torchrun_suite")


def test_torchrun_mode_runs_the_same_properties():
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "pytest",
                TORCHRUN_SUITE,
                "-q",
                "-p",
                "no:cacheprovider",
                "--dcprop-torchrun",
                "--hypothesis-profile=dcprop-ci",
                "--rootdir",
                TORCHRUN_SUITE,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp,
            # this checkout's dcprop, not an installed one (the ranks start from `tmp`)
            env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE])),
        )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "5 passed" in out, out[-4000:]


def test_the_stale_directory_sweep_leaves_other_hosts_directories(tmp_path):
    # On a checkpoint root that several hosts share, another host's live pool may
    # have a pid that is dead here: only this host's directories are swept.
    import socket

    from dcprop.runner.pool import remove_stale_tempdirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / f"dcprop-{dead.pid}-{socket.gethostname()}-abc"
    theirs = tmp_path / f"dcprop-{dead.pid}-another-host-abc"
    mine.mkdir()
    theirs.mkdir()
    assert remove_stale_tempdirs(str(tmp_path)) == [str(mine)]
    assert theirs.exists()


def test_temp_files_made_in_a_rank_go_with_the_pool(tmp_path):
    # a rank ends with os._exit, so what multiprocessing (an async writer) makes in
    # TMPDIR would outlive it: it lives in the pool's directory instead
    with Pool(1, tmp_root=str(tmp_path)) as pool:
        made = pool.run(helpers.make_multiprocessing_temp_dir)[0]
        assert made.startswith(str(tmp_path) + os.sep)
        assert os.path.isdir(made)
    assert not os.path.exists(made)
    assert not os.listdir(tmp_path)
