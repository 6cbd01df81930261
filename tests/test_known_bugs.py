"""Known upstream bugs match only their diagnosis.

Each row is a failure as the runner reports it, in a scenario the bug occurs in (it
must be that bug), then the same failure in a near miss: a scenario just outside
the bug's condition, or a failure that shows something the diagnosis does not
predict (it must be new).  These need no ranks; `test_corpus.py` replays the real
failures.
"""

import os

import attrs
import helpers
import pytest

from dcprop import specs as S
from dcprop.corpus import load_entries
from dcprop.errors import RankTimeout
from dcprop.known_bugs import KNOWN_BUGS, match_known
from dcprop.runner.failures import failure_from_outcomes
from dcprop.runner.messages import Outcome

CORPUS = os.path.join(os.path.dirname(__file__), os.pardir, "strategies", "corpus")
ENTRIES = load_entries(CORPUS)


def corpus(bug, entry=None, **fields):
    """The scenario of ``bug``'s corpus entry: the one named ``entry`` (a file name), or
    its only strict one that loads where it saved."""
    found = [
        e
        for e in ENTRIES
        if e.known_bug == bug
        and (
            os.path.basename(e.path) == entry
            if entry
            else e.scenario.load is None and e.scenario.load_topology.state_dict.strict
        )
    ]
    assert len(found) == 1, f"{bug}: name one of {[os.path.basename(e.path) for e in found]}"
    return attrs.evolve(found[0].scenario, **fields)


def options(scenario, **changes):
    """``scenario`` with its (single) topology's state-dict options changed."""
    topology = scenario.save
    return attrs.evolve(
        scenario,
        save=attrs.evolve(topology, state_dict=attrs.evolve(topology.state_dict, **changes)),
    )


def error(rank, signature, message="", keys=()):
    return Outcome(
        rank,
        "error",
        error_type=signature.partition(":")[0],
        message=message or signature,
        signature=signature,
        keys=tuple(keys),
    )


def failed(*outcomes):
    return failure_from_outcomes({o.rank: o for o in outcomes})


def hang(idle_ranks):
    """A hang of rank 0 in the broadcast, beside pool ranks outside the example."""
    return RankTimeout(
        "timed out",
        outcomes={r: Outcome(r, "idle") for r in idle_ranks},
        signature="RankTimeout: ranks did not finish, waiting in _broadcast_state_dict "
        "(_state_dict_utils.py)",
    )


STATELESS = "AssertionError: Expected device to be set @ _load_optim_state_dict"
FLATTEN = "KeyError: 'param_groups.N.params.N' @ _unflatten_state_dict"
FLATTEN_RANK0 = "KeyError: 'state' @ load_state_dict"  # broadcast from rank 0: rank 0 ...
FLATTEN_OTHERS = "KeyError: 'param_groups' @ _load_optim_state_dict"  # ... and the others
VIEW = (
    "RuntimeError: This operation would remove or reshape sharded dimension N, which requires "
    "redistribution. Please redistribute the input first. @ "
    "_propagate_op_sharding_dispatch_slow_path"
)
GROUPS = (
    "ValueError: loaded state dict contains a parameter group that doesn't match the size of "
    "optimizer's group @ load_state_dict"
)
STRICT_MISSING = (
    'RuntimeError: Error(s) in loading state_dict for FSDPModel: Missing key(s) in state_dict: "'
    'experts.N.weight", "experts.N.bias". @ load_state_dict'
)
DIFFERENCES = (
    "PropertyFailure: state after load on rank N: differences in N of N entries (bitwise): "
    "@ assert_same"
)
OFFLOAD = (
    "RuntimeError: Missing key in checkpoint state_dict: model.experts.N.weight. @ "
    "create_default_local_load_plan"
)
KEY_ERROR = "KeyError: 'experts.N.weight' @ _broadcast_state_dict"
TIED = (
    "PropertyFailure: ignore_frozen_params=True but the model state dict on rank N holds "
    "frozen parameters ['model<path>'] @ check_frozen_absent"
)


