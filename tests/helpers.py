"""Test-only code that runs in the rank processes (so it must be importable)."""

import os
import signal
import time

import torch
import torch.distributed as dist

from dcprop.checkpointer import DCPCheckpointer
from dcprop.errors import UsageError


# ---- rank functions for runner tests ------------------------------------------------
def all_reduce_rank(ctx, offset=0):
    t = torch.tensor([ctx.rank + offset])
    dist.all_reduce(t, group=ctx.group())
    return int(t.item())


def mesh_ranks(ctx, spec):
    mesh = ctx.mesh(spec)
    return None if mesh is None else mesh.mesh.flatten().tolist()


def fail_on(ctx, rank):
    if ctx.rank == rank:
        raise ValueError(f"deliberate failure on rank {rank}")
    dist.barrier(group=ctx.group())


def skip_barrier(ctx, rank):
    if ctx.rank != rank:
        dist.barrier(group=ctx.group())
    else:
        time.sleep(600)


def exit_on(ctx, rank):
    if ctx.rank == rank:
        os._exit(7)
    dist.barrier(group=ctx.group())


def sleep(ctx, seconds):
    time.sleep(seconds)
    return ctx.rank


def leave_state_behind(ctx):
    torch.set_default_dtype(torch.float64)
    torch.use_deterministic_algorithms(True)
    torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    os.environ["DCPROP_LEAK"] = "1"
    dist.new_group([0])  # a group the example never cleans up
    torch.manual_seed(1234)
    return ctx.example_dir


def observe_state(ctx):
    from torch.nn.modules import module

    return {
        "dtype": str(torch.get_default_dtype()),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "hooks": len(module._global_forward_hooks),
        "env": os.environ.get("DCPROP_LEAK"),
        "groups": len(dist.distributed_c10d._world.pg_map),
        "random": torch.rand(1).item(),
        "example_dir_exists": os.path.isdir(ctx.example_dir),
    }


def load_missing_key_on(ctx, rank):
    """A real DCP load in which one rank asks for a key the checkpoint lacks."""
    import torch.distributed.checkpoint as dcp

    path = os.path.join(ctx.example_dir, "ckpt")
    dcp.save({"a": torch.zeros(2)}, checkpoint_id=path, process_group=ctx.group())
    wanted = {"b" if ctx.rank == rank else "a": torch.ones(2)}
    dcp.load(wanted, checkpoint_id=path, process_group=ctx.group())


def write_file(ctx):
    path = os.path.join(ctx.example_dir, f"rank{ctx.rank}.txt")
    with open(path, "w") as f:
        f.write("x")
    dist.barrier(group=ctx.group())
    return sorted(os.listdir(ctx.example_dir))


def unmet_precondition(ctx):
    """A property handed a scenario it does not fit: dcprop's harness, not the code under test."""
    raise UsageError("this property needs a scenario with experts")


def take(ctx, obj):
    return None


class OnlyCheckpointsBeside(DCPCheckpointer):
    """DCP that refuses to load where the example's directory holds anything but
    checkpoints (directories): across hosts, what one rank wrote there is no message to
    another."""

    def load(self, state_dict, path, *, group):
        where = os.path.dirname(path)
        files = sorted(n for n in os.listdir(where) if not os.path.isdir(os.path.join(where, n)))
        if files:
            raise AssertionError(f"files beside the checkpoint: {files}")
        super().load(state_dict, path, group=group)


def _import_only_the_controller_has():
    raise ModuleNotFoundError("No module named 'only_on_the_controller'")


class RanksCannotImport(DCPCheckpointer):
    """A user's checkpointer whose module the rank processes cannot import."""

    def __reduce__(self):
        return (_import_only_the_controller_has, ())


# ---- deliberately faulty checkpointers (bug injections) ----------------------------
class _Faulty(DCPCheckpointer):
    """DCP, with one fault applied to what is saved or loaded."""

    def save(self, state_dict, path, *, storage, group):
        super().save(self.on_save(state_dict), path, storage=storage, group=group)

    def load(self, state_dict, path, *, group):
        super().load(state_dict, path, group=group)
        self.on_load(state_dict)

    def on_save(self, state_dict):
        return state_dict

    def on_load(self, state_dict):
        pass


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class DropKey(_Faulty):
    """Forgets the last model entry on load: it keeps its perturbed value."""

    def load(self, state_dict, path, *, group):
        model = state_dict["model"]
        if not model:  # a rank that loads nothing itself (broadcast_from_rank0)
            return super().load(state_dict, path, group=group)
        dropped = sorted(model)[-1]
        kept = model.pop(dropped)
        try:
            super().load(state_dict, path, group=group)
        finally:
            model[dropped] = kept


class CorruptOneElement(_Faulty):
    """Flips one element of rank 0's first non-empty model shard on load."""

    def on_load(self, state_dict):
        if dist.get_rank() != 0:
            return
        for key in sorted(state_dict["model"]):
            t = _local(state_dict["model"][key])
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                t.view(-1)[0] += 1.0
                return


