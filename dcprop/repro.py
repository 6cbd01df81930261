"""Standalone reproducers: a failing scenario as a script that needs torch and dcprop,
not Hypothesis.

``python repro.py`` starts the right number of ranks itself; ``torchrun
--nproc-per-node N repro.py`` runs it on torchrun's ranks.  Either way it prints
the outcome and exits 1 if the property fails.
"""

from __future__ import annotations

import hashlib
import os
import sys
import textwrap
from typing import Any

import attrs

from dcprop import specs as S

__all__ = ["main", "pretty", "render", "write_reproducer"]

_WIDTH = 88


def pretty(value: Any, indent: int = 0) -> str:
    """A spec as readable, valid Python: one line when it fits, else one field a line."""
    flat = repr(value)
    if len(flat) + indent <= _WIDTH:
        return flat
    pad = " " * (indent + 4)
    if attrs.has(type(value)):
        parts = [
            pretty(v, indent + 4) if n is None else f"{n}={pretty(v, indent + 5 + len(n))}"
            for n, v in S.explicit_fields(value)
        ]
        body = f",\n{pad}".join(parts)
        return f"{type(value).__name__}(\n{pad}{body},\n{' ' * indent})"
    if isinstance(value, tuple) and value:
        items = f",\n{pad}".join(pretty(v, indent + 4) for v in value)
        return f"(\n{pad}{items},\n{' ' * indent})"
    return flat


def render(
    property: str, scenario: S.Scenario, *, error: str = "", checkpointer: str | None = None
) -> str:
    """The text of a reproducer script."""
    import torch

    from dcprop import __version__

    summary = textwrap.indent(
        textwrap.shorten(error.strip().splitlines()[0], 300)
        if error.strip()
        else "(no failure recorded)",
        "    ",
    )
    hooks = f"\nCHECKPOINTER = {checkpointer!r}" if checkpointer else "\nCHECKPOINTER = None"
    return f'''"""dcprop reproducer: property {property!r} fails.

Found with dcprop {__version__} on torch {torch.__version__}.  The failure:
{summary}

Run it with either of:
    python {{this file}}
    torchrun --nproc-per-node {scenario.world_size} {{this file}}
"""

from dcprop.specs import *  # noqa: F403 - the spec classes the scenario is written in

PROPERTY = {property!r}{hooks}
SCENARIO = {pretty(scenario)}

if __name__ == "__main__":
    from dcprop.repro import main

    main(PROPERTY, SCENARIO, checkpointer=CHECKPOINTER)
'''


def write_reproducer(
    directory: str,
    property: str,
    scenario: S.Scenario,
    *,
    error: str = "",
    checkpointer: str | None = None,
    name: str | None = None,
) -> str:
    """Write a reproducer under ``directory`` (atomically); return its path."""
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha1(repr(scenario).encode()).hexdigest()[:10]
    path = os.path.join(directory, f"{name or 'repro'}_{property}_{digest}.py")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(render(property, scenario, error=error, checkpointer=checkpointer))
    os.replace(tmp, path)
    return path


def main(
    property: str,
    scenario: S.Scenario,
    *,
    checkpointer: str | None = None,
    timeout: float | None = None,
) -> None:
    """Run ``property`` on ``scenario`` once, on local ranks or torchrun's, and exit."""
    from dcprop.errors import ExampleFailure
    from dcprop.known_bugs import match_known
    from dcprop.properties import run_property
    from dcprop.runner import DEFAULT_TIMEOUT, make_runner, under_torchrun

    hooks = _hooks(checkpointer)
    runner = make_runner(
        scenario.world_size, device=scenario.device, timeout=timeout or DEFAULT_TIMEOUT
    )
    if under_torchrun() and not runner.is_driver:
        runner.follow()
        sys.exit(0)
    try:
        run_property(runner, property, scenario, hooks=hooks)
    except ExampleFailure as e:
        known = match_known(e.signature)
        print(f"FAIL: {property}\n{e}")
        if known:
            print(
                f"\nThis is a known upstream bug: {known.id}: {known.title}"
                + (f" ({known.upstream})" if known.upstream else "")
            )
        runner.close()
        sys.exit(1)
    runner.close()
    print(f"PASS: {property} holds for this scenario")
    sys.exit(0)


def _hooks(checkpointer: str | None) -> Any:
    if not checkpointer:
        return None
    from dcprop.checkpointer import load_checkpointer
    from dcprop.properties._harness import Hooks

    return Hooks(checkpointer=load_checkpointer(checkpointer))
