"""Installing and importing vae_ext the ways users do: from the repository root after
`pip install .`, without build isolation, without torch, and the code and links of the README and
docs/*.md as they stand."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILT_IN_PLACE = any((REPO / "vae_ext").glob("_C*"))


def _run(code: str, cwd, timeout=120, env=None):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_import_from_the_repository_root():
    """`python -c "import vae_ext"` in the clone's root: the source folder shadows the installed
    package. With an in-place build it works; without one the error says what is happening."""
    r = _run("import vae_ext; print(vae_ext.__file__)", REPO)
    if BUILT_IN_PLACE:
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()).parent == REPO / "vae_ext"
        return
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "you are importing the source tree at" in last and str(REPO / "vae_ext") in last, last
    assert "pip install -e ." in last and "another folder" in last, last


def test_python_m_pytest_from_the_root_tests_the_installed_package():
    """`python -m pytest` puts the root first on sys.path; conftest.py takes it off unless the
    checkout is built in place, so the tests import a vae_ext that has its kernels."""
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_build.py", "-q", "-p", "no:cacheprovider",
                        "-k", "build_info_keys"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1 passed" in r.stdout


def _setup_py_fails(tmp_path, *setup: str) -> str:
    """Runs a copy of setup.py alone (its checks run before it looks for sources, and nothing can
    be written into the checkout) after the `setup` lines (which may use sys); it must fail: its
    last line on stderr."""
    shutil.copy(REPO / "setup.py", tmp_path / "setup.py")
    code = "\n".join(["import runpy, sys", *setup, "runpy.run_path('setup.py', run_name='__main__')"])
    r = _run(code, tmp_path)
    assert r.returncode != 0
    return r.stderr.strip().splitlines()[-1]


def test_build_without_isolation_says_what_it_needs(tmp_path):
    """setuptools < 70.1 without the `wheel` package has no bdist_wheel: one line that says what to
    install, not setuptools' "invalid command 'bdist_wheel'"."""
    last = _setup_py_fails(
        tmp_path,
        "for m in ('wheel', 'wheel.bdist_wheel', 'setuptools.command.bdist_wheel'): sys.modules[m] = None",
        "sys.argv = ['setup.py', 'dist_info']",
    )
    assert "has no bdist_wheel command" in last and "pip install wheel" in last, last


def test_build_without_torch_names_a_pinned_cpu_install(tmp_path):
    msg = _setup_py_fails(tmp_path, "sys.modules['torch'] = None", "sys.argv = ['setup.py', 'build_ext']")
    assert "torch==" in msg and "CPU" in msg, msg
    assert "--system-site-packages" in msg and "--no-build-isolation" in msg, msg
    assert not re.search(r"pip install torch(?![=\w])", msg), f"suggests an unpinned torch: {msg}"


DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]


def _python_blocks(doc):
    return re.findall(r"```python\n(.*?)```", (REPO / doc).read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert _python_blocks("README.md"), "README.md has no python code block"
    assert len(DOCS) > 1 and _python_blocks("docs/porting.md"), "no docs/*.md found, or porting.md lost its code"


@pytest.mark.parametrize("doc,index", [(d, i) for d in DOCS for i in range(len(_python_blocks(d)))])
def test_docs_python_block_runs_as_written(doc, index, tmp_path):
    """Every ```python block of the README and of docs/*.md runs as it stands, in a fresh
    interpreter (a user copies it into a file), from a folder outside the checkout."""
    code = _python_blocks(doc)[index]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = _run(code, tmp_path, timeout=300, env=env)
    assert r.returncode == 0, f"{doc} python block {index} failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' in a code block is no heading
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_slug_is_githubs():
    assert _slug("Class-conditional VAE (`--conditional`)") == "class-conditional-vae---conditional"
    assert _slug("`vae-ext sweep`") == "vae-ext-sweep"


@pytest.mark.parametrize("page", ["README.md"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))
def test_relative_links_resolve(page):
    """Every relative link and image of the README and docs/ names a file of the checkout, and an
    anchor (#...) names a heading of its page."""
    path = REPO / page
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        dest = (path.parent / target).resolve() if target else path
        if not dest.exists():
            broken.append(link)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(link)
    assert not broken, f"{page}: broken links {broken}"


def test_readme_says_how_long_the_build_takes_and_how_to_watch_it():
    """`pip install .` compiles for minutes without a word: the README says so and names `-v`."""
    text = (REPO / "README.md").read_text()
    assert "pip install -v ." in text
    assert re.search(r"about (two|\d+) minutes on a 2-core machine", text)


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_the_machine_they_measured_on(doc):
    """A time or a size measured "on this machine" means nothing to a reader on another one: the docs
    name the machine (AMD EPYC VM, H100, ...) instead."""
    text = (REPO / doc).read_text()
    found = re.findall(r".{0,60}\bthis (?:shared |\d-core |busy )*(?:machine|VM|box|computer|server)\b", text)
    assert not found, f"{doc} speaks of a machine without naming it: {found}"