DIRECT_IO = "OSError: [Errno N] Invalid argument @ close"
DIRECT_IO_ASYNC = (
    'OSError: Unexpected response from worker process: Traceback (most recent call last): File "'
    '<path>", line N, in _write_key @ _recv'
)
EINVAL = "[Errno 22] Invalid argument"
NO_CUDA = "AssertionError: Torch not compiled with CUDA enabled @ _lazy_init"


def with_tc(failure, project="torch_checkpointing"):
    """``failure`` as met with the checkpointer of ``project`` (run_property records it)."""
    failure.checkpointer_project = project
    return failure


def strict_missing(rank, *names):
    listed = ", ".join(f'"{n}"' for n in names)
    message = (
        f"Error(s) in loading state_dict for FSDPModel:\n\tMissing key(s) in state_dict: {listed}. "
    )
    return error(rank, STRICT_MISSING, message)


def lost_expert_state(rank, expert):
    """What the non-strict broadcast load leaves on ``rank``: its expert's optimizer
    state missing under its names, present under integer keys (as seen in the corpus)."""
    names = ("exp_avg", "exp_avg_sq", "step")
    keys = [f"optim/state/experts.{expert}.{p}/{n}" for p in ("bias", "weight") for n in names]
    keys += [f"optim/state/{i}/{n}" for i in (2, 3) for n in names]
    return keys


def kept_frozen(*names):
    listed = [f"model/{n}" for n in names]
    message = (
        f"ignore_frozen_params=True but the model state dict on rank 0 holds frozen "
        f"parameters {listed}"
    )
    return error(0, TIED, message)


def checkpoint_lacks(rank, key, quoting_source=False):
    """``quoting_source``: the message quotes torch's raising line first, as a
    CheckpointException's traceback does."""
    source = '    raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")\n'
    message = f"Missing key in checkpoint state_dict: {key}."
    return error(rank, OFFLOAD, source + message if quoting_source else message)


SUBMESH = corpus("dsd-broadcast-submesh-params", "submesh_layout-c9cd2bf02a.json")
NON_STRICT = options(SUBMESH, strict=False)
OFFLOADED = corpus("dsd-full-offload-drops-submesh-params")
TP = corpus("dtensor-view-size1-shard")
WIDE_TP = attrs.evolve(
    TP,
    model=S.ModelSpec(
        S.Block(
            (
                ("fc0", S.Linear(1, 1)),
                ("mlp", S.Sequential((S.Linear(1, 2), S.Activation(), S.Linear(2, 1)))),
            )
        )
    ),
)
TIED_FROZEN = corpus("dsd-ignore-frozen-tied-alias", "roundtrip-dd07c6005c.json")
# dcprop check found it so in finetune_resume: fine-tuning freezes the pretrained part,
# in which two Linear weights are tied (nothing frozen by the scenario itself)
FINE_TUNED_TIE = S.Scenario(
    S.ModelSpec(
        S.Block(
            (
                ("pretrain", S.Block((("fc0", S.Linear(1, 1)), ("fc1", S.Linear(1, 1))))),
                ("head", S.Linear(1, 1)),
            )
        ),
        ties=(("pretrain.fc0", "pretrain.fc1"),),
    ),
    S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()),
    pretrained="pretrain",
)

# (bug, failure, scenario where it is that bug, near misses: (why, failure, scenario))
PARTIAL = "PropertyFailure: state dict before save on rank N breaks the key contract: @ check"
UNSTEPPED = [f"state.skip1.body.{p}.{n}" for p in ("bias", "weight") for n in ("exp_avg", "step")]


def contract_broken(*problems):
    message = (
        "state dict before save on rank 0 breaks the key contract:\n  "
        + "\n  ".join(problems)
        + "\n  (the contract of fsdp2 on mesh (1,), OptimizerSpec(kind='adam'), options default)"
    )
    return failed(error(0, PARTIAL, message))


def optimizer_misses(*keys):
    return f"optimizer misses {len(keys)} key(s): {sorted(keys)}"


def skipped_first(**fields):
    return corpus("dsd-partial-optimizer-state", **fields)


