import math

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import dcprop.specs as S
from dcprop import serialization
from dcprop import strategies as dst
from dcprop.specs.scenario import eps_underflows
from dcprop.strategies._scenarios import uneven_layout

M = S.ModelSpec(S.Block((("fc", S.Linear(4, 4)),)))
MESH = S.MeshSpec((2,), ("shard",))

BAD_ARGUMENTS = [
    (dst.dims, dict(shards=0), "shards=0 must be at least 1"),
    (dst.dims, dict(min_value=5, max_value=2), "Cannot have max_value=2 < min_value=5"),
    (dst.dims, dict(uneven=1.5), "uneven=1.5 must be a number between 0 and 1"),
    (dst.models, dict(max_layers=0), "max_layers=0 must be at least 1"),
    (dst.models, dict(layers=("conv",)), "unknown entries ['conv']"),
    (dst.models, dict(layers=("activation",)), "must include 'linear'"),
    (dst.models, dict(max_dim="8"), "max_dim='8' must be an int"),
    (dst.models, dict(ties=1), "ties=1 must be a bool"),
    (dst.models, dict(dtypes=("bf16",)), "must include 'fp32'"),
    (dst.models, dict(dtypes=("fp8",)), "unknown entries ['fp8']"),
    (dst.frozen_subsets, dict(model="m"), "model='m' must be a ModelSpec"),
    (
        dst.frozen_subsets,
        dict(model=M, min_trainable=5),
        "min_trainable=5 but the model has only 2",
    ),
    (dst.frozen_subsets, dict(model=M, granularity="layer"), "unknown entries ['layer']"),
    (dst.meshes, dict(world_size=0), "world_size=0 must be at least 1"),
    (dst.meshes, dict(world_size=4, min_dims=3, max_dims=2), "Cannot have max_dims=2 < min_dims=3"),
    (dst.meshes, dict(world_size=4, dim_names=("a", "b", "c", "d")), "has 4 names"),
    (
        dst.parallel_plans,
        dict(model=M, mesh=S.MeshSpec((1, 1, 2), ("a", "b", "c"))),
        "no plan of kinds",
    ),
    (dst.parallel_plans, dict(model=M, mesh=MESH, kinds=("zero3",)), "unknown entries ['zero3']"),
    (dst.parallel_plans, dict(model=M, mesh=MESH, device="tpu"), "unknown entries ['tpu']"),
    (dst.optimizers, dict(kinds=("lamb",)), "unknown entries ['lamb']"),
    (dst.state_dict_options, dict(full_state_dict="yes"), "full_state_dict='yes' must be a bool"),
    (dst.trainings, dict(max_steps=0), "max_steps=0 must be at least 1"),
    (dst.scenarios, dict(property="nope"), "unknown entries ['nope']"),
    (dst.scenarios, dict(world_sizes=()), "world_sizes=() must hold at least one"),
    (dst.scenarios, dict(world_sizes=(0,)), "world_sizes entry=0 must be at least 1"),
    (dst.scenarios, dict(property="submesh_layout", kinds=("ddp",)), "leaves no plan"),
    (dst.scenarios, dict(max_layers=-1), "max_layers=-1 must be at least 1"),
    (dst.scenarios, dict(dtypes=("bf16", "fp16")), "must include 'fp32'"),
]


@pytest.mark.parametrize(("strategy", "kwargs", "message"), BAD_ARGUMENTS)
@pytest.mark.parametrize("first_use", ["validate", "example"])
@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_invalid_arguments_raise_at_first_use(strategy, kwargs, message, first_use):
    """As Hypothesis' own strategies: building one checks nothing, its first use does."""
    built = strategy(**kwargs)
    with pytest.raises(InvalidArgument) as info:
        getattr(built, first_use)()
    assert message in str(info.value)


REPRS = [
    "dims(4, uneven=1.0)",
    "models(max_layers=2, layers=('linear',))",
    "frozen_subsets(ModelSpec(Block((('fc', Linear(4, 4)),))), granularity='module')",
    "meshes(4, max_dims=2)",
    "parallel_plans(ModelSpec(Block((('fc', Linear(4, 4)),))), MeshSpec((2,), ('shard',)))",
    "topologies(ModelSpec(Block((('fc', Linear(4, 4)),))), 2, kinds=('ddp',))",
    "optimizers(('sgd',))",
    "state_dict_options(full_state_dict=True)",
    "storage_options()",
    "trainings(max_steps=2)",
    "scenarios('roundtrip', world_sizes=(1, 2))",
    "scenarios('reshard', exclude=('plan=ddp',))",
    "scenarios(property='nope')",
]


