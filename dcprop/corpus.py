"""The regression corpus: saved failing scenarios that the test suite replays.

Each entry is a JSON file ``{"property", "expect", "signature", "checkpointer", "note",
"scenario"}``.  ``checkpointer`` is a short name of
:data:`~dcprop.checkpointer.CHECKPOINTERS` or a user's ``module:attr`` (absent for
DCP).  ``expect`` is ``"pass"`` (a fixed bug that must stay fixed), ``"fail"`` (a
dcprop self-test), or ``"known:<bug id>"`` (a known upstream bug, so the suite
notices when upstream fixes it).  An entry that expects a failure names its
``signature``: the replay must fail with exactly that, not just somehow (a hang
where a wrong value was expected is another bug).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

from dcprop.checkpointer import CHECKPOINTERS
from dcprop.errors import SpecError, headline
from dcprop.serialization import from_json, to_json
from dcprop.specs import Scenario

__all__ = ["CorpusEntry", "load_entries", "write_entry"]


class CorpusEntry:
    __slots__ = ("checkpointer", "expect", "note", "path", "property", "scenario", "signature")

    def __init__(
        self,
        path: str,
        property: str,
        scenario: Scenario,
        expect: str,
        note: str,
        signature: str | None = None,
        checkpointer: str = "dcp",
    ) -> None:
        self.path, self.property, self.scenario = path, property, scenario
        self.expect, self.note, self.signature = expect, note, signature
        self.checkpointer = checkpointer

    @property
    def known_bug(self) -> str | None:
        return self.expect.split(":", 1)[1] if self.expect.startswith("known:") else None

    def __repr__(self) -> str:
        return f"CorpusEntry({os.path.basename(self.path)!r}, {self.property!r}, {self.expect!r})"


def write_entry(
    directory: str,
    property: str,
    scenario: Scenario,
    *,
    expect: str,
    signature: str | None = None,
    note: str = "",
    checkpointer: str = "dcp",
) -> str:
    if expect != "pass" and not signature:
        raise ValueError(f"a corpus entry that expects {expect!r} needs the failure's signature")
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha1(repr(scenario).encode()).hexdigest()[:10]
    path = os.path.join(directory, f"{property}-{digest}.json")
    data: dict[str, Any] = {"property": property, "expect": expect}
    if signature:
        data["signature"] = signature
    if checkpointer != "dcp":
        data["checkpointer"] = _checkpointer_name(checkpointer, path)
    data.update(note=note, scenario=to_json(scenario))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


def load_entries(directory: str) -> list[CorpusEntry]:
    entries = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            data: dict[str, Any] = json.load(f)
        try:
            scenario = from_json(data["scenario"])
        except (KeyError, SpecError) as e:
            raise SpecError(f"corpus entry {path}: {e}") from e
        expect, signature = data.get("expect", "pass"), data.get("signature")
        if expect != "pass" and not signature:
            raise SpecError(
                f"corpus entry {path} expects {expect!r} but names no failure signature: "
                "replay it and add the signature it fails with"
            )
        checkpointer = _checkpointer_name(data.get("checkpointer", "dcp"), path)
        entries.append(
            CorpusEntry(
                path,
                data["property"],
                scenario,
                expect,
                data.get("note", ""),
                signature,
                checkpointer,
            )
        )
    return entries


def _checkpointer_name(checkpointer: str, path: str) -> str:
    """An entry names its checkpointer as ``--checkpointer`` does: a short name, or a
    user's own by ``module:attr`` (a project's corpus of its own checkpointer)."""
    module, _, attr = checkpointer.partition(":")
    if checkpointer not in CHECKPOINTERS and not (module and attr):
        raise SpecError(
            f"corpus entry {path}: checkpointer {checkpointer!r} is neither 'module:attr' "
            "nor one of "
            f"{', '.join(map(repr, CHECKPOINTERS))}"
        )
    return checkpointer


def add_failure(
    directory: str, property: str, scenario: Scenario, failure: Any, *, checkpointer: str = "dcp"
) -> str:
    """Keep a campaign's failure as a corpus entry: expected to fail as a known bug
    where it matches one, else as a new failure, with its signature."""
    from dcprop.known_bugs import match_known

    known = match_known(failure, scenario)
    return write_entry(
        directory,
        property,
        scenario,
        expect=f"known:{known.id}" if known else "fail",
        signature=failure.signature,
        note=headline(str(failure)),
        checkpointer=checkpointer,
    )
