"""The five upstream seed tests (../shared/seeds/INDEX.md) as explicit dcprop scenarios.

World size 4 on CPU with FSDP2 standing in for FSDP1 (``*_FSDP1`` variants run on GPU).
Seed 004 needs 8 ranks upstream; ``SEED_004_WORLD8`` is that exact layout and
``SEED_004`` the same structure at 4 ranks.
"""

from dcprop.specs import *

RELU = Activation()


def _lin(d_in, d_out):
    return Linear(d_in, d_out)


# --- seeds 000/001: test_fine_tuning.py ------------------------------------------
DIM = 500
PRETRAIN = Block(
    (
        ("layer1", _lin(DIM, DIM)),
        ("relu", RELU),
        ("layer2", _lin(DIM, DIM)),
        ("relu1", RELU),
        ("layer3", _lin(DIM, DIM)),
        ("relu2", RELU),
        ("sequential", Sequential((_lin(DIM, DIM), RELU))),
        ("module_list", ModuleList((_lin(DIM, DIM), RELU))),
    )
)
FINETUNE_MODEL = ModelSpec(
    Block(
        (
            ("pretrain", PRETRAIN),
            ("relu", RELU),
            ("layer1", _lin(DIM, DIM)),
            ("relu1", RELU),
            ("layer2", _lin(DIM, DIM)),
            ("relu2", RELU),
            ("layer3", _lin(DIM, DIM)),
            ("relu3", RELU),
        )
    )
)
SEED_000 = Scenario(
    FINETUNE_MODEL,
    Topology(
        4,
        MeshSpec((4,), ("shard",)),
        FSDP2Plan(),
        StateDictSpec(
            ignore_frozen_params=True, keep_submodule_prefixes=False, submodules=("pretrain",)
        ),
    ),
    frozen=tuple(n for n in FINETUNE_MODEL.parameter_names() if n.startswith("pretrain.")),
    optimizer=OptimizerSpec("adam", lr=1e-3),
    training=TrainingSpec(steps=3, batch_size=8),
    pretrained="pretrain",
)

# --- seed 002: test_hsdp_checkpoint.py ---------------------------------------------
SIMPLE = ModelSpec(
    Block(
        (
            ("net1", _lin(5, 8)),
            ("relu", RELU),
            ("net2", _lin(8, 4)),
            ("relu1", RELU),
            ("net3", _lin(4, 12)),
            ("relu2", RELU),
        )
    )
)
SIMPLE_UNEVEN = ModelSpec(
    Block(
        (
            ("net1", _lin(5, 10)),
            ("relu", RELU),
            ("net2", _lin(10, 15)),
            ("relu1", RELU),
            ("net3", _lin(15, 30)),
            ("relu2", RELU),
            ("net4", _lin(30, 5)),
            ("relu3", RELU),
        )
    )
)
HSDP = Topology(4, MeshSpec((2, 2), ("replicate", "shard")), FSDP2Plan(replicate_dim="replicate"))
FSDP_1D = Topology(4, MeshSpec((4,), ("shard",)), FSDP2Plan())
SEED_002_EVEN = Scenario(
    SIMPLE, HSDP, optimizer=OptimizerSpec("adam", lr=0.1), training=TrainingSpec(batch_size=4)
)
SEED_002_UNEVEN = Scenario(
    SIMPLE_UNEVEN,
    HSDP,
    optimizer=OptimizerSpec("adam", lr=0.1),
    training=TrainingSpec(batch_size=4),
)
SEED_002_CONVERSION = Scenario(
    SIMPLE_UNEVEN,
    HSDP,
    load=FSDP_1D,
    optimizer=OptimizerSpec("adam", lr=0.1),
    training=TrainingSpec(batch_size=4),
)

