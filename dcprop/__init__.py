"""dcprop: property-based testing for PyTorch distributed checkpointing and sharded training.

>>> from dcprop import strategies as dst          # Hypothesis strategies over specs
>>> from dcprop.testing import property_test      # the pytest pattern

Importing dcprop does not import torch: the specs, strategies and the runner's
controller are plain Python; torch is imported in the rank processes.
"""

__version__ = "0.1.0"
