#!/usr/bin/env python
"""Render benchmark results (the JSON of ``python benchmarks/run.py``) as the tables of docs/benchmarks.md.

    python benchmarks/make_tables.py --json benchmarks/results/cpu.json                     # print them
    python benchmarks/make_tables.py --json benchmarks/results/cpu.json --write              # docs/benchmarks.md
    python benchmarks/make_tables.py --json benchmarks/results/h100.json --write --section h100

With ``--write`` the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in that file
(default: docs/benchmarks.md) is replaced (the markers stay); with ``--section NAME`` the text between
``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->`` (one section per machine). Needs neither
torch nor the compiled extension: report.py, through the same table renderer as a run's own output, is
pure Python.
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py and table.py, when loaded by path

import report  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"  # where the tables live


def markers(name: str = "") -> tuple:
    """The begin and end markers of a generated section: ``bench`` or ``bench:NAME``."""
    tag = f"bench:{name}" if name else "bench"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


def update_markers(text: str, section: str, name: str = "") -> str:
    """Replace what lies between the bench markers (``markers(name)``) of ``text`` by ``section``."""
    begin, end = markers(name)
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pat.search(text):
        raise ValueError(f"no {begin} ... {end} markers found")
    return pat.sub(lambda _: f"{begin}\n{section.rstrip()}\n{end}", text, count=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="results JSON written by python benchmarks/run.py")
    p.add_argument("--write", metavar="FILE", nargs="?", const=str(DOC),
                   help="update the section between the bench markers in FILE (default: docs/benchmarks.md)")
    p.add_argument("--section", default="", metavar="NAME",
                   help="write between <!-- bench:NAME:begin/end --> instead of <!-- bench:begin/end -->")
    args = p.parse_args(argv)
    try:
        results = json.loads(Path(args.json).read_text())
    except (OSError, ValueError) as e:
        print(f"make_tables: cannot read {args.json}: {e}", file=sys.stderr)
        return 2
    try:
        section = report.markdown_section(results)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"make_tables: {args.json} is not a benchmark results file ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    if not args.write:
        print(section)
        return 0
    path = Path(args.write)
    try:
        text = path.read_text()
        new = update_markers(text, section, args.section)
    except (OSError, ValueError) as e:
        print(f"make_tables: {path}: {e}", file=sys.stderr)
        return 2
    if new != text:
        path.write_text(new)
        print(f"updated the benchmark tables of {path}")
    else:
        print(f"{path} is already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