STRIDED = "AssertionError:  @ _shard_tensor"
EVEN_MLP = S.ModelSpec(
    S.Block(
        (
            ("embed", S.Embedding(2, 2)),
            ("fc0", S.Linear(2, 4)),
            ("mlp", S.Sequential((S.Linear(4, 4), S.Activation(), S.Linear(4, 4)))),
        )
    )
)

CASES = [
    (
        "dsd-full-osd-strided-uneven",
        failed(error(0, STRIDED)),
        corpus("dsd-full-osd-strided-uneven"),
        [
            (
                "the colwise rows divide by tp size times shard size",
                failed(error(0, STRIDED)),
                corpus("dsd-full-osd-strided-uneven", model=EVEN_MLP),
            ),
            (
                "a sharded state dict is distributed by DCP, not DSD",
                failed(error(0, STRIDED)),
                options(corpus("dsd-full-osd-strided-uneven"), full_state_dict=False),
            ),
            (
                "SGD without momentum has no state to distribute",
                failed(error(0, STRIDED)),
                corpus("dsd-full-osd-strided-uneven", optimizer=S.OptimizerSpec()),
            ),
        ],
    ),
    (
        "dsd-partial-optimizer-state",
        contract_broken(optimizer_misses(*UNSTEPPED)),
        skipped_first(),
        [
            (
                "a parameter that every step uses lacks state",
                contract_broken(optimizer_misses(*UNSTEPPED, "state.fc0.weight.step")),
                skipped_first(),
            ),
            (
                "a model key is missing too",
                contract_broken(
                    optimizer_misses(*UNSTEPPED), "model misses 1 key(s): ['fc0.bias']"
                ),
                skipped_first(),
            ),
            (
                "the branch was used before the save",
                contract_broken(optimizer_misses(*UNSTEPPED)),
                skipped_first(training=S.TrainingSpec(steps=2)),
            ),
            (
                "SGD without momentum keeps no state",
                contract_broken(optimizer_misses(*UNSTEPPED)),
                skipped_first(optimizer=S.OptimizerSpec()),
            ),
        ],
    ),
    (
        "dsd-full-osd-stateless-optimizer",
        failed(error(0, STATELESS)),
        corpus("dsd-full-osd-stateless-optimizer"),
        [
            (
                "SGD with momentum has state tensors",
                failed(error(0, STATELESS)),
                corpus("dsd-full-osd-stateless-optimizer", optimizer=S.OptimizerSpec(momentum=0.9)),
            ),
            (
                "Adam has state tensors",
                failed(error(0, STATELESS)),
                corpus("dsd-full-osd-stateless-optimizer", optimizer=S.OptimizerSpec("adam")),
            ),
        ],
    ),
    (
        "dsd-flatten-full-osd",
        failed(error(0, FLATTEN)),
        corpus("dsd-flatten-full-osd", "roundtrip-49f8f14b91.json"),
        [
            (
                "the optimizer state dict is not flattened",
                failed(error(0, FLATTEN)),
                options(
                    corpus("dsd-flatten-full-osd", "roundtrip-49f8f14b91.json"),
                    flatten_optimizer_state_dict=False,
                ),
            ),
        ],
    ),
    (
        "dsd-flatten-full-osd",
        failed(error(0, FLATTEN_RANK0), error(1, FLATTEN_OTHERS)),
        options(
            corpus("dsd-flatten-full-osd", "roundtrip-49f8f14b91.json"), broadcast_from_rank0=True
        ),
        [
            (
                "no broadcast_from_rank0: every rank was given the dict",
                failed(error(0, FLATTEN_RANK0), error(1, FLATTEN_OTHERS)),
                options(
                    corpus("dsd-flatten-full-osd", "roundtrip-49f8f14b91.json"),
                    broadcast_from_rank0=False,
                ),
            ),
            (
                "the optimizer state dict is not flattened",
                failed(error(0, FLATTEN_RANK0), error(1, FLATTEN_OTHERS)),
                options(
                    corpus("dsd-flatten-full-osd", "roundtrip-49f8f14b91.json"),
                    broadcast_from_rank0=True,
                    flatten_optimizer_state_dict=False,
                ),
            ),
        ],
    ),
    (
        "dtensor-view-size1-shard",
        failed(error(0, VIEW)),
        TP,
        [("the colwise Linear has two output features", failed(error(0, VIEW)), WIDE_TP)],
    ),
    (
        "dcp-per-rank-param-groups",
        failed(error(0, GROUPS), error(1, GROUPS)),
        corpus("dcp-per-rank-param-groups"),
        [
            (
                "nothing is frozen: every rank trains as many parameters",
                failed(error(0, GROUPS), error(1, GROUPS)),
                corpus("dcp-per-rank-param-groups", frozen=()),
            ),
            (
                "every expert has its bias frozen: the lists are as long",
                failed(error(0, GROUPS), error(1, GROUPS)),
                corpus("dcp-per-rank-param-groups", frozen=("experts.0.bias", "experts.1.bias")),
            ),
        ],
    ),
    (
        "dcp-per-rank-param-groups",
        failed(error(0, GROUPS), error(1, GROUPS)),
        corpus(
            "dcp-per-rank-param-groups",
            frozen=(),
            model=S.ModelSpec(
                S.Block(
                    (
                        ("fc0", S.Linear(1, 1)),
                        ("experts", S.Experts((S.Linear(1, 1), S.Linear(1, 1, bias=False)))),
                    )
                )
            ),
        ),
        [],
    ),
    (
        "dcp-per-rank-param-groups",
        failed(error(0, GROUPS)),
        attrs.evolve(  # equal experts, saved on their sub-meshes, loaded without experts
            corpus("dcp-per-rank-param-groups", frozen=()),
            load=S.Topology(1, S.MeshSpec((1,), ("shard",)), S.FSDP2Plan()),
        ),
        [
            (
                "loaded on the layout it was saved on",
                failed(error(0, GROUPS)),
                attrs.evolve(
                    corpus("dcp-per-rank-param-groups", frozen=()),
                    load=corpus("dcp-per-rank-param-groups").save,
                ),
            ),
        ],
    ),
    (
        "dsd-broadcast-default-group",
        hang(idle_ranks=()),
        corpus("dsd-broadcast-default-group"),  # a model on a drawn sub-world of its job
        [
            (
                "the model holds every rank of the default group",
                hang(idle_ranks=()),
                corpus("dsd-broadcast-default-group", job_world_size=None),
            ),
        ],
    ),
    (
        "dsd-broadcast-submesh-params",
        failed(*(strict_missing(r, f"experts.{r}.weight", f"experts.{r}.bias") for r in (1, 2))),
        SUBMESH,
        [
            (
                "a missing parameter outside the experts",
                failed(strict_missing(1, "experts.1.weight", "fc0.weight")),
                SUBMESH,
            ),
            (
                "a missing expert that rank 0 holds",
                failed(strict_missing(1, "experts.0.weight")),
                SUBMESH,
            ),
            (
                "no broadcast_from_rank0",
                failed(strict_missing(1, "experts.1.weight")),
                options(SUBMESH, broadcast_from_rank0=False),
            ),
        ],
    ),
    (
        "dsd-broadcast-submesh-params",
        failed(
            Outcome(0, "error", error_type="PeerFailed", signature="PeerFailed: x @ agree"),
            *(error(r, DIFFERENCES, keys=lost_expert_state(r, r)) for r in (1, 2, 3)),
        ),
        NON_STRICT,
        [
            (
                "a wrong value outside the experts",
                failed(error(1, DIFFERENCES, keys=[*lost_expert_state(1, 1), "model/fc0.weight"])),
                NON_STRICT,
            ),
            (
                "only a wrong value outside the experts",
                failed(error(1, DIFFERENCES, keys=["model/fc0.bias"])),
                NON_STRICT,
            ),
            (
                "a wrong value in the expert rank 0 holds",
                failed(error(2, DIFFERENCES, keys=["model/experts.0.weight"])),
                NON_STRICT,
            ),
            (
                "more integer-keyed optimizer entries than lost parameters",
                failed(
                    error(1, DIFFERENCES, keys=[*lost_expert_state(1, 1), "optim/state/0/step"])
                ),
                NON_STRICT,
            ),
            (
                "a PropertyFailure that names no keys",
                failed(error(1, DIFFERENCES)),
                NON_STRICT,
            ),
            (
                "no broadcast_from_rank0",
                failed(error(1, DIFFERENCES, keys=lost_expert_state(1, 1))),
                options(NON_STRICT, broadcast_from_rank0=False),
            ),
        ],
    ),
    (
        "dsd-broadcast-submesh-params",
        failed(*(error(r, KEY_ERROR, message="'experts.0.weight'") for r in (1, 2, 3))),
        options(SUBMESH, full_state_dict=True, cpu_offload=True),
        [
            (
                "without cpu_offload the key is not looked up",
                failed(error(1, KEY_ERROR, message="'experts.0.weight'")),
                options(SUBMESH, full_state_dict=True),
            ),
            (
                "the key is not rank 0's expert",
                failed(error(1, KEY_ERROR, message="'experts.1.weight'")),
                options(SUBMESH, full_state_dict=True, cpu_offload=True),
            ),
            (
                "the key is not an expert's",
                failed(error(1, KEY_ERROR, message="'fc0.weight'")),
                options(SUBMESH, full_state_dict=True, cpu_offload=True),
            ),
        ],
    ),
    (
        "dsd-full-offload-drops-submesh-params",
        failed(
            checkpoint_lacks(0, "model.experts.1.weight"),
            checkpoint_lacks(1, "model.experts.1.weight"),
        ),
        OFFLOADED,
        [
            (
                "the checkpoint lacks a parameter outside the experts",
                failed(checkpoint_lacks(0, "model.fc0.weight", quoting_source=True)),
                OFFLOADED,
            ),
            (
                "only the loading topology drops experts: the checkpoint is whole",
                failed(checkpoint_lacks(0, "model.experts.1.weight")),
                attrs.evolve(options(OFFLOADED, cpu_offload=False), load=OFFLOADED.save),
            ),
            (
                "the checkpoint lacks a parameter outside the experts",
                failed(checkpoint_lacks(0, "model.fc0.weight")),
                OFFLOADED,
            ),
            (
                "the checkpoint lacks the expert that rank 0 holds",
                failed(checkpoint_lacks(1, "model.experts.0.weight")),
                OFFLOADED,
            ),
        ],
    ),
    (
        "dsd-full-offload-drops-submesh-params",
        failed(
            checkpoint_lacks(0, "model.experts.1.weight", quoting_source=True),
            checkpoint_lacks(1, "model.experts.1.weight", quoting_source=True),
        ),
        options(OFFLOADED, broadcast_from_rank0=True),  # the writer ignores the broadcast
        [],
    ),
    (
        "dsd-ignore-frozen-tied-alias",
        failed(kept_frozen("head.weight")),
        TIED_FROZEN,
        [
            (
                "the frozen weight is not tied",
                failed(kept_frozen("head.weight")),
                attrs.evolve(TIED_FROZEN, model=attrs.evolve(TIED_FROZEN.model, ties=())),
            ),
            (
                "the state dict keeps the frozen weight under its first name",
                failed(kept_frozen("embed.weight")),
                TIED_FROZEN,
            ),
        ],
    ),
    (
        "dsd-ignore-frozen-tied-alias",
        failed(kept_frozen("pretrain.fc1.weight")),
        FINE_TUNED_TIE,  # frozen by fine-tuning, which saves without frozen parameters
        [
            (
                "nothing is pretrained: the tied weight trains",
                failed(kept_frozen("pretrain.fc1.weight")),
                attrs.evolve(FINE_TUNED_TIE, pretrained=None),
            ),
        ],
    ),
]


