"""A checkpointer with a bug of the kind dcprop exists to find.

It saves through DCP, but "optimises" the load by skipping optimizer state for
parameters whose name ends in ``bias``: training resumes with reset moments there.
"""

import torch.distributed.checkpoint as dcp

from dcprop.specs import StorageSpec


class SkipsBiasOptimizerState:
    def save(self, state_dict, path, *, storage: StorageSpec, group):
        dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(path), process_group=group)

    def load(self, state_dict, path, *, group):
        optim_state = state_dict.get("optim", {}).get("state", {})
        skipped = {k: optim_state.pop(k) for k in list(optim_state) if k.endswith("bias")}
        dcp.load(state_dict, storage_reader=dcp.FileSystemReader(path), process_group=group)
        optim_state.update(skipped)  # the template's (perturbed) values stay: the bug
