"""A trainer's own checkpoint manager, and the few lines that put it under dcprop's test.

Trainers built on DCP hand their checkpoint manager an *app state*: ``Stateful`` objects
(model, optimizer, LR scheduler, train state) whose ``state_dict()`` it saves and whose
``load_state_dict()`` it feeds on resume.  ``TrainerCheckpoints`` is such a manager, in
miniature (torchtitan's ``CheckpointManager`` has the same shape); ``UnderTest`` is the
dcprop hook that drives it: ``save_app_state``/``load_app_state`` receive the app state
of each example, built from the very state dicts dcprop checks.
"""

import os
import re

import torch.distributed.checkpoint as dcp


class TrainerCheckpoints:
    """Saves the app state under ``folder/step-<n>`` and resumes from the newest."""

    def __init__(self, states, folder, process_group=None):
        self.states, self.folder, self.process_group = states, folder, process_group

    def save(self, step):
        path = os.path.join(self.folder, f"step-{step}")
        dcp.save(self.states, checkpoint_id=path, process_group=self.process_group)

    def load_latest(self):
        steps = [
            int(m[1])
            for m in map(re.compile(r"step-(\d+)").fullmatch, os.listdir(self.folder))
            if m
        ]
        path = os.path.join(self.folder, f"step-{max(steps)}")
        dcp.load(self.states, checkpoint_id=path, process_group=self.process_group)


class UnderTest:
    """The dcprop hook: each example's checkpoint is a folder of this manager's."""

    def save_app_state(self, app_state, path, *, storage, group):
        step = app_state["train_state"].state_dict()["step"]
        TrainerCheckpoints(app_state, path, process_group=group).save(step)

    def load_app_state(self, app_state, path, *, group):
        TrainerCheckpoints(app_state, path, process_group=group).load_latest()
