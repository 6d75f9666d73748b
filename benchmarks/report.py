"""A results dict as text: the benchmarks' tables, the terminal report and the tables of docs/benchmarks.md.

Pure Python on purpose: it renders a results JSON on any machine, without torch or the compiled
extension (make_tables.py). Every table is printed through table.render.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from table import Table, fmt_count, fmt_mib, fmt_ms, fmt_pct, fmt_x, render
from targets import targets_table


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

Column = Tuple[str, Callable[[dict], str]]  # header, the cell of a record


def _table(title: str, columns: List[Column], records: List[dict]) -> Table:
    return (title, [h for h, _ in columns], [[cell(r) for _, cell in columns] for r in records])


def _ms_col(header: str, impl: str) -> Column:
    return header, lambda r: fmt_ms(_ms(r, impl))


def _x_col(header: str, key: str) -> Column:
    return header, lambda r: fmt_x((r.get("speedup") or {}).get(key))


_OP_COLUMNS: List[Column] = [
    _ms_col("fused ms", "fused"), _ms_col("eager ms", "eager"), _ms_col("compile ms", "compile"),
    _ms_col("floor ms", "floor"), _x_col("vs eager", "eager"), _x_col("vs compile", "compile"),
    ("fused % of floor", lambda r: fmt_pct((r.get("pct_floor") or {}).get("fused"))),
    ("peak MiB fused / eager / compile", lambda r: _mem_cols(r, ("fused", "eager", "compile"))),
    ("fused mem <= eager / compile", _mem_ok),
]


def _faults(times: dict, impls: Sequence[str]) -> str:
    """Minor page faults per call of each implementation, ' / ' between them."""
    def one(impl):
        v = (times.get(impl) or {}).get("minflt_per_call")
        return "-" if v is None else (f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.1f}")

    return " / ".join(one(i) for i in impls)


_FAULT_HEADER = "faults/call fused / eager / compile"


def _glibc(r: dict) -> dict:
    return r.get("glibc_process") or {}


def _glibc_ms(impl: str) -> Column:
    return f"{impl} ms", lambda r: fmt_ms(_ms(_glibc(r), impl))


def _glibc_columns(impls: Sequence[Tuple[str, str]], speedups: Sequence[Tuple[str, str]]) -> List[Column]:
    """A fresh process per case under glibc's malloc defaults (benchmarks/glibc_process.py): each
    impl's time ((header, impl) pairs), the speedups ((header, key)), the page faults per call."""
    names = [i for _, i in impls]
    return [
        *((f"{h} ms", lambda r, i=i: fmt_ms(_ms(_glibc(r), i))) for h, i in impls),
        *((h, lambda r, k=k: fmt_x((_glibc(r).get("speedup") or {}).get(k))) for h, k in speedups),
        (f"faults/call {' / '.join(h for h, _ in impls)}",
         lambda r: _faults(_glibc(r)["times"], names) if _glibc(r).get("times") else _glibc(r).get("error", "-")),
    ]


def _glibc_table(title: str, columns: List[Column], recs: list) -> List[Table]:
    """The glibc table of a benchmark, where its run measured any case in fresh processes."""
    if not any("glibc_process" in r for r in recs):
        return []
    return [_table(f"{title}: glibc's malloc defaults, a fresh process per case", columns, recs)]


_GLIBC_COLUMNS = _glibc_columns((("fused", "fused"), ("eager", "eager"), ("compile", "compile")),
                                (("vs eager", "eager"), ("vs compile", "compile")))


def _op_table(bench: dict, size_columns: List[Column]) -> List[Table]:
    """Sizes, then the op columns; a dtype column after the first size column when the dtypes differ.
    Where the run counted page faults, a column of them; where it measured the cases in fresh
    processes under glibc's defaults, a second table of those."""
    dtypes = {r.get("dtype") for r in bench["results"]}
    if len(dtypes) > 1:
        at = 1 if size_columns[0][0] in ("recon", "case") else 0
        size_columns = [*size_columns[:at], ("dtype", lambda r: r.get("dtype", "")), *size_columns[at:]]
        title = bench["title"]
    else:
        title = f"{bench['title']}, {next(iter(dtypes))}"
    recs = bench["results"]
    columns = list(_OP_COLUMNS)
    if any("minflt_per_call" in (r.get("times") or {}).get("fused", {}) for r in recs):
        columns.insert(7, (_FAULT_HEADER, lambda r: _faults(r.get("times") or {}, ("fused", "eager", "compile"))))
    return [_table(title, size_columns + columns, recs), *_glibc_table(title, size_columns + _GLIBC_COLUMNS, recs)]


def loss_table(bench: dict) -> List[Table]:
    return _op_table(bench, [("recon", lambda r: r["recon"]), ("N x D, L", lambda r: f"{r['N']}x{r['D']}, {r['L']}"),
                             ("elements", lambda r: fmt_count(r["elements"]))])


