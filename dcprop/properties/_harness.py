"""What every property does on a rank: build, wrap, train, take and apply state dicts.

Training uses one global batch per step, split across data-parallel ranks (unevenly
if need be).  Each rank's loss is scaled so that the data-parallel average of the
gradients is the gradient of the global mean-square loss, whatever the split:
training under 2 ranks and under 3 computes the same thing, which is what lets
``reshard`` and ``ddp_parity`` compare across topologies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import torch
import torch.distributed as dist
from torch import nn

from dcprop import build
from dcprop import specs as S
from dcprop.checkpointer import (
    AnyCheckpointer,
    DCPCheckpointer,
    Pending,
    StatefulCheckpointer,
    live,
    start_save,
)
from dcprop.contract import Contract
from dcprop.errors import DcpropError, PropertyFailure
from dcprop.runner.execute import PeerFailed, RankContext

__all__ = ["Hooks", "Job", "setup"]

ModelFactory = Callable[[S.ModelSpec, int, torch.device, tuple[str, ...]], nn.Module]


def default_model_factory(
    model: S.ModelSpec, seed: int, device: torch.device, frozen: tuple[str, ...]
) -> nn.Module:
    return build.build_model(model, seed=seed, device=device, frozen=frozen)


@attrs.frozen
class Hooks:
    """The user's pieces a property runs with: checkpoint save/load and model factory.

    Both must be importable by reference (they travel to the rank processes).
    """

    checkpointer: AnyCheckpointer = attrs.field(factory=DCPCheckpointer)
    model_factory: ModelFactory = attrs.field(default=default_model_factory)


DEFAULT_HOOKS = Hooks()


def global_rows(scenario: S.Scenario) -> int:
    """Rows in one global batch: ``batch_size`` per rank of the example's whole world, so
    any data-parallel split of it (DDP over every rank included) keeps at least
    ``batch_size`` rows per rank."""
    return scenario.training.batch_size * scenario.world_size


def state_dict_options(spec: S.StateDictSpec, **overrides: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    fields: dict[str, Any] = dict(
        full_state_dict=spec.full_state_dict,
        cpu_offload=spec.cpu_offload,
        ignore_frozen_params=spec.ignore_frozen_params,
        keep_submodule_prefixes=spec.keep_submodule_prefixes,
        strict=spec.strict,
        flatten_optimizer_state_dict=spec.flatten_optimizer_state_dict,
        broadcast_from_rank0=spec.broadcast_from_rank0,
    )
    fields.update(overrides)
    return StateDictOptions(**fields)


class Job:
    """One wrapped model with its optimizer on one topology, on this rank."""

    def __init__(
        self,
        ctx: Any,
        scenario: S.Scenario,
        topology: S.Topology,
        *,
        model: S.ModelSpec | None = None,
        seed: int | None = None,
        frozen: tuple[str, ...] | None = None,
        hooks: Hooks = DEFAULT_HOOKS,
    ) -> None:
        self.ctx = ctx
        self.scenario = scenario
        self.topology = topology
        self.model_spec = model or scenario.model
        self.hooks = hooks
        self.frozen = scenario.frozen if frozen is None else frozen
        self.mesh = ctx.mesh(topology.mesh)
        self.group = ctx.group(topology.world_size)
        module = hooks.model_factory(
            self.model_spec,
            scenario.seed if seed is None else seed,
            ctx.device,
            self.frozen,
        )
        self.model = build.wrap(
            module,
            topology,
            self.mesh,
            flat_mesh=ctx.flat_mesh(topology.world_size),
            device=ctx.device,
        )
        self.optimizer = build.optimizer_for(self.model.parameters(), scenario.optimizer)
        self.scheduler = build.scheduler_for(self.optimizer, scenario.optimizer)
        self.data_split = build.data_split(topology, self.mesh)
        self.rows = global_rows(scenario)
        self.steps_taken = 0
        #: where :meth:`save` and :meth:`load` put checkpoints by name: the example's
        #: directory, unless the property keeps them longer than one task
        self.checkpoint_root: str = ctx.example_dir

    def resume_at(self, step: int) -> None:
        """Continue as a run that has taken ``step`` training steps: the next
        :meth:`train_step` trains on that step's batch (after a load that restored the
        state of step ``step``)."""
        self.steps_taken = step

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def batch(self, step: int) -> tuple[torch.Tensor, int]:
        """This rank's rows of the global batch for ``step``, and their count."""
        return batch_rows(
            self.model_spec,
            self.scenario.training,
            step,
            self.data_split.part,
            self.data_split.parts,
            self.rows,
            self.ctx.device,
        )

    def train_step(self) -> float:
        """One optimizer step; returns the global mean-square loss (same on every rank)."""
        x, _ = self.batch(self.steps_taken)
        out = self.model(x)
        local_sum = (out.full_tensor() if hasattr(out, "full_tensor") else out).float().square()
        width = local_sum.shape[-1] if local_sum.dim() else 1
        total = local_sum.sum()
        # scaled so that averaging gradients over dp ranks gives the global-mean gradient
        loss = total * (self.data_split.parts / (self.rows * width))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps_taken += 1
        self.sync_buffers()
        summed = total.detach().reshape(1).to(torch.float64).cpu()
        dist.all_reduce(summed, group=self.group)
        replicas = self.topology.world_size // self.data_split.parts  # tensor-parallel copies
        return float(summed.item() / replicas / (self.rows * width))

    def lrs(self) -> list[float]:
        """The learning rate of each param group: what the next step will use."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def next_step(self) -> NextStep:
        """One :meth:`train_step`, with the learning rates around it."""
        before = self.lrs()
        loss = self.train_step()
        return NextStep(before, loss, self.lrs())

    def sync_buffers(self) -> None:
        """Make plain (non-DTensor) buffers equal on every rank, as DDP does before each
        forward: DCP saves one copy of a replicated tensor, so copies must agree.  DDP
        too: it syncs before the next forward, so after a step its copies differ."""
        for _, buf in self.model.named_buffers():
            if not hasattr(buf, "to_local") and buf.numel():
                dist.broadcast(buf, group_src=0, group=self.group)

    def state(self, options: S.StateDictSpec | None = None, **overrides: Any) -> dict[str, Any]:
        """``{"model": ..., "optim": ...}`` from ``get_state_dict``, and the LR scheduler's
        ``state_dict()`` under ``"scheduler"`` if there is one."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        opts = state_dict_options(options or self.topology.state_dict, **overrides)
        msd, osd = get_state_dict(self.model, self.optimizer, options=opts)
        state = {"model": msd, "optim": osd}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def check_keys(
        self,
        state: dict[str, Any],
        when: str,
        options: S.StateDictSpec | None = None,
        **overrides: Any,
    ) -> None:
        """Check ``state`` (from :meth:`state` with the same arguments) against the key
        contract: the entries the spec says this rank's state dict holds."""
        spec = attrs.evolve(options or self.topology.state_dict, **overrides)
        contract = Contract(
            self.model_spec, self.frozen, self.scenario.optimizer, self.topology, spec, self.rank
        )
        try:
            contract.check(state, when)
        except PropertyFailure:
            self.agree(False, f"the key check {when}")
            raise
        self.agree(True, f"the key check {when}")

    def agree(self, ok: bool, what: str) -> None:
        """Like the runner's ``ctx.agree``, over this job's ranks (a sub-world's job
        cannot wait for ranks outside it)."""
        if self.any_rank(not ok) and ok:
            raise PeerFailed(f"another rank failed during {what}")

    def any_rank(self, flag: bool) -> bool:
        """True on every rank of the job if ``flag`` is true on any (collective)."""
        value = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def apply(
        self, state: dict[str, Any], options: S.StateDictSpec | None = None, **overrides: Any
    ) -> None:
        """``set_state_dict``; with ``broadcast_from_rank0``, model and optimizer separately
        and with empty dicts off rank 0, the way that feature is meant to be used."""
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
            set_state_dict,
        )

        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        spec = options or self.topology.state_dict
        if spec.ignore_frozen_params or overrides.get("ignore_frozen_params"):
            # frozen parameters are deliberately absent: a strict load_state_dict would
            # reject the state dict that get_state_dict made with the same options
            overrides.setdefault("strict", False)
        opts = state_dict_options(spec, **overrides)
        if opts.broadcast_from_rank0:
            mine = self.ctx.rank == 0
            set_model_state_dict(self.model, state["model"] if mine else {}, options=opts)
            set_optimizer_state_dict(
                self.model, self.optimizer, state["optim"] if mine else {}, options=opts
            )
            return
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=opts,
        )

    def checkpoint_dir(self, name: str) -> str:
        return os.path.join(self.checkpoint_root, name)

    def save(self, state: dict[str, Any], name: str) -> str:
        """Save ``state`` (from :meth:`state`) as checkpoint ``name``: the one place a
        property hands state to the checkpointer, as a state dict or as an app state."""
        path = self.checkpoint_dir(name)
        checkpointer = live(self.hooks.checkpointer, self.ctx)
        storage = self.scenario.storage
        if isinstance(checkpointer, StatefulCheckpointer):
            app_state = app_state_of(state, self.steps_taken)
            checkpointer.save_app_state(app_state, path, storage=storage, group=self.group)
        else:
            checkpointer.save(state, path, storage=storage, group=self.group)
        return path

    def start_save(self, state: dict[str, Any], name: str, group: Any = None) -> Pending:
        """Like :meth:`save`, through the checkpointer's asynchronous save where it has
        one: returns the pending save (``result()`` awaits it).  ``group`` (default: the
        job's) is the one the save's collectives run on while training goes on."""
        checkpointer = live(self.hooks.checkpointer, self.ctx)
        if isinstance(checkpointer, StatefulCheckpointer):
            state = app_state_of(state, self.steps_taken)
        return start_save(
            checkpointer,
            state,
            self.checkpoint_dir(name),
            storage=self.scenario.storage,
            group=self.group if group is None else group,
        )

    def load(self, state: dict[str, Any], name: str, step: int | None = None) -> None:
        """Fill ``state`` (a template from :meth:`state`) from checkpoint ``name``, which
        was saved after ``step`` training steps (default: the scenario's)."""
        path = self.checkpoint_dir(name)
        checkpointer = live(self.hooks.checkpointer, self.ctx)
        if not isinstance(checkpointer, StatefulCheckpointer):
            checkpointer.load(state, path, group=self.group)
            return
        app_state = app_state_of(state, step=None)
        checkpointer.load_app_state(app_state, path, group=self.group)
        missed = [key for key, entry in app_state.items() if entry.loaded is None]
        if missed:
            raise PropertyFailure(
                f"load_app_state never called load_state_dict of {missed} (rank {self.rank})"
            )
        state.update({key: app_state[key].loaded for key in state})
        loaded = app_state[TRAIN_STATE].loaded["step"]  # type: ignore[index]
        saved_at = self.scenario.training.steps if step is None else step
        if loaded != saved_at:
            raise PropertyFailure(
                f"the train state loaded from {name!r} has step {loaded!r}, saved at step "
                f"{saved_at} (rank {self.rank})"
            )

    def restore(self, name: str, **overrides: Any) -> None:
        """Load checkpoint ``name`` into a template of this job's state dict and apply it.
        ``overrides`` shape both (``ignore_frozen_params=True`` for a checkpoint saved
        without frozen parameters: they can be neither read nor required)."""
        target = self.state(**load_template_overrides(self.topology.state_dict), **overrides)
        self.load(target, name)
        self.apply(target, **overrides)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter as a full CPU tensor under its canonical name (collective)."""
        out = {}
        with build.fsdp1_full_params(self.model):
            for name, p in self.model.named_parameters():
                t = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[canonical_name(name)] = t.detach().to("cpu", copy=True)
        return out

    def perturb(self, keep: Callable[[str], bool] = lambda name: False) -> None:
        """Change every parameter, persistent buffer (float, integer and bool alike),
        optimizer state entry and optimizer hyperparameter (lr, betas, eps, weight decay,
        momentum, ...) on this rank (except parameter names for which ``keep`` is true),
        so that a load that restores nothing cannot pass for one that restores
        everything.  The changed hyperparameters are never stepped with: the load
        replaces them."""
        g = torch.Generator().manual_seed(1_000_003 + self.steps_taken)
        # a non-persistent buffer is rebuilt by the constructor, never loaded: a real
        # job that restarts has its constructed value, so it is left alone
        rebuilt = self.model_spec.non_persistent_buffers()
        with torch.no_grad():
            for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
                if not keep(canonical_name(name)) and canonical_name(name) not in rebuilt:
                    _shift(t, g)
            for param_state in self.optimizer.state.values():
                for value in param_state.values():
                    if isinstance(value, torch.Tensor):
                        _shift(value, g)
        for group in self.optimizer.param_groups:
            for key, value in group.items():
                # Zero momentum means no momentum buffers; get_state_dict steps a
                # stateless optimizer once, which under a non-zero one would create
                # buffers that the checkpoint never had.
                if key != "params" and not (key == "momentum" and not value):
                    group[key] = _nudge(value)
        if self.scheduler is not None:
            sched = self.scheduler.state_dict()
            self.scheduler.load_state_dict({k: _nudge(v) for k, v in sched.items()})


TRAIN_STATE = "train_state"


class Entry:
    """One ``Stateful`` of the app state a :class:`StatefulCheckpointer` receives:
    ``state_dict()`` is the very dict the property took with ``get_state_dict`` and the
    drawn options (and checks), and what ``load_state_dict`` receives goes back to the
    property, which applies it with ``set_state_dict`` under the same options and checks
    it."""

    def __init__(self, state_dict: dict[str, Any]) -> None:
        self._state_dict = state_dict
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self._state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict


def app_state_of(state: dict[str, Any], step: int | None) -> dict[str, Entry]:
    """The app state a trainer hands its checkpoint manager: one ``Stateful`` per entry
    of ``state`` (model, optimizer, LR scheduler) and the train state (its step
    counter; -1 in a template to load into)."""
    app_state = {key: Entry(value) for key, value in state.items()}
    app_state[TRAIN_STATE] = Entry({"step": -1 if step is None else step})
    return app_state


def _shift(t: torch.Tensor, g: torch.Generator) -> None:
    local = t.to_local() if hasattr(t, "to_local") else t
    if local.numel() == 0:
        return
    if local.is_floating_point():
        noise = torch.rand(local.shape, generator=g).to(local.device, local.dtype)
        local.add_(noise + 0.5)
    elif local.dtype == torch.bool:
        local.logical_not_()
    else:
        local.add_(1)


def _nudge(value: Any) -> Any:
    """A different value of a hyperparameter's type: numbers change, flags stay."""
    if isinstance(value, (tuple, list)):
        return type(value)(_nudge(x) for x in value)
    if isinstance(value, float):
        return value * 1.5 + 0.25
    if isinstance(value, int) and not isinstance(value, bool):
        return value + 1
    return value


_WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def canonical_name(name: str) -> str:
    """A parameter name without DDP/FSDP1 wrapper prefixes (what state dicts use)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def batch_rows(
    model: S.ModelSpec,
    training: S.TrainingSpec,
    step: int,
    index: int,
    parts: int,
    rows: int,
    device: Any,
) -> tuple[torch.Tensor, int]:
    """Rows ``[index*rows//parts, (index+1)*rows//parts)`` of the global batch for ``step``."""
    g = torch.Generator().manual_seed(training.data_seed * 7919 + step)
    if model.takes_tokens:
        full = torch.randint(0, model.in_features, (rows,), generator=g)
    else:
        full = torch.randn(rows, model.in_features, generator=g)
    lo, hi = index * rows // parts, (index + 1) * rows // parts
    x = full[lo:hi].to(device)
    if training.input_requires_grad:
        x.requires_grad_(True)
    return x, hi - lo


#: state-dict option overrides that give every entry as a full, nested tensor on every rank,
#: frozen parameters included: the form in which two runs' states can be compared
FULL_STATE: dict[str, Any] = dict(
    full_state_dict=True,
    cpu_offload=False,
    broadcast_from_rank0=False,
    flatten_optimizer_state_dict=False,
    ignore_frozen_params=False,
)


def load_template_overrides(options: S.StateDictSpec) -> dict[str, Any]:
    """A template to load into needs full tensors on every rank: full_state_dict with
    cpu_offload leaves non-zero ranks empty unless rank 0 broadcasts."""
    if options.full_state_dict and options.cpu_offload and not options.broadcast_from_rank0:
        return {"cpu_offload": False}
    return {}


class NextStep(NamedTuple):
    """A training step as a resumed run must repeat it: the learning rates it steps
    with, its loss, and the learning rates it leaves for the step after."""

    lrs: list[float]
    loss: float
    next_lrs: list[float]


def uninterrupted_next_step(
    ctx: Any, scenario: S.Scenario, topology: S.Topology, hooks: Hooks
) -> NextStep:
    """Step ``training.steps`` of a fresh run that was never interrupted."""
    twin = Job(ctx, scenario, topology, hooks=hooks)
    for _ in range(scenario.training.steps):
        twin.train_step()
    return twin.next_step()


def setup(
    ctx: RankContext, scenario: S.Scenario, topology: S.Topology, **kwargs: Any
) -> Job | None:
    """A :class:`Job` on ``topology``, or None on ranks outside its world."""
    if ctx.rank >= topology.world_size:
        return None
    return Job(ctx, scenario, topology, **kwargs)


def checkpointer_error(call: Any) -> str | None:
    """``type: message`` (first line) of what ``call()`` raised, None if it returned: a
    load the checkpointer refused.  A property's check and dcprop's own errors are not
    the checkpointer's: they propagate."""
    # DCP's CheckpointException (the error of every failed dcp.load) is a BaseException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        call()
    except (PropertyFailure, DcpropError):
        raise
    except CheckpointException as error:
        rank, (cause, _) = min(error.failures.items())  # what it wraps says what failed
        return f"CheckpointException (rank {rank}: {_headline(cause)})"
    except Exception as error:
        return _headline(error)
    return None


def _headline(error: BaseException) -> str:
    lines = f"{type(error).__name__}: {error}".strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
