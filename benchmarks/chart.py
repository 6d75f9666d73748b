"""The PNG chart of a run: speedup of the fused path against size, one panel per benchmark.

matplotlib is needed for this file alone: run.py skips the chart, with one line, where it is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from report import machine_line


def write_chart(results: dict, path) -> Optional[str]:
    """PNG of speedup (baseline time / fused time) against size, one panel per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    benches = results.get("benchmarks", {})
    # a benchmark without a single speedup (dmol where the build lacks the fused op) has nothing to plot
    panels = [n for n in ("loss", "objectives", "reparam", "dmol", "step")
              if any(v for r in benches.get(n, {}).get("results", []) for v in (r.get("speedup") or {}).values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        recs = benches[name]["results"]
        series, ticks = {}, {}
        if name in ("loss", "objectives", "reparam", "dmol"):
            for r in recs:
                kind = {"loss": r.get("recon"), "objectives": r.get("case")}.get(name)
                tag = (f"{kind} " if kind else "") + (r["dtype"] if r["dtype"] != "float32" else "")
                for base in ("eager", "compile"):
                    v = r["speedup"].get(base)
                    if v:
                        series.setdefault(f"{tag.strip()} vs {base}".strip(), []).append((r["elements"], v))
                ticks[r["elements"]] = ("x".join(map(str, r["shape"])) if r.get("case") == "kl_prior" or name == "dmol"
                                        else f"{r['N']}x{r['D']}" if "D" in r else f"{r['N']}x{r['L']}")
            ax.set_xlabel({"loss": "size, N x D (log of elements)", "reparam": "size, N x L (log of elements)",
                           "dmol": "x's shape (log of params' elements)"}
                          .get(name, "size: mu's shape (KL) or N x D (ELBO) (log of elements)"))
        else:
            for r in recs:
                for key, label in (("eager", "vs reference"), ("compile", "compiled vs compiled ref")):
                    v = r["speedup"].get(key)
                    if v:
                        series.setdefault(f"{r['model']} {label}", []).append((r["batch"], v))
                ticks[r["batch"]] = str(r["batch"])
            ax.set_xlabel("batch size")
        for label, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("speedup: baseline time / fused time")
        ax.set_xticks(sorted(ticks), [ticks[k] for k in sorted(ticks)], fontsize=7, rotation=20)
        ax.xaxis.set_minor_formatter(NullFormatter())
        vals = [v for pts in series.values() for _, v in pts] + [1.0]
        lo, hi = min(vals), max(vals)
        yt = []
        for subs in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.1, 1.2, 1.3, 1.5, 1.7, 2, 3, 5, 7, 8, 9)):
            yt = [m * 10.0**e for e in range(-3, 5) for m in subs if lo / 1.15 <= m * 10.0**e <= hi * 1.15]
            if len(yt) >= 3:
                break
        ax.set_ylim(min(yt + [lo]) / 1.1, max(yt + [hi]) * 1.1)
        ax.set_yticks(yt)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(benches[name].get("title", name), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"vae_ext fused kernels - {machine_line(results)}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
