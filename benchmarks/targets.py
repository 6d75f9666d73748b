"""The project's speed targets, checked against a results dict (pure Python, like the renderer).

Each target is held against the worst float32 case it covers, recomputed from the records by the
current rules whenever results are rendered (so an old JSON is judged by today's targets).
"""
from __future__ import annotations

from typing import List

from table import Table, fmt_pct, fmt_x

# (device, description, benchmark, which records, metric, minimum). metric: a baseline name (speedup of
# the fused path over it), "floor" (percent of the copy floor the fused path reaches) or "mem_" and a
# baseline name (the baseline's peak memory over the fused path's). The CPU targets are the issues'
# figures for the 2-core CPU, the CUDA ones those for an H100.
_BIG = 16 * 2**20
_OBJ_BIG = 4 * 2**20
_DMOL_BIG = 500_000  # params elements: the sizes (the smallest, 64x1x28x28 with M = 5, has 752,640)


def _dmol(r) -> bool:
    return r["elements"] >= _DMOL_BIG
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
    *(("cpu", f"{what}: fused >= {x:g}x {name} at >= 64K elements", "objectives",
       (lambda r, op=op: r["op"] == op and r["elements"] >= 65536), base, x)
      for op, what in (("gaussian_kl", "gaussian_kl with a prior"), ("elbo_loss", "elbo_loss l1 / gaussian"))
      for base, name, x in (("eager", "eager reference", 3.0), ("compile", "torch.compile(reference)", 1.3))),
    *(("cpu", f"gaussian_latent: fused >= {x:g}x {name} at (64, 16, 16, 16)", "latent",
       lambda r: r["shape"] == [64, 16, 16, 16], base, x)
      for base, name, x in (("two_call", "reparameterize + gaussian_kl", 1.3), ("eager", "eager reference", 3.0))),
    ("cpu", "objectives: fused >= 80% of the copy floor at >= 4M elements", "objectives",
     lambda r: r["elements"] >= _OBJ_BIG, "floor", 80.0),
    *(("cpu", f"MLP train step, {recon}: fused >= {x}x eager reference at batch {b}", "step",
       (lambda r, b=b, recon=recon: r["model"] == "mlp" and r["batch"] == b
        and r.get("recon", "bce_logits") == recon), "eager", x)
      for recon in ("bce", "bce_logits") for b, x in ((128, 1.3), (1024, 1.2))),
    *(("cpu", f"dmol: fused >= {x:g}x {name} at >= 500K params", "dmol", _dmol, base, x)
      for base, name, x in (("eager", "eager reference", 10.0), ("compile", "torch.compile(reference)", 3.0))),
    ("cpu", "dmol: fused peak memory <= 1/4 of eager's at >= 500K params", "dmol", _dmol, "mem_eager", 4.0),
    ("cpu", "dmol: fused peak memory <= torch.compile's at >= 500K params", "dmol", _dmol, "mem_compile", 1.0),
    ("cuda", "loss bce: fused >= 85% of the copy floor at >= 16M elements", "loss",
     lambda r: r["recon"] == "bce" and r["elements"] >= _BIG, "floor", 85.0),
    ("cuda", "loss bce: fused >= 1.5x torch.compile(reference) at >= 16M elements", "loss",
     lambda r: r["recon"] == "bce" and r["elements"] >= _BIG, "compile", 1.5),
    ("cuda", "reparameterize: fused >= 85% of the copy floor at >= 16M elements", "reparam",
     lambda r: r["elements"] >= _BIG, "floor", 85.0),
]


# Benchmarks whose speedup targets are held under glibc's defaults in a fresh process too (the
# records' "glibc_process", where the run measured it): a user's script gets those.
GLIBC_BENCHMARKS = ("loss", "objectives", "reparam")
GLIBC_SUFFIX = " (glibc defaults, fresh process)"


