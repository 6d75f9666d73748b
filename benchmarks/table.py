"""The one table renderer: a table is (title, headers, rows of strings), printed as text or markdown.

Every table the harness shows goes through here: the terminal report of a run and the docs/benchmarks.md
section that make_tables.py writes. Pure Python: no torch, so a results JSON renders anywhere.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

Table = Tuple[str, List[str], List[List[str]]]  # title, headers, rows


def fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_x(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def fmt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}%"


def fmt_mib(v: Optional[int]) -> str:
    if v is None:
        return "-"
    m = v / 2**20
    return f"{m:.0f}" if m >= 100 else (f"{m:.1f}" if m >= 1 else f"{m:.2f}")


def fmt_count(n: int) -> str:
    for div, suffix in ((1 << 20, "Mi"), (1 << 10, "Ki")):
        if n >= div and n % (div // 16) == 0:
            return f"{n / div:g}{suffix}"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1000:
        return f"{n / 1e3:.0f}K"
    return str(n)


def render(table: Table, markdown: bool = False, heading: str = "####") -> str:
    """The table as aligned text (first column left, the others right) or as a markdown table."""
    title, headers, rows = table
    if markdown:
        align = "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(headers))) + "|"
        return "\n".join([f"{heading} {title}", "", "| " + " | ".join(headers) + " |", align,
                          *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([title, sep, line(headers), sep, *(line(r) for r in rows), sep])
