"""Strategies for optimizers, state-dict options, storage and training settings."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from dcprop import specs as S
from dcprop.strategies._lazy import defines_strategy
from dcprop.strategies._validation import check_choices, check_int, check_type

OPTIMIZER_KINDS = ("sgd", "adam", "adamw")


@st.composite
def _optimizers(draw: Any, kinds: tuple[str, ...]) -> S.OptimizerSpec:
    # Every branch makes the same draws: Hypothesis orders examples by their choice
    # sequence, shortest first, so a branch with fewer draws would pass for "simpler".
    kind = draw(st.sampled_from(kinds))
    lr = draw(st.sampled_from((0.01, 0.1, 0.001)))
    momentum = draw(st.sampled_from((0.0, 0.9)))
    decay = draw(st.sampled_from((0.0, 0.01)))
    return S.OptimizerSpec(
        kind,
        lr=lr,
        momentum=momentum if kind == "sgd" else 0.0,
        weight_decay=0.0 if kind == "adam" else decay,
        scheduler=draw(st.sampled_from(_SCHEDULERS)),
    )


# One draw, so that a scheduler costs the choice sequence (and shrinking) little.
_SCHEDULERS = (
    None,
    S.SchedulerSpec("step"),
    S.SchedulerSpec("linear", period=3),
    S.SchedulerSpec("step", period=2, factor=0.9),
    S.SchedulerSpec("linear", period=1, factor=0.9),
)


@defines_strategy
def optimizers(kinds: Any = OPTIMIZER_KINDS) -> st.SearchStrategy[S.OptimizerSpec]:
    """SGD (with and without momentum), Adam, AdamW with weight decay, each with or
    without an LR scheduler (StepLR, LinearLR).

    Shrinks toward plain SGD with lr 0.01 and no scheduler.
    """
    return _optimizers(check_choices("kinds", kinds, OPTIMIZER_KINDS))


@st.composite
def _state_dicts(draw: Any, full: bool | None) -> S.StateDictSpec:
    full_sd = draw(st.booleans()) if full is None else full
    return S.StateDictSpec(
        full_state_dict=full_sd,
        cpu_offload=draw(st.booleans()),
        ignore_frozen_params=draw(st.booleans()),
        flatten_optimizer_state_dict=draw(st.booleans()),
        broadcast_from_rank0=full_sd and draw(st.booleans()),
    )


@defines_strategy
def state_dict_options(
    *,
    full_state_dict: bool | None = None,
) -> st.SearchStrategy[S.StateDictSpec]:
    """``StateDictOptions`` as data: full or sharded, cpu_offload, ignore_frozen_params,
    flatten_optimizer_state_dict, broadcast_from_rank0 (full only).  ``full_state_dict``
    fixes that choice.  Shrinks toward the defaults (sharded, nothing set)."""
    if full_state_dict is not None:
        check_type("full_state_dict", full_state_dict, bool)
    return _state_dicts(full_state_dict)


@st.composite
def _storage(draw: Any) -> S.StorageSpec:
    return S.StorageSpec(
        single_file_per_rank=not draw(st.booleans()),
        thread_count=draw(st.integers(1, 2)),
        async_save=draw(st.booleans()),
    )


@defines_strategy
def storage_options() -> st.SearchStrategy[S.StorageSpec]:
    """DCP FileSystemWriter options and sync/async save.  Shrinks toward the defaults."""
    return _storage()


@st.composite
def _trainings(
    draw: Any, min_steps: int, max_steps: int, min_batch: int, max_batch: int, input_grad: bool
) -> S.TrainingSpec:
    return S.TrainingSpec(
        steps=draw(st.integers(min_steps, max_steps)),
        batch_size=draw(st.integers(min_batch, max_batch)),
        input_requires_grad=input_grad and draw(st.booleans()),
        data_seed=draw(st.integers(0, 2**16)),
    )


@defines_strategy
def trainings(
    *,
    min_steps: int = 1,
    max_steps: int = 3,
    min_batch: int = 1,
    max_batch: int = 4,
    input_requires_grad: bool = True,
) -> st.SearchStrategy[S.TrainingSpec]:
    """Steps, per-rank batch size, whether the input requires grad, and the data seed.
    Shrinks toward one step of the smallest batch."""
    check_int("min_steps", min_steps, min_value=1, max_value=64)
    check_int("max_steps", max_steps, min_value=min_steps, max_value=64)
    check_int("min_batch", min_batch, min_value=1)
    check_int("max_batch", max_batch, min_value=min_batch)
    check_type("input_requires_grad", input_requires_grad, bool)
    return _trainings(min_steps, max_steps, min_batch, max_batch, input_requires_grad)
