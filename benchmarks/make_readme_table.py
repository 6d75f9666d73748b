#!/usr/bin/env python
"""Render benchmark results (the JSON of ``vae-ext bench``) as the README's performance section.

    python benchmarks/make_readme_table.py --json benchmarks/results/cpu.json               # print it
    python benchmarks/make_readme_table.py --json benchmarks/results/cpu.json --write README.md

With ``--write`` the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in that file is
replaced (the markers stay); with ``--section NAME`` the text between ``<!-- bench:NAME:begin -->``
and ``<!-- bench:NAME:end -->`` (the README has one section per machine). Needs neither torch nor the compiled extension: it loads
vae_ext/bench/report.py directly.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

_REPORT = Path(__file__).resolve().parents[1] / "vae_ext" / "bench" / "report.py"


def _load_report():
    spec = importlib.util.spec_from_file_location("_vae_ext_bench_report", _REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="results JSON written by vae-ext bench / benchmarks/run.py")
    p.add_argument("--write", metavar="FILE", help="update the section between the bench markers in FILE")
    p.add_argument("--section", default="", metavar="NAME",
                   help="write between <!-- bench:NAME:begin/end --> instead of <!-- bench:begin/end -->")
    args = p.parse_args(argv)
    report = _load_report()
    try:
        results = report.load(args.json)
    except (OSError, ValueError) as e:
        print(f"make_readme_table: cannot read {args.json}: {e}", file=sys.stderr)
        return 2
    section = report.markdown_section(results)
    if not args.write:
        print(section)
        return 0
    path = Path(args.write)
    try:
        text = path.read_text()
        new = report.update_markers(text, section, args.section)
    except (OSError, ValueError) as e:
        print(f"make_readme_table: {path}: {e}", file=sys.stderr)
        return 2
    if new != text:
        path.write_text(new)
        print(f"updated the performance section of {path}")
    else:
        print(f"{path} is already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
