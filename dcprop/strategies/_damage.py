"""Strategies for the faults of ``loud_failure`` and ``async_isolation``."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from dcprop import specs as S
from dcprop.strategies._lazy import defines_strategy
from dcprop.strategies._validation import check_choices

#: the kinds of damage to a saved checkpoint, simplest first (what a search shrinks to)
DAMAGE_KINDS = ("remove", "truncate", "flip_metadata", "flip_tensor", "stale")
_MASKS = (1, 0x80, 0xFF, 0x10)  # a low bit, a float's sign bit, every bit, a middle bit
_STEPS = 16  # fractions are multiples of 1/16: a cut or a flip at the start shrinks best


@st.composite
def _damages(draw: Any, kinds: tuple[str, ...]) -> S.FileDamage:
    # Every branch makes the same draws: Hypothesis orders examples by their choice
    # sequence, so a kind with fewer draws would pass for a simpler one.
    kind = draw(st.sampled_from(kinds))
    index = draw(st.integers(0, 7))
    fraction = draw(st.integers(0, _STEPS - 1)) / _STEPS
    mask = draw(st.sampled_from(_MASKS))
    metadata = draw(st.booleans())
    if kind == "remove":
        return S.RemoveFile(index)
    if kind == "truncate":
        if metadata:
            return S.Truncate("metadata", keep=fraction)
        return S.Truncate("data", index, fraction)
    if kind == "flip_metadata":
        return S.FlipMetadataByte(fraction, mask)
    if kind == "flip_tensor":
        return S.FlipTensorByte(index, fraction, mask)
    return S.StaleFile(index)


@defines_strategy
def damages(kinds: Any = DAMAGE_KINDS) -> st.SearchStrategy[S.FileDamage]:
    """Damage to a completed checkpoint (:mod:`dcprop.specs.damage`) of the ``kinds``
    given (:data:`DAMAGE_KINDS`): a removed or truncated file, a byte flipped in the
    metadata or in a tensor's data, a stale data file of an older save.

    >>> damages(kinds=("flip_tensor",)).example()                 # doctest: +SKIP
    FlipTensorByte(entry=3, at=0.5, mask=128)

    Shrinks toward ``RemoveFile()`` (the first kind given, at index 0), then toward
    damage at the start of the first file with the lowest bit.
    """
    return _damages(check_choices("kinds", kinds, DAMAGE_KINDS))


@defines_strategy
def mutations(hows: Any = S.MUTATIONS) -> st.SearchStrategy[S.MutateInFlight]:
    """What the training loop does while an async save is in flight
    (:data:`dcprop.specs.MUTATIONS`).

    >>> mutations().example()                                      # doctest: +SKIP
    MutateInFlight(how='perturb')

    Shrinks toward an optimizer step (``MutateInFlight()``).
    """
    return st.builds(S.MutateInFlight, st.sampled_from(check_choices("hows", hows, S.MUTATIONS)))


def damage_for(property: str) -> st.SearchStrategy[S.Damage | None]:
    """The fault a scenario for ``property`` carries: None for properties without one."""
    if property == "loud_failure":
        return damages()
    if property == "async_isolation":
        return mutations()
    return st.none()
