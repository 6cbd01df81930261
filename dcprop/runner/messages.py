"""What travels between the controller and the ranks.

Messages are ``(name, payload)`` pairs, as in pytest-xdist.  Controller to rank:
``("run", Task)``, ``("shutdown", None)``.  Rank to controller: ``("ready", rank)``,
``("outcome", Outcome)``.  Everything here is plain picklable data.
"""

from __future__ import annotations

from typing import Any

import attrs

from dcprop.specs import MeshSpec

__all__ = ["Outcome", "Task"]


@attrs.frozen
class Task:
    """One example: call ``fn(ctx, *args)`` on every rank below ``world_size``.

    ``meshes`` are the device meshes the example will ask for; every pool rank takes
    part in creating them (group creation is collective), then ranks outside the
    example's world stay idle.
    """

    id: int
    fn: Any
    args: tuple[Any, ...]
    world_size: int
    meshes: tuple[MeshSpec, ...]
    tmpdir: str
    seed: int
    device: str


@attrs.frozen
class Outcome:
    """What one rank reports for one task."""

    rank: int
    status: str  # "ok" | "error" | "idle"
    value: Any = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    signature: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == "error"