class SkipStepCount(_Faulty):
    """Does not restore the optimizer's step counters."""

    def load(self, state_dict, path, *, group):
        steps = {}
        for fqn, state in state_dict["optim"].get("state", {}).items():
            if "step" in state:
                steps[fqn] = state.pop("step")
        super().load(state_dict, path, group=group)
        for fqn, step in steps.items():
            state_dict["optim"]["state"][fqn]["step"] = step


class WrongOffsets(_Faulty):
    """Loads each rank's shard rolled by one row, as a resharding bug would."""

    def on_load(self, state_dict):
        for value in state_dict["model"].values():
            t = _local(value)
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] > 1:
                t.copy_(torch.roll(t.clone(), 1, 0))


class DropBuffers(_Faulty):
    """Leaves buffers (BatchNorm statistics) out of the load."""

    def load(self, state_dict, path, *, group):
        model = state_dict["model"]
        buffers = {
            k: model.pop(k)
            for k in list(model)
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        }
        try:
            super().load(state_dict, path, group=group)
        finally:
            model.update(buffers)


class ZeroFrozen(_Faulty):
    """Mishandles frozen parameters: writes zeros for parameters that do not require grad
    (it decides by the optimizer state, which frozen parameters lack)."""

    def on_load(self, state_dict):
        trained = set(state_dict.get("optim", {}).get("state", {}))
        if not trained:
            return
        for key, value in state_dict["model"].items():
            if key not in trained and key.endswith("weight"):
                _local(value).zero_()


def _tensors(tree):
    """Every tensor in a nested state dict (DTensors: their local shard)."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)
    elif isinstance(tree, torch.Tensor):
        yield _local(tree)


def _param_groups(optim):
    """Each hyperparameter mapping of an optimizer state dict, nested or flattened:
    ``(mapping, key)`` pairs for its ``lr``."""
    if "param_groups" in optim:
        return [(group, "lr") for group in optim["param_groups"]]
    return [(optim, k) for k in optim if k.startswith("param_groups.") and k.endswith(".lr")]


class KeepLiveLR(_Faulty):
    """Restores every optimizer entry except the learning rate, which keeps the value
    the live optimizer had before the load."""

    def load(self, state_dict, path, *, group):
        live = [(m, k, m[k]) for m, k in _param_groups(state_dict["optim"])]
        super().load(state_dict, path, group=group)
        for mapping, key, value in live:
            mapping[key] = value


class KeepLiveScheduler(_Faulty):
    """Restores model and optimizer but leaves the LR scheduler's state as it was."""

    def load(self, state_dict, path, *, group):
        live = state_dict.pop("scheduler", None)
        try:
            super().load(state_dict, path, group=group)
        finally:
            if live is not None:
                state_dict["scheduler"] = live


class ZeroAsNaN(_Faulty):
    """Loads every floating-point zero as NaN (as a reader of uninitialised memory would)."""

    def on_load(self, state_dict):
        for t in _tensors(state_dict):
            if t.is_floating_point():
                t.masked_fill_(t == 0, float("nan"))


class ZeroAsNegativeZero(_Faulty):
    """Loads every floating-point 0.0 as -0.0 (a sign bit set by a bad conversion)."""

    def on_load(self, state_dict):
        for t in _tensors(state_dict):
            if t.is_floating_point():
                t.masked_fill_((t == 0) & ~t.signbit(), -0.0)


class RenamedDCP(DCPCheckpointer):
    """Plain DCP under another name: a user's checkpointer with no bug of its own."""


class TwoFaults(DCPCheckpointer):
    """Two distinct bugs in two regions: a rank alone in its job loses its write, and a
    load beside other ranks fails."""

    def save(self, state_dict, path, *, storage, group):
        if dist.get_world_size() == 1:
            raise OSError("the write of a lone rank was lost")
        super().save(state_dict, path, storage=storage, group=group)

    def load(self, state_dict, path, *, group):
        if dist.get_world_size() > 1:
            raise ValueError("a checkpoint shared between ranks cannot be read")
        super().load(state_dict, path, group=group)


class AssumesTheModelIsTheJob(DCPCheckpointer):
    """Fails where the default group (the job) is larger than the model's group, as a
    checkpointer that saves over the default group would (without the hang)."""

    def save(self, state_dict, path, *, storage, group):
        if dist.get_world_size() != dist.get_world_size(group):
            raise ValueError(
                f"the default group has {dist.get_world_size()} ranks, "
                f"the model's {dist.get_world_size(group)}"
            )
        super().save(state_dict, path, storage=storage, group=group)


class DropNamedBuffers(_Faulty):
    """Leaves the model entries whose last name is in ``names`` out of the load: they
    keep the values the job had (perturbed, in a property)."""

    def __init__(self, *names):
        self.names = names

    def load(self, state_dict, path, *, group):
        model = state_dict["model"]
        left = {k: model.pop(k) for k in list(model) if k.rsplit(".", 1)[-1] in self.names}
        try:
            super().load(state_dict, path, group=group)
        finally:
            model.update(left)