def _rules(results: dict):
    """TARGETS, then each speedup target of GLIBC_BENCHMARKS again on the records' glibc_process
    figures where any record has them: (device, description, benchmark, keep, metric, minimum, glibc)."""
    benches = results.get("benchmarks", {})
    for rule in TARGETS:
        yield (*rule, False)
    for dev, desc, bench, keep, metric, minimum in TARGETS:
        measured = any("glibc_process" in r for r in benches.get(bench, {}).get("results", []))
        if bench in GLIBC_BENCHMARKS and metric != "floor" and not metric.startswith("mem_") and measured:
            yield dev, desc + GLIBC_SUFFIX, bench, keep, metric, minimum, True


def check_targets(results: dict) -> List[dict]:
    """The targets of the run's device type, each with the worst float32 case among those it covers."""
    device = (results.get("machine") or {}).get("device", "cpu")
    out = []
    for dev, desc, bench, keep, metric, minimum, glibc in _rules(results):
        if dev != device:
            continue
        recs = [r for r in results.get("benchmarks", {}).get(bench, {}).get("results", [])
                if r.get("dtype", "float32") == "float32" and keep(r)]
        if glibc:
            vals = [((r.get("glibc_process") or {}).get("speedup") or {}).get(metric) for r in recs]
        elif metric == "floor":
            vals = [r.get("pct_floor", {}).get("fused") for r in recs]
        elif metric.startswith("mem_"):
            peaks = [r.get("peak_mem_bytes") or {} for r in recs]
            vals = [p[metric[4:]] / p["fused"] if p.get("fused") and metric[4:] in p else None for p in peaks]
        else:
            vals = [r["speedup"].get(metric) for r in recs]
        vals = [v for v in vals if v is not None]
        worst = min(vals) if vals else None
        out.append({
            "target": desc,
            "metric": "percent_of_floor" if metric == "floor" else (
                f"memory_ratio_vs_{metric[4:]}" if metric.startswith("mem_") else f"speedup_vs_{metric}"),
            "minimum": minimum,
            "measured_worst": worst,
            "cases": len(vals),
            "met": None if worst is None else worst >= minimum,
            "benchmark": bench,
            "glibc_process": glibc,
        })
    return out + _step_targets(results, device)


# Issue 27's hvae step targets, on each hvae record: the objectives' share of the fused (eager) step
# is a maximum (percent); the memory ratio is the whole step's peak, reference over fused.
STEP_TARGETS = [
    ("cpu", "hvae train step: latent layers + likelihood <= 10% of the fused step", "share", 10.0),
    ("cpu", "hvae train step: fused peak memory <= the reference's", "mem", 1.0),
]


def _step_targets(results: dict, device: str) -> List[dict]:
    recs = [r for r in results.get("benchmarks", {}).get("step", {}).get("results", [])
            if r.get("dtype", "float32") == "float32" and r.get("model") == "hvae"]
    out = []
    for dev, desc, kind, bound in STEP_TARGETS:
        if dev != device:
            continue
        if kind == "share":
            vals = [(r.get("objective_share") or {}).get("fused_eager") for r in recs]
            vals = [100.0 * v for v in vals if v is not None]
        else:
            peaks = [r.get("peak_mem_step_bytes") or {} for r in recs]
            vals = [p["ref_eager"] / p["fused_eager"] for p in peaks if p.get("fused_eager") and "ref_eager" in p]
        worst = (max(vals) if kind == "share" else min(vals)) if vals else None
        met = None if worst is None else (worst <= bound if kind == "share" else worst >= bound)
        out.append({"target": desc,
                    "metric": "percent_of_fused_eager_step" if kind == "share" else "memory_ratio_vs_ref_eager",
                    "maximum" if kind == "share" else "minimum": bound, "measured_worst": worst,
                    "cases": len(vals), "met": met, "benchmark": "step", "glibc_process": False})
    return out


def targets_table(results: dict) -> Table:
    rows = []
    ran = set(results.get("benchmarks", {}))
    # a run of some benchmarks (--only) is not listed against the others' targets
    for t in (t for t in check_targets(results) if t["benchmark"] in ran):
        met = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        fmt = fmt_pct if t["metric"].startswith("percent_of") else fmt_x
        rows.append([t["target"], fmt(t["measured_worst"]), str(t["cases"]), met])
    return ("Targets (worst case among the matching sizes)", ["target", "measured", "cases", "status"], rows)
