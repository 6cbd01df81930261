import pickle

import attrs
import pytest

import dcprop.specs as S
from dcprop import serialization
from dcprop.errors import SpecError

M = S.ModelSpec(S.Block((("fc", S.Linear(4, 8)), ("act", S.Activation()), ("out", S.Linear(8, 4)))))
FSDP2 = S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan())


LOW_PRECISION = S.ModelSpec(
    S.Block(
        (("fc", S.Linear(4, 8)), ("act", S.Activation()), ("out", S.Linear(8, 4, dtype="bf16")))
    )
)


def scenario(**kw):
    return S.Scenario(**{"model": M, "save": FSDP2, **kw})


INVALID = [
    (
        lambda: S.Topology(4, S.MeshSpec((2, 3), ("a", "b")), S.DDPPlan()),
        "mesh (2, 3) has 6 ranks but world_size is 4",
    ),
    (lambda: S.MeshSpec((2, 2, 2, 2), ("a", "b", "c", "d")), "must have 1 to 3 dims"),
    (lambda: S.MeshSpec((2,), ("a", "b")), "has 1 dims but dim_names"),
    (lambda: S.Topology(4, S.MeshSpec((2, 2), ("a", "b")), S.DDPPlan()), "DDPPlan needs a 1D mesh"),
    (lambda: S.Topology(2, S.MeshSpec((2,), ("x",)), S.FSDP2Plan()), "uses mesh dims ['shard']"),
    (
        lambda: S.ModelSpec(S.Block((("a", S.Linear(4, 8)), ("b", S.Linear(4, 2))))),
        "Linear at 'b' has in_features=4 but its input has width 8",
    ),
    (
        lambda: S.ModelSpec(S.Block((("a", S.Linear(4, 4)), ("e", S.Embedding(3, 4))))),
        "must be the model's first layer",
    ),
    (
        lambda: S.ModelSpec(S.Block((("a", S.Linear(4, 4)), ("b", S.Linear(4, 8)))), (("a", "b"),)),
        "weights must exist and have one shape",
    ),
    (lambda: S.StateDictSpec(broadcast_from_rank0=True), "needs full_state_dict=True"),
    (lambda: S.StateDictSpec(keep_submodule_prefixes=False), "only means something with"),
    (lambda: S.OptimizerSpec("adam", momentum=0.9), "momentum=0.9 is an SGD option"),
    (lambda: scenario(frozen=("nope.weight",)), "frozen names ['nope.weight']"),
    (
        lambda: scenario(frozen=("fc.weight", "fc.bias", "out.weight", "out.bias")),
        "freezes every parameter",
    ),
    (
        lambda: scenario(save=S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP1Plan())),
        "needs device='cuda'",
    ),
    (
        lambda: scenario(
            save=S.Topology(
                2,
                S.MeshSpec((1, 2), ("shard", "tp")),
                S.FSDP2Plan(tp=S.TensorParallel("tp", (("fc", "out"),))),
            )
        ),
        None,
    ),
    (
        lambda: S.Scenario(
            S.ModelSpec(
                S.Block((("fc", S.Linear(4, 3)), ("act", S.Activation()), ("out", S.Linear(3, 4))))
            ),
            S.Topology(
                2,
                S.MeshSpec((1, 2), ("shard", "tp")),
                S.FSDP2Plan(tp=S.TensorParallel("tp", (("fc", "out"),))),
            ),
        ),
        "hidden width 3 must be divisible by mesh dim 'tp' of size 2 (3 % 2 = 1)",
    ),
    (
        lambda: scenario(
            save=S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan(wrap=("missing",)))
        ),
        "wraps 'missing', which is not a submodule path",
    ),
    (
        lambda: S.Scenario(
            S.ModelSpec(S.Block((("a", S.Linear(4, 4)), ("b", S.Linear(4, 4)))), (("a", "b"),)),
            S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan(wrap=("b",))),
        ),
        "holds one side of the tie",
    ),
    (
        lambda: S.Scenario(
            S.ModelSpec(S.Block((("a", S.Linear(4, 4)), ("bn", S.BatchNorm(4))))),
            FSDP2,
            training=S.TrainingSpec(batch_size=1),
        ),
        "BatchNorm needs at least 2",
    ),
    (
        lambda: S.ModelSpec(S.Block((("a", S.Linear(4, 4)), ("s", S.Skip(S.Linear(4, 2)))))),
        "Skip at 's' needs children that keep the width, but 's.body' maps 4 -> 2",
    ),
    (
        lambda: S.ModelSpec(S.Block((("r", S.Repeat(S.Skip(S.Linear(4, 4)))),))),
        "Repeat at 'r' holds a Skip",
    ),
    (lambda: S.Skip(S.Linear(4, 4), period=3, phase=3), "phase=3: must be < period=3"),
    (
        lambda: S.ModelSpec(
            S.Block((("a", S.Linear(4, 4)), ("b", S.Linear(4, 4, dtype="bf16")))), (("a", "b"),)
        ),
        "one shared weight has one dtype, got ['bf16', 'fp32']",
    ),
    (
        lambda: scenario(model=LOW_PRECISION),
        "unit '<root>' mixes parameter dtypes ['bf16', 'fp32']",
    ),
    (  # control: the low-precision Linear wrapped on its own
        lambda: scenario(
            model=LOW_PRECISION,
            save=S.Topology(2, S.MeshSpec((2,), ("shard",)), S.FSDP2Plan(wrap=("out",))),
        ),
        None,
    ),
    (  # control: FSDP2 checks trainable parameters only, as torch does
        lambda: scenario(model=LOW_PRECISION, frozen=("out.weight", "out.bias")),
        None,
    ),
    (
        lambda: S.Scenario(
            S.ModelSpec(S.Block((("a", S.Linear(4, 4)), ("x", S.Experts((S.Linear(4, 4),) * 3))))),
            S.Topology(
                4, S.MeshSpec((2, 2), ("shard", "ep")), S.FSDP2Plan(experts=S.ExpertParallel("x"))
            ),
        ),
        "has 3 experts but mesh dim 'ep' has size 2",
    ),
]


