"""Damage done to a checkpoint after its save completed, and the in-place mutation
that races an async save: the faults of ``loud_failure`` and ``async_isolation``.

Files are named by position, not by name, so that one spec applies to any
checkpointer's layout: the *data files* are the regular files of the checkpoint
directory other than the metadata (DCP's ``.metadata``), sorted by path, and
``index`` picks one modulo their number (DCP names them ``__<rank>_<n>.distcp``:
index 0 is rank 0's first file).  Fractions place a cut or a flip inside a file (or
a tensor's bytes) whatever its size, so a spec shrinks to the same kind of damage on
a smaller model.  In a layout without DCP's metadata file, damage to "the metadata"
falls on data file 0, and a tensor-byte flip on a byte of a data file.

>>> Truncate(target="metadata", keep=0.5)
Truncate(target='metadata', keep=0.5)
"""

from __future__ import annotations

import attrs

from dcprop.errors import SpecError
from dcprop.specs._base import Spec, as_float, at_least, at_most, below, instance_of, one_of

__all__ = [
    "DAMAGE_KINDS",
    "FILE_DAMAGES",
    "MUTATIONS",
    "TARGETS",
    "Damage",
    "FileDamage",
    "FlipMetadataByte",
    "FlipTensorByte",
    "MutateInFlight",
    "RemoveFile",
    "StaleFile",
    "Truncate",
]

#: which file a truncation cuts: a data file, or the checkpoint's metadata
TARGETS = ("data", "metadata")
#: what the training loop does while an async save is in flight: an optimizer step,
#: an in-place shift of every parameter, buffer and optimizer value (``Job.perturb``),
#: or an in-place change of every tensor of the state dict handed to the save
MUTATIONS = ("step", "perturb", "state_dict")

_index = [instance_of(int), at_least(0), at_most(4095)]
_fraction = [instance_of(float), at_least(0.0), below(1.0)]
_mask = [instance_of(int), at_least(1), at_most(255)]


@attrs.frozen(repr=False)
class RemoveFile(Spec):
    """Delete data file ``index``: a lost shard."""

    index: int = attrs.field(default=0, validator=_index)


@attrs.frozen(repr=False)
class Truncate(Spec):
    """Cut ``target`` (data file ``index``, or the metadata) to ``keep`` of its bytes,
    rounded down: a write cut short by a full disk.  ``keep=0.0`` empties it."""

    target: str = attrs.field(default="data", validator=one_of(TARGETS))
    index: int = attrs.field(default=0, validator=_index)
    keep: float = attrs.field(default=0.0, converter=as_float, validator=_fraction)

    def __attrs_post_init__(self) -> None:
        if self.target == "metadata" and self.index:
            raise SpecError(
                f"index={self.index}: a checkpoint has one metadata file, so "
                "Truncate(target='metadata') takes no index"
            )


@attrs.frozen(repr=False)
class FlipTensorByte(Spec):
    """XOR byte ``at`` (a fraction of the tensor's bytes) of stored tensor ``entry`` with
    ``mask``: bit rot in a tensor's data, never in a header or padding.  The tensors
    are those the checkpoint's metadata locates (DCP: ``storage_data``, in key order),
    ``entry`` modulo their number; a checkpoint without DCP metadata has its byte
    flipped at ``at`` of data file ``entry``."""

    entry: int = attrs.field(default=0, validator=_index)
    at: float = attrs.field(default=0.0, converter=as_float, validator=_fraction)
    mask: int = attrs.field(default=1, validator=_mask)


@attrs.frozen(repr=False)
class FlipMetadataByte(Spec):
    """XOR byte ``at`` (a fraction of its length) of the metadata file with ``mask``."""

    at: float = attrs.field(default=0.0, converter=as_float, validator=_fraction)
    mask: int = attrs.field(default=1, validator=_mask)


@attrs.frozen(repr=False)
class StaleFile(Spec):
    """Copy data file ``index`` of an older checkpoint of the same job (saved one
    training step earlier, so its values differ) over the new one's: a file left
    behind by an earlier save that the new one was meant to replace."""

    index: int = attrs.field(default=0, validator=_index)


@attrs.frozen(repr=False)
class MutateInFlight(Spec):
    """Right after an async save returns, before it is awaited, change state in place
    (one of :data:`MUTATIONS`)."""

    how: str = attrs.field(default="step", validator=one_of(MUTATIONS))


#: damage to a completed checkpoint's files (``loud_failure``)
FileDamage = RemoveFile | Truncate | FlipTensorByte | FlipMetadataByte | StaleFile
FILE_DAMAGES = (RemoveFile, Truncate, FlipTensorByte, FlipMetadataByte, StaleFile)
#: every fault a scenario's ``damage`` can hold
Damage = FileDamage | MutateInFlight
DAMAGE_KINDS = (*FILE_DAMAGES, MutateInFlight)