@pytest.mark.parametrize("call", REPRS)
def test_a_strategy_s_repr_is_the_call_that_made_it(call):
    assert repr(eval(call, {**vars(S), **vars(dst)})) == call


@pytest.mark.parametrize("prop", dst.PROPERTY_NAMES)
@settings(max_examples=60, deadline=None)  # default health checks stay on
@given(data=st.data())
def test_every_scenario_validates_pickles_and_round_trips(prop, data):
    scenario = data.draw(dst.scenarios(prop, device=data.draw(st.sampled_from(S.DEVICES))))
    assert eval(repr(scenario), vars(S)) == scenario
    assert serialization.loads(serialization.dumps(scenario)) == scenario
    assert scenario.save.world_size <= 4


SHRINK = settings(max_examples=2000, deadline=None, database=None, derandomize=True)


def test_minimal_model_with_a_frozen_parameter():
    model_and_frozen = dst.models().flatmap(
        lambda m: st.tuples(st.just(m), dst.frozen_subsets(m, min_trainable=0))
    )
    model, frozen = find(model_and_frozen, lambda mf: len(mf[1]) > 0, settings=SHRINK)
    assert model == S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)),)))
    assert frozen == ("fc0.weight",)


def test_minimal_uneven_layout_has_empty_shards():
    found = find(dst.scenarios(world_sizes=(2, 3, 4)), uneven_layout, settings=SHRINK)
    assert found.save.world_size == 2 and found.save.mesh.shape == (2,)
    # weight (1, 2): one row over two ranks, so one rank holds an empty shard; the
    # unsharded input width stays an even multiple
    assert found.model == S.ModelSpec(S.Block((("fc0", S.Linear(2, 1)),)))


def test_minimal_reshard_changes_world_size():
    found = find(
        dst.scenarios("reshard"), lambda s: s.save.world_size != s.load.world_size, settings=SHRINK
    )
    assert {found.save.world_size, found.load.world_size} == {1, 2}
    assert found.frozen == () and found.save.plan == S.FSDP2Plan()
    assert found.save.state_dict == S.StateDictSpec()


def test_shrinks_to_simplest_scenario():
    found = find(dst.scenarios(), lambda s: True, settings=SHRINK)
    assert found == S.Scenario(
        S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)),))),
        S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()),
    )


def _kinds(model):
    return {type(layer) for _, layer in model.modules()}


GROWN_MINIMA = [
    # (what a model holds, the simplest model that holds it)
    (
        lambda m: bool(m.low_precision_modules()),
        S.ModelSpec(S.Block((("fc0", S.Linear(1, 1, dtype="bf16")),))),
    ),
    (
        lambda m: S.Mask in _kinds(m),
        S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)), ("mask1", S.Mask(1))))),
    ),
    (
        lambda m: bool(m.non_persistent_buffers()),
        S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)), ("mask1", S.Mask(1, cache=True))))),
    ),
    (
        lambda m: bool(m.idle_parameters(1)),
        S.ModelSpec(S.Block((("fc0", S.Linear(1, 1)), ("skip1", S.Skip(S.Linear(1, 1), phase=1))))),
    ),
]


@pytest.mark.parametrize(("holds", "minimal"), GROWN_MINIMA)
def test_each_grown_model_feature_shrinks_to_its_simplest_model(holds, minimal):
    assert find(dst.models(), holds, settings=SHRINK) == minimal


@settings(max_examples=60, deadline=None, database=None)
@given(dst.scenarios(world_sizes=(1, 2, 3, 4)))
def test_sharded_plans_wrap_each_low_precision_linear_alone(scenario):
    """torch's FSDP needs one dtype per unit (Scenario also refuses any other plan)."""
    plan = scenario.save.plan
    if not isinstance(plan, S.DDPPlan):
        assert set(scenario.model.low_precision_modules()) <= set(plan.wrap)
    if eps_underflows(scenario.model, scenario.frozen, scenario.pretrained):
        assert scenario.optimizer.kind == "sgd"


def test_a_model_without_the_grown_features_is_one_argument_away():
    plain = dst.models(dtypes=("fp32",), layers=dst.LAYER_KINDS[:-2])

    @settings(max_examples=50, deadline=None, database=None)
    @given(plain)
    def test(model):
        assert not model.low_precision_modules() and not {S.Mask, S.Skip} & _kinds(model)

    test()


def test_uneven_share_is_a_knob():
    def share(uneven):
        draws = []

        @settings(max_examples=300, deadline=None, database=None)
        @given(dst.dims(4, uneven=uneven))
        def collect(d):
            draws.append(d % 4 != 0)

        collect()
        return sum(draws) / len(draws)

    assert share(0.0) == 0.0
    assert share(1.0) == 1.0
    assert 0.2 < share(0.5) < 0.8


