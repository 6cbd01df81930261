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
from dcprop.errors import headline

__all__ = ["main", "pretty", "render", "write_reproducer"]

_WIDTH = 88


def pretty(value: Any, indent: int = 0, lead: int = 0) -> str:
    """A spec as readable, valid Python: one line when it fits (after ``lead`` characters
    already on the line), else one field a line, indented as black would."""
    flat = repr(value)
    if indent + lead + len(flat) <= _WIDTH:
        return flat
    pad = " " * (indent + 4)
    if attrs.has(type(value)):
        parts = [
            pretty(v, indent + 4) if n is None else f"{n}={pretty(v, indent + 4, len(n) + 1)}"
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

    summary = textwrap.fill(
        textwrap.shorten(headline(error), 400) if error.strip() else "(no failure recorded)",
        _WIDTH,
        initial_indent="    ",
        subsequent_indent="    ",
        break_on_hyphens=False,
    )
    hooks = f"\nCHECKPOINTER = {checkpointer!r}" if checkpointer else "\nCHECKPOINTER = None"
    root = _import_root(checkpointer) if checkpointer else None
    if root:
        hooks += f"\nCHECKPOINTER_PATH = {root!r}  # where it was imported from"
    call = "checkpointer=CHECKPOINTER" + (", checkpointer_path=CHECKPOINTER_PATH" if root else "")
    return f'''"""dcprop reproducer: property {property!r} fails.

Found with dcprop {__version__} on torch {torch.__version__}.  The failure:
{summary}

Run it with either of:
    python {{this file}}
    torchrun --nproc-per-node {scenario.world_size} {{this file}}
"""

from dcprop.specs import *  # noqa: F403 - the spec classes the scenario is written in

PROPERTY = {property!r}{hooks}
SCENARIO = {pretty(scenario, lead=len("SCENARIO = "))}

if __name__ == "__main__":
    from dcprop.repro import main

    main(PROPERTY, SCENARIO, {call})
'''


def _import_root(checkpointer: str) -> str | None:
    """The directory on ``sys.path`` that the checkpointer's module was found under, so a
    reproducer run from elsewhere still imports it; None if it cannot be found."""
    import importlib.util

    top = checkpointer.partition(":")[0].split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    where = os.path.dirname(os.path.abspath(spec.origin))
    return os.path.dirname(where) if spec.submodule_search_locations else where


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
    checkpointer_path: str | None = None,
    timeout: float | None = None,
) -> None:
    """Run ``property`` on ``scenario`` once, on local ranks or torchrun's, and exit.

    ``checkpointer_path`` is tried last when importing ``checkpointer`` (``module:attr``).
    """
    from dcprop.errors import ExampleFailure
    from dcprop.known_bugs import match_known
    from dcprop.properties import run_property
    from dcprop.runner import DEFAULT_TIMEOUT, make_runner, under_torchrun

    if checkpointer_path and checkpointer_path not in sys.path:
        sys.path.append(checkpointer_path)  # the ranks inherit it
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
        known = match_known(e, scenario)
        print(f"FAIL: {property}\n{e}")
        if known:
            links = [known.upstream] if known.upstream else list(known.related)
            print(
                f"\nThis is a known upstream bug: {known.id}: {known.title}"
                + (f" (see {', '.join(links)})" if links else "")
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
