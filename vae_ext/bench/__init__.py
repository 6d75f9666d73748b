"""``vae-ext bench``: benchmarks of the fused ops against eager PyTorch, torch.compile and the copy floor.

    vae-ext bench                      # every benchmark, full sizes, on CUDA if there is one
    vae-ext bench --quick              # smoke run (small sizes, short timings)
    vae-ext bench --only loss --device cpu --out results.json
    python benchmarks/run.py --only reparam --sizes reparam=4096x256,16384x1024

Prints one table per benchmark, writes every figure and the machine to a JSON file and a PNG chart
of speedup against size. ``benchmarks/make_readme_table.py`` renders the JSON for the README.
See docs/benchmarks.md for what is measured and how.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

BENCHMARKS = ("loss", "reparam", "step")

__all__ = ["main", "run", "BENCHMARKS"]


def _csv(text: str) -> List[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def build_parser(prog: str = "vae-ext bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the fused vae_ext ops (forward + backward) against the eager reference, "
        "torch.compile of the reference and a copy of the bytes they must move.",
    )
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help=f"benchmark(s) to run: {', '.join(BENCHMARKS)} (repeat or comma-separate; default: all)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", action="append", default=None, metavar="DTYPE",
                   help="float32 (default), bfloat16, float16, float64; repeatable. On CUDA the loss "
                   "benchmark adds bfloat16 to a full run")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, short timings")
    p.add_argument("--sizes", action="append", default=[], metavar="BENCH=LIST",
                   help="override sizes: loss=NxD:L,...  reparam=NxL,...  step=BATCH,... (repeatable)")
    p.add_argument("--recon", default="bce,bce_logits", help="loss modes (comma list; default: bce,bce_logits)")
    p.add_argument("--models", default=None,
                   help="step benchmark models, comma list (default: mlp,conv; mlp with --quick)")
    p.add_argument("--adam", default="default", choices=("default", "foreach", "fused"),
                   help="step benchmark: Adam implementation (default: PyTorch's default for the device)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; 2 with --quick)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per implementation per round (default 0.2; 0.03 with --quick)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up calls (default 0.3; 0.05 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the compiled baselines (default: default)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for the compiled baselines (default: inductor; "
                   "aot_eager compiles fast but is no baseline, for smoke tests)")
    p.add_argument("--cpu-allocator", default="retain", choices=("retain", "fresh", "glibc"),
                   help="CPU: how freed memory is reused (glibc mallopt), the same for every implementation: "
                   "retain (default; no page faults after warm-up), fresh (large blocks are new pages "
                   "every time), glibc (untouched defaults; large-size timings then depend on heap history)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA, loss and reparam benchmarks: capture one call of each implementation (and the "
                        "floor's copy) in a CUDA graph and time its replays: device time, without the host's "
                        "per-call Python, dispatch and launch cost (the step benchmark is timed as usual)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results path (default: runs/bench/<device>-<time>.json)")
    p.add_argument("--chart", default=None, help="PNG chart path (default: the JSON path with .png)")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _parse_sizes(specs: List[str]) -> dict:
    from . import loss, reparam, step

    parsers = {"loss": loss.parse_size, "reparam": reparam.parse_size, "step": step.parse_size}
    out = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        name = name.strip()
        if not sep or name not in parsers:
            raise SystemExit(f"--sizes: expected BENCH=LIST with BENCH one of {', '.join(parsers)}, got {spec!r}")
        try:
            out.setdefault(name, []).extend(parsers[name](s) for s in _csv(rest))
        except ValueError as e:
            raise SystemExit(f"--sizes: {e}") from None
    return out


def _command(prog: str, argv: List[str]) -> str:
    import shlex

    return " ".join([prog, *(shlex.quote(a) for a in argv)])


def run(args: argparse.Namespace, prog: str = "vae-ext bench", argv: Optional[List[str]] = None) -> dict:
    """Run the selected benchmarks; return the results dict (also written to ``args.out``)."""
    import torch
    from tqdm.auto import tqdm

    import vae_ext

    from . import common, report

    only = []
    for item in args.only or list(BENCHMARKS):
        for name in _csv(item):
            if name not in BENCHMARKS:
                raise SystemExit(f"--only: expected one of {', '.join(BENCHMARKS)}, got {name!r}")
            if name not in only:
                only.append(name)

    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: this torch has no CUDA device")
        if not vae_ext.build_info().get("cuda_kernels"):
            raise SystemExit("--device cuda: this vae_ext was built without CUDA kernels "
                             "(build it where torch.version.cuda and CUDA_HOME are set)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("--cuda-graph: needs --device cuda")

    dtypes = []
    for d in args.dtype or ["float32"]:
        for name in _csv(d):
            if name not in common.DTYPES:
                raise SystemExit(f"--dtype: expected one of {', '.join(common.DTYPES)}, got {name!r}")
            dtypes.append(common.DTYPES[name])

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    quick = args.quick
    ctx = common.Context(
        device=device,
        dtypes=dtypes,
        quick=quick,
        rounds=args.rounds or (2 if quick else 5),
        min_run_time=args.min_run_time if args.min_run_time is not None else (0.03 if quick else 0.2),
        warmup_time=args.warmup if args.warmup is not None else (0.05 if quick else 0.3),
        threads=threads,
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        measure_memory=not args.no_memory,
        sizes=_parse_sizes(args.sizes),
        recon_modes=_csv(args.recon),
        models=_csv(args.models) if args.models else (["mlp"] if quick else ["mlp", "conv"]),
        adam=args.adam,
        cuda_graph=args.cuda_graph,
        seed=args.seed,
    )
    common.configure_dynamo()
    allocator = common.configure_cpu_allocator(args.cpu_allocator)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / "bench" / f"{device.type}-{stamp}.json"
    chart = None if args.no_chart else Path(args.chart) if args.chart else out.with_suffix(".png")

    machine = common.machine_info(device, threads)
    notes = []
    if args.cpu_allocator != "glibc" and not allocator["applied"]:
        notes.append(f"--cpu-allocator {args.cpu_allocator} could not be applied ({allocator.get('why_not', '?')}): "
                     "large CPU tensors may page-fault on every allocation")
    if args.compile_backend != "inductor":
        notes.append(f"compiled baselines use torch.compile(backend={args.compile_backend!r}), not inductor: "
                     "their times are not the torch.compile baseline")
    # Other processes' CPU use over half a second (the load average would still count our own last run).
    snap = common._cpu_snapshot()
    time.sleep(0.5)
    others = common.other_load(snap, common._cpu_snapshot())
    machine["other_cpu_load_start"] = others
    if device.type == "cpu" and others is not None and others > 0.25:
        notes.append(f"other processes kept {others:.1f} of {os.cpu_count()} CPUs busy at the start: "
                     "timings may be noisy")
    results = {
        "schema": common.SCHEMA,
        "command": _command(prog, list(argv if argv is not None else sys.argv[1:])),
        "date": common.now_iso(),
        "machine": machine,
        "build_info": vae_ext.build_info(),
        "vae_ext_version": getattr(vae_ext, "__version__", None),
        "git": common._git_commit(),
        "settings": {
            "quick": quick,
            "device": str(device),
            "dtypes": [common.dtype_name(d) for d in dtypes],
            "threads": threads,
            "rounds": ctx.rounds,
            "min_run_time_s": ctx.min_run_time,
            "warmup_s": ctx.warmup_time,
            "compile_mode": ctx.compile_mode or "default",
            "compile_backend": ctx.compile_backend,
            "compile_dynamic": False,
            "seed": ctx.seed,
            "recon_modes": ctx.recon_modes,
            "models": ctx.models,
            "adam": ctx.adam,
            "cuda_graph": ctx.cuda_graph,
            "timer": "torch.utils.benchmark.Timer.blocked_autorange, interleaved rounds; median over all blocks",
            "cpu_allocator": allocator,
        },
        "memory_method": common.MEMORY_METHOD[device.type] if ctx.measure_memory else None,
        "copy_bandwidth": None,
        "benchmarks": {},
        "errors": {},
        "notes": notes,
    }

    show = not args.no_progress

    def progress(cases, name, label):
        bar = tqdm(cases, desc=name, unit="case", disable=not show, dynamic_ncols=True, leave=True)
        ctx.status = lambda s: bar.set_postfix_str(s, refresh=False)
        try:
            for c in bar:
                bar.set_description(f"{name} {label(c)}")
                yield c
        finally:
            ctx.status = lambda s: None
            bar.close()

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(out)

    results["copy_bandwidth"] = common.measure_copy_bandwidth(device, ctx)
    t_start = time.perf_counter()
    for name in only:
        try:
            mod = importlib.import_module(f".{name}", __name__)
            results["benchmarks"][name] = mod.run(ctx, progress)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # keep the other benchmarks' figures; report the failure
            results["errors"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()
            print(f"\n{name} benchmark failed:\n{traceback.format_exc()}", file=sys.stderr)
        save()
    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    busy = [(name, r) for name, b in results["benchmarks"].items() for r in b.get("results", [])
            if (r.get("other_cpu_load") or 0) > 0.25]
    if busy:
        worst = max(r["other_cpu_load"] for _, r in busy)
        notes.append(f"other processes kept up to {worst:.1f} of {os.cpu_count()} CPUs busy while {len(busy)} "
                     "case(s) were timed (other_cpu_load in the JSON): those timings are noisy")
    if hasattr(os, "getloadavg"):
        results["machine"]["load_avg_end"] = list(os.getloadavg())
    results["targets"] = report.check_targets(results)
    save()
    if chart is not None:
        try:
            results["chart"] = report.write_chart(results, chart)
        except Exception as e:  # a chart is not worth losing the results over
            notes.append(f"chart not written: {e}")
        save()
    print()
    print(report.render_console(results))
    print(f"\nresults: {out}" + (f"\nchart:   {results.get('chart')}" if results.get("chart") else ""))
    return results


def main(argv: Optional[List[str]] = None, prog: str = "vae-ext bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    results = run(args, prog=prog, argv=argv)
    return 1 if results["errors"] else 0
