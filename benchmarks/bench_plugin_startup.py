"""pytest start-up with dcprop installed but unused, side by side in one run (not a test).

    python benchmarks/bench_plugin_startup.py [--runs N]

In a temporary project holding one trivial test, it times ``python -m pytest`` with
dcprop's plugin loaded (its ``pytest11`` entry point) and with ``-p no:dcprop``,
alternating the two so that machine noise hits both alike, and prints the medians
and their ratio.  It also reports whether importing the plugin imported torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

TEST = "def test_nothing():\n    assert 1 + 1 == 2\n"


def _pytest_seconds(project: str, *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra],
        cwd=project,
        capture_output=True,
        check=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each (default 15)")
    args = parser.parse_args()
    probe = "import sys, dcprop.pytest_plugin; print('torch' in sys.modules)"
    torch_loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="dcprop-bench-") as project:
        with open(f"{project}/test_trivial.py", "w") as f:
            f.write(TEST)
        with_plugin, without = [], []
        for _ in range(args.runs):
            with_plugin.append(_pytest_seconds(project))
            without.append(_pytest_seconds(project, "-p", "no:dcprop"))
    a, b = statistics.median(with_plugin), statistics.median(without)
    print(f"importing dcprop.pytest_plugin imports torch: {torch_loaded}")
    print(f"| pytest start-up ({args.runs} runs each) | median s | min s |")
    print("| --- | --- | --- |")
    print(f"| dcprop plugin loaded | {a:.3f} | {min(with_plugin):.3f} |")
    print(f"| -p no:dcprop | {b:.3f} | {min(without):.3f} |")
    print(f"ratio loaded/disabled: {a / b:.3f}x ({1000 * (a - b):+.0f} ms)")


if __name__ == "__main__":
    main()
