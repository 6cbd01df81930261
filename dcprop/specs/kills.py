"""Killed ranks: which ranks of a save die (``SIGKILL``), and at which point of it."""

from __future__ import annotations

from typing import Any

import attrs

from dcprop.errors import SpecError
from dcprop.specs._base import Spec, as_tuple, non_negative, one_of, tuple_of

#: Where in a save the ranks die, in the order a save reaches them:
#:
#: * ``"write"``: as a dying rank opens its ``writes + 1``-th file for writing under the
#:   checkpoint root (``writes=0``: before it writes anything; a rank with fewer files
#:   dies as its save returns);
#: * ``"metadata"``: as a rank opens DCP's ``.metadata`` file (its ``.tmp``) for
#:   writing, every data file written;
#: * ``"saved"``: as each dying rank's save returns, the metadata in place;
#: * ``"in_flight"``: right after an asynchronous save (the checkpointer's
#:   ``async_save``) returns, while its writes go on in the background.
#:
#: At ``"metadata"`` the rank that writes the metadata kills every dying rank, itself
#: too if it is one; where no rank writes a ``.metadata`` file (a checkpointer of
#: another format), each dying rank dies as its save returns.
KILL_POINTS = ("write", "metadata", "saved", "in_flight")


def _sorted_ranks(value: Any) -> Any:
    value = as_tuple(value)
    if isinstance(value, tuple) and all(isinstance(r, int) for r in value):
        return tuple(sorted(value))
    return value


@attrs.frozen(repr=False)
class Kill(Spec):
    """``ranks`` of the example's world die by ``SIGKILL`` at point ``at`` of a save
    (one of :data:`KILL_POINTS`); ``writes`` counts the files each dying rank has
    opened for writing first, at point ``"write"`` only.

    >>> Kill()
    Kill()
    >>> Kill(ranks=(0, 1), at="write", writes=2).describe()
    'ranks [0, 1] killed as each opens its file 3 for writing'
    """

    ranks: tuple[int, ...] = attrs.field(
        default=(0,), converter=_sorted_ranks, validator=tuple_of(int)
    )
    at: str = attrs.field(default="write", validator=one_of(KILL_POINTS))
    writes: int = attrs.field(default=0, validator=non_negative)

    def __attrs_post_init__(self) -> None:
        if not self.ranks:
            raise SpecError("ranks=() kills no rank: name at least one rank")
        if len(set(self.ranks)) != len(self.ranks) or self.ranks[0] < 0:
            raise SpecError(f"ranks={self.ranks!r} must be distinct ranks, each at least 0")
        if self.writes and self.at != "write":
            raise SpecError(
                f"writes={self.writes} counts files before point 'write', not {self.at!r}: "
                "use writes=0"
            )

    def describe(self) -> str:
        """The kill in words, as a failure message names it."""
        who = f"rank{'s' if len(self.ranks) > 1 else ''} {list(self.ranks)}"
        return (
            f"{who} killed "
            + {
                "write": f"as each opens its file {self.writes + 1} for writing",
                "metadata": "as the metadata file is opened for writing",
                "saved": "as each one's save returns",
                "in_flight": "while an async save is in flight",
            }[self.at]
        )