# --- seed 003: test_fsdp_fine_tune.py ----------------------------------------------
SEQ = ModelSpec(
    Block((("seq", Sequential(tuple(x for _ in range(6) for x in (_lin(5, 5), RELU)))),))
)
ALTERNATING_FROZEN = tuple(
    f"seq.{i * 2}.{p}" for i in range(6) if i % 2 == 0 for p in ("weight", "bias")
)
SEED_003_PARITY = Scenario(
    SEQ,
    Topology(
        4, MeshSpec((4,), ("shard",)), FSDP2Plan(wrap=tuple(f"seq.{i * 2}" for i in range(6)))
    ),
    frozen=ALTERNATING_FROZEN,
    optimizer=OptimizerSpec("adam", lr=1e-2),
    training=TrainingSpec(steps=6, batch_size=8),
)
UNUSED = ModelSpec(
    Block(
        (
            (
                "layers",
                Branches(
                    (
                        Linear(4, 4, unused_input=True),
                        Linear(4, 4, unused_input=True),
                        Linear(4, 4, unused_input=True),
                    ),
                    concat_input=True,
                ),
            ),
        )
    )
)
SEED_003_UNUSED_INPUT = Scenario(
    UNUSED,
    Topology(4, MeshSpec((4,), ("shard",)), FSDP2Plan(wrap=("layers.0", "layers.1", "layers.2"))),
    frozen=("layers.1.bias", "layers.1.weight"),
    optimizer=OptimizerSpec("adam", lr=1e-2),
    training=TrainingSpec(steps=6, batch_size=4, input_requires_grad=True),
)
MULTI_TRAVERSAL = ModelSpec(
    Block(
        (
            ("layer_0", _lin(5, 5)),
            (
                "loop",
                Repeat(
                    Block((("layer_with_grad", _lin(5, 5)), ("layer_no_grad", _lin(5, 5)))),
                    times=10,
                    no_grad_residual=True,
                ),
            ),
        )
    )
)
SEED_003_MULTI_TRAVERSAL = Scenario(
    MULTI_TRAVERSAL,
    Topology(
        4,
        MeshSpec((4,), ("shard",)),
        FSDP2Plan(wrap=("layer_0", "loop.body.layer_with_grad", "loop.body.layer_no_grad")),
    ),
    frozen=("loop.body.layer_no_grad.bias", "loop.body.layer_no_grad.weight"),
    optimizer=OptimizerSpec("adam", lr=1e-2),
    training=TrainingSpec(steps=6, batch_size=8),
)
SEED_003_FSDP1 = Scenario(
    SEQ,
    Topology(
        2,
        MeshSpec((2,), ("shard",)),
        FSDP1Plan(
            "SHARD_GRAD_OP", use_orig_params=False, wrap=tuple(f"seq.{i * 2}" for i in range(6))
        ),
    ),
    frozen=ALTERNATING_FROZEN,
    optimizer=OptimizerSpec("adam", lr=1e-2),
    training=TrainingSpec(steps=6, batch_size=8),
    device="cuda",
)


# --- seed 004: test_fsdp_ep.py -----------------------------------------------------
def _ep_model(experts):
    ep = Block(
        (("net1", Sequential((_lin(16, 16), RELU))), ("net2", Sequential((_lin(16, 16), RELU))))
    )
    return ModelSpec(
        Block(
            (
                (
                    "second",
                    Block(
                        (
                            ("ep_layers", Experts((ep,) * experts)),
                            ("net", Sequential((_lin(16, 16), RELU))),
                        )
                    ),
                ),
                ("net", Sequential((_lin(16, 16), RELU))),
            )
        )
    )


SEED_004_WORLD8 = Scenario(
    _ep_model(4),
    Topology(
        8,
        MeshSpec((2, 4), ("shard", "ep")),
        FSDP2Plan(wrap=("second",), experts=ExpertParallel("second.ep_layers")),
    ),
    optimizer=OptimizerSpec("adam", lr=0.1),
)
SEED_004 = Scenario(
    _ep_model(2),
    Topology(
        4,
        MeshSpec((2, 2), ("shard", "ep")),
        FSDP2Plan(wrap=("second",), experts=ExpertParallel("second.ep_layers")),
    ),
    optimizer=OptimizerSpec("adam", lr=0.1),
)

#: (property, scenario) for every seed scenario that runs on 4 CPU ranks
CPU_SEEDS = {
    "000-finetune": ("finetune_resume", SEED_000),
    "002-hsdp-even": ("roundtrip", SEED_002_EVEN),
    "002-hsdp-uneven": ("roundtrip", SEED_002_UNEVEN),
    "002-hsdp-to-fsdp": ("reshard", SEED_002_CONVERSION),
    "003-alternating-frozen": ("ddp_parity", SEED_003_PARITY),
    "003-unused-input": ("ddp_parity", SEED_003_UNUSED_INPUT),
    "003-multi-traversal": ("ddp_parity", SEED_003_MULTI_TRAVERSAL),
    "004-expert-submesh": ("submesh_layout", SEED_004),
}