TC_SYNC = "roundtrip-6bf9af1273.json"
CASES += [
    (
        "tc-direct-io-buffered-write",
        with_tc(failed(error(0, DIRECT_IO, EINVAL))),
        corpus("tc-direct-io-buffered-write", TC_SYNC),
        [
            (
                "met with DCP, not torch_checkpointing",
                with_tc(failed(error(0, DIRECT_IO, EINVAL)), "torch"),
                corpus("tc-direct-io-buffered-write", TC_SYNC),
            ),
            (
                "met with your own checkpointer",
                with_tc(failed(error(0, DIRECT_IO, EINVAL)), None),
                corpus("tc-direct-io-buffered-write", TC_SYNC),
            ),
            (
                "a two-rank job (its save fails earlier, in the metadata gather)",
                with_tc(failed(error(0, DIRECT_IO, EINVAL), error(1, DIRECT_IO, EINVAL))),
                corpus("tc-direct-io-buffered-write", TC_SYNC, job_world_size=2),
            ),
        ],
    ),
    (
        "tc-direct-io-buffered-write",
        with_tc(failed(error(0, DIRECT_IO_ASYNC, f"... self._file.close()\nOSError: {EINVAL}\n"))),
        corpus("tc-direct-io-buffered-write", TC_SYNC, storage=S.StorageSpec(async_save=True)),
        [
            (
                "the writer process failed otherwise",
                with_tc(failed(error(0, DIRECT_IO_ASYNC, "...\nPermissionError: [Errno 13]\n"))),
                corpus(
                    "tc-direct-io-buffered-write", TC_SYNC, storage=S.StorageSpec(async_save=True)
                ),
            ),
        ],
    ),
    (
        "tc-metadata-gather-cuda",
        with_tc(failed(error(0, NO_CUDA), error(1, NO_CUDA))),
        corpus("tc-metadata-gather-cuda"),
        [
            (
                "met with DCP, not torch_checkpointing",
                with_tc(failed(error(0, NO_CUDA), error(1, NO_CUDA)), "torch"),
                corpus("tc-metadata-gather-cuda"),
            ),
            (
                "a one-rank job gathers no metadata",
                with_tc(failed(error(0, NO_CUDA))),
                attrs.evolve(
                    corpus("tc-metadata-gather-cuda"),
                    save=corpus("tc-direct-io-buffered-write", TC_SYNC).save,
                ),
            ),
            (
                "a GPU job has CUDA",
                with_tc(failed(error(0, NO_CUDA), error(1, NO_CUDA))),
                corpus("tc-metadata-gather-cuda", device="cuda"),
            ),
        ],
    ),
]

