"""Spec -> ``nn.Module``, deterministic from a seed; spec -> module wrapped on a mesh.

Initialisation never touches the global RNG: every parameter and buffer is drawn
from its own CPU generator seeded by ``(seed, name)``, then copied to the device,
so the same spec gives bitwise the same module on every rank, run and device.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from dcprop import specs as S
from dcprop.specs.model import RUNNING_VAR

__all__ = [
    "DataSplit",
    "build_model",
    "data_split",
    "optimizer_for",
    "scheduler_for",
    "wrap",
]

#: The torch dtype of each of the spec's parameter dtypes (:data:`~dcprop.specs.DTYPES`).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_ACT = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def _call(child: nn.Module, x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    # Containers and unused-input layers take the model input as a second argument.
    return child(x, aux) if getattr(child, "takes_aux", False) else child(x)


class LinearUnusedInput(nn.Linear):
    """Receives the model input and ignores it: ``LinearUnusedInput`` of PyTorch's
    ``test/distributed/fsdp/test_fsdp_fine_tune.py``."""

    takes_aux = True

    def forward(self, x: torch.Tensor, unused: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class CastLinear(LinearUnusedInput):
    """A Linear whose parameters are bf16 or fp16 in a float32 model: it computes in
    its own dtype and hands its input's dtype on, as a layer kept in low precision does
    (a float64 copy of the model, as ddp_parity's reference makes, stays float64)."""

    def forward(self, x: torch.Tensor, unused: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class Mask(nn.Module):
    """A fixed sign mask held in a bool buffer; with ``cache``, plus a float buffer
    registered ``persistent=False`` (rebuilt from the spec, never saved)."""

    keep: torch.Tensor
    cache: torch.Tensor | None

    def __init__(self, dim: int, cache: bool) -> None:
        super().__init__()
        self.register_buffer("keep", torch.ones(dim, dtype=torch.bool))
        # a function of the spec alone (like a rotary table), so every build agrees
        table = 0.1 * torch.sin(torch.arange(dim, dtype=torch.float32) + 1.0)
        self.register_buffer("cache", table if cache else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(self.keep, x, -x)
        return x if self.cache is None else x + self.cache


class Skip(nn.Module):
    """``body`` on the calls ``c`` with ``c % period == phase``, else the identity; the
    call count is a persistent int64 buffer that every training-mode forward advances."""

    takes_aux = True
    calls: torch.Tensor

    def __init__(self, body: nn.Module, period: int, phase: int) -> None:
        super().__init__()
        self.body = body
        self.period, self.phase = period, phase
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        use = int(self.calls) % self.period == self.phase
        if self.training:
            self.calls += 1
        return _call(self.body, x, aux) if use else x


class Chain(nn.Module):
    """Named children applied in order (a :class:`~dcprop.specs.Block`)."""

    takes_aux = True

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        for child in self.children():
            x = _call(child, x, aux)
        return x


class _InOrder:
    """A container's entries applied in order, each as often as it is listed (where
    ``children()`` would name a repeated module once)."""

    takes_aux = True

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        for child in cast("Iterable[nn.Module]", self):  # an nn.Sequential or nn.ModuleList
            x = _call(child, x, aux)
        return x


class ChainSequential(_InOrder, nn.Sequential):
    pass


class ChainList(_InOrder, nn.ModuleList):
    pass


class Branches(nn.ModuleList):
    takes_aux = True

    def __init__(self, modules: list[nn.Module], concat_input: bool) -> None:
        super().__init__(modules)
        self.concat_input = concat_input

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        outs = [_call(child, x, aux) for child in self]
        return torch.cat([*outs, x] if self.concat_input else outs, dim=-1)


class Repeat(nn.Module):
    takes_aux = True

    def __init__(self, body: nn.Module, times: int, no_grad_residual: bool) -> None:
        super().__init__()
        self.body = body
        self.times = times
        self.no_grad_residual = no_grad_residual

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        for _ in range(self.times):
            x = _call(self.body, x, aux)
            if self.no_grad_residual:
                with torch.no_grad():
                    residual = _call(self.body, x, aux)
                x = x + residual
        return x


class AbsentExpert(nn.Module):
    """Placeholder for an expert that lives on other ranks (``Dummymodel`` in PyTorch's
    ``test/distributed/checkpoint/e2e/test_fsdp_ep.py``)."""


class ExpertList(nn.ModuleList):
    takes_aux = True

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        out = x
        for expert in self:
            if not isinstance(expert, AbsentExpert):
                out = out + _call(expert, x, aux)
        return out


class Model(Chain):
    """The root module built from a :class:`~dcprop.specs.ModelSpec`."""

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, x if aux is None and x.is_floating_point() else aux)


def _module(layer: Any) -> nn.Module:
    if isinstance(layer, S.Linear):
        dtype = DTYPES[layer.dtype]
        if dtype != torch.float32:
            cls: type[nn.Linear] = CastLinear
        else:
            cls = LinearUnusedInput if layer.unused_input else nn.Linear
        return cls(layer.in_features, layer.out_features, bias=layer.bias, dtype=dtype)
    if isinstance(layer, S.Mask):
        return Mask(layer.dim, layer.cache)
    if isinstance(layer, S.Skip):
        return Skip(_module(layer.body), layer.period, layer.phase)
    if isinstance(layer, S.Activation):
        return _ACT[layer.kind]()
    if isinstance(layer, S.LayerNorm):
        return nn.LayerNorm(layer.dim, elementwise_affine=layer.elementwise_affine)
    if isinstance(layer, S.BatchNorm):
        return nn.BatchNorm1d(layer.dim)
    if isinstance(layer, S.Embedding):
        return nn.Embedding(layer.num_embeddings, layer.dim)
    if isinstance(layer, S.Block):
        chain = Chain()
        for name, child in layer.children:
            chain.add_module(name, _module(child))
        return chain
    if isinstance(layer, S.Sequential):
        return ChainSequential(*[_module(c) for c in layer.layers])
    if isinstance(layer, S.ModuleList):
        return ChainList([_module(c) for c in layer.layers])
    if isinstance(layer, S.Branches):
        return Branches([_module(c) for c in layer.layers], layer.concat_input)
    if isinstance(layer, S.Repeat):
        return Repeat(_module(layer.body), layer.times, layer.no_grad_residual)
    if isinstance(layer, S.Experts):
        return ExpertList([_module(c) for c in layer.layers])
    raise TypeError(f"not a layer spec: {layer!r}")


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _initial_value(seed: int, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:  # a mask: a fixed random pattern
        return torch.rand(shape, generator=_generator(seed, name)) < 0.5
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)  # step and call counts start at zero
    noise = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == RUNNING_VAR or (len(shape) == 1 and leaf == "weight"):
        value = 1.0 + 0.1 * noise.abs()  # norm scales and variances stay positive
    elif len(shape) >= 2:
        value = noise / math.sqrt(shape[-1])
    else:
        value = 0.1 * noise
    return value.to(dtype)


def build_model(
    model: S.ModelSpec,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    frozen: tuple[str, ...] = (),
) -> nn.Module:
    """Build ``model`` on ``device`` with values fixed by ``seed``; freeze ``frozen``.

    >>> spec = S.ModelSpec(S.Block((("fc", S.Linear(4, 2)),)))
    >>> build_model(spec, seed=1).fc.weight.shape
    torch.Size([2, 4])
    """
    device = torch.device(device)
    root = Model()
    for name, child in model.root.children:
        root.add_module(name, _module(child))
    for src, dst in model.ties:
        root.get_submodule(dst).weight = root.get_submodule(src).weight
    if device.type != "meta":
        with torch.no_grad():
            for name, tensor in _state_tensors(root):
                tensor.copy_(_initial_value(seed, name, tensor.shape, tensor.dtype))
    root.to(device)
    names = set(frozen)
    for name, param in root.named_parameters():
        param.requires_grad_(name not in names)
    return root


def _state_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers; a non-persistent buffer keeps the value its
    constructor derived from the spec, whatever the seed."""
    yield from module.named_parameters()
    saved = module.state_dict(keep_vars=True)
    yield from ((name, buf) for name, buf in module.named_buffers() if name in saved)


# ------------------------------------------------------------------- wrapping


def data_split(topology: S.Topology, mesh: Any) -> DataSplit:
    """Which slice of the global batch this rank trains on."""
    plan = topology.plan
    if isinstance(plan, S.FSDP2Plan) and plan.tp is not None:
        dims = [d for d in topology.mesh.dim_names if d != plan.tp.dim]
        index, size = 0, 1
        for d in dims:
            index = index * mesh.size(topology.mesh.dim_names.index(d)) + mesh.get_local_rank(d)
            size *= topology.mesh.dim_size(d)
        return DataSplit(index, size)
    return DataSplit(mesh_rank(mesh), topology.world_size)


class DataSplit(NamedTuple):
    """This rank's position ``part`` among ``parts`` data-parallel ranks (different rows)."""

    part: int
    parts: int


def mesh_rank(mesh: Any) -> int:
    """This rank's position in ``mesh`` (row-major), the rank within the example's world."""
    flat = mesh.mesh.flatten().tolist()
    return flat.index(torch.distributed.get_rank())


def optimizer_for(params: Any, spec: S.OptimizerSpec) -> torch.optim.Optimizer:
    """The optimizer a spec names, over ``params`` (only those that require grad)."""
    params = [p for p in params if p.requires_grad]
    if spec.kind == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    if spec.kind == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def scheduler_for(optimizer: torch.optim.Optimizer, spec: S.OptimizerSpec) -> Any:
    """The LR scheduler ``spec`` names over ``optimizer``, or None."""
    sched = spec.scheduler
    if sched is None:
        return None
    if sched.kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, sched.period, gamma=sched.factor)
    return torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=sched.factor, total_iters=sched.period
    )


