"""The scripts that only run elsewhere (on the GPU machine, or in CI) at least parse here.

benchmarks/gpu_check.sh and benchmarks/sanitize_kernels.py run only where a GPU is lent, for
minutes that are scarce; a syntax error found there costs a device call. CI runs the README's quick
start through .ci/quickstart, checked here on made-up READMEs (its lines run, a failing one fails).
"""
from __future__ import annotations

import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_SCRIPTS = (".ci/run", ".ci/quickstart", ".ci/check-cuda-glue", ".ci/check-cuda-build", "benchmarks/gpu_check.sh")
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


# --------------------------------------------------------------------------- the README's quick start in CI
def _quickstart(readme, cwd, **env):
    return subprocess.run(["bash", os.path.join(REPO_ROOT, ".ci", "quickstart"), str(readme)], cwd=cwd,
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_runs_the_readme_quickstart_read_from_the_readme(tmp_path):
    """.ci/quickstart runs the first ```bash block of the file it is given, as it stands then (a
    README edited after the script was written runs as edited), and only that block."""
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n```python\nprint('not this')\n```\n\n```bash\necho one > ran.txt\n"
                      "echo two >> ran.txt   # a comment\n```\n\n```bash\necho three >> ran.txt\n```\n")
    r = _quickstart(readme, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ran.txt").read_text() == "one\ntwo\n"
    r = _quickstart(readme, tmp_path, PRINT="1")
    assert r.stdout == "echo one > ran.txt\necho two >> ran.txt   # a comment\n"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("failing", ["false", "(exit 5)", "false | cat", "echo $UNSET_VARIABLE_X"],
                         ids=["fails", "pytest-no-tests", "pipe", "unset"])
def test_ci_quickstart_fails_when_a_readme_line_fails(tmp_path, failing):
    """Every line counts (bash -euo pipefail): a failing command stops the block and fails CI, pytest's
    "no tests collected" (exit 5) included; nothing after it runs."""
    readme = tmp_path / "README.md"
    readme.write_text(f"```bash\n{failing}\ntouch after\n```\n")
    r = _quickstart(readme, tmp_path)
    assert r.returncode != 0
    assert not (tmp_path / "after").exists()


def test_ci_run_uses_the_quickstart_not_a_copy():
    """.ci/run calls .ci/quickstart on the README and runs no test command of its own; the real
    README's quick start installs every test requirement (pyproject's `test` extra) before `pytest`."""
    run = Path(REPO_ROOT, ".ci", "run").read_text()
    code = [ln.split("#")[0] for ln in run.splitlines()]
    assert any(ln.strip() == ".ci/quickstart" for ln in code), "CI does not run the README's quick start"
    assert not any(re.search(r"\bpytest\b", ln) for ln in code), "CI runs pytest besides the README's line"
    block = subprocess.run(["bash", os.path.join(REPO_ROOT, ".ci", "quickstart")], cwd=REPO_ROOT,
                           capture_output=True, text=True, env={**os.environ, "PRINT": "1"}).stdout
    commands = [ln.split("#")[0] for ln in block.splitlines()]
    assert any(re.search(r"\bpytest tests\b", c) for c in commands), block
    installed = set()
    extras = _pyproject_extras()
    for c in commands:
        for part in c.split("&&"):
            words = part.split()
            if words[:2] != ["pip", "install"]:
                continue
            for w in words[2:]:
                w = w.strip("'\"")
                m = re.fullmatch(r"\.\[([\w,]+)\]", w)
                if m:
                    installed.update(r for e in m.group(1).split(",") for r in extras[e])
                elif not w.startswith("-") and w != ".":
                    installed.add(re.split(r"[=<>]", w)[0])
    missing = set(extras["test"]) - installed
    assert not missing, f"the README's quick start runs the tests without installing {sorted(missing)}"


def _pyproject_extras():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]
