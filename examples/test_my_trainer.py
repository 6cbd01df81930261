"""Property-test a trainer's own checkpoint manager (``my_trainer.py``).

pytest examples/test_my_trainer.py --hypothesis-show-statistics
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the ranks import the hook from here

from dcprop.testing import property_test


@property_test("roundtrip", world_sizes=(1, 2), checkpointer="my_trainer:UnderTest")
def test_trainer_checkpoints_round_trip(scenario):
    pass


@property_test("reshard", world_sizes=(1, 2), checkpointer="my_trainer:UnderTest")
def test_trainer_checkpoints_reshard(scenario):
    pass
