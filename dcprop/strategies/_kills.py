"""``kills(world_size)``: which ranks of a save die, and where (``durability``)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from dcprop import specs as S
from dcprop.strategies._lazy import defines_strategy
from dcprop.strategies._validation import check_choices, check_int

#: the most files a dying rank is drawn to open before it dies (DCP writes one file per
#: tensor, or one per writer thread with ``single_file_per_rank``)
MAX_WRITES = 8


@st.composite
def _kills(draw: Any, world_size: int, points: tuple[str, ...]) -> S.Kill:
    # Every branch makes the same draws (see _options._optimizers): rank 0 alone and
    # the first point sit at the shortest choice sequence, so a kill shrinks toward
    # rank 0 dying before it writes anything.
    at = draw(st.sampled_from(points))
    writes = draw(st.integers(0, MAX_WRITES))
    others = draw(st.sets(st.integers(1, world_size - 1))) if world_size > 1 else set()
    first = draw(st.integers(0, world_size - 1))
    ranks = {first, *others} if others else {first}
    return S.Kill(tuple(ranks), at=at, writes=writes if at == "write" else 0)


@defines_strategy
def kills(world_size: int = 1, *, points: Any = S.KILL_POINTS) -> st.SearchStrategy[S.Kill]:
    """Kills for a save on ``world_size`` ranks: one or more of its ranks die at one of
    ``points`` (see :data:`dcprop.specs.KILL_POINTS`), after opening up to
    :data:`MAX_WRITES` files at point ``"write"``.

    Shrinks toward rank 0 alone, killed before it writes anything
    (``Kill(ranks=(0,), at="write", writes=0)``).

    >>> kills(2).example()                                         # doctest: +SKIP
    Kill(ranks=(0, 1), at='metadata')
    """
    check_int("world_size", world_size, min_value=1, max_value=4096)
    return _kills(world_size, check_choices("points", points, S.KILL_POINTS))
