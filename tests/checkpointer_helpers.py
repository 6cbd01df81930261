"""Checkpointers for tests/test_checkpointers.py (importable: they run in the rank processes)."""

import os

import torch.distributed.checkpoint as dcp

from dcprop.checkpointer import DCPCheckpointer
from dcprop.checkpointers.torch_checkpointing import TorchCheckpointing
from dcprop.errors import UsageError


class AppStateDCP:
    """A trainer's checkpoint manager in miniature: ``dcp.save``/``dcp.load`` of its app state."""

    def save_app_state(self, app_state, path, *, storage, group):
        dcp.save(app_state, checkpoint_id=path, process_group=group)

    def load_app_state(self, app_state, path, *, group):
        dcp.load(app_state, checkpoint_id=path, process_group=group)


class ForgetsTrainState(AppStateDCP):
    """Does not save the train state, and resumes a checkpoint without one at step 0."""

    def save_app_state(self, app_state, path, *, storage, group):
        super().save_app_state(
            _without(app_state, "train_state"), path, storage=storage, group=group
        )

    def load_app_state(self, app_state, path, *, group):
        super().load_app_state(_without(app_state, "train_state"), path, group=group)
        app_state["train_state"].load_state_dict({"step": 0})


class SkipsOptimizer(AppStateDCP):
    """Loads the model, not the optimizer."""

    def load_app_state(self, app_state, path, *, group):
        super().load_app_state(_without(app_state, "optim"), path, group=group)


def _without(app_state, key):
    return {k: v for k, v in app_state.items() if k != key}


class CountsLifecycle(DCPCheckpointer):
    """DCP that leaves a file per ``setup`` and per ``close`` in ``directory``."""

    def __init__(self, directory):
        self.directory = directory
        self.rank = None

    def setup(self, ctx):
        self.rank = ctx.rank
        self._mark("setup")

    def close(self):
        self._mark("close")

    def _mark(self, what):
        path = os.path.join(self.directory, f"{what}-rank{self.rank}-pid{os.getpid()}")
        with open(path, "x"):  # a second setup or close on this rank fails here
            pass


#: the adapter with the library's direct I/O off, past `tc-direct-io-unaligned-write`
try:
    TC_BUFFERED = TorchCheckpointing(direct_io=False)
except UsageError:  # the library is not installed: the tests that use it skip
    TC_BUFFERED = None
