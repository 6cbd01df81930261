"""Write a reproducer for a scenario and replay it, as `dcprop check` does for failures.

python examples/replay_reproducer.py [DIR]
"""

import subprocess
import sys
import tempfile

from dcprop.repro import write_reproducer
from dcprop.specs import Block, FSDP2Plan, Linear, MeshSpec, ModelSpec, Scenario, Topology

SCENARIO = Scenario(
    ModelSpec(Block((("fc0", Linear(4, 3)),))), Topology(2, MeshSpec((2,), ("shard",)), FSDP2Plan())
)

if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    path = write_reproducer(directory, "roundtrip", SCENARIO)
    with open(path) as f:
        print(f.read())
    sys.exit(subprocess.run([sys.executable, path]).returncode)
