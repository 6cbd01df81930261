import os
import sys

# helpers.py must be importable by the rank processes (they get the controller's sys.path)
sys.path.insert(0, os.path.dirname(__file__))

# run under torchrun by test_runner.py, never collected directly
collect_ignore = ["torchrun_suite"]
