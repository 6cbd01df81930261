"""Named campaigns for ``dcprop check --recipe NAME``, shipped with the package.

Each ``NAME.json`` here says which properties to run, on which world sizes, how many
examples, strategy arguments per property and explicit scenarios that always run
first (see ``strategies/README.md``).  A recipe of your own is a path to such a file.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from dcprop.errors import UsageError

__all__ = ["load", "names"]


def names() -> list[str]:
    """The recipes shipped with dcprop."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load(name: str) -> dict[str, Any]:
    """The recipe called ``name``, or the JSON file at ``name`` if it ends in ``.json``."""
    if name.endswith(".json"):
        try:
            with open(name) as f:
                return json.load(f)
        except OSError as e:
            raise UsageError(f"--recipe {name!r}: cannot read it: {e.strerror}") from None
    if name not in names():
        raise UsageError(f"--recipe {name!r}: no such recipe; choose from {names()}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())