_OBJECTIVE_NAMES = {"kl_prior": "gaussian_kl, prior", "l1": "elbo l1", "gaussian": "elbo gaussian, 0-d rlv",
                    "gaussian_pixel": "elbo gaussian, per-pixel rlv"}


def _objective_size(r: dict) -> str:
    if r["case"] == "kl_prior":
        return "x".join(map(str, r["shape"]))
    return f"{r['N']}x{r['D']}, {r['L']}"


def objectives_table(bench: dict) -> List[Table]:
    return _op_table(bench, [("case", lambda r: _OBJECTIVE_NAMES.get(r["case"], r["case"])),
                             ("mu shape / N x D, L", _objective_size),
                             ("elements", lambda r: fmt_count(r["elements"]))])


def reparam_table(bench: dict) -> List[Table]:
    return _op_table(bench, [("N x L", lambda r: f"{r['N']}x{r['L']}"),
                             ("elements", lambda r: fmt_count(r["elements"]))])


_LATENT_COLUMNS: List[Column] = [
    ("mu shape", lambda r: "x".join(map(str, r["shape"]))), ("elements", lambda r: fmt_count(r["elements"])),
    _ms_col("fused ms", "fused"), _ms_col("two-call ms", "two_call"), _ms_col("eager ms", "eager"),
    _ms_col("compile ms", "compile"), _ms_col("floor ms", "floor"), _x_col("vs two-call", "two_call"),
    _x_col("vs eager", "eager"), _x_col("vs compile", "compile"),
    ("fused % of floor", lambda r: fmt_pct((r.get("pct_floor") or {}).get("fused"))),
    ("peak MiB fused / two-call / eager / compile", lambda r: _mem_cols(r, ("fused", "two_call", "eager", "compile"))),
]


_LATENT_GLIBC_COLUMNS = _glibc_columns(
    (("fused", "fused"), ("two-call", "two_call"), ("eager", "eager"), ("compile", "compile")),
    (("vs two-call", "two_call"), ("vs eager", "eager"), ("vs compile", "compile")))


def latent_table(bench: dict) -> List[Table]:
    """gaussian_latent beside reparameterize + gaussian_kl (this package's two calls)."""
    dtypes = sorted({r.get("dtype", "") for r in bench["results"]})
    lead = [] if len(dtypes) == 1 else [("dtype", lambda r: r.get("dtype", ""))]
    title, recs = f"{bench['title']}, {', '.join(dtypes)}", bench["results"]
    return [_table(title, lead + _LATENT_COLUMNS, recs),
            *_glibc_table(title, lead + _LATENT_COLUMNS[:2] + _LATENT_GLIBC_COLUMNS, recs)]


_STEP_COLUMNS: List[Column] = [
    ("model", lambda r: r["model"]), ("loss", lambda r: r.get("recon", "bce_logits")),
    ("batch", lambda r: str(r["batch"])),
    _ms_col("reference ms", "ref_eager"), _ms_col("fused ms", "fused_eager"), _x_col("vs reference", "eager"),
    _ms_col("compiled ref ms", "ref_compile"), _ms_col("compiled fused ms", "fused_compile"),
    _x_col("vs compiled ref", "compile"), _x_col("fused vs compiled ref", "fused_eager_vs_ref_compile"),
    ("peak MiB fwd+bwd: ref / fused / c. ref / c. fused",
     lambda r: _mem_cols(r, ("ref_eager", "fused_eager", "ref_compile", "fused_compile"))),
    ("fused mem <= ref (eager / compiled)", _mem_ok),
]


def _step_model(r: dict) -> str:
    cfg = r.get("model_config") or {}
    return f"{r['model']} {cfg['width']}x{cfg['layers']}" if r["model"] == "hvae" else r["model"]


def _shares(r: dict) -> str:
    share = r.get("objective_share") or {}
    return " / ".join(fmt_pct(None if share.get(i) is None else 100 * share[i])
                      for i in ("ref_eager", "fused_eager", "ref_compile", "fused_compile"))


_STEP_GLIBC_COLUMNS = _glibc_columns(
    (("reference", "ref_eager"), ("fused", "fused_eager"), ("compiled ref", "ref_compile"),
     ("compiled fused", "fused_compile")),
    (("vs reference", "eager"), ("vs compiled ref", "compile")))


def step_table(bench: dict) -> List[Table]:
    dtypes = {r.get("dtype") for r in bench["results"]}
    adam = bench.get("adam", "default")
    adam = "Adam" if adam == "default" else f"Adam({adam}=True)"
    title = f"{bench['title']}, {', '.join(sorted(d for d in dtypes if d))}, {adam}"
    columns = _STEP_COLUMNS
    if any("objective_share" in r for r in bench["results"]):  # the hierarchical VAE (width x layers)
        columns = [("model", _step_model), *columns[1:],
                   ("objectives % of step: ref / fused / c. ref / c. fused", _shares)]
    recs = bench["results"]
    return [_table(title, columns, recs), *_glibc_table(title, columns[:3] + _STEP_GLIBC_COLUMNS, recs)]


