"""How a property saves and loads: the checkpointer hooks.

A checkpointer is one of two kinds, both called on every rank of the world that
holds the state:

* a :class:`Checkpointer` saves and loads a state dict (``save(state_dict, path, ...)``,
  ``load(state_dict, path, ...)``), as ``torch.distributed.checkpoint`` does;
* a :class:`StatefulCheckpointer` saves and loads an *app state*: a dict of
  ``torch.distributed.checkpoint.stateful.Stateful`` objects (``"model"``,
  ``"optim"``, ``"scheduler"``, ``"train_state"``), as trainers built on DCP
  hand theirs to their checkpoint manager.

The default, :class:`DCPCheckpointer`, is DCP with ``FileSystemWriter`` and
``FileSystemReader``; ``"torch_checkpointing"`` names the adapter of Meta's
``torch_checkpointing`` (:mod:`dcprop.checkpointers.torch_checkpointing`).  Yours
must be importable by reference (a module-level object): it travels to the rank
processes.

Either kind may also have ``setup(ctx)`` and ``close()`` (a manager object, a
writer process): :func:`live` calls ``setup`` once per rank on first use and keeps
the object for the rest of the rank's life; :func:`close_live` calls ``close``
when the rank stops.
"""

from __future__ import annotations

import atexit
import importlib
import pickle
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from dcprop.errors import UsageError
from dcprop.specs import StorageSpec

if TYPE_CHECKING:
    from dcprop.runner.execute import RankContext

__all__ = [
    "CHECKPOINTERS",
    "AnyCheckpointer",
    "Checkpointer",
    "DCPCheckpointer",
    "StatefulCheckpointer",
    "close_live",
    "live",
    "load_checkpointer",
    "project_of",
]

#: short names accepted wherever a checkpointer is named (``--checkpointer NAME``)
CHECKPOINTERS: dict[str, str] = {
    "dcp": "dcprop.checkpointer:DCPCheckpointer",
    "torch_checkpointing": "dcprop.checkpointers.torch_checkpointing:TorchCheckpointing",
}


@runtime_checkable
class Checkpointer(Protocol):
    def save(
        self, state_dict: dict[str, Any], path: str, *, storage: StorageSpec, group: Any
    ) -> None:
        """Write ``state_dict`` (this rank's part) under directory ``path``."""

    def load(self, state_dict: dict[str, Any], path: str, *, group: Any) -> None:
        """Fill ``state_dict`` in place from the checkpoint at ``path``."""


@runtime_checkable
class StatefulCheckpointer(Protocol):
    def save_app_state(
        self, app_state: dict[str, Any], path: str, *, storage: StorageSpec, group: Any
    ) -> None:
        """Write the state of every ``Stateful`` in ``app_state`` under directory ``path``
        (``value.state_dict()`` gives it, as ``dcp.save`` takes it)."""

    def load_app_state(self, app_state: dict[str, Any], path: str, *, group: Any) -> None:
        """Restore every ``Stateful`` in ``app_state`` from the checkpoint at ``path``:
        ``value.state_dict()`` is the template to load into, and ``value.load_state_dict``
        takes what was loaded, as ``dcp.load`` does."""


#: what a property saves and loads with: a state-dict checkpointer or an app-state one
AnyCheckpointer = Checkpointer | StatefulCheckpointer


class DCPCheckpointer:
    """``torch.distributed.checkpoint`` save/load (or ``async_save``) on a file system."""

    project = "torch"

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


def project_of(checkpointer: AnyCheckpointer | None) -> str | None:
    """The project whose known bugs may explain a failure met with ``checkpointer``
    (None: DCP's): ``"torch"`` for DCP, the library for a built-in adapter (its
    ``project``), None for your own."""
    if checkpointer is None:
        return DCPCheckpointer.project
    return getattr(checkpointer, "project", None)


def load_checkpointer(ref: str) -> AnyCheckpointer:
    """Resolve a short name (:data:`CHECKPOINTERS`) or ``"module:attr"`` to a checkpointer
    (an instance, or a class to instantiate)."""
    ref = CHECKPOINTERS.get(ref, ref)
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UsageError(
            f"--checkpointer {ref!r} must be {' or '.join(map(repr, CHECKPOINTERS))} "
            "or look like 'package.module:attribute'"
        )
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--checkpointer {ref!r} does not import: {e}") from e
    if isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, (Checkpointer, StatefulCheckpointer)):
        raise UsageError(
            f"--checkpointer {ref!r} has neither save(...) and load(...) "
            "nor save_app_state(...) and load_app_state(...) methods"
        )
    return obj


# This rank's checkpointers that have been set up, by their pickled form: each example
# unpickles its own copy of the hooks, and the copy that was set up must serve them all.
_LIVE: dict[bytes, AnyCheckpointer] = {}


def live(checkpointer: AnyCheckpointer, ctx: RankContext) -> AnyCheckpointer:
    """The object that serves ``checkpointer`` on this rank: the first one seen, after its
    ``setup(ctx)`` (if it has one) ran once; later examples get that same object."""
    if not hasattr(checkpointer, "setup") or any(checkpointer is c for c in _LIVE.values()):
        return checkpointer
    key = pickle.dumps(checkpointer)
    if key not in _LIVE:
        if not _LIVE:
            atexit.register(close_live)  # plain python and torchrun: the interpreter's exit
        checkpointer.setup(ctx)
        _LIVE[key] = checkpointer
    return _LIVE[key]


def close_live() -> None:
    """``close()`` every checkpointer :func:`live` set up on this rank (when it stops)."""
    while _LIVE:
        _, checkpointer = _LIVE.popitem()
        close = getattr(checkpointer, "close", None)
        if close is not None:
            close()
