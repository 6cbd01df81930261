"""Standalone reproducers: a failing scenario as a script that needs torch and dcprop,
not Hypothesis.

``python repro.py`` starts the right number of ranks itself; ``torchrun
--nproc-per-node N repro.py`` runs it on torchrun's ranks.  Either way it prints
the outcome and exits 1 if the property fails.

A reproducer carries everything the failure depended on: the user's checkpointer
and model factory travel by import reference (``"module:attr"``) where they are
module-level objects, else by value (:class:`Pickled`), with the directories their
modules were imported from.  What can be carried neither way is written as
:class:`Missing`, and the script refuses to run (exit 2) rather than replay
something else and pass.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import pickle
import pickletools
import site
import sys
import sysconfig
import textwrap
from typing import TYPE_CHECKING, Any

import attrs

from dcprop import specs as S
from dcprop.errors import headline

if TYPE_CHECKING:
    from dcprop.properties._harness import Hooks

__all__ = ["Missing", "Pickled", "hooks_for", "main", "pretty", "render", "write_reproducer"]

_WIDTH = 88


def pretty(value: Any, indent: int = 0, lead: int = 0) -> str:
    """A spec as readable, valid Python: one line when it fits (after ``lead`` characters
    already on the line), else one field a line, indented as black would.  A lifecycle
    program is always one step a line."""
    flat = repr(value)
    program = isinstance(value, S.Scenario) and bool(value.program)
    if indent + lead + len(flat) <= _WIDTH and not program:
        return flat
    pad = " " * (indent + 4)
    if attrs.has(type(value)):
        parts = [_field(n, v, indent + 4) for n, v in S.explicit_fields(value)]
        body = f",\n{pad}".join(parts)
        return f"{type(value).__name__}(\n{pad}{body},\n{' ' * indent})"
    if isinstance(value, tuple) and value:
        items = f",\n{pad}".join(pretty(v, indent + 4) for v in value)
        return f"(\n{pad}{items},\n{' ' * indent})"
    return flat


def _field(name: str | None, value: Any, indent: int) -> str:
    if name is None:
        return pretty(value, indent)
    if name == "program":
        return f"{name}={_steps(value, indent)}"
    return f"{name}={pretty(value, indent, len(name) + 1)}"


def _steps(program: tuple[Any, ...], indent: int) -> str:
    pad = " " * (indent + 4)
    steps = f",\n{pad}".join(pretty(step, indent + 4) for step in program)
    return f"(\n{pad}{steps},\n{' ' * indent})"


@attrs.frozen
class Pickled:
    """One of the user's objects carried by value: a base64 pickle, which names its
    classes and functions by module path."""

    data: str

    def load(self) -> Any:
        return pickle.loads(base64.b64decode(self.data))


@attrs.frozen
class Missing:
    """One of the user's objects that a reproducer could not carry: why."""

    why: str


def render(
    property: str,
    scenario: S.Scenario,
    *,
    error: str = "",
    checkpointer: Any = None,
    model_factory: Any = None,
    blame: str = "",
) -> str:
    """The text of a reproducer script.  ``checkpointer`` and ``model_factory``: what
    the failure ran with (an object, or a ``"module:attr"`` reference); ``blame``: what
    plain DCP does on the same scenario (:meth:`dcprop.campaign.Blame.sentence`)."""
    import torch

    from dcprop import __version__

    summary = textwrap.fill(
        textwrap.shorten(headline(error), 400) if error.strip() else "(no failure recorded)",
        _WIDTH,
        initial_indent="    ",
        subsequent_indent="    ",
        break_on_hyphens=False,
    )
    hooks, call = _carried_hooks(checkpointer, model_factory)
    whose = f"\nWhose bug: {blame}\n" if blame else ""
    return f'''"""dcprop reproducer: property {property!r} fails.

Found with dcprop {__version__} on torch {torch.__version__}.  The failure:
{summary}
{whose}
Run it with either of:
    python {{this file}}
    torchrun --nproc-per-node {scenario.job_world} {{this file}}
"""

from dcprop.repro import Missing, Pickled  # noqa: F401 - how the hooks may be carried
from dcprop.specs import *  # noqa: F403 - the spec classes the scenario is written in

PROPERTY = {property!r}{hooks}
SCENARIO = {pretty(scenario, lead=len("SCENARIO = "))}

if __name__ == "__main__":
    from dcprop.repro import main

    main(PROPERTY, SCENARIO, {call})
'''


def _carried_hooks(checkpointer: Any, model_factory: Any) -> tuple[str, str]:
    """The reproducer's lines that carry the hooks, and the arguments that hand them to
    :func:`main`."""
    carried_checkpointer, paths = carry(checkpointer, "checkpointer")
    carried_factory, factory_paths = carry(model_factory, "model factory")
    paths += [p for p in factory_paths if p not in paths]
    hooks = f"\nCHECKPOINTER = {carried_checkpointer!r}\nMODEL_FACTORY = {carried_factory!r}"
    if paths:
        hooks += f"\nIMPORT_PATHS = {paths!r}  # where their modules were imported from"
    call = "checkpointer=CHECKPOINTER, model_factory=MODEL_FACTORY" + (
        ", import_paths=IMPORT_PATHS" if paths else ""
    )
    return hooks, call


