"""Documented limitations of checkpoint formats: damage they cannot detect at all.

DCP keeps no checksums: a byte flipped in a tensor's data, or a data file of an older
save left in place of the new one, loads as other numbers without an error.  That is
no bug to fix in a release but what the format is, so ``loud_failure`` reports it in
a category of its own: an example that ends in a limitation is neither held nor a
new failure; ``dcprop check`` counts it apart and exits 0 unless ``--strict``.

A limitation is matched like a known bug (:class:`~dcprop.known_bugs.KnownBug`): the
checkpointer's project, the failure's signature (``loud_failure``'s silent-load
failure, never the one of a checkpointer that claims integrity checking) and the
kind of damage.  As with torch's known bugs, a ``"torch"`` limitation explains the
failure met with any checkpointer: one built on DCP (most trainers' checkpoint
managers) inherits DCP's format.  A checkpointer that claims integrity checking
(``verifies_integrity = True``) is never excused.
"""

from __future__ import annotations

import attrs

from dcprop import specs as S
from dcprop.errors import ExampleFailure
from dcprop.known_bugs import KnownBug, sightings

__all__ = ["LIMITATIONS", "Limitation", "match_limitation"]

# loud_failure's failure after damage of the kind named, by a checkpointer that does
# not claim integrity checking (dcprop.properties.loud_failure.SILENT)
_SILENT = r"^PropertyFailure: a damaged checkpoint loaded without an error, with values that "
_SILENT += r"differ from those saved after {kind} damage(?: @ \w+)?$"


@attrs.frozen
class Limitation(KnownBug):
    """Damage a checkpointer's format cannot detect: ``damages`` are the kinds of
    :mod:`dcprop.specs.damage` it loads silently wrong."""

    damages: tuple[type, ...] = ()


def _limitation(
    id: str, project: str, damages: tuple[type, ...], *, title: str, explanation: str
) -> Limitation:
    kinds = "|".join(t.__name__ for t in damages)
    return Limitation(
        id=id,
        title=title,
        project=project,
        pattern=_SILENT.format(kind=f"(?:{kinds})"),
        occurs_in=lambda scenario: isinstance(scenario.damage, damages),
        explanation=explanation,
        damages=damages,
    )


LIMITATIONS: tuple[Limitation, ...] = (
    _limitation(
        "dcp-no-checksums",
        "torch",
        (S.FlipTensorByte,),
        title="DCP keeps no checksum of tensor data: a flipped byte in a stored tensor "
        "loads as a different value, without an error",
        explanation="FileSystemWriter stores each tensor as a torch.save archive at an "
        "offset and length recorded in .metadata, and FileSystemReader reads it back with "
        "torch.load; neither records nor checks a checksum of the bytes (the zip "
        "record's CRC is not verified by torch.load), so any value is accepted.",
    ),
    _limitation(
        "dcp-stale-data-file",
        "torch",
        (S.StaleFile,),
        title="DCP's metadata does not identify the data files it was written with: a "
        "data file of an older save of the same layout loads in place of the new one",
        explanation=".metadata maps each entry to (relative path, offset, length); an "
        "older save of the same state-dict layout writes archives of the same sizes at "
        "the same offsets, so a file left over from it (or copied back by a sync tool) "
        "is read as if it were the new one.",
    ),
)


def match_limitation(failure: ExampleFailure, scenario: S.Scenario) -> Limitation | None:
    """The documented limitation that explains every failure in ``failure``, if one does."""
    seen = sightings(failure, scenario)
    return next((lim for lim in LIMITATIONS if all(lim.explains(s) for s in seen)), None)