@pytest.mark.parametrize("world", [4, 6, 8, 12])
def test_meshes_reach_every_factorization(world):
    shapes = {m.shape for m in dst._topology.meshes_list(world, (1, 2, 3))}
    expected = {f for nd in (1, 2, 3) for f in dst.factorizations(world, nd)}
    assert shapes == expected and all(math.prod(f) == world for f in expected)
    for shape in expected:
        found = find(
            dst.meshes(world),
            lambda m, shape=shape: m.shape == shape,
            settings=settings(max_examples=2000, database=None),
        )
        assert found.shape == shape


def test_scenarios_reach_every_factorization_of_four():
    for shape in {f for nd in (1, 2, 3) for f in dst.factorizations(4, nd)}:
        found = find(
            dst.scenarios("roundtrip", world_sizes=(4,)),
            lambda s, shape=shape: s.save.mesh.shape == shape,
            settings=SHRINK,
        )
        assert found.save.mesh.shape == shape


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_parallel_plans_fit_their_mesh(data):
    world = data.draw(st.sampled_from((1, 2, 4)))
    mesh = data.draw(dst.meshes(world, max_dims=2))
    model = data.draw(
        dst.models(tp_size=mesh.shape[-1], experts=mesh.shape[-1] if len(mesh.shape) == 2 else 0)
    )
    device = data.draw(st.sampled_from(S.DEVICES))
    plan = data.draw(dst.parallel_plans(model, mesh, device=device))
    # the plan names the mesh's dims and the model's modules: the scenario validates
    rows = S.TrainingSpec(batch_size=2)  # enough for a BatchNorm
    scenario = S.Scenario(model, S.Topology(world, mesh, plan), training=rows, device=device)
    assert scenario.save.plan_kind in dst._topology.plan_kinds_for(model, mesh, device)


def test_the_job_is_drawn_and_can_be_fixed():
    """A model on a sub-world of its job is a drawn dimension (shrinking to its own
    world); under torchrun the job is fixed to torchrun's world."""
    big = find(dst.scenarios("reshard", world_sizes=(1, 2, 4)), lambda s: s.job_world_size)
    assert big.job_world_size in (2, 4) and big.job_world > big.world_size
    assert (
        find(dst.scenarios("reshard", world_sizes=(1, 2, 4)), lambda s: True).job_world_size is None
    )
    fixed = dst.scenarios("roundtrip", world_sizes=(1, 2), job_world_size=2)
    assert find(fixed, lambda s: True).job_world == 2
    with pytest.raises(InvalidArgument, match="job_world_size=2"):
        dst.scenarios("roundtrip", world_sizes=(1, 4), job_world_size=2).example()


# ---- exclusions: regions a campaign leaves out, in the coverage table's words -------
def _covered(scenario):
    from dcprop.campaign import describe_scenario

    return describe_scenario(scenario)


EXCLUDED_REGIONS = [
    # (property, exclude, a check on each draw, in the words of the coverage table)
    ("reshard", ("plan=fsdp2",), lambda c: "fsdp2" not in c["plan"].split(" -> ")),
    ("roundtrip", ("plan=submesh", "plan=ddp"), lambda c: c["plan"] not in ("submesh", "ddp")),
    ("roundtrip", ("broadcast_from_rank0=true",), lambda c: "broadcast" not in c["options"]),
    (
        "roundtrip",
        ("broadcast_from_rank0=False",),
        lambda c: "broadcast_from_rank0" in c["options"],
    ),
    ("roundtrip", ("full_state_dict=true",), lambda c: c["state dict"] == "sharded"),
    ("roundtrip", ("job=sub-world",), lambda c: c["job"] == "own world"),
    ("roundtrip", ("layout=uneven",), lambda c: c["layout"] == "even"),
    ("roundtrip", ("frozen=some",), lambda c: c["frozen"] == "none frozen"),
    ("finetune_resume", ("cpu_offload=false",), lambda c: "cpu_offload=True" in c["options"]),
]


@pytest.mark.parametrize(("prop", "exclude", "holds"), EXCLUDED_REGIONS)
def test_excluded_regions_are_never_drawn(prop, exclude, holds):
    """Under Hypothesis' health checks: exclusions are choices left out, not a filter
    that rejects many draws."""

    @settings(max_examples=60, database=None, deadline=None)
    @given(dst.scenarios(prop, world_sizes=(1, 2, 3, 4), exclude=exclude))
    def test(scenario):
        assert holds(_covered(scenario)), _covered(scenario)

    test()