def carry(obj: Any, what: str) -> tuple[Any, list[str]]:
    """How a reproducer carries ``obj`` (``what``: its role), and the directories its
    modules must be imported from: None for dcprop's default, a ``"module:attr"``
    reference, a :class:`Pickled` value, or :class:`Missing`."""
    from dcprop.checkpointer import DCPCheckpointer
    from dcprop.properties._harness import default_model_factory

    if obj is None or obj is default_model_factory or type(obj) is DCPCheckpointer:
        return None, []
    if isinstance(obj, str):
        return obj, _import_roots([obj.partition(":")[0]])
    ref = _module_level_ref(obj)
    if ref is not None:
        return ref, _import_roots([ref.partition(":")[0]])
    try:
        data = pickle.dumps(obj, protocol=2)  # protocol 2 names each global in its opcode
    except Exception as e:
        return Missing(
            f"the {what} {obj!r} is neither a module-level object nor picklable: {e}"
        ), []
    modules = {
        str(arg).split(" ")[0] for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"
    }
    if "__main__" in modules:
        return Missing(
            f"the {what} {obj!r} uses code defined in __main__, which a reproducer cannot "
            "import; define it in a module"
        ), []
    return Pickled(base64.b64encode(data).decode()), _import_roots(sorted(modules))


def _module_level_ref(obj: Any) -> str | None:
    """``"module:name"`` if that names ``obj`` itself (a module-level function or
    class, or an instance bound to a global of its class's module), else None."""
    from dcprop.runner.execute import resolve

    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or module == "__main__" or module not in sys.modules:
        return None
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(qualname, str):  # an instance: look for the global that holds it
        names = [n for n, v in vars(sys.modules[module]).items() if v is obj]
        qualname = names[0] if names else None
    if qualname is None:
        return None
    ref = f"{module}:{qualname}"
    try:
        return ref if resolve(ref) is obj else None
    except (ImportError, AttributeError):
        return None


def _import_roots(modules: list[str]) -> list[str]:
    """The directories on ``sys.path`` that ``modules`` were found under, so a
    reproducer run from elsewhere still imports them; directories that any ``python``
    searches (the standard library, site-packages) are left out."""
    standard = {
        os.path.abspath(p)
        for p in (*sysconfig.get_paths().values(), *site.getsitepackages())
        if isinstance(p, str)
    }
    roots = []
    for module in modules:
        root = _import_root(module)
        if root and os.path.abspath(root) not in standard and root not in roots:
            roots.append(root)
    return roots


def _import_root(module: str) -> str | None:
    """The directory on ``sys.path`` that ``module``'s top-level package was found
    under; None if it cannot be found (a built-in module)."""
    top = module.split(".")[0]
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
    checkpointer: Any = None,
    model_factory: Any = None,
    name: str | None = None,
    blame: str = "",
) -> str:
    """Write a reproducer under ``directory`` (atomically); return its path."""
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha1(repr(scenario).encode()).hexdigest()[:10]
    path = os.path.join(directory, f"{name or 'repro'}_{property}_{digest}.py")
    text = render(
        property,
        scenario,
        error=error,
        checkpointer=checkpointer,
        model_factory=model_factory,
        blame=blame,
    )
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def main(
    property: str,
    scenario: S.Scenario,
    *,
    checkpointer: Any = None,
    model_factory: Any = None,
    import_paths: tuple[str, ...] | list[str] = (),
    timeout: float | None = None,
) -> None:
    """Run ``property`` on ``scenario`` once, on local ranks or torchrun's, and exit:
    0 if it holds, 1 if it fails, 2 if the hooks it needs cannot be had.

    ``checkpointer``, ``model_factory``: as :func:`carry` wrote them; ``import_paths``
    are tried last when importing them.
    """
    from dcprop.properties import run_and_match
    from dcprop.runner import DEFAULT_TIMEOUT, make_runner, under_torchrun

    for path in import_paths:
        if path not in sys.path:
            sys.path.append(path)  # the ranks inherit it
    try:
        hooks = hooks_for(checkpointer, model_factory)
    except Exception as e:
        print(f"CANNOT REPLAY: {property}: {e}")
        sys.exit(2)
    runner = make_runner(
        scenario.job_world, device=scenario.device, timeout=timeout or DEFAULT_TIMEOUT
    )
    if under_torchrun() and not runner.is_driver:
        sys.exit(runner.follow())
    failed = run_and_match(runner, property, scenario, hooks=hooks)
    if failed is None:
        runner.close()
        print(f"PASS: {property} holds for this scenario")
        sys.exit(0)
    print(f"FAIL: {property}\n{failed.failure}")
    if failed.known:
        print(_known_note(failed.known))
    runner.close(1)
    sys.exit(1)


def _known_note(known: Any) -> str:
    """What a reproducer says of the known bug, or documented limitation, it shows."""
    from dcprop.limitations import Limitation

    limitation = isinstance(known, Limitation)
    what = "a documented limitation of the checkpointer" if limitation else "a known upstream bug"
    links = ", ".join(known.related)
    return f"\nThis is {what}: {known.id}: {known.title}" + (f" (see {links})" if links else "")


def hooks_for(checkpointer: Any, model_factory: Any) -> Hooks | None:
    """:func:`~dcprop.properties.make_hooks` for the hooks as :func:`carry` wrote them:
    :class:`Pickled` ones unpickled; raises for :class:`Missing`."""
    from dcprop.errors import UsageError
    from dcprop.properties import make_hooks

    missing = [x.why for x in (checkpointer, model_factory) if isinstance(x, Missing)]
    if missing:
        raise UsageError(
            "this reproducer lacks what the failure depended on: " + "; ".join(missing)
        )
    checkpointer, model_factory = (
        x.load() if isinstance(x, Pickled) else x for x in (checkpointer, model_factory)
    )
    return make_hooks(checkpointer, model_factory)
