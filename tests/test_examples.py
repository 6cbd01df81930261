"""Everything in examples/ runs, so that it cannot rot."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _run(*args):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def _pytest_example(test_file, *options):
    """An example test file under pytest, as a user runs it: two ranks, the CI profile."""
    return _run(
        "-m",
        "pytest",
        os.path.join(EXAMPLES, test_file),
        "-q",
        "-p",
        "no:cacheprovider",
        "--hypothesis-profile=dcprop-ci",
        "--dcprop-world-size",
        "2",
        "--rootdir",
        EXAMPLES,
        *options,
    )


def test_strategies_in_your_own_suite():
    result = _run(os.path.join(EXAMPLES, "my_suite_strategies.py"))
    assert result.returncode == 0 and "forward and backward" in result.stdout, result.stderr


def test_replay_reproducer(tmp_path):
    result = _run(os.path.join(EXAMPLES, "replay_reproducer.py"), str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS: roundtrip" in result.stdout


def test_checkpointer_example_catches_the_buggy_one(tmp_path):
    result = _pytest_example(
        "test_my_checkpointer.py",
        "--dcprop-timeout",
        "10",  # known upstream deadlocks cost a timeout each: keep it short here
        "--dcprop-repro-dir",
        str(tmp_path),
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "xfailed" in out  # the buggy checkpointer's strict xfail held (exit code 0)
    # the terminal summary names the reproducer of each distinct failure found
    scripts = os.listdir(tmp_path)
    assert scripts and "dcprop reproducers" in out
    assert all(f"python {tmp_path / script}" in out for script in scripts)


def _readme_commands():
    """The README's set-up commands: the code blocks of its "Start here" section."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## Start here", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in section.split("```")[1::2]]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    campaign, tests = _readme_commands()
    assert campaign.endswith("dcprop check") and tests.endswith("--hypothesis-profile=dcprop-ci -q")
    for command in (campaign, tests):  # a new environment, torch pinned and first in it
        assert command.startswith(
            "python3 -m venv .venv && . .venv/bin/activate && pip install torch=="
        )
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "rm -rf .venv" in ci  # a fresh environment: a missing dependency fails CI
    assert tests in ci.splitlines()


def test_trainer_checkpoint_manager_example():
    result = _pytest_example("test_my_trainer.py")
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "2 passed" in out, out[-3000:]
