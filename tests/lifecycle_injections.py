"""Faulty checkpointers for the lifecycle property: each gets one part of a training
job's state wrong on load (importable by reference: the ranks unpickle them)."""

import os

from helpers import KeepLiveScheduler as ForgetsScheduler  # noqa: F401 (the same fault)

from dcprop.checkpointer import DCPCheckpointer


class RNGOfRankZero(DCPCheckpointer):
    """Restores rank 0's training RNG on every rank (a per-rank key read as a constant)."""

    def load(self, state_dict, path, *, group):
        train = state_dict.get("train", {})
        mine = [key for key in train if key.startswith("rng_rank")]
        for key in mine:
            train["rng_rank0"] = train.pop(key)
        super().load(state_dict, path, group=group)
        for key in mine:
            train[key] = train.pop("rng_rank0")


class OptimizerOfFirstSave(DCPCheckpointer):
    """Loads the model of the checkpoint asked for, but the optimizer (and scheduler) of
    the first checkpoint saved beside it: one save's model paired with another's
    optimizer."""

    def load(self, state_dict, path, *, group):
        first = os.path.join(os.path.dirname(path), "c0")
        optim = {k: state_dict.pop(k) for k in ("optim", "scheduler") if k in state_dict}
        super().load(state_dict, path, group=group)
        super().load(optim, first, group=group)
        state_dict.update(optim)


class SkipsMissingKeys(DCPCheckpointer):
    """Loads what the checkpoint has and leaves every other entry as it was (a partial
    load where a strict one was asked for): a changed model keeps fresh values."""

    def load(self, state_dict, path, *, group):
        import torch.distributed.checkpoint as dcp

        dcp.load(
            state_dict,
            storage_reader=dcp.FileSystemReader(path),
            planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
            process_group=group,
        )


class SkipsOtherDtypes(DCPCheckpointer):
    """Loads only the model entries whose template has the dtype they were saved in: a
    job restarted in another dtype silently keeps its fresh weights."""

    def load(self, state_dict, path, *, group):
        import torch.distributed.checkpoint as dcp

        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        model = state_dict.get("model", {})
        skipped = {
            key: model.pop(key)
            for key in list(model)
            if getattr(saved.get(f"model.{key}"), "properties", None) is not None
            and saved[f"model.{key}"].properties.dtype != model[key].dtype
        }
        super().load(state_dict, path, group=group)
        model.update(skipped)
