"""ddp_parity: sharded training with a frozen subset matches DDP and a single-process
reference (generalizes PyTorch's ``test/distributed/fsdp/test_fsdp_fine_tune.py``).

The same global batches train three models for several steps: the scenario's
sharded plan, DDP over the same ranks, and a single process that replays every
data-parallel rank's rows in turn (so layers with batch statistics see the same
per-rank batches).  Per-step losses, final parameters, buffers (batch-norm running
statistics, as rank 0 holds them: DDP broadcasts rank 0's before every forward and
the harness does the same for sharded plans) and optimizer state (momentum, Adam's
moments and step) must agree.

What the arithmetic decides
---------------------------
The runs add the same float32 numbers in different orders (all-reduce, reduce-scatter,
a local sum), so every gradient carries a few ulps of rounding noise.  For most
parameters that noise stays a few ulps of the parameter (:data:`RTOL`/:data:`ATOL`).
It does not where a gradient is zero, or nearly so, in exact arithmetic: a Linear's
bias feeding a BatchNorm (normalisation removes any per-feature shift), everything
before a LayerNorm over one feature.  Then the float32 gradient *is* the noise, and
a normalising optimizer (Adam, AdamW: ``m / (sqrt(v) + eps)``) turns noise of either
sign into a step of the size of the learning rate.  The two runs step such an element
differently and neither is wrong; no tolerance on the value can tell them apart from
a bug without also hiding bugs everywhere else.

So the reference run also computes every gradient in float64 at the same parameter
values and data.  An element is *free* from the first step at which its float32
gradient's relative rounding error ``rho`` could move an Adam update by more than a
tenth of the tolerance (``lr * rho * NOISE_MARGIN > atol``), and stays free (its
moments carry the noise from then on).  A gradient that is exactly zero in both
precisions (an embedding row no token used, the weights behind a dead ReLU) is no
noise: Adam does not move it, and it is judged strictly.
For a free element the arithmetic still fixes how far it can have moved: Adam's
bias-corrected ``|m_hat| / sqrt(v_hat)`` is at most :func:`adam_step_bound` for any
gradient sequence, so two runs differ by at most ``2 * lr * adam_step_bound(t)`` per
step since it became free, and that is what a free element is checked against.  Every
other element keeps the strict tolerance.  Under SGD a noisy gradient makes a noisy
step (``lr`` times a few ulps) and nothing is free.  A batch-norm buffer whose input a
free parameter element reaches (:meth:`~dcprop.specs.ModelSpec.feeding`) is not
decided by the arithmetic either: its running mean and variance are not compared, its
batch count is.  Optimizer state needs no exception: the moments of noise are noise.

The other properties that train compare runs with the same arithmetic (roundtrip,
finetune_resume: bitwise against an uninterrupted run on the same topology, whose
noise is the same noise) or compare only a forward pass on loaded, bitwise-equal
parameters (reshard's step after resharding), so none of them meets free elements.

Mixed precision (FSDP1 on GPU)
------------------------------
bf16 keeps 8 significant bits (relative rounding 2**-8 = 4e-3), fp16 11 (5e-4); with
``param_dtype``, ``reduce_dtype`` and ``buffer_dtype`` low, each gradient element is
off by a few roundings, ~1e-2 relative for bf16, while the parameters and Adam's step
stay in float32.  A tolerance on parameter *values* of that size (``2e-2 * |p|``, with
``|p| ~ 0.3``: 6e-3) would hide what the bugs do to a few steps of ``lr <= 0.1``
updates.  So mixed runs compare *updates* (final minus initial value):
:data:`MIXED_RTOL` = 10% of the reference's update is several times the bf16 error,
and well below a dropped gradient (one of at most four data-parallel ranks' rows: 25%
of the update and up), a frozen layer stepped anyway (the whole update, against an
update of exactly 0), a skipped step (the whole update) or a wrong shard (the value,
not just the update).  The free-element rule above runs with the low precision's
rounding (``rho`` scaled by its unit roundoff over float32's).

Low-precision parameters (a bf16 or fp16 Linear in a float32 model)
-------------------------------------------------------------------
Such a layer computes, and its gradient is summed across ranks, in its own dtype, so
its gradients carry that dtype's rounding (and the reference, which computes the layer
in the same dtype, measures that noise itself: no scaling).  Every layer before it
receives gradients through it, so those carry it too: the runs compare updates with
:data:`MIXED_RTOL`, as under mixed precision, for the reasons given there.  The
parameter itself is stored in its dtype: each step rounds the updated value to the
nearest representable one, and two runs whose updates differ by rounding noise can
land on neighbouring values, one ulp (at most ``eps * |p|``) apart, at every step,
however small the update.  So a low-precision tensor may also differ by
``steps * eps * |p|`` (:func:`_rounding_slack`); a dropped gradient or a skipped step
still moves it by the whole update, which that does not cover once the update exceeds a
few ulps.  Optimizer state (momentum, Adam's moments) is made of those gradients, so
it may drift by the low precision's eps times its tensor's largest magnitude per step
(:func:`_state_slack` says why the tensor's scale and not the element's).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import attrs
import torch

from dcprop import build
from dcprop import specs as S
from dcprop.compare import assert_same, full_values
from dcprop.errors import PropertyFailure
from dcprop.properties._harness import DEFAULT_HOOKS, FULL_STATE, Hooks, Job, batch_rows, setup
from dcprop.runner.execute import RankContext
from dcprop.specs.model import RUNNING_MEAN, RUNNING_VAR

__all__ = [
    "ATOL",
    "MIXED_ATOL",
    "MIXED_RTOL",
    "RTOL",
    "Reference",
    "Tolerance",
    "adam_step_bound",
    "compare_trained",
    "ddp_parity",
    "reference_run",
]

# float32 reassociation: a few ulps per step (~1e-7 relative), grown by Adam's 1/sqrt(v)
# over a handful of steps; 1e-4 relative sits three orders above that and far below a
# dropped gradient, a wrong shard or a skipped frozen layer (order 1e-2 and up).
RTOL = 1e-4
ATOL = 1e-5
# Mixed precision: relative to each element's update (see the module docstring).
MIXED_RTOL = 1e-1
MIXED_ATOL = 1e-5
# A bf16 forward pass: the loss is off by ~2**-8 per op.
MIXED_LOSS_RTOL = 2e-2
# How far below the tolerance an element's rounding-driven update must stay to be judged.
NOISE_MARGIN = 10.0

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_UNIT_ROUNDOFF = {
    None: torch.finfo(torch.float32).eps / 2,
    "bf16": torch.finfo(torch.bfloat16).eps / 2,
    "fp16": torch.finfo(torch.float16).eps / 2,
}


@attrs.frozen
class Tolerance:
    """How closely a run must match: ``rtol``/``atol`` on values, or (``on_updates``)
    ``rtol`` relative to each parameter's update; ``loss_rtol`` for per-step losses."""

    rtol: float
    atol: float
    loss_rtol: float
    on_updates: bool = False
    mixed: str | None = None
    #: per step, how far optimizer state may drift relative to its tensor's largest
    #: magnitude (:func:`_state_slack`): a model with low-precision parameters
    state_eps: float = 0.0

    @classmethod
    def of(cls, scenario: S.Scenario) -> Tolerance:
        plan = scenario.save.plan
        if isinstance(plan, S.FSDP1Plan) and plan.mixed_precision:
            return cls(MIXED_RTOL, MIXED_ATOL, MIXED_LOSS_RTOL, True, plan.mixed_precision)
        if scenario.model.low_precision_modules():
            # the reference computes those layers in their dtype too: its measured
            # gradient noise needs no scaling (mixed stays None)
            dtypes = {
                scenario.model.module(p).dtype for p in scenario.model.low_precision_modules()
            }
            eps = max(torch.finfo(_TORCH_DTYPES[d]).eps for d in dtypes)
            return cls(MIXED_RTOL, MIXED_ATOL, MIXED_LOSS_RTOL, True, state_eps=eps)
        return cls(RTOL, ATOL, RTOL)

    def __str__(self) -> str:
        of = " of the update" if self.on_updates else ""
        return f"rtol={self.rtol:g}{of}, atol={self.atol:g}"


