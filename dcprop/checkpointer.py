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

Three more optional methods let the lifecycle and crash-consistency properties see
what a checkpoint manager does beyond save and load (each has DCP's behaviour as
its default, through the module functions named after it):

* ``async_save(...)`` / ``async_save_app_state(...)``: start a save and return at
  once with a *pending* save (anything with ``result()``, as ``dcp.async_save``'s
  future); :func:`start_save` calls it, or saves synchronously and returns a
  finished pending save for a checkpointer without one;
* ``complete(root)``: the checkpoints under directory ``root`` that are complete
  and safe to load, oldest first (:func:`complete_checkpoints`; DCP's default: the
  directories that hold a ``.metadata`` file, which DCP writes last);
* ``latest(root)``: the checkpoint the checkpointer would resume from, or None
  (:func:`latest_checkpoint`; DCP has no notion of it: None).
"""

from __future__ import annotations

import atexit
import importlib
import os
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
    "Pending",
    "StatefulCheckpointer",
    "close_live",
    "complete_checkpoints",
    "latest_checkpoint",
    "live",
    "load_checkpointer",
    "project_of",
    "start_save",
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


@runtime_checkable
class Pending(Protocol):
    """A save in flight: ``result()`` blocks until it is durable (or raises)."""

    def result(self) -> Any: ...


class Done:
    """The pending save of a checkpointer that only saves synchronously: already done."""

    def result(self) -> None:
        return None


def start_save(
    checkpointer: AnyCheckpointer,
    state: dict[str, Any],
    path: str,
    *,
    storage: StorageSpec,
    group: Any,
) -> Pending:
    """Start saving ``state`` (a state dict, or an app state for a
    :class:`StatefulCheckpointer`) at ``path`` and return the pending save: the
    checkpointer's own ``async_save``/``async_save_app_state`` where it has one, else a
    synchronous save and :class:`Done`."""
    if isinstance(checkpointer, StatefulCheckpointer):
        start = getattr(checkpointer, "async_save_app_state", None)
        if start is None:
            checkpointer.save_app_state(state, path, storage=storage, group=group)
            return Done()
    else:
        start = getattr(checkpointer, "async_save", None)
        if start is None:
            checkpointer.save(state, path, storage=storage, group=group)
            return Done()
    pending: Pending = start(state, path, storage=storage, group=group)
    return pending


def complete_checkpoints(checkpointer: AnyCheckpointer, root: str) -> list[str]:
    """The complete checkpoints under ``root``, oldest first: the checkpointer's own
    ``complete(root)``, or DCP's rule (a directory with a ``.metadata`` file)."""
    own = getattr(checkpointer, "complete", None)
    if own is not None:
        return list(own(root))
    return DCPCheckpointer().complete(root)


def latest_checkpoint(checkpointer: AnyCheckpointer, root: str) -> str | None:
    """The checkpoint under ``root`` the checkpointer would resume from: its own
    ``latest(root)``, or None where it has no such notion (DCP)."""
    own = getattr(checkpointer, "latest", None)
    return None if own is None else own(root)


class DCPCheckpointer:
    """``torch.distributed.checkpoint`` save/load (or ``async_save``) on a file system."""

    project = "torch"

    def save(
        self, state_dict: dict[str, Any], path: str, *, storage: StorageSpec, group: Any
    ) -> None:
        import torch.distributed.checkpoint as dcp

        if storage.async_save:
            self.async_save(state_dict, path, storage=storage, group=group).result()
        else:
            dcp.save(state_dict, storage_writer=_writer(path, storage), process_group=group)

    def async_save(
        self, state_dict: dict[str, Any], path: str, *, storage: StorageSpec, group: Any
    ) -> Pending:
        """``dcp.async_save``: returns once the state is staged (copied), the write goes on
        in the background until ``result()``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        pending = dcp.async_save(
            state_dict, storage_writer=_writer(path, storage), process_group=group
        )
        if isinstance(pending, AsyncSaveResponse):  # staging and upload as two futures
            return pending.upload_completion
        return pending

    def complete(self, root: str) -> list[str]:
        """The directories under ``root`` holding a ``.metadata`` file (DCP writes it
        last, after every rank's data), oldest first."""
        if not os.path.isdir(root):
            return []
        found = [
            os.path.join(root, name)
            for name in os.listdir(root)
            if os.path.isfile(os.path.join(root, name, ".metadata"))
        ]
        return sorted(found, key=lambda path: os.stat(os.path.join(path, ".metadata")).st_mtime_ns)

    def load(self, state_dict: dict[str, Any], path: str, *, group: Any) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load(state_dict, storage_reader=dcp.FileSystemReader(path), process_group=group)

    def __repr__(self) -> str:
        return "DCPCheckpointer()"


def _writer(path: str, storage: StorageSpec) -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemWriter(
        path,
        single_file_per_rank=storage.single_file_per_rank,
        thread_count=storage.thread_count,
    )


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