TC_RESHARD = "reshard-8979173bdd.json"
LR_KEPT = (
    "PropertyFailure: full state after resharding fsdpN on mesh (N,) -> hsdp on mesh (N, N) "
    "on rank N: differences in N of N entries (bitwise): @ assert_same"
)


def lr_kept(*keys):
    return with_tc(failed(error(0, LR_KEPT, keys=keys)))


CASES += [
    (
        "tc-reshard-keeps-template-leaves",
        lr_kept("optim/param_groups[0]/lr"),
        corpus("tc-reshard-keeps-template-leaves", TC_RESHARD),
        [
            (
                "met with DCP, not torch_checkpointing",
                with_tc(failed(error(0, LR_KEPT, keys=("optim/param_groups[0]/lr",))), "torch"),
                corpus("tc-reshard-keeps-template-leaves", TC_RESHARD),
            ),
            (
                "a tensor differs too",
                lr_kept("optim/param_groups[0]/lr", "model/fc0.weight"),
                corpus("tc-reshard-keeps-template-leaves", TC_RESHARD),
            ),
            (
                "no scheduler moves the lr",
                lr_kept("optim/param_groups[0]/lr"),
                corpus(
                    "tc-reshard-keeps-template-leaves",
                    TC_RESHARD,
                    optimizer=S.OptimizerSpec("adam"),
                ),
            ),
            (
                "plain SGD has no state to reshard",
                lr_kept("optim/param_groups[0]/lr"),
                corpus(
                    "tc-reshard-keeps-template-leaves",
                    TC_RESHARD,
                    optimizer=S.OptimizerSpec(scheduler=S.SchedulerSpec(kind="linear", factor=0.9)),
                ),
            ),
        ],
    ),
]