@attrs.frozen
class Reference:
    """The single-process run: its losses, its initial parameters, its final state
    (flattened like ``full_values(get_state_dict(...))``), and per parameter element the
    step from which the element is free (``steps`` where it never is)."""

    losses: list[float]
    initial: dict[str, torch.Tensor]
    state: dict[str, Any]
    free_since: dict[str, torch.Tensor]


def ddp_parity(
    ctx: RankContext, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS
) -> dict[str, Any]:
    sharded = setup(ctx, scenario, scenario.save, hooks=hooks)
    if sharded is None:
        return {}
    world = scenario.save.world_size
    ddp_topology = S.Topology(world, S.MeshSpec((world,), ("world",)), S.DDPPlan())
    ddp = Job(ctx, scenario, ddp_topology, hooks=hooks)
    steps = scenario.training.steps
    tol = Tolerance.of(scenario)

    runs: dict[str, list[float]] = {"sharded": [], "ddp": []}
    for _ in range(steps):
        runs["sharded"].append(sharded.train_step())
        runs["ddp"].append(ddp.train_step())
    reference = reference_run(
        scenario, sharded.data_split.parts, sharded.rows, ctx.device, hooks, tol=tol
    )
    runs["reference"] = reference.losses

    # Batch statistics depend on how rows are split: compare DDP only on the same split.
    compare_ddp = (
        not scenario.model.has_batch_statistics()
        or ddp.data_split.parts == sharded.data_split.parts
    )
    others = ("ddp", "reference") if compare_ddp else ("reference",)
    for other in others:
        for step, (a, b) in enumerate(zip(runs[other], runs["sharded"])):
            if abs(a - b) > tol.atol + tol.loss_rtol * abs(a):
                raise PropertyFailure(
                    f"step {step}: {scenario.save.plan_kind} loss {b!r} != {other} loss {a!r} "
                    f"(rtol={tol.loss_rtol:g}, atol={tol.atol:g}) on rank {ctx.rank}; losses "
                    f"so far: sharded {runs['sharded'][: step + 1]}, "
                    f"{other} {runs[other][: step + 1]}"
                )
    final = _trained_state(sharded)
    kind = scenario.save.plan_kind
    compare_trained(
        scenario, reference, reference.state, final, tol,
        what=f"state after {steps} steps, {kind} vs single-process reference", rank=ctx.rank,
    )  # fmt: skip
    if compare_ddp:
        compare_trained(
            scenario, reference, _trained_state(ddp), final, tol,
            what=f"state after {steps} steps, {kind} vs DDP", rank=ctx.rank,
        )  # fmt: skip
    return {"losses": runs["sharded"]}