@pytest.mark.parametrize(
    "word", ["plan=nope", "nope=true", "cpu_offload=maybe", "broadcast_from_rank0", "job=own"]
)
def test_an_unknown_exclusion_names_the_argument_and_the_valid_words(word):
    with pytest.raises(InvalidArgument) as e:
        dst.scenarios("roundtrip", exclude=[word]).validate()
    message = str(e.value)
    assert f"exclude={word!r} is not a region dcprop can exclude" in message
    assert "plan=fsdp2|ddp|" in message and "broadcast_from_rank0=true|false" in message


@pytest.mark.parametrize(
    ("prop", "kwargs", "message"),
    [
        ("submesh_layout", dict(exclude=["plan=submesh"]), "leaves no plan"),
        ("roundtrip", dict(exclude=["cpu_offload=true", "cpu_offload=false"]), "both values"),
        (
            "roundtrip",
            dict(exclude=["broadcast_from_rank0=false", "full_state_dict=true"]),
            "without the full_state_dict it needs",
        ),
        ("finetune_resume", dict(exclude=["frozen=some"]), "a frozen pretrained part"),
        ("finetune_resume", dict(exclude=["ignore_frozen_params=true"]), "pretrained part"),
        (
            "roundtrip",
            dict(exclude=["job=sub-world"], world_sizes=(1, 2), job_world_size=4),
            "leaves no world size",
        ),
    ],
)
def test_exclusions_that_leave_nothing_to_draw_are_refused(prop, kwargs, message):
    with pytest.raises(InvalidArgument, match="exclude=") as e:
        dst.scenarios(prop, **kwargs).validate()
    assert message in str(e.value)


def test_excluding_sub_worlds_under_a_fixed_job_keeps_the_job_s_own_world():
    @settings(max_examples=20, database=None, deadline=None)
    @given(
        dst.scenarios("roundtrip", world_sizes=(1, 2), job_world_size=2, exclude=["job=sub-world"])
    )
    def test(scenario):
        assert scenario.world_size == 2 and scenario.job_world_size is None

    test()


def test_fsdp1_flat_parameters_freeze_whole_units():
    """FSDP1 without use_orig_params flattens each wrapped unit into one tensor: the
    frozen set is drawn as whole units, several modules at once where a unit has them."""

    def units_frozen_whole(s):
        plan = s.save.plan
        if not isinstance(plan, S.FSDP1Plan) or plan.use_orig_params or not s.frozen:
            return False
        owners = {name.rsplit(".", 1)[0] for name in s.frozen}
        return len({S.flat_unit(n, plan.wrap) for n in s.frozen}) < len(owners)

    found = find(
        dst.scenarios("roundtrip", device="cuda", kinds=("fsdp1",), max_depth=1),
        units_frozen_whole,
        settings=SHRINK,
    )
    for name in found.model.parameter_names():
        unit = S.flat_unit(name, found.save.plan.wrap)
        same = [
            n for n in found.model.parameter_names() if S.flat_unit(n, found.save.plan.wrap) == unit
        ]
        assert (name in found.frozen) == (same[0] in found.frozen)


@settings(max_examples=60, deadline=None)
@given(dst.scenarios("reshard", device="cuda"))
def test_the_shard_count_a_model_is_drawn_for_is_the_topology_s(scenario):
    for topology in (scenario.save, scenario.load):
        plan = topology.plan
        if isinstance(plan, S.FSDP1Plan) and plan.sharding_strategy == "NO_SHARD":
            assert topology.shard_count == 1
        else:
            expected = dst._topology.shard_count(topology.plan_kind, topology.mesh.shape)
            assert topology.shard_count == expected


@settings(max_examples=300, deadline=None, database=None)
@given(dst.scenarios("reshard", device="cuda", kinds=("fsdp1", "fsdp2")))
def test_frozen_sets_fit_the_flat_units_of_both_fsdp1_plans_of_a_reshard(scenario):
    """Drawn whole for the save plan's units and the load plan's at once (the
    scenario validates: nothing is retried)."""
    for topology in (scenario.save, scenario.load):
        plan = topology.plan
        if isinstance(plan, S.FSDP1Plan) and not plan.use_orig_params:
            frozen_by_unit = {}
            for name in scenario.model.parameter_names():
                unit = S.flat_unit(name, plan.wrap)
                frozen_by_unit.setdefault(unit, set()).add(name in scenario.frozen)
            assert all(len(flags) == 1 for flags in frozen_by_unit.values())
