import os
import sys

# helpers.py must be importable by the rank processes (they get the controller's sys.path)
sys.path.insert(0, os.path.dirname(__file__))
