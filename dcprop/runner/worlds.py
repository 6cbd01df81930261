"""Rank-side cache of process groups and device meshes for sub-worlds.

Asking for a group or mesh the example did not declare is a :class:`RunnerError`:
the harness's mistake, which the example's outcome reports as ``internal``, never a
failure of the code under test.

An example may use the first ``k`` ranks of an ``N``-rank pool, and a resharding
example uses two such worlds in turn.  Creating a group is collective over the
default group, so every pool rank creates the same groups in the same order (the
controller sends every task to every rank) and caches them by their rank list:
a world seen before costs nothing.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist

from dcprop.errors import RunnerError
from dcprop.specs import MeshSpec

__all__ = ["Worlds"]


class Worlds:
    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self._timeout: timedelta | None = None  # of the groups created here; None: torch's
        self._groups: dict[tuple[int, ...], Any] = {}
        # a second group over the same ranks for checkpointing: an async save runs its
        # collectives from a writer thread while training runs its own on the job's
        # group, and two threads' collectives on one gloo group pair up wrongly
        self._checkpoint_groups: dict[tuple[int, ...], Any] = {}
        self._meshes: dict[MeshSpec, Any] = {}

    def known_groups(self) -> set[Any]:
        groups = [*self._groups.values(), *self._checkpoint_groups.values()]
        return {g for g in groups if g is not None}

    def set_timeout(self, timeout: timedelta) -> None:
        """From now on a collective of the default group or of any group made here,
        before or after, waits at most ``timeout`` before it raises."""
        from torch.distributed.distributed_c10d import _set_pg_timeout

        self._timeout = timeout
        for group in {dist.group.WORLD, *self.known_groups()}:
            _set_pg_timeout(timeout, group)

    def group(self, ranks: tuple[int, ...]) -> Any:
        """The group over ``ranks`` (None on ranks outside it), created by :meth:`prepare`."""
        if ranks not in self._groups:
            raise RunnerError(
                f"no process group over ranks {list(ranks)} was prepared for this "
                "example; declare its world size or mesh in the task"
            )
        return self._groups[ranks]

    def _create_group(self, ranks: tuple[int, ...]) -> Any:
        """Collective over every pool rank the first time; cached after."""
        if ranks not in self._groups:
            if len(ranks) == dist.get_world_size():
                self._groups[ranks] = dist.group.WORLD
            else:
                g = dist.new_group(list(ranks), timeout=self._timeout)
                self._groups[ranks] = g if dist.get_rank() in ranks else None
        return self._groups[ranks]

    def _create_checkpoint_group(self, ranks: tuple[int, ...]) -> None:
        """Collective over every pool rank the first time; cached after."""
        if ranks not in self._checkpoint_groups:
            g = dist.new_group(list(ranks), timeout=self._timeout)
            self._checkpoint_groups[ranks] = g if dist.get_rank() in ranks else None

    def checkpoint_group(self, world_size: int) -> Any:
        """The checkpointing group over ranks ``0..world_size-1`` (see ``__init__``)."""
        ranks = tuple(range(world_size))
        if ranks not in self._checkpoint_groups:
            raise RunnerError(f"no checkpointing group over ranks {list(ranks)} was prepared")
        return self._checkpoint_groups[ranks]

    def prepare(self, meshes: tuple[MeshSpec, ...], world_size: int) -> None:
        """Create (collectively: every pool rank calls this) the example's world group and
        everything ``meshes`` need, including each world's flat mesh."""
        for k in sorted({world_size, *(m.size for m in meshes)}):
            self._create_group(tuple(range(k)))
            self._create_checkpoint_group(tuple(range(k)))
        for spec in meshes:
            for s in (spec, _flat(spec.size)):
                if s not in self._meshes:
                    self._meshes[s] = self._build(s)

    def mesh(self, spec: MeshSpec) -> Any:
        """The ``DeviceMesh`` for ``spec`` over ranks ``0..spec.size-1``; None off the mesh."""
        if spec not in self._meshes:
            raise RunnerError(
                f"mesh {spec!r} was not declared for this example; list it in the "
                "task's meshes so that every rank creates it"
            )
        return self._meshes[spec]

    def flat_mesh(self, world_size: int) -> Any:
        return self.mesh(_flat(world_size))

    def world_group(self, world_size: int) -> Any:
        return self.group(tuple(range(world_size)))

    def _build(self, spec: MeshSpec) -> Any:
        from torch.distributed.device_mesh import DeviceMesh

        layout = torch.arange(spec.size).reshape(spec.shape)
        per_dim = []
        for d in range(len(spec.shape)):
            mine = None
            moved = layout.movedim(d, -1).reshape(-1, spec.shape[d])
            for row in moved.tolist():
                g = self._create_group(tuple(row))
                if dist.get_rank() in row:
                    mine = g
            per_dim.append(mine)
        if dist.get_rank() >= spec.size:
            return None
        if len(spec.shape) == 1:
            return DeviceMesh.from_group(
                cast(Any, per_dim[0]), self.device_type, mesh_dim_names=spec.dim_names
            )
        return DeviceMesh.from_group(
            cast(Any, per_dim), self.device_type, mesh=layout, mesh_dim_names=spec.dim_names
        )


def _flat(world_size: int) -> MeshSpec:
    return MeshSpec((world_size,), ("world",))