def _trained_state(job: Job) -> dict[str, Any]:
    """Full parameters, buffers and optimizer state, flattened (collective)."""
    state = full_values(job.state(**FULL_STATE))
    params = {f"model/{k}": v for k, v in job.full_parameters().items()}
    return {**{k: v for k, v in state.items() if not _is_param_groups(k)}, **params}


def _is_param_groups(key: str) -> bool:
    return key.startswith("optim/param_groups")


# ----------------------------------------------------------------- the reference run


def reference_run(
    scenario: S.Scenario,
    parts: int,
    rows: int,
    device: Any,
    hooks: Hooks = DEFAULT_HOOKS,
    *,
    tol: Tolerance | None = None,
) -> Reference:
    """Train in this process alone, replaying ``parts`` data-parallel ranks per step.

    Buffers keep what the first part's forward made of them, as rank 0's do.  Under a
    normalising optimizer a float64 twin computes each step's exact gradients to find
    the free elements (see the module docstring)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tol = tol or Tolerance.of(scenario)
    module = hooks.model_factory(scenario.model, scenario.seed, device, scenario.frozen)
    optimizer = build.optimizer_for(module.parameters(), scenario.optimizer)
    initial = {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters()}
    steps = scenario.training.steps
    free_since = {n: torch.full(p.shape, steps) for n, p in initial.items()}
    normalising = scenario.optimizer.kind != "sgd"
    scheduler = build.scheduler_for(optimizer, scenario.optimizer)
    losses = []
    for step in range(steps):
        twin = _float64_twin(module) if normalising else None
        batches = (
            batch_rows(scenario.model, scenario.training, step, index, parts, rows, device)[0]
            for index in range(parts)
        )
        total, width, kept = _backward_parts(module, twin, batches, rows)
        if twin is not None:
            _mark_free(module, twin, scenario.optimizer, tol, step, free_since)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _restore(module, kept)
        if scheduler is not None:
            scheduler.step()
        losses.append(total / (rows * width))
    msd, osd = get_state_dict(module, optimizer, options=_state_options())
    trained: dict[str, Any] = {"model": msd, "optim": osd}
    if scheduler is not None:  # as Job.state holds it: the schedules must agree too
        trained["scheduler"] = scheduler.state_dict()
    state = full_values(trained)
    state = {k: v for k, v in state.items() if not _is_param_groups(k)}
    return Reference(losses, initial, state, free_since)


def _backward_parts(
    module: Any, twin: Any, batches: Iterator[torch.Tensor], rows: int
) -> tuple[float, int, dict[str, torch.Tensor]]:
    """Forward and backward each part's rows through ``module`` (and its float64
    ``twin``, if any), as that many data-parallel ranks would: the summed square loss,
    the output width, and the buffers as the first part's forward left them."""
    total, width, kept = 0.0, 1, {}
    # every data-parallel rank starts the step with the same buffers (a Skip's call
    # count gates its body), so each part does too
    start = [_buffers(m) for m in (module, twin) if m is not None]
    for index, x in enumerate(batches):
        if index:
            for m, buffers in zip((module, twin), start):
                _restore(m, buffers)
        part_sum, width = _backward(module, x, rows)
        total += float(part_sum.detach().to(torch.float64).item())
        if twin is not None:
            _backward(twin, x.double() if x.is_floating_point() else x, rows)
        if index == 0:
            kept = copy.deepcopy(dict(module.named_buffers()))
    return total, width, kept


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in module.named_buffers()}


