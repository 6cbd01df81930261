"""The Checkpointer protocol: how a property saves and loads a state dict.

Properties call ``save`` and ``load`` on every rank of the world that holds the
state dict.  The default, :class:`DCPCheckpointer`, is
``torch.distributed.checkpoint`` with ``FileSystemWriter``/``FileSystemReader``;
pass your own object to test your own checkpoint code.  It must be importable by
reference (a module-level object), because it travels to the rank processes.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from dcprop.errors import UsageError
from dcprop.specs import StorageSpec

__all__ = ["Checkpointer", "DCPCheckpointer", "load_checkpointer"]


@runtime_checkable
class Checkpointer(Protocol):
    def save(
        self, state_dict: dict[str, Any], path: str, *, storage: StorageSpec, group: Any
    ) -> None:
        """Write ``state_dict`` (this rank's part) under directory ``path``."""

    def load(self, state_dict: dict[str, Any], path: str, *, group: Any) -> None:
        """Fill ``state_dict`` in place from the checkpoint at ``path``."""


class DCPCheckpointer:
    """``torch.distributed.checkpoint`` save/load (or ``async_save``) on a file system."""

    def save(
        self, state_dict: dict[str, Any], path: str, *, storage: StorageSpec, group: Any
    ) -> None:
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(
            path,
            single_file_per_rank=storage.single_file_per_rank,
            thread_count=storage.thread_count,
        )
        if storage.async_save:
            pending: Any = dcp.async_save(state_dict, storage_writer=writer, process_group=group)
            pending.result()
        else:
            dcp.save(state_dict, storage_writer=writer, process_group=group)

    def load(self, state_dict: dict[str, Any], path: str, *, group: Any) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load(state_dict, storage_reader=dcp.FileSystemReader(path), process_group=group)

    def __repr__(self) -> str:
        return "DCPCheckpointer()"


def load_checkpointer(ref: str) -> Any:
    """Resolve ``"module:attr"`` to a checkpointer (an instance, or a class to instantiate)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--checkpointer {ref!r} must look like 'package.module:attribute'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--checkpointer {ref!r} does not import: {e}") from e
    if isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, Checkpointer):
        raise UsageError(f"--checkpointer {ref!r} has no save(...) and load(...) methods")
    return obj
