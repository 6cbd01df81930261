"""finetune_resume: pretrain, fine-tune on top of the frozen pretrained submodule, save
only trainable state, restart, resume (generalizes PyTorch's
``test/distributed/checkpoint/e2e/test_fine_tuning.py``).

1. A random pretrain model (the scenario's ``pretrained`` submodule on its own) is
   trained and saved with DCP.
2. A fine-tuning model is built with fresh weights; its pretrained submodule is
   frozen and loaded from the pretrain checkpoint through ``get_model_state_dict``
   with ``submodules`` and ``keep_submodule_prefixes=False``, then
   ``set_model_state_dict(..., strict=False)``.  It trains, saves its trainable
   state (``ignore_frozen_params=True``), and trains on: the uninterrupted run.
3. A restarted process builds it again from fresh weights, loads the pretrained
   part the same way, loads the fine-tuning checkpoint, and resumes.

The resumed losses and final parameters equal the uninterrupted run's, bitwise,
and the pretrained weights are exactly the saved ones throughout.
"""

from __future__ import annotations

from typing import Any, cast

import attrs
import torch

from dcprop import specs as S
from dcprop.compare import assert_same, same_bits
from dcprop.errors import PropertyFailure, UsageError
from dcprop.properties._harness import (
    DEFAULT_HOOKS,
    Hooks,
    Job,
    load_template_overrides,
    setup,
    state_dict_options,
)
from dcprop.runner.execute import RankContext

__all__ = ["finetune_resume", "pretrain_scenario"]


def finetune_resume(
    ctx: RankContext, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS
) -> dict[str, Any]:
    if scenario.pretrained is None:
        raise UsageError("finetune_resume needs a scenario with pretrained=<submodule>")
    prefix = scenario.pretrained + "."
    steps = scenario.training.steps

    pre = setup(ctx, pretrain_scenario(scenario), pretrain_scenario(scenario).save, hooks=hooks)
    if pre is None:
        return {}
    for _ in range(steps):
        pre.train_step()
    state = pre.state()
    pre.check_keys(state, "before save")
    pre.save(state, "pretrain")
    pretrained = {prefix + k: v for k, v in pre.full_parameters().items()}

    frozen = scenario.fine_tuning_frozen
    first = _finetune_job(ctx, scenario, frozen, scenario.seed + 1, hooks)
    _check_pretrained(first, pretrained, "after loading the pretrain checkpoint")
    for _ in range(steps):
        first.train_step()
    state = first.state(ignore_frozen_params=True)
    first.check_keys(state, "before save", ignore_frozen_params=True)
    first.save(state, "finetune")
    uninterrupted = [first.train_step() for _ in range(steps)]
    expected = first.full_parameters()

    second = _finetune_job(ctx, scenario, frozen, scenario.seed + 2, hooks)
    second.restore("finetune", ignore_frozen_params=True)
    loaded = second.state(ignore_frozen_params=True)
    second.check_keys(loaded, "after load", ignore_frozen_params=True)
    second.resume_at(steps)
    resumed = [second.train_step() for _ in range(steps)]
    if not same_bits(resumed, uninterrupted):
        raise PropertyFailure(
            f"resumed losses {resumed} != uninterrupted {uninterrupted} (rank {ctx.rank})"
        )
    assert_same(expected, second.full_parameters(), what="parameters after resuming", rank=ctx.rank)
    _check_pretrained(second, pretrained, "after resuming")
    return {"losses": resumed}


def _finetune_job(
    ctx: Any, scenario: S.Scenario, frozen: tuple[str, ...], seed: int, hooks: Hooks
) -> Job:
    """A fresh fine-tuning job whose pretrained submodule is loaded the way PyTorch's
    ``test/distributed/checkpoint/e2e/test_fine_tuning.py`` loads it."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    job = Job(ctx, scenario, scenario.save, seed=seed, frozen=frozen, hooks=hooks)
    assert scenario.pretrained is not None
    sub = _unwrapped(job.model).get_submodule(scenario.pretrained)
    options = scenario.save.state_dict
    # The pretrained weights are frozen and are exactly what must be loaded here.
    read = state_dict_options(
        options,
        keep_submodule_prefixes=False,
        ignore_frozen_params=False,
        **load_template_overrides(options),
    )
    partial = get_model_state_dict(job.model, submodules={sub}, options=read)
    loaded = {"model": partial}
    job.load(loaded, "pretrain")
    partial = loaded["model"]
    write = state_dict_options(options, strict=False, ignore_frozen_params=False)
    if write.broadcast_from_rank0 and ctx.rank != 0:
        partial = {}
    # keyed by module, as test_fine_tuning.py does
    set_model_state_dict(job.model, cast(Any, {sub: partial}), options=write)
    return job


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _check_pretrained(job: Job, pretrained: dict[str, torch.Tensor], when: str) -> None:
    current = {k: v for k, v in job.full_parameters().items() if k in pretrained}
    assert_same(pretrained, current, what=f"pretrained weights {when}", rank=job.rank)


def pretrain_scenario(scenario: S.Scenario) -> S.Scenario:
    """The pretrain phase: the pretrained submodule alone, on the same topology."""
    assert scenario.pretrained is not None and scenario.pretrained_model is not None
    prefix = scenario.pretrained + "."
    save = attrs.evolve(
        scenario.save,
        plan=_restrict(scenario.save.plan, prefix),
        state_dict=attrs.evolve(
            scenario.save.state_dict, submodules=(), keep_submodule_prefixes=True
        ),
    )
    return attrs.evolve(
        scenario, model=scenario.pretrained_model, save=save, load=None, frozen=(), pretrained=None
    )


def _restrict(plan: Any, prefix: str) -> Any:
    def inside(paths: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(p[len(prefix) :] for p in paths if p.startswith(prefix))

    if isinstance(plan, S.FSDP2Plan):
        tp = plan.tp
        if tp is not None:
            pairs = tuple(
                (c[len(prefix) :], r[len(prefix) :]) for c, r in tp.pairs if c.startswith(prefix)
            )
            tp = attrs.evolve(tp, pairs=pairs) if pairs else None
            if tp is None:
                raise PropertyFailure(
                    "a tensor-parallel plan must place a pair inside the "
                    f"pretrained submodule {prefix[:-1]!r} too"
                )
        return attrs.evolve(plan, wrap=inside(plan.wrap), tp=tp)
    if isinstance(plan, S.FSDP1Plan):
        return attrs.evolve(plan, wrap=inside(plan.wrap))
    return plan
