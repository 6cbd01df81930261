"""dcprop's pytest plugin (entry point ``pytest11``).

Registers the ``dcprop-*`` Hypothesis profiles, the ``--dcprop-*`` options, the
session-scoped ``dcprop_runner`` fixture, and a terminal summary listing the
reproducer of each failing dcprop test.  It imports neither torch nor dcprop's
heavy parts until a test asks for the runner.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings

_PROFILE_DEFAULTS: dict[str, Any] = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
PROFILES: dict[str, dict[str, Any]] = {
    "dcprop-ci": dict(max_examples=6, derandomize=True, database=None),
    "dcprop-dev": dict(max_examples=25),
    "dcprop-nightly": dict(max_examples=400),
    "dcprop-gpu": dict(max_examples=50, derandomize=True),
}
for _name, _options in PROFILES.items():
    settings.register_profile(_name, **{**_PROFILE_DEFAULTS, **_options})

_RUNNER_KEY = pytest.StashKey[Any]()
#: where dcprop.testing writes reproducers in this session (set from --dcprop-repro-dir)
repro_dir = "dcprop-repros"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dcprop", "dcprop: property-based distributed checkpoint tests")
    group.addoption(
        "--dcprop-world-size",
        type=int,
        default=4,
        help="largest job: one pool per job size up to this many ranks (default 4)",
    )
    group.addoption(
        "--dcprop-device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="run ranks on cpu (gloo) or cuda (default cpu)",
    )
    group.addoption(
        "--dcprop-timeout",
        type=float,
        default=30.0,
        help="seconds an example may take before it counts as a hang",
    )
    group.addoption(
        "--dcprop-repro-dir",
        default="dcprop-repros",
        help="where reproducers of failing examples are written",
    )
    group.addoption(
        "--dcprop-checkpoint-root",
        default=None,
        help="where examples write checkpoints (default: $DCPROP_CHECKPOINT_ROOT, else the "
        "temp directory); under torchrun across hosts, a directory every host mounts",
    )
    group.addoption(
        "--dcprop-torchrun",
        action="store_true",
        help="under torchrun: rank 0 runs the tests, other ranks follow",
    )


def _device(config: pytest.Config) -> str:
    from dcprop.errors import UsageError
    from dcprop.runner import resolve_device

    try:
        return resolve_device(config.getoption("--dcprop-device"), option="--dcprop-device")
    except UsageError as e:
        raise pytest.UsageError(str(e)) from None


def _checkpoint_root(config: pytest.Config) -> str | None:
    from dcprop.runner import resolve_checkpoint_root

    return resolve_checkpoint_root(config.getoption("--dcprop-checkpoint-root"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "dcprop: a dcprop property test")
    global repro_dir
    repro_dir = config.getoption("--dcprop-repro-dir")
    if config.getoption("--dcprop-torchrun"):
        from dcprop.errors import UsageError
        from dcprop.runner.spmd import SPMDRunner

        try:
            config.stash[_RUNNER_KEY] = SPMDRunner(
                device=_device(config),
                timeout=config.getoption("--dcprop-timeout"),
                tmp_root=_checkpoint_root(config),
            )
        except UsageError as e:
            raise pytest.UsageError(str(e)) from None


@pytest.hookimpl(tryfirst=True)  # torchrun followers serve rank 0 instead of testing
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    runner = session.config.stash.get(_RUNNER_KEY, None)
    if runner is not None and not runner.is_driver:
        # torchrun follower: run what rank 0 sends, no tests of its own; fail where it failed
        session.testsfailed = runner.follow()
        return True
    return None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    runner = session.config.stash.get(_RUNNER_KEY, None)
    if runner is not None:
        runner.close(int(exitstatus))


def pytest_unconfigure(config: pytest.Config) -> None:
    runner = config.stash.get(_RUNNER_KEY, None)
    if runner is not None:
        runner.close(1)  # no-op after pytest_sessionfinish


@pytest.fixture(scope="session")
def dcprop_runner(request: pytest.FixtureRequest) -> Any:
    """The session's runner: lazily started local Pools (one per job size), or
    torchrun's ranks."""
    config = request.config
    spmd = config.stash.get(_RUNNER_KEY, None)
    if spmd is not None:
        yield spmd
        return
    from dcprop.runner import Pools

    pools = Pools(
        config.getoption("--dcprop-world-size"),
        device=_device(config),
        timeout=config.getoption("--dcprop-timeout"),
        tmp_root=_checkpoint_root(config),
    )
    yield pools
    pools.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    import sys

    testing = sys.modules.get("dcprop.testing")
    found = getattr(testing, "reproducers", None)
    if found:
        terminalreporter.section("dcprop reproducers")
        for test, paths in sorted(found.items()):
            for path in paths:
                terminalreporter.write_line(f"{test}: python {path}")