def _restore(module: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(buffers[name])


def _state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**FULL_STATE)


def _backward(module: torch.nn.Module, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    out = module(x)
    out = out.to(torch.promote_types(out.dtype, torch.float32)).square()
    width = out.shape[-1]
    part_sum = out.sum()
    (part_sum / (rows * width)).backward()
    return part_sum, width


def _float64_twin(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in float64 at its current values (train mode, no gradients yet)."""
    twin = copy.deepcopy(module).double()
    for p in twin.parameters():
        p.grad = None
    return twin


def _mark_free(
    module: torch.nn.Module,
    twin: torch.nn.Module,
    spec: S.OptimizerSpec,
    tol: Tolerance,
    step: int,
    free_since: dict[str, torch.Tensor],
) -> None:
    """Record which elements become free at ``step``: their gradient's relative rounding
    error (float32 vs float64, scaled to the run's precision) could move an update by
    ``atol / NOISE_MARGIN`` or more."""
    scale = _UNIT_ROUNDOFF[tol.mixed] / _UNIT_ROUNDOFF[None]
    coupled_decay = spec.weight_decay if spec.kind == "adam" else 0.0
    twins = dict(twin.named_parameters())
    for name, p in module.named_parameters():
        exact_grad = twins[name].grad
        if p.grad is None or exact_grad is None:
            continue
        exact = exact_grad.detach().cpu() + coupled_decay * twins[name].detach().cpu()
        noise = (p.grad.detach().cpu().double() + coupled_decay * p.detach().cpu().double()) - exact
        free = noise.abs() * (scale * spec.lr * NOISE_MARGIN) > exact.abs() * tol.atol
        since = free_since[name]
        since[free & (since > step)] = step


def adam_step_bound(step: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """The largest ``|m_hat| / sqrt(v_hat)`` of Adam's ``step``-th update (1-based), over
    all gradient sequences: ``m_hat = sum w_i g_i`` and ``v_hat = sum u_i g_i**2`` with
    bias-corrected weights, so by Cauchy-Schwarz it is ``sqrt(sum w_i**2 / u_i)``."""
    b1, b2 = betas
    total = 0.0
    for age in range(step):
        w = (1 - b1) * b1**age / (1 - b1**step)
        u = (1 - b2) * b2**age / (1 - b2**step)
        total += w * w / u
    return math.sqrt(total)


# ----------------------------------------------------------------------- comparing


def compare_trained(
    scenario: S.Scenario,
    reference: Reference,
    expected: dict[str, Any],
    actual: dict[str, Any],
    tol: Tolerance,
    *,
    what: str,
    rank: int,
) -> None:
    """``actual`` matches ``expected`` (both flattened trained states) within ``tol``,
    free elements within their step bound and undecided buffers by their count only."""
    allowance = _allowances(scenario, reference)
    undecided = _undecided_buffers(scenario, allowance)
    strict_e: dict[str, Any] = {}
    strict_a: dict[str, Any] = {}
    slack: dict[str, Any] = {}
    for key in sorted(set(expected) | set(actual)):
        if key not in expected or key not in actual:  # assert_same names the missing side
            strict_e.update({key: expected[key]} if key in expected else {})
            strict_a.update({key: actual[key]} if key in actual else {})
            continue
        e, a = expected[key], actual[key]
        if tol.state_eps and key.startswith("optim/") and _has_floats(e, a):
            slack[key] = _state_slack(e, a, scenario.training.steps, tol.state_eps)
        name = key[len("model/") :] if key.startswith("model/") else None
        if name in undecided:
            continue
        canonical = _canonical(scenario.model).get(name or "")
        if canonical is not None and isinstance(e, torch.Tensor) and e.shape == a.shape:
            rounding = _rounding_slack(e, a, scenario.training.steps)
            bound = allowance[canonical]
            _check_free(key, e, a, bound, tol, what, rank, rounding)
            decided = bound == 0
            if tol.on_updates:
                start = reference.initial[canonical].double()
                e, a, key = e.double() - start, a.double() - start, f"{key} (update)"
                slack[key] = rounding[decided]
            e, a = e[decided], a[decided]
        strict_e[key], strict_a[key] = e, a
    if tol.on_updates:
        _assert_updates(strict_e, strict_a, tol, what, rank, slack)
    else:
        assert_same(strict_e, strict_a, what=what, rank=rank, rtol=tol.rtol, atol=tol.atol)


def _allowances(scenario: S.Scenario, reference: Reference) -> dict[str, torch.Tensor]:
    """Per parameter element: how far two runs may differ because the element is free
    (0 where it never is)."""
    steps = scenario.training.steps
    lr = scenario.optimizer.lr
    # after[t]: the most two runs can drift apart from step t (0-based) to the end
    after = [2 * lr * sum(adam_step_bound(s + 1) for s in range(t, steps)) for t in range(steps)]
    after.append(0.0)
    table = torch.tensor(after, dtype=torch.float64)
    return {name: table[since] for name, since in reference.free_since.items()}


def _undecided_buffers(scenario: S.Scenario, allowance: dict[str, torch.Tensor]) -> set[str]:
    """Running statistics of a batch norm that a free parameter element feeds."""
    free = {name for name, bound in allowance.items() if bool((bound > 0).any())}
    if not free:
        return set()
    out = set()
    for path, layer in scenario.model.modules():
        if isinstance(layer, S.BatchNorm) and scenario.model.feeding(path) & free:
            out |= {S.join(path, name) for name in (RUNNING_MEAN, RUNNING_VAR)}
    return out


def _canonical(model: S.ModelSpec) -> dict[str, str]:
    return {alias: fqn for fqn, names in model.aliases().items() for alias in names}


def _check_free(
    key: str,
    expected: torch.Tensor,
    actual: torch.Tensor,
    bound: torch.Tensor,
    tol: Tolerance,
    what: str,
    rank: int,
    rounding: torch.Tensor | float = 0.0,
) -> None:
    free = bound > 0
    if not bool(free.any()):
        return
    excess = (actual.double() - expected.double()).abs() - bound - tol.atol - rounding
    excess[~free] = -1
    if bool((excess > 0).any()):
        i = int(excess.flatten().argmax())
        raise PropertyFailure(
            f"{what} on rank {rank}: {key} element {i} is free (its gradient is rounding "
            f"noise) but moved further than any optimizer step allows: expected "
            f"{expected.flatten()[i].item():.8g}, got {actual.flatten()[i].item():.8g}, "
            f"bound {bound.flatten()[i].item():.6g}"
        )


def _has_floats(expected: Any, actual: Any) -> bool:
    return (
        isinstance(expected, torch.Tensor)
        and isinstance(actual, torch.Tensor)
        and expected.is_floating_point()
        and expected.numel() > 0
    )


def _state_slack(expected: torch.Tensor, actual: torch.Tensor, steps: int, eps: float) -> float:
    """How far two runs' optimizer state (momentum, Adam's moments) may be apart where
    the model holds low-precision layers: every gradient passes through them (and a
    low-precision parameter's gradient is summed across ranks in its dtype), so it
    carries rounding of size ``eps`` relative to the sums it is made of, whose size is
    that of the tensor's larger elements, not that of an element whose contributions
    nearly cancel.  So an element may be off by ``eps`` times the tensor's largest
    magnitude per step.  A dropped or doubled gradient moves the state by the gradient
    itself, far beyond that wherever the gradient is more than a few eps of the
    tensor's scale (and the parameter updates are checked besides)."""
    scale = max(expected.double().abs().max().item(), actual.double().abs().max().item())
    return steps * eps * scale


def _rounding_slack(expected: torch.Tensor, actual: torch.Tensor, steps: int) -> torch.Tensor:
    """How far two runs' values of a low-precision tensor may be apart by rounding
    alone: an ulp (at most ``eps * |value|``) per step (zero for float32 and wider)."""
    if expected.dtype not in (torch.bfloat16, torch.float16):
        return torch.zeros(expected.shape, dtype=torch.float64)
    eps = torch.finfo(expected.dtype).eps
    return steps * eps * torch.maximum(expected.double().abs(), actual.double().abs())


def _assert_updates(
    expected: dict[str, Any],
    actual: dict[str, Any],
    tol: Tolerance,
    what: str,
    rank: int,
    slack: dict[str, torch.Tensor],
) -> None:
    """Mixed precision: parameter updates relative to the reference's update (plus the
    rounding ``slack`` of a low-precision parameter); buffers and optimizer state
    relative to their value."""
    updates = [k for k in expected if k.endswith(" (update)")]
    for key in updates:
        e, a = expected[key].double(), actual[key].double()
        bad = (a - e).abs() > tol.atol + tol.rtol * e.abs() + slack.get(key, 0.0)
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            raise PropertyFailure(
                f"{what} on rank {rank}: {key} element {i}: expected "
                f"{e.flatten()[i].item():.8g}, got {a.flatten()[i].item():.8g} ({tol})"
            )
    rest_e = {k: v for k, v in expected.items() if k not in updates and k not in slack}
    rest_a = {k: v for k, v in actual.items() if k not in updates and k not in slack}
    assert_same(rest_e, rest_a, what=what, rank=rank, rtol=MIXED_LOSS_RTOL, atol=tol.atol)
    for key in sorted(set(slack) - set(updates)):  # optimizer state (see _state_slack)
        atol = tol.atol + float(slack[key])
        assert_same(
            {key: expected[key]}, {key: actual[key]}, what=what, rank=rank,
            rtol=MIXED_LOSS_RTOL, atol=atol,
        )  # fmt: skip
