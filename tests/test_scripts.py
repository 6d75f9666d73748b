"""The scripts that only run elsewhere (on the GPU machine, or in CI) at least parse here.

benchmarks/gpu_check.sh and benchmarks/sanitize_kernels.py run only where a GPU is lent, for
minutes that are scarce; a syntax error found there costs a device call.
"""
from __future__ import annotations

import os
import py_compile
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_SCRIPTS = (".ci/run", ".ci/check-cuda-glue", ".ci/check-cuda-build", "benchmarks/gpu_check.sh")
PYTHON_SCRIPTS = ("benchmarks/sanitize_kernels.py", "benchmarks/run.py", "benchmarks/make_tables.py")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_parses(script):
    path = os.path.join(REPO_ROOT, script)
    if not os.path.exists(path):
        pytest.skip(f"{script} is not in this checkout")
    res = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert res.returncode == 0, f"bash -n {script}:\n{res.stderr}"


@pytest.mark.parametrize("script", PYTHON_SCRIPTS)
def test_python_script_compiles(script, tmp_path):
    path = os.path.join(REPO_ROOT, script)
    if not os.path.exists(path):
        pytest.skip(f"{script} is not in this checkout")
    py_compile.compile(path, cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_sanitize_workload_runs_on_cpu():
    """The compute-sanitizer workload makes the same calls on CPU without error."""
    import vae_ext  # the subprocess imports the same vae_ext (installed, or the built checkout)

    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(vae_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "sanitize_kernels.py"),
                          "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "every kernel ran" in res.stdout and "on cpu" in res.stdout, res.stdout
