"""Run under torchrun by tests/test_runner.py: the same properties, SPMD mode."""

import attrs
import pytest
import torch
import torch.distributed as dist

import dcprop.specs as S
from dcprop.errors import ExampleSkipped, RankTimeout
from dcprop.properties import run_property
from dcprop.runner import RankContext
from dcprop.testing import property_test

M = S.ModelSpec(S.Block((("fc", S.Linear(4, 6)), ("act", S.Activation()), ("out", S.Linear(6, 3)))))


def world(ctx: RankContext):
    return dist.get_world_size(ctx.group())


def group_timeouts(ctx: RankContext, spec: S.MeshSpec):
    """The timeouts of the groups this rank's example may use, in seconds."""
    mesh = ctx.mesh(spec)
    groups = [dist.group.WORLD, ctx.group(), *mesh.get_all_groups()]
    return {g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups}


def test_runner_is_spmd(dcprop_runner):
    assert type(dcprop_runner).__name__ == "SPMDRunner"
    assert dcprop_runner.run(world) == {0: 2, 1: 2}
    # an example's timeout is that of every group it uses, made for it or before it
    spec = S.MeshSpec((2, 1), ("replicate", "shard"))
    for timeout in (7.0, 9.0):
        ran = dcprop_runner.run(group_timeouts, spec, world_size=2, meshes=(spec,), timeout=timeout)
        assert ran == {0: {timeout}, 1: {timeout}}


def test_reshard_two_to_one(dcprop_runner):
    scenario = S.Scenario(
        M,
        S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan()),
        load=S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()),
    )
    assert sorted(run_property(dcprop_runner, "reshard", scenario)) == [0, 1]


# World size 2, the whole torchrun world: on a sub-world, broadcast_from_rank0 hits the
# known upstream deadlock (dsd-broadcast-default-group), which torchrun mode cannot recover
# from; the pool tests and the corpus cover it.
@property_test("roundtrip", world_sizes=(2,), max_layers=2)
def test_generated_roundtrip(scenario):
    pass


def test_a_job_of_another_size_is_skipped(dcprop_runner):
    """torchrun's world is the job: a model of one rank runs only as a drawn sub-world."""
    one = S.Scenario(M, S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()))
    with pytest.raises(ExampleSkipped, match="torchrun's world has 2"):
        run_property(dcprop_runner, "roundtrip", one)
    on_sub_world = attrs.evolve(one, job_world_size=2)
    assert sorted(run_property(dcprop_runner, "roundtrip", on_sub_world)) == [0]


def wait_for_rank_1(ctx: RankContext):
    if ctx.rank != 1:
        dist.all_reduce(torch.zeros(1), group=ctx.group())


# Last in the file: torchrun's processes cannot be restarted, so a hang ends the run's
# examples (the runner refuses more), and this test must come after every other.
def test_zz_a_collective_that_outlives_its_timeout_is_a_hang(dcprop_runner):
    """Under torchrun the process-group timeout is the only clock: a rank whose
    collective ran out of it hung, which is a RankTimeout, not a failure of the code."""
    with pytest.raises(RankTimeout, match=r"rank\(s\) \[0\] did not finish") as info:
        dcprop_runner.run(wait_for_rank_1, timeout=3.0)
    assert info.value.signature.startswith("RankTimeout: ranks did not finish, waiting in")
    assert "wait_for_rank_1" in info.value.signature