# ---- lifecycle programs -----------------------------------------------------------------
DROPPED = (
    "PropertyFailure: state loaded from 'cN' on rank N: differences in N of N entries "
    "(bitwise): @ do"
)
FROZEN_LOAD = corpus("dsd-frozen-optim-state-dropped", "lifecycle-16ac64faeb.json")


def dropped(*keys, extra=""):
    lines = "".join(f"\n  {k}: missing after load" for k in keys)
    where = "\n  at program[3] Load('c0')"
    message = f"state loaded from 'c0' on rank 0: differences ...{lines}{extra}{where}"
    return failed(error(0, DROPPED, message, keys=keys))


NO_STATE = " in checkpoint. The parameter requires gradients but has no saved optimizer state."
PARTIAL = (
    "RuntimeError: Missing optimizer state for parameter 'fcN.bias'" + NO_STATE + " To load "
    "anyway, use StateDictOptions(strict=False). @ _split_optim_state_dict"
)
NO_KEY = (
    "RuntimeError: Missing key in checkpoint state_dict: optim.state.fcN.bias.momentum_buffer. "
    "@ create_default_local_load_plan"
)
UNFROZEN = corpus("dsd-partial-optim-state-init", "lifecycle-6dd21d000d.json")


UNMAPPED = (
    "ValueError: loaded state dict contains a parameter group that doesn't match the size "
    "of optimizer's group @ load_state_dict"
)
FEWER = corpus("dsd-stateless-osd-param-groups-unmapped", "lifecycle-dae676cf79.json")
TIED_RELOAD = corpus("dsd-ignore-frozen-tied-alias", "lifecycle-acf518b80c.json")
VERSUS_REFERENCE = (
    "PropertyFailure: sharded job vs single-process reference on rank N: differences in N "
    "of N entries (rtol=N, atol=Ne-N): @ do"
)


