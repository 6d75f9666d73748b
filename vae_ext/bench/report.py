"""Tables (console and markdown), target checks, the README section and the chart, from a results dict.

Pure Python on purpose (matplotlib is imported only to draw the chart): it renders a results JSON
on any machine, without torch or the compiled extension (``benchmarks/make_readme_table.py`` loads
this file directly).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple


Table = Tuple[str, List[str], List[List[str]]]  # title, headers, rows


# --------------------------------------------------------------------------- formatting


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


def _ms(rec: dict, impl: str) -> Optional[float]:
    t = rec.get("times", {}).get(impl)
    return t.get("median_ms") if t else None


def _yes_no(v) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def _mem_cols(rec: dict, impls: Sequence[str]) -> str:
    peak = rec.get("peak_mem_bytes") or {}
    if not peak:
        return "-"
    return " / ".join(fmt_mib(peak.get(i)) for i in impls)


_STEP_PAIRS = {"eager": ("fused_eager", "ref_eager"), "compile": ("fused_compile", "ref_compile")}


def _mem_ok(rec: dict) -> str:
    """'yes' where the fused peak is <= the baseline's, else 'NO +x%' (how much more)."""
    ok = rec.get("mem_fused_le")
    peak = rec.get("peak_mem_bytes") or {}
    if not ok:
        return "-"
    cells = []
    for base, v in ok.items():
        f, b = _STEP_PAIRS[base] if "fused_eager" in peak else ("fused", base)
        if v or not peak.get(b):
            cells.append(_yes_no(v))
        else:
            pct = 100.0 * (peak[f] - peak[b]) / peak[b]
            cells.append(f"NO +{pct:.0f}%" if pct >= 10 else f"NO +{pct:.2g}%")
    return " / ".join(cells)


# --------------------------------------------------------------------------- tables


def _op_table(bench: dict, size_cols: Callable[[dict], List[str]], size_headers: List[str]) -> Table:
    rows = []
    dtypes = {r.get("dtype") for r in bench["results"]}
    show_dtype = len(dtypes) > 1
    for r in bench["results"]:
        row = size_cols(r)
        if show_dtype:
            row.insert(1 if "recon" in r else 0, r.get("dtype", ""))
        pct = r.get("pct_floor") or {}
        row += [
            fmt_ms(_ms(r, "fused")),
            fmt_ms(_ms(r, "eager")),
            fmt_ms(_ms(r, "compile")),
            fmt_ms(_ms(r, "floor")),
            fmt_x(r["speedup"].get("eager")),
            fmt_x(r["speedup"].get("compile")),
            fmt_pct(pct.get("fused")),
            _mem_cols(r, ("fused", "eager", "compile")),
            _mem_ok(r),
        ]
        rows.append(row)
    headers = list(size_headers)
    if show_dtype:
        headers.insert(1 if size_headers[0] == "recon" else 0, "dtype")
    headers += [
        "fused ms",
        "eager ms",
        "compile ms",
        "floor ms",
        "vs eager",
        "vs compile",
        "fused % of floor",
        "peak MiB fused / eager / compile",
        "fused mem <= eager / compile",
    ]
    dt = "" if show_dtype else f", {next(iter(dtypes))}"
    return (f"{bench['title']}{dt}", headers, rows)


def loss_table(bench: dict) -> Table:
    return _op_table(
        bench,
        lambda r: [r["recon"], f"{r['N']}x{r['D']}, {r['L']}", fmt_count(r["elements"])],
        ["recon", "N x D, L", "elements"],
    )


def reparam_table(bench: dict) -> Table:
    return _op_table(bench, lambda r: [f"{r['N']}x{r['L']}", fmt_count(r["elements"])], ["N x L", "elements"])


def step_table(bench: dict) -> Table:
    rows = []
    for r in bench["results"]:
        sp = r.get("speedup", {})
        rows.append(
            [
                r["model"],
                r.get("recon", "bce_logits"),
                str(r["batch"]),
                fmt_ms(_ms(r, "ref_eager")),
                fmt_ms(_ms(r, "fused_eager")),
                fmt_x(sp.get("eager")),
                fmt_ms(_ms(r, "ref_compile")),
                fmt_ms(_ms(r, "fused_compile")),
                fmt_x(sp.get("compile")),
                fmt_x(sp.get("fused_eager_vs_ref_compile")),
                _mem_cols(r, ("ref_eager", "fused_eager", "ref_compile", "fused_compile")),
                _mem_ok(r),
            ]
        )
    headers = [
        "model",
        "loss",
        "batch",
        "reference ms",
        "fused ms",
        "vs reference",
        "compiled ref ms",
        "compiled fused ms",
        "vs compiled ref",
        "fused vs compiled ref",
        "peak MiB fwd+bwd: ref / fused / c. ref / c. fused",
        "fused mem <= ref (eager / compiled)",
    ]
    dtypes = {r.get("dtype") for r in bench["results"]}
    adam = bench.get("adam", "default")
    adam = "Adam" if adam == "default" else f"Adam({adam}=True)"
    return (f"{bench['title']}, {', '.join(sorted(d for d in dtypes if d))}, {adam}", headers, rows)