@pytest.mark.parametrize(("make", "message"), INVALID)
def test_invalid_specs_name_the_problem(make, message):
    if message is None:  # a valid control row: the table's neighbours fail for their reason
        make()
        return
    with pytest.raises(SpecError) as info:
        make()
    assert message in str(info.value)


# Every field check raises SpecError naming the field and the value: attrs' own
# validators raised bare TypeError/ValueError, and float converters took True as 1.0.
BAD_FIELDS = [
    (lambda: S.OptimizerSpec(lr=True), "lr=True: expected float, got bool"),
    (lambda: S.OptimizerSpec(lr="0.1"), "lr='0.1': expected float, got str"),
    (lambda: S.Linear(True, 8), "in_features=True: expected int, got bool"),
    (lambda: S.Linear(4, 0), "out_features=0: must be >= 1"),
    (lambda: S.TrainingSpec(steps=65), "steps=65: must be <= 64"),
    (lambda: S.StorageSpec(thread_count=0), "thread_count=0: must be >= 1"),
    (lambda: S.Activation("swish"), "kind='swish': expected one of"),
    (lambda: S.MeshSpec((2.0,), ("a",)), "shape=(2.0,): expected a tuple of int"),
    (lambda: S.Repeat(S.MeshSpec((1,), ("a",))), "body=MeshSpec((1,), ('a',)): expected Linear"),
    (lambda: S.Sequential(S.Linear(1, 1)), "layers=Linear(1, 1): expected a tuple of"),
    (lambda: scenario(frozen="fc.weight"), "frozen='fc.weight': expected a tuple of str"),
    (lambda: scenario(pretrained=3), "pretrained=3: expected str"),
    (lambda: S.Linear(4, 4, dtype="float32"), "dtype='float32': expected one of"),
    (lambda: S.Mask(4, cache=1), "cache=1: expected bool, got int"),
    (lambda: S.Skip(S.Linear(4, 4), period=1), "period=1: must be >= 2"),
]


@pytest.mark.parametrize(("make", "message"), BAD_FIELDS)
def test_bad_field_values_raise_spec_error_naming_the_field(make, message):
    with pytest.raises(SpecError) as info:
        make()
    assert message in str(info.value)


def test_a_corpus_file_with_an_out_of_range_value_names_the_file(tmp_path):
    from dcprop.corpus import load_entries

    data = serialization.to_json(scenario(storage=S.StorageSpec(thread_count=2)))
    data["storage"]["thread_count"] = 0
    path = tmp_path / "roundtrip-bad.json"
    path.write_text(serialization.json.dumps({"property": "roundtrip", "scenario": data}))
    with pytest.raises(SpecError) as info:
        load_entries(str(tmp_path))
    assert "roundtrip-bad.json: thread_count=0: must be >= 1" in str(info.value)


def test_spec_classes_are_frozen_and_slotted():
    classes = [getattr(S, n) for n in S.__all__ if attrs.has(getattr(S, n))]
    assert S.Scenario in classes and S.Linear in classes
    for cls in classes:
        assert "__slots__" in cls.__dict__, cls.__name__
        bare = cls.__new__(cls)  # no validation needed to test assignment
        fields = attrs.fields(cls)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(bare, fields[0].name if fields else "anything", None)


def test_repr_pickle_json_round_trip():
    s = scenario(
        frozen=("fc.bias",),
        load=S.Topology(
            4, S.MeshSpec((2, 2), ("replicate", "shard")), S.FSDP2Plan(replicate_dim="replicate")
        ),
    )
    assert eval(repr(s), vars(S)) == s
    assert pickle.loads(pickle.dumps(s)) == s
    assert serialization.loads(serialization.dumps(s)) == s
    assert repr(S.Linear(4, 8)) == "Linear(4, 8)"  # defaults left out


