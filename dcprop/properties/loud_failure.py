"""loud_failure: a damaged checkpoint never loads silently wrong.

Build and train per the scenario's save topology, save, then damage the saved
checkpoint as ``scenario.damage`` says (a file cut short or removed, a byte flipped
in a tensor's data or in the metadata, a stale file of an older save of other
values put in place: :mod:`dcprop.specs.damage`); perturb and load.  The
checkpointer's load must raise (any exception), or give back exactly what was saved,
bitwise.  Values that differ without an error fail.

A format that cannot see some damage at all (DCP keeps no checksums, so a flipped
data byte loads as a different number) fails the same way; :mod:`dcprop.limitations`
names such failures of a known checkpointer as its documented limitation, counted
apart from new failures.  A checkpointer that says it verifies integrity
(``verifies_integrity = True``) is held to it: the failure then says so, and no
limitation explains it.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from dcprop import specs as S
from dcprop.compare import Mismatch, local_values, mismatches
from dcprop.damage import damage
from dcprop.errors import PropertyFailure, UsageError
from dcprop.properties._harness import (
    DEFAULT_HOOKS,
    Hooks,
    Job,
    checkpointer_error,
    load_template_overrides,
    setup,
)
from dcprop.runner.execute import RankContext

__all__ = ["SILENT", "claims_integrity", "loud_failure"]

#: the first line of the failure: what a limitation's pattern matches
SILENT = "a damaged checkpoint loaded without an error, with values that differ from those saved"


def claims_integrity(checkpointer: Any) -> bool:
    """The checkpointer says it detects damage (``verifies_integrity = True``)."""
    return getattr(checkpointer, "verifies_integrity", False) is True


def loud_failure(
    ctx: RankContext, scenario: S.Scenario, hooks: Hooks = DEFAULT_HOOKS
) -> dict[str, Any]:
    """Run on every rank of the example's world; raises PropertyFailure if it fails."""
    spec = scenario.damage
    if not isinstance(spec, S.FILE_DAMAGES):
        raise UsageError(
            f"loud_failure needs a scenario whose damage is one of "
            f"{', '.join(t.__name__ for t in S.FILE_DAMAGES)}, got damage={spec!r}"
        )
    job = setup(ctx, scenario, scenario.save, hooks=hooks)
    if job is None:
        return {}
    older = None
    for step in range(scenario.training.steps):
        if isinstance(spec, S.StaleFile) and step == scenario.training.steps - 1:
            older = job.save(job.state(), "older")  # one step behind: other values
        job.train_step()
    state = job.state()
    job.check_keys(state, "before save")
    saved = local_values(state)
    path = job.save(state, "ckpt")
    done = _damage_once(job, spec, path, older)
    job.train_step()
    job.perturb()
    error, wrong = _load(job, saved)
    if error is not None:
        return {"damage": done, "raised": error}
    job.ctx.agree(not wrong, "state comparison")
    if wrong:
        claim = (
            "although the checkpointer claims integrity checking (verifies_integrity=True)"
            if claims_integrity(hooks.checkpointer)
            else f"after {type(spec).__name__} damage"
        )
        shown = "\n  ".join(str(m) for m in wrong[:8])
        raise PropertyFailure(
            f"{SILENT} {claim}\n{done}; {len(wrong)} entries differ on rank {job.rank}:\n  {shown}",
            keys=[m.key for m in wrong],
        )
    return {"damage": done, "raised": None}


def _damage_once(job: Job, spec: S.FileDamage, path: str, older: str | None) -> str:
    """Rank 0 damages the checkpoint while the other ranks wait; what it did."""
    done = ""
    if job.rank == 0:
        try:
            done = damage(spec, path, older)
        except BaseException:
            job.agree(False, "damaging the checkpoint")
            raise
    job.agree(True, "damaging the checkpoint")
    box = [done]
    dist.broadcast_object_list(box, group_src=0, group=job.group)
    return str(box[0])


def _load(job: Job, saved: dict[str, Any]) -> tuple[str | None, list[Mismatch]]:
    """Load checkpoint ``ckpt`` into a template and apply it: ``type: message`` of the
    error the checkpointer's load raised on any rank, else how what this rank loaded
    differs from ``saved``.  Only the load may detect the damage: an error from applying
    what it loaded (torch's ``set_state_dict``) is the example's failure, as in every
    other property."""
    target = job.state(**load_template_overrides(job.topology.state_dict))
    refused = None
    try:
        error = checkpointer_error(lambda: job.load(target, "ckpt"))
    except PropertyFailure as failure:  # dcprop's check of what an app-state load gave
        error, refused = None, Mismatch("app state", str(failure).splitlines()[0])
    if job.any_rank(error is not None):
        return error or "another rank's load raised", []
    if job.any_rank(refused is not None):
        return None, [refused] if refused else []  # ranks without one stop at the agree
    job.apply(target)
    return None, mismatches(saved, local_values(job.state()))
