"""Checkpointers with crash-consistency bugs, for tests/test_damage.py (importable: they
run in the rank processes).  Each names no project: as a user's own checkpointer, no
known bug or documented limitation of DCP's can excuse it."""

import torch.distributed.checkpoint as dcp

from dcprop.checkpointer import DCPCheckpointer


class _WhenAwaited:
    """A pending save that does its work only when awaited."""

    def __init__(self, work):
        self._work = work

    def result(self):
        return self._work()


class NoCopyAsync(DCPCheckpointer):
    """An async save that stages nothing: it returns at once and writes the live tensors
    of the state dict it was handed when awaited, whatever the loop did to them since."""

    project = None

    def async_save(self, state_dict, path, *, storage, group):
        def write():
            dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(path), process_group=group)

        return _WhenAwaited(write)


class ClaimsIntegrity(DCPCheckpointer):
    """Says it verifies what it loads, and loads through plain DCP, which checks nothing."""

    project = None
    verifies_integrity = True