def test_new_layers_round_trip_through_repr_pickle_and_json():
    model = S.ModelSpec(
        S.Block(
            (
                ("fc", S.Linear(4, 4, dtype="fp16")),
                ("mask", S.Mask(4, cache=True)),
                ("skip", S.Skip(S.Sequential((S.Linear(4, 4), S.Activation("tanh"))), 3, 2)),
            )
        )
    )
    assert eval(repr(model), vars(S)) == model
    assert pickle.loads(pickle.dumps(model)) == model
    assert serialization.loads(serialization.dumps(model)) == model
    assert repr(S.Skip(S.Linear(2, 2))) == "Skip(Linear(2, 2))"


def test_buffers_split_into_persistent_and_not():
    model = S.ModelSpec(
        S.Block((("fc", S.Linear(4, 4)), ("m", S.Mask(4, cache=True)), ("s", S.Skip(S.Mask(4)))))
    )
    assert model.buffers() == {"m.keep": (4,), "s.calls": (), "s.body.keep": (4,)}
    assert model.non_persistent_buffers() == {"m.cache": (4,)}


def test_idle_parameters_follow_each_skips_calls():
    inner = S.Skip(S.Linear(4, 4), period=2, phase=1)
    model = S.ModelSpec(
        S.Block(
            (
                ("fc", S.Linear(4, 4)),
                ("late", S.Skip(S.Linear(4, 4), period=3, phase=1)),
                ("outer", S.Skip(S.Block((("inner", inner),)), period=2, phase=0)),
                ("tied", S.Linear(4, 4)),
            )
        ),
        ties=(("tied", "late.body"),),
    )
    late = {"late.body.bias"}  # its weight is tied.weight, which every step uses
    inner_params = {"outer.body.inner.body.weight", "outer.body.inner.body.bias"}
    assert model.idle_parameters(0) == set(model.parameter_names())
    assert model.idle_parameters(1) == late | inner_params
    assert model.idle_parameters(2) == inner_params
    # outer applies its body on steps 0 and 2, where inner's calls 0 and 1 fall: the
    # second one (step 2) is inner's first use
    assert model.idle_parameters(3) == frozenset()


def test_json_rejects_unknown_types():
    with pytest.raises(SpecError, match="unknown spec type 'Nope'"):
        serialization.from_json({"type": "Nope"})


def test_parameter_names_match_torch_with_ties():
    from dcprop.build import build_model

    model = S.ModelSpec(
        S.Block(
            (
                ("embed", S.Embedding(5, 3)),
                ("fc", S.Linear(3, 3)),
                ("bn", S.BatchNorm(3)),
                ("head", S.Linear(3, 5, bias=False)),
            )
        ),
        (("embed", "head"),),
    )
    built = build_model(model)
    assert list(model.parameter_names()) == [n for n, _ in built.named_parameters()]
    assert set(model.buffers()) == {n for n, _ in built.named_buffers()}
    assert built.head.weight is built.embed.weight


def test_plan_kinds_and_counts():
    t = S.Topology(
        8,
        S.MeshSpec((2, 2, 2), ("replicate", "shard", "tp")),
        S.FSDP2Plan(replicate_dim="replicate", tp=S.TensorParallel("tp", (("a", "b"),))),
    )
    assert (t.plan_kind, t.shard_count, t.dp_size) == ("hsdp+tp", 2, 4)


@pytest.mark.parametrize(
    "mesh, plan, shards",
    [
        (S.MeshSpec((4,), ("dp",)), S.DDPPlan(), 1),
        (S.MeshSpec((2, 2), ("replicate", "shard")), S.FSDP2Plan(replicate_dim="replicate"), 2),
        (S.MeshSpec((2, 2), ("shard", "ep")), S.FSDP2Plan(experts=S.ExpertParallel("moe")), 4),
        (S.MeshSpec((2, 2), ("r", "s")), S.FSDP1Plan("HYBRID_SHARD"), 2),
        (S.MeshSpec((4,), ("shard",)), S.FSDP1Plan("NO_SHARD"), 1),
    ],
)
def test_a_plan_names_the_mesh_dims_that_split_dim_0(mesh, plan, shards):
    topology = S.Topology(mesh.size, mesh, plan)
    assert topology.shard_count == mesh.size_of(plan.split_dims(mesh)) == shards


def test_feeding_names_the_parameters_that_reach_a_module():
    model = S.ModelSpec(
        S.Block(
            (
                ("fc", S.Linear(2, 2)),
                (
                    "br",
                    S.Branches((S.Linear(2, 2), S.Sequential((S.Linear(2, 2), S.BatchNorm(2))))),
                ),
                ("rep", S.Repeat(S.Sequential((S.BatchNorm(4), S.Linear(4, 4))))),
            )
        )
    )
    fc = {"fc.weight", "fc.bias"}
    assert model.feeding("fc") == frozenset()
    # a sibling branch sees the same input, so it does not feed
    assert model.feeding("br.1.1") == fc | {"br.1.0.weight", "br.1.0.bias"}
    # a second pass of a Repeat sees what its body computed on the first
    branches = {f"br.{m}.{p}" for m in ("0", "1.0", "1.1") for p in ("weight", "bias")}
    body = {f"rep.body.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    assert model.feeding("rep.body.0") == fc | branches | body
    with pytest.raises(SpecError, match="no module at path 'nope'"):
        model.feeding("nope")