TABLES = {"loss": loss_table, "reparam": reparam_table, "step": step_table}


def tables(results: dict) -> List[Table]:
    out = []
    for name, bench in results.get("benchmarks", {}).items():
        if bench.get("results") and name in TABLES:
            out.append(TABLES[name](bench))
    return out


def render_text(table: Table) -> str:
    title, headers, rows = table
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([title, sep, line(headers), sep, *(line(r) for r in rows), sep])


def render_markdown(table: Table, heading: str = "####") -> str:
    title, headers, rows = table
    out = [f"{heading} {title}", "", "| " + " | ".join(headers) + " |", "|" + "|".join(
        " --- " if i == 0 else " ---: " for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- targets

# (device, description, benchmark, which records, metric, minimum). metric: a baseline name (speedup of
# the fused path over it) or "floor" (percent of the copy floor the fused path reaches). The CPU
# targets are the issues' figures for the 2-core CPU, the CUDA ones those for an H100.
_BIG = 16 * 2**20
TARGETS = [
    ("cpu", "loss bce: fused >= 10x eager reference at >= 0.8M elements", "loss",
     lambda r: r["recon"] == "bce" and r["elements"] >= 800_000, "eager", 10.0),
    ("cpu", "loss bce: fused >= 2x torch.compile(reference) at >= 0.8M elements", "loss",
     lambda r: r["recon"] == "bce" and r["elements"] >= 800_000, "compile", 2.0),
    ("cpu", "loss bce: fused >= 3x torch.compile(reference) at 128x784", "loss",
     lambda r: r["recon"] == "bce" and r["N"] == 128 and r["D"] == 784, "compile", 3.0),
    ("cpu", "reparameterize: fused >= 3x eager reference at >= 64K elements", "reparam",
     lambda r: r["elements"] >= 65536, "eager", 3.0),
    ("cpu", "reparameterize: fused >= 5x torch.compile(reference) at >= 64K elements", "reparam",
     lambda r: r["elements"] >= 65536, "compile", 5.0),
    *(("cpu", f"MLP train step, {recon}: fused >= {x}x eager reference at batch {b}", "step",
       (lambda r, b=b, recon=recon: r["model"] == "mlp" and r["batch"] == b
        and r.get("recon", "bce_logits") == recon), "eager", x)
      for recon in ("bce", "bce_logits") for b, x in ((128, 1.3), (1024, 1.2))),
    ("cuda", "loss bce: fused >= 85% of the copy floor at >= 16M elements", "loss",
     lambda r: r["recon"] == "bce" and r["elements"] >= _BIG, "floor", 85.0),
    ("cuda", "loss bce: fused >= 1.5x torch.compile(reference) at >= 16M elements", "loss",
     lambda r: r["recon"] == "bce" and r["elements"] >= _BIG, "compile", 1.5),
    ("cuda", "reparameterize: fused >= 85% of the copy floor at >= 16M elements", "reparam",
     lambda r: r["elements"] >= _BIG, "floor", 85.0),
]


def check_targets(results: dict) -> List[dict]:
    """The targets of the run's device type, each with the worst float32 case among those it covers."""
    device = (results.get("machine") or {}).get("device", "cpu")
    out = []
    for dev, desc, bench, keep, metric, minimum in TARGETS:
        if dev != device:
            continue
        recs = [r for r in results.get("benchmarks", {}).get(bench, {}).get("results", [])
                if r.get("dtype", "float32") == "float32" and keep(r)]
        if metric == "floor":
            vals = [r.get("pct_floor", {}).get("fused") for r in recs]
        else:
            vals = [r["speedup"].get(metric) for r in recs]
        vals = [v for v in vals if v is not None]
        worst = min(vals) if vals else None
        out.append({
            "target": desc,
            "metric": "percent_of_floor" if metric == "floor" else f"speedup_vs_{metric}",
            "minimum": minimum,
            "measured_worst": worst,
            "cases": len(vals),
            "met": None if worst is None else worst >= minimum,
        })
    return out


def targets_table(results: dict) -> Table:
    rows = []
    for t in check_targets(results):  # from the records, by the current rules
        met = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        fmt = fmt_pct if t["metric"] == "percent_of_floor" else fmt_x
        rows.append([t["target"], fmt(t["measured_worst"]), str(t["cases"]), met])
    return ("Targets (worst case among the matching sizes)", ["target", "measured", "cases", "status"], rows)


# --------------------------------------------------------------------------- whole reports


def machine_line(results: dict) -> str:
    m = results.get("machine", {})
    if m.get("device") == "cuda" and m.get("gpu_name"):
        return f"{m['gpu_name']} (CUDA {m.get('cuda')}), torch {m.get('torch')}"
    return (f"{m.get('cpu_model')} ({m.get('cpu_count')} cores, {m.get('threads')} threads, "
            f"{m.get('torch_cpu_capability')}), torch {m.get('torch')}")


def _bandwidth_line(results: dict) -> str:
    bw = results.get("copy_bandwidth")
    if not bw:
        return ""
    what = "device-to-device" if results.get("machine", {}).get("device") == "cuda" else "memory"
    return (f"Measured {what} copy bandwidth: {bw['GBps_peak']:.0f} GB/s peak, {bw['GBps_median']:.0f} GB/s median "
            f"(`dst.copy_(src)`, {bw['bytes'] / 2**20:.0f} MiB read + written per copy).")


def _allocator_text(results: dict) -> str:
    st = results.get("settings") or {}
    a = st.get("cpu_allocator")
    if not a or (results.get("machine") or {}).get("device") != "cpu":
        return ""
    if a.get("mode") == "glibc":
        return "; CPU allocator: glibc defaults (large blocks may page-fault on every allocation)"
    if not a.get("applied"):
        return f"; CPU allocator: {a.get('mode')} requested but not applied"
    return {"retain": "; CPU allocator: freed memory retained for reuse (no page faults after warm-up)",
            "fresh": "; CPU allocator: every block >= 256 KiB is fresh pages (page faults on every allocation)",
            }.get(a.get("mode"), f"; CPU allocator: {a.get('mode')}")


def settings_line(results: dict) -> str:
    st = results.get("settings") or {}
    if not st:
        return ""
    mode = st.get("compile_mode", "default")
    backend = st.get("compile_backend", "inductor")
    env = (results.get("machine") or {}).get("env") or {}
    return (f"{st.get('threads')} threads; torch.compile(mode={mode!r}, backend={backend!r}, dynamic=False); "
            f"{st.get('rounds')} interleaved rounds of {st.get('min_run_time_s')} s per implementation"
            + ("; --quick" if st.get("quick") else "")
            + ("; --cuda-graph: loss and reparam timed as CUDA-graph replays of one call (device time, "
               "no host overhead)" if st.get("cuda_graph") else "")
            + _allocator_text(results)
            + ("; environment: " + ", ".join(f"{k}={v}" for k, v in env.items()) if env else "") + ".")


def render_console(results: dict) -> str:
    parts = [f"Machine: {machine_line(results)}", f"vae_ext build: {results.get('build_info')}",
             f"Settings: {settings_line(results)}"]
    bw = _bandwidth_line(results)
    if bw:
        parts.append(bw)
    for t in tables(results):
        parts += ["", render_text(t)]
    parts += ["", render_text(targets_table(results))]
    notes = results.get("notes") or []
    if notes:
        parts += ["", *(f"note: {n}" for n in notes)]
    return "\n".join(parts)


def markdown_section(results: dict) -> str:
    """The README's performance section (without the markers)."""
    date = str(results.get("date", ""))[:10]
    bi = results.get("build_info") or {}
    cmd = results.get("command", "vae-ext bench")
    lines = [
        f"Measured on **{machine_line(results)}**, {date}; vae_ext {results.get('vae_ext_version', '?')} "
        f"(CPU kernels: {bi.get('cpu_capability', '?')}, CUDA kernels: {'yes' if bi.get('cuda_kernels') else 'no'}).",
        "",
        f"Command: `{cmd}`",
        "",
        "Medians of forward + backward (`torch.utils.benchmark`, interleaved rounds after warm-up). "
        "*vs eager* / *vs compile*: time of the eager `vae_ext.reference` op / of `torch.compile` of it, "
        "divided by the fused time (> 1: fused is faster). *floor*: a `copy_` of as many bytes as any forward + "
        "backward must read and write (loss: recon, x and the gradient, 3 x N x D; reparameterize: 6 x N x L); "
        "*% of floor*: floor time / fused time. Peak memory: "
        f"{results.get('memory_method', '-')}.",
        "",
        f"Settings: {settings_line(results)}",
    ]
    bw = _bandwidth_line(results)
    if bw:
        lines += ["", bw]
    for t in tables(results):
        lines += ["", render_markdown(t)]
    lines += ["", render_markdown(targets_table(results))]
    notes = results.get("notes") or []
    if notes:
        lines += ["", *(f"Note: {n}." for n in notes)]
    return "\n".join(lines)


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


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- chart


def write_chart(results: dict, path) -> Optional[str]:
    """PNG of speedup (baseline time / fused time) against size, one panel per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, NullFormatter

    benches = results.get("benchmarks", {})
    panels = [n for n in ("loss", "reparam", "step") if benches.get(n, {}).get("results")]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        recs = benches[name]["results"]
        series, ticks = {}, {}
        if name in ("loss", "reparam"):
            for r in recs:
                tag = (f"{r['recon']} " if name == "loss" else "") + (r["dtype"] if r["dtype"] != "float32" else "")
                for base in ("eager", "compile"):
                    v = r["speedup"].get(base)
                    if v:
                        series.setdefault(f"{tag.strip()} vs {base}".strip(), []).append((r["elements"], v))
                ticks[r["elements"]] = f"{r['N']}x{r['D']}" if name == "loss" else f"{r['N']}x{r['L']}"
            ax.set_xlabel("size, N x D (log of elements)" if name == "loss" else "size, N x L (log of elements)")
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