def reloaded(*keys, at="Restart(Topology(1, MeshSpec((1,), ('shard',)), FSDP2Plan()), 'c0')"):
    lines = "".join(f"\n  {k}: 1 of 1 elements differ beyond rtol=0.0001, atol=1e-05" for k in keys)
    message = f"sharded job vs single-process reference on rank 0: ...{lines}\n  at program[1] {at}"
    return failed(error(0, VERSUS_REFERENCE, message, keys=keys))


def no_state(signature, name):
    if signature == PARTIAL:
        message = f"Missing optimizer state for parameter '{name}'{NO_STATE}"
    else:
        message = f"Missing key in checkpoint state_dict: optim.state.{name}.momentum_buffer."
    return failed(error(0, signature, message))


CASES += [
    (
        "dsd-frozen-optim-state-dropped",
        dropped("optim/state/fc0.bias/momentum_buffer"),
        FROZEN_LOAD,
        [
            (
                "the state of a trainable parameter is missing",
                dropped("optim/state/fc0.weight/momentum_buffer"),
                FROZEN_LOAD,
            ),
            (
                "a value differs too",
                dropped(
                    "optim/state/fc0.bias/momentum_buffer",
                    extra="\n  model/fc0.weight: 1 of 1 elements differ bitwise",
                ),
                FROZEN_LOAD,
            ),
            (
                "nothing was frozen before the load",
                dropped("optim/state/fc0.bias/momentum_buffer"),
                attrs.evolve(FROZEN_LOAD, program=(S.Train(), S.Save("c0"), S.Load("c0"))),
            ),
        ],
    ),
    (
        "dsd-partial-optim-state-init",
        no_state(PARTIAL, "fc0.bias"),
        UNFROZEN,
        [
            (
                "the parameter was never unfrozen",
                no_state(PARTIAL, "fc0.weight"),
                UNFROZEN,
            ),
            (
                "no load follows an unfreeze",
                no_state(PARTIAL, "fc0.bias"),
                attrs.evolve(UNFROZEN, program=(S.Save("c0"), S.Load("c0"))),
            ),
        ],
    ),
    ("dsd-partial-optim-state-init", no_state(NO_KEY, "fc0.bias"), UNFROZEN, []),
    (
        "dsd-stateless-osd-param-groups-unmapped",
        failed(error(0, UNMAPPED)),
        FEWER,
        [
            (
                "the optimizer holds state (SGD with momentum)",
                failed(error(0, UNMAPPED)),
                attrs.evolve(FEWER, optimizer=S.OptimizerSpec(momentum=0.9)),
            ),
            (
                "the changed model has every parameter of the saved one",
                failed(error(0, UNMAPPED)),
                attrs.evolve(FEWER, program=(S.Save("c0"), S.Load("c0"))),
            ),
        ],
    ),
    (
        "dsd-ignore-frozen-tied-alias",
        reloaded("model/embed.weight", "model/head.weight"),
        TIED_RELOAD,
        [
            (
                "an entry that is not the tied weight differs too",
                reloaded("model/embed.weight", "model/head.weight", "model/fc0.weight"),
                TIED_RELOAD,
            ),
            (
                "it differs after a train step, not a load",
                reloaded("model/embed.weight", "model/head.weight", at="Train()"),
                TIED_RELOAD,
            ),
            (
                "the tied weight was never frozen",
                reloaded("model/embed.weight", "model/head.weight"),
                attrs.evolve(TIED_RELOAD, frozen=("fc0.weight",)),
            ),
        ],
    ),
]