class OneUlpOffInLowPrecision(_Faulty):
    """Loads every bf16 and fp16 model tensor one ulp off in its first element (the
    smallest change its dtype can show): only a bitwise comparison sees it."""

    def on_load(self, state_dict):
        for value in state_dict["model"].values():
            t = _local(value)
            if t.dtype in (torch.bfloat16, torch.float16) and t.numel():
                t.view(torch.int16).view(-1)[0] += 1


INJECTIONS = {
    "drop_key": DropKey(),
    "corrupt_one_element": CorruptOneElement(),
    "skip_step_count": SkipStepCount(),
    "wrong_offsets": WrongOffsets(),
    "drop_buffers": DropBuffers(),
    "zero_frozen": ZeroFrozen(),
    "keep_live_lr": KeepLiveLR(),
    "keep_live_scheduler": KeepLiveScheduler(),
    "zero_as_nan": ZeroAsNaN(),
    "zero_as_negative_zero": ZeroAsNegativeZero(),
}


def double_grads_on_rank0(model, seed, device, frozen):
    """A model factory with a gradient-reduction bug: rank 0's gradients count twice."""
    from dcprop.build import build_model

    module = build_model(model, seed=seed, device=device, frozen=frozen)
    if dist.get_rank() == 0:
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(lambda g: g * 2)
    return module


def without_running_mean(model, seed, device, frozen):
    """A model factory whose state dict leaves out every BatchNorm's ``running_mean``
    (a persistent buffer): a state-dict hook drops it and a load hook stops strict
    loading from asking for it, so it is missing from what is saved and what is loaded
    alike, and a load never restores it."""
    from dcprop.build import build_model

    module = build_model(model, seed=seed, device=device, frozen=frozen)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm1d):
            bn.register_state_dict_post_hook(_drop_running_mean)
            bn.register_load_state_dict_post_hook(_forgive_running_mean)
    return module


def _drop_running_mean(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "running_mean", None)


def _forgive_running_mean(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.endswith("running_mean")]


def with_persistent_cache(model, seed, device, frozen):
    """A model factory that registers every Mask's ``cache`` as persistent: a buffer
    that must never be saved shows up in the state dict."""
    from dcprop.build import Mask, build_model

    module = build_model(model, seed=seed, device=device, frozen=frozen)
    for mask in module.modules():
        if isinstance(mask, Mask) and mask.cache is not None:
            mask._non_persistent_buffers_set.discard("cache")
    return module


MODEL_INJECTIONS = {"without_running_mean": without_running_mean}


# ---- known-bug matching --------------------------------------------------------------
def _load_optim_state_dict(ctx, other_on):
    """Fails as torch's stateless-optimizer bug does (same type, message and function),
    except on rank ``other_on``, which fails differently."""
    dist.barrier(group=ctx.group())
    if ctx.rank == other_on:
        raise ValueError("a different failure")
    raise AssertionError("Expected device to be set")


def default_world(ctx):
    """The size of this rank's default process group (the example's job)."""
    return dist.get_world_size()


def barrier_on_the_default_group(ctx, seconds=0.5):
    """After some work, wait on the job's default group: ranks outside the example's
    world (idle) never join, as in ``dsd-broadcast-default-group``."""
    time.sleep(seconds)
    dist.barrier()


def return_early_on(ctx, rank, seconds=0.5):
    """Every rank but ``rank``, which returns at once, joins a collective after some work."""
    if ctx.rank == rank:
        return ctx.rank
    time.sleep(seconds)
    dist.all_reduce(torch.zeros(1), group=ctx.group())


def compute_then_all_reduce_on(ctx, rank, seconds):
    """``rank`` computes for ``seconds`` (no collective) while the others wait for it in
    an all-reduce: slow, but healthy."""
    if ctx.rank == rank:
        x, until = torch.ones(64, 64), time.monotonic() + seconds
        while time.monotonic() < until:
            x = (x @ x).clamp(-1, 1)
    return all_reduce_rank(ctx)


def kill_self_on(ctx, rank):
    """``rank`` is killed (SIGKILL) while the others wait for it in a barrier."""
    if ctx.rank == rank:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier(group=ctx.group())


def make_multiprocessing_temp_dir(ctx):
    """What an async writer's start-up does: multiprocessing's own temp directory."""
    import multiprocessing.util

    return multiprocessing.util.get_temp_dir()


class FailsOnce(DCPCheckpointer):
    """A transient fault: the first save after ``marker`` is armed fails, every later one
    passes (as a write that hit a full disk once would)."""

    def __init__(self, marker):
        self.marker = marker

    def save(self, state_dict, path, *, storage, group):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().save(state_dict, path, storage=storage, group=group)
        raise OSError("a transient write error")


def use_undeclared_mesh(ctx):
    """Ask for a mesh the task did not declare (so no rank created it)."""
    from dcprop.specs import MeshSpec

    return ctx.mesh(MeshSpec((2,), ("shard",)))
