"""Property-test your own checkpointer in a few lines.

    pytest examples/test_my_checkpointer.py --hypothesis-show-statistics

The first test uses DCP (it passes); the second points the same property at the buggy
checkpointer next door, and expects dcprop to catch and shrink the bug.
"""

import os
import sys

import pytest
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))  # the ranks import the checkpointer from here

from dcprop.testing import property_test


@property_test("roundtrip", world_sizes=(1, 2))
def test_dcp_round_trips(scenario):
    pass


# the bug shows only with a stateful optimizer and a biased layer: give it room to find one
@pytest.mark.xfail(strict=True, reason="the checkpointer drops bias optimizer state")
@settings(max_examples=40)
@property_test(
    "roundtrip", world_sizes=(1,), checkpointer="buggy_checkpointer:SkipsBiasOptimizerState"
)
def test_buggy_checkpointer_is_caught(scenario):
    pass