def test_every_known_bug_has_a_case():
    assert {bug for bug, *_ in CASES} == {b.id for b in KNOWN_BUGS}


@pytest.mark.parametrize(
    ("bug", "failure", "scenario"),
    [case[:3] for case in CASES],
    ids=[f"{case[0]}-{i}" for i, case in enumerate(CASES)],
)
def test_the_diagnosed_failure_is_the_known_bug(bug, failure, scenario):
    known = match_known(failure, scenario)
    assert known is not None and known.id == bug


@pytest.mark.parametrize(
    ("failure", "scenario"),
    [(f, s) for case in CASES for _, f, s in case[3]],
    ids=[f"{case[0]}: {why}" for case in CASES for why, *_ in case[3]],
)
def test_a_near_miss_is_new(failure, scenario):
    assert match_known(failure, scenario) is None


def test_every_failing_rank_must_be_the_bug():
    """A new failure on one rank does not hide behind a known one on another."""
    scenario = corpus("dsd-full-osd-stateless-optimizer")
    both = failed(error(0, STATELESS), error(1, STATELESS))
    assert match_known(both, scenario).id == "dsd-full-osd-stateless-optimizer"
    other = "ValueError: something else @ load_state_dict"
    assert match_known(failed(error(0, STATELESS), error(1, other)), scenario) is None


def test_a_new_failure_on_another_rank_is_new_with_real_ranks(dcprop_runner):
    """The same through a real pool: rank 0 raises what the known bug raises, rank 1
    raises something else."""
    from dcprop.errors import ExampleFailure

    scenario = corpus("dsd-full-osd-stateless-optimizer")
    with pytest.raises(ExampleFailure) as same:
        dcprop_runner.run(helpers._load_optim_state_dict, None, world_size=2)
    assert match_known(same.value, scenario).id == "dsd-full-osd-stateless-optimizer"
    with pytest.raises(ExampleFailure) as different:
        dcprop_runner.run(helpers._load_optim_state_dict, 1, world_size=2)
    assert different.value.signature == STATELESS  # the first rank's looks known
    assert match_known(different.value, scenario) is None


def test_a_sub_world_is_also_seen_in_idle_ranks():
    """A runner whose job is larger than the scenario's (a plain Pool) leaves idle ranks:
    the broadcast over the default group hangs there too."""
    scenario = corpus("dsd-broadcast-default-group", job_world_size=None)
    bug = match_known(hang(idle_ranks=(1, 2, 3)), scenario)
    assert bug is not None and bug.id == "dsd-broadcast-default-group"