def _depth_first(paths: tuple[str, ...]) -> list[str]:
    return sorted(paths, key=lambda p: (-p.count("."), p))


def wrap(
    module: nn.Module,
    topology: S.Topology,
    mesh: Any,
    *,
    flat_mesh: Any = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Apply ``topology.plan`` to ``module`` on ``mesh`` (a ``DeviceMesh`` of the topology's
    shape).  ``flat_mesh`` is a 1D mesh over the same ranks, needed by expert plans."""
    plan = topology.plan
    if isinstance(plan, S.DDPPlan):
        from torch.nn.parallel import DistributedDataParallel

        device = torch.device(device)
        ids = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else None
        )
        # DDP rebuilds its gradient buckets after the first backward, which changes the
        # order in which ranks' gradients are summed: a restarted job's first step would
        # then differ in the last bits from the uninterrupted job's step, and the
        # properties compare those bitwise.  With find_unused_parameters the buckets are
        # never rebuilt (Reducer::should_rebuild_buckets); the arithmetic is unchanged.
        return DistributedDataParallel(
            module,
            process_group=mesh.get_group(),
            device_ids=ids,
            find_unused_parameters=True,
        )
    if isinstance(plan, S.FSDP1Plan):
        return _wrap_fsdp1(module, plan, mesh)
    return _wrap_fsdp2(module, plan, mesh, flat_mesh)


def _wrap_fsdp2(module: nn.Module, plan: S.FSDP2Plan, mesh: Any, flat_mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    if plan.tp is not None:
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        layout: dict[str, Any] = {}
        for col, row in plan.tp.pairs:
            layout[col], layout[row] = ColwiseParallel(), RowwiseParallel()
        parallelize_module(module, mesh[plan.tp.dim], layout)
    if plan.experts is not None:
        experts = cast(nn.ModuleList, module.get_submodule(plan.experts.module))
        mine = mesh.get_local_rank(plan.experts.dim)
        for i in range(len(experts)):
            if i != mine:
                experts[i] = AbsentExpert()
        fully_shard(
            experts[mine],
            mesh=mesh[plan.shard_dim],
            reshard_after_forward=plan.reshard_after_forward,
        )
        dp_mesh = flat_mesh
    elif plan.replicate_dim is not None:
        dp_mesh = mesh[(plan.replicate_dim, plan.shard_dim)]
    else:
        dp_mesh = mesh[plan.shard_dim] if mesh.ndim > 1 else mesh
    for path in _depth_first(plan.wrap):
        fully_shard(
            module.get_submodule(path),
            mesh=dp_mesh,
            reshard_after_forward=plan.reshard_after_forward,
        )
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=plan.reshard_after_forward)
    return module


def _wrap_fsdp1(module: nn.Module, plan: S.FSDP1Plan, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import (
        BackwardPrefetch,
        CPUOffload,
        MixedPrecision,
        ShardingStrategy,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(plan.mixed_precision or "")
    kwargs: dict[str, Any] = dict(
        device_mesh=mesh,
        sharding_strategy=ShardingStrategy[plan.sharding_strategy],
        use_orig_params=plan.use_orig_params,
        cpu_offload=CPUOffload(offload_params=plan.cpu_offload),
        mixed_precision=MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype)
        if dtype
        else None,
        backward_prefetch=BackwardPrefetch[plan.backward_prefetch]
        if plan.backward_prefetch
        else None,
    )
    if not plan.cpu_offload:
        kwargs["device_id"] = torch.cuda.current_device()
    for path in _depth_first(plan.wrap):
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        parent.register_module(name, FSDP(parent.get_submodule(name), **kwargs))
    return FSDP(module, **kwargs)


@contextlib.contextmanager
def fsdp1_full_params(module: nn.Module) -> Iterator[None]:
    """``summon_full_params`` for FSDP1 roots; a no-op for anything else."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(module, FSDP):
        with FSDP.summon_full_params(module):
            yield
    else:
        yield
