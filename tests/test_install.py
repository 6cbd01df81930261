"""dcprop installed as users install it: `pip install .`, not editable, into a fresh
virtual environment that has nothing else, then run from another directory, so that
nothing is found through the source tree."""

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = "torch==2.13.0"  # pinned first, as the README says, so pip takes the CPU build


def _run(*command, cwd, env):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def test_pip_install_gives_a_working_dcprop_check():
    with tempfile.TemporaryDirectory(prefix="dcprop-install-") as tmp:
        # the project as a user's clone holds it, without this checkout's caches
        source = os.path.join(tmp, "source")
        for name in ("pyproject.toml", "README.md"):
            os.makedirs(source, exist_ok=True)
            shutil.copy(os.path.join(ROOT, name), source)
        shutil.copytree(
            os.path.join(ROOT, "dcprop"),
            os.path.join(source, "dcprop"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        venv = os.path.join(tmp, "venv")
        bin_dir = os.path.join(venv, "bin")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = bin_dir + os.pathsep + env["PATH"]
        elsewhere = os.path.join(tmp, "elsewhere")
        os.mkdir(elsewhere)
        steps = [
            (sys.executable, "-m", "venv", venv),
            ("pip", "install", "--no-cache-dir", TORCH),
            ("pip", "install", "--no-cache-dir", source),
        ]
        for step in steps:
            code, out = _run(*step, cwd=elsewhere, env=env)
            assert code == 0, f"{' '.join(step)}:\n{out[-3000:]}"
        shutil.rmtree(source)  # what runs now is what was installed

        code, out = _run(
            "python", "-c", "import dcprop; print(dcprop.__file__)", cwd=elsewhere, env=env
        )
        assert code == 0 and out.startswith(os.path.join(venv, "lib")), out
        code, out = _run("dcprop", "check", "--help", cwd=elsewhere, env=env)
        assert code == 0 and "--recipe" in out, out
        code, out = _run("dcprop", "check", "--recipe", "no-such-recipe", cwd=elsewhere, env=env)
        assert code == 2 and "choose from ['ci', 'nightly', 'seed000-finetune'" in out, out
        code, out = _run(
            *("dcprop", "check", "--recipe", "ci", "--properties", "roundtrip"),
            *("--max-examples", "2", "--world-size", "2", "--no-database"),
            cwd=elsewhere,
            env=env,
        )
        assert code == 0, out[-3000:]
        assert "roundtrip               2" in out, out[-3000:]
