"""Meta's ``torch_checkpointing`` as a dcprop checkpointer (``--checkpointer torch_checkpointing``).

It uses the library as its README and docs tell users to: one ``CheckpointManager``,
``save(path, {...})`` and ``load(path, into={...})`` of plain dicts, a resharder on
every item (``DefaultResharder``: the docs' "save distributed, reshard on load"), the
default store barrier that commits a multi-rank write, and on a host without an
accelerator the documented CPU staging configuration (no pinned memory, no
non-blocking copy).  ``storage.async_save`` picks the async preset (a background
writer process) or the synchronous one.

A manager is built per checkpoint, so this adapter has no per-rank ``setup``: a
manager's metadata manager caches the first state dict's layout and rejects any other
(right for a training job, whose layout never changes; every example here is a new
job), and the uncached one the docs recommend for a changing layout cannot be handed to
a 0.1.1 ``CheckpointManager`` (its ``Config`` has no ``checkpoint_metadata_manager``).
The async preset therefore starts its writer process (``spawn``, which imports torch)
per save: seconds, more under load, so give ``--timeout`` room.

Install it with ``pip install dcprop[torch-checkpointing]``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from dcprop.errors import UsageError
from dcprop.specs import StorageSpec

__all__ = ["TorchCheckpointing"]

_EXTRA = "pip install 'dcprop[torch-checkpointing]'"


class TorchCheckpointing:
    """``torch_checkpointing.CheckpointManager`` save/load of a state dict.

    ``direct_io``: the local file-system storage's ``use_direct_io`` (the library's
    default, True, unless you turn it off)."""

    project = "torch_checkpointing"

    def __init__(self, *, direct_io: bool = True) -> None:
        self.direct_io = direct_io
        # found, not imported: the controller that names it never imports torch
        try:
            found = importlib.util.find_spec("torch_checkpointing") is not None
        except ImportError:
            found = False
        if not found:
            raise UsageError(
                "--checkpointer torch_checkpointing needs the torch_checkpointing package: "
                + _EXTRA
            )

    def save(
        self, state_dict: dict[str, Any], path: str, *, storage: StorageSpec, group: Any
    ) -> None:
        import torch.distributed as dist

        manager = _manager(async_save=storage.async_save, direct_io=self.direct_io)
        try:
            written = manager.save(path, state_dict)
            if written is not None:
                written.result()
        finally:
            manager.close()
        # an async write returns per rank; the checkpoint is whole once every rank's is
        dist.barrier(group=group)

    def load(self, state_dict: dict[str, Any], path: str, *, group: Any) -> None:
        manager = _manager(async_save=False, direct_io=self.direct_io)
        try:
            loaded = manager.load(path, into=state_dict, strict=True)
        finally:
            manager.close()
        # tensors are loaded in place; other leaves (hyperparameters, scheduler
        # state) come back only in the returned mapping
        state_dict.update(loaded)

    def __repr__(self) -> str:
        return "TorchCheckpointing()" if self.direct_io else "TorchCheckpointing(direct_io=False)"


def _manager(*, async_save: bool, direct_io: bool) -> Any:
    import torch
    from torch_checkpointing import CheckpointManager, ItemSpec
    from torch_checkpointing.config import AsyncCheckpointSaverConfig, SyncCheckpointSaverConfig
    from torch_checkpointing.default_resharder import DefaultResharder
    from torch_checkpointing.staging import CheckpointStagerConfig
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    if async_save:
        # docs/troubleshooting.md, "Save fails on a CPU-only host"
        accelerator = torch.accelerator.is_available()
        staging = CheckpointStagerConfig(
            use_pinned_memory=accelerator, use_non_blocking_copy=accelerator
        )
        save: Any = AsyncCheckpointSaverConfig(staging_config=staging)
    else:
        save = SyncCheckpointSaverConfig()
    config = CheckpointManager.Config(
        default=ItemSpec(resharder=DefaultResharder()),
        save=save,
        storage_config=LocalFileSystemStorageConfig(use_direct_io=direct_io),
    )
    return CheckpointManager(config)