def dmol_table(bench: dict) -> List[Table]:
    return _op_table(bench, [("x shape, M", lambda r: f"{'x'.join(map(str, r['shape']))}, {r['M']}"),
                             ("bits", lambda r: str(r["num_bits"])),
                             ("params", lambda r: fmt_count(r["elements"]))])


TABLES = {"loss": loss_table, "objectives": objectives_table, "reparam": reparam_table, "dmol": dmol_table,
          "latent": latent_table,
          "step": step_table}


def tables(results: dict) -> List[Table]:
    out = []
    for name, bench in results.get("benchmarks", {}).items():
        if bench.get("results") and name in TABLES:
            t = TABLES[name](bench)
            out += t if isinstance(t, list) else [t]
    return out


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


def _fresh_process_text(results: dict) -> str:
    """Which benchmarks' cases were measured again in fresh processes (older runs did some only)."""
    names = [name for name, bench in (results.get("benchmarks") or {}).items()
             if any("glibc_process" in r for r in bench.get("results") or [])]
    if not names:
        return ""
    which = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return (f"; each {which} case also in a fresh process under glibc's malloc defaults "
            "(benchmarks/glibc_process.py)")


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
            + ("; --cuda-graph: the op benchmarks timed as CUDA-graph replays of one call (device time, "
               "no host overhead)" if st.get("cuda_graph") else "")
            + _allocator_text(results)
            + _fresh_process_text(results)
            + ("; environment: " + ", ".join(f"{k}={v}" for k, v in env.items()) if env else "") + ".")


def _tables_and_notes(results: dict, markdown: bool) -> List[str]:
    out = []
    for t in [*tables(results), targets_table(results)]:
        out += ["", render(t, markdown)]
    notes = results.get("notes") or []
    if notes:
        out += ["", *((f"Note: {n}." if markdown else f"note: {n}") for n in notes)]
    return out


def render_console(results: dict) -> str:
    """What a run prints at the end."""
    parts = [f"Machine: {machine_line(results)}", f"vae_ext build: {results.get('build_info')}",
             f"Settings: {settings_line(results)}"]
    bw = _bandwidth_line(results)
    if bw:
        parts.append(bw)
    return "\n".join(parts + _tables_and_notes(results, markdown=False))


_FAULTS_TEXT = (
    "*faults/call*: minor page faults (`resource.getrusage` ru_minflt) over an implementation's timed calls, "
    "divided by their number: each is a page the kernel hands the process afresh, zeroed. The second table "
    "of an op times each case again in a fresh process (`benchmarks/glibc_process.py`) under glibc's malloc "
    "defaults, as a user's script runs: inputs built, fused, eager and compiled warmed up and timed "
    "interleaved in that one process, in fewer rounds. The others' blocks in that process shape glibc's "
    "thresholds, so a script that calls one implementation alone can fault more (the latent layer: 600 "
    "faults per call steady, fused, where this table showed 0, until its gradients became one block): "
    "`benchmarks/page_faults.py` runs each implementation in processes of its own "
    "(`benchmarks/results/cpu-page-faults.txt`).")


def _counted_faults(results: dict) -> bool:
    return any("minflt_per_call" in t or "glibc_process" in r
               for b in results.get("benchmarks", {}).values() for r in b.get("results", [])
               for t in (r.get("times") or {}).values() if isinstance(t, dict))


def markdown_section(results: dict) -> str:
    """The benchmark tables of docs/benchmarks.md, one machine's section (without the markers)."""
    date = str(results.get("date", ""))[:10]
    bi = results.get("build_info") or {}
    cmd = results.get("command", "python benchmarks/run.py")
    lines = [
        f"Measured on **{machine_line(results)}**, {date}; vae_ext {results.get('vae_ext_version', '?')} "
        f"(CPU kernels: {bi.get('cpu_capability', '?')}, CUDA kernels: {'yes' if bi.get('cuda_kernels') else 'no'}).",
        "",
        f"Command: `{cmd}`",
        "",
        "Medians of forward + backward (`torch.utils.benchmark`, interleaved rounds after warm-up). "
        "*vs eager* / *vs compile*: time of the eager `vae_ext.reference` op / of `torch.compile` of it, "
        "divided by the fused time (> 1: fused is faster). *floor*: a `copy_` of as many bytes as any forward + "
        "backward must read and write (loss: recon, x and the gradient, 3 x N x D; gaussian_kl with a prior: mu, "
        "logvar, the prior and their 4 gradients, 8 x numel(mu); a per-pixel recon_logvar adds 2 x N x D; "
        "reparameterize: 6 x N x L; dmol: params, x and the gradient of params, 2 x numel(params) + numel(x)); "
        "*% of floor*: floor time / fused time. Peak memory: "
        f"{results.get('memory_method', '-')}.",
        *(["", _FAULTS_TEXT] if _counted_faults(results) else []),
        "",
        f"Settings: {settings_line(results)}",
    ]
    bw = _bandwidth_line(results)
    if bw:
        lines += ["", bw]
    return "\n".join(lines + _tables_and_notes(results, markdown=True))
