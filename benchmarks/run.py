#!/usr/bin/env python
"""Benchmarks of the fused vae_ext ops against eager PyTorch, torch.compile and the copy floor.

    python benchmarks/run.py                    # every benchmark, full sizes, on CUDA if there is one
    python benchmarks/run.py --quick            # smoke run (small sizes, short timings)
    python benchmarks/run.py --only loss --device cpu --out results.json
    python benchmarks/run.py --only reparam --sizes reparam=4096x256,16384x1024
    python benchmarks/run.py --only latent --sizes latent=64x16x16x16
    python benchmarks/run.py --only objectives --sizes objectives=64x16x64x64,256x12288:128
    python benchmarks/run.py --only dmol --sizes dmol=16x3x32x32:10,8x1x16000:10

Prints one table per benchmark, writes every figure and the machine to a JSON file and a PNG chart
of speedup against size (with matplotlib). make_tables.py renders the JSON into docs/benchmarks.md.
See docs/benchmarks.md for what is measured and how.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from checkout import prefer_built_checkout

prefer_built_checkout()

import torch  # noqa: E402

try:
    import vae_ext  # noqa: E402
except ImportError as e:
    sys.exit(f"benchmarks: cannot import vae_ext ({e}); build it in place (python setup.py build_ext "
             "--inplace) or install it (pip install .)")

import cpu_allocator  # noqa: E402
import dmol  # noqa: E402
import latent  # noqa: E402
import loss  # noqa: E402
import machine  # noqa: E402
import objectives  # noqa: E402
import reparameterize  # noqa: E402
import report  # noqa: E402
import step  # noqa: E402
from floor import measure_copy_bandwidth  # noqa: E402
from measure import configure_dynamo  # noqa: E402
from memory import MEMORY_METHOD  # noqa: E402
from settings import Settings, csv  # noqa: E402
from targets import check_targets  # noqa: E402

PROG = "python benchmarks/run.py"
BENCHMARKS = {"loss": loss, "objectives": objectives, "reparam": reparameterize, "dmol": dmol,  # --only name: module
              "latent": latent, "step": step}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
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
                   help="override sizes: loss=NxD:L,...  objectives=NxD:L,NxCxHxW,... (ELBO sizes, KL latent "
                   "shapes)  reparam=NxL,...  dmol=NxCx...:M,... (x's shape, M components)  latent=NxCxHxW,...  "
                   "step=BATCH,... or MODEL:BATCH, hvae:BATCH[:WIDTHxLAYERS][:eager] (repeatable)")
    p.add_argument("--recon", default="bce,bce_logits", help="loss modes (comma list; default: bce,bce_logits)")
    p.add_argument("--models", default=None,
                   help="step benchmark models, comma list: mlp, conv, hvae (default: mlp,conv; mlp with --quick)")
    p.add_argument("--adam", default="default", choices=("default", "foreach", "fused"),
                   help="step benchmark: Adam implementation (default: PyTorch's default for the device)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; 2 with --quick)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per implementation per round (default 0.2; 0.03 with --quick)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of warm-up calls (default 0.3; 0.05 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compiled baselines (default: default)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for the compiled baselines (default: inductor; "
                   "aot_eager compiles fast but is no baseline, for smoke tests)")
    p.add_argument("--cpu-allocator", default="retain", choices=("retain", "fresh", "glibc"),
                   help="CPU: how freed memory is reused (glibc mallopt), the same for every implementation: "
                   "retain (default; no page faults after warm-up), fresh (large blocks are new pages "
                   "every time), glibc (untouched defaults; large-size timings then depend on heap history)")
    p.add_argument("--no-glibc-process", dest="glibc_process", action="store_false",
                   help="CPU: skip the second measurement of each case in a "
                   "fresh process under glibc's malloc defaults (done unless --cpu-allocator glibc)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA, loss and reparam benchmarks: capture one call of each implementation (and the "
                        "floor's copy) in a CUDA graph and time its replays: device time, without the host's "
                        "per-call Python, dispatch and launch cost (the step benchmark is timed as usual)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results path (default: runs/bench/<device>-<time>.json)")
    p.add_argument("--chart", default=None, help="PNG chart path (default: the JSON path with .png)")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="do not name each case on stderr as it starts")
    return p


def _only(args: argparse.Namespace) -> List[str]:
    only = []
    for item in args.only or list(BENCHMARKS):
        for name in csv(item):
            if name not in BENCHMARKS:
                raise SystemExit(f"--only: expected one of {', '.join(BENCHMARKS)}, got {name!r}")
            if name not in only:
                only.append(name)
    return only


def _sizes(specs: List[str]) -> dict:
    out = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        name = name.strip()
        if not sep or name not in BENCHMARKS:
            raise SystemExit(f"--sizes: expected BENCH=LIST with BENCH one of {', '.join(BENCHMARKS)}, got {spec!r}")
        try:
            out.setdefault(name, []).extend(BENCHMARKS[name].parse_size(s) for s in csv(rest))
        except ValueError as e:
            raise SystemExit(f"--sizes: {e}") from None
    return out


def _device(args: argparse.Namespace) -> torch.device:
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(dev)
    except RuntimeError:
        raise SystemExit(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}") from None
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
    return device


def _progress(cases, name, label):
    """Names each case of a benchmark on stderr as it starts (the run's only progress report)."""
    for i, c in enumerate(cases):
        print(f"{name} {i + 1}/{len(cases)}: {label(c)}", file=sys.stderr, flush=True)
        yield c


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> dict:
    """Run the selected benchmarks; return the results dict (also written to ``args.out``)."""
    only = _only(args)
    device = _device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.from_args(args, device, _sizes(args.sizes))
    configure_dynamo()
    allocator = cpu_allocator.configure(args.cpu_allocator)
    if not allocator["applied"]:
        settings.cpu_allocator = "glibc"

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / "bench" / f"{device.type}-{stamp}.json"
    chart = None if args.no_chart else Path(args.chart) if args.chart else out.with_suffix(".png")

    info = machine.machine_info(device, settings.threads)
    notes = []
    if args.cpu_allocator != "glibc" and not allocator["applied"]:
        notes.append(f"--cpu-allocator {args.cpu_allocator} could not be applied ({allocator.get('why_not', '?')}): "
                     "large CPU tensors may page-fault on every allocation")
    if args.compile_backend != "inductor":
        notes.append(f"compiled baselines use torch.compile(backend={args.compile_backend!r}), not inductor: "
                     "their times are not the torch.compile baseline")
    others = info["other_cpu_load_start"] = machine.other_load_now()
    if device.type == "cpu" and others is not None and others > 0.25:
        notes.append(f"other processes kept {others:.1f} of {os.cpu_count()} CPUs busy at the start: "
                     "timings may be noisy")
    results = {
        "schema": "vae_ext.bench/1",
        "command": " ".join([PROG, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))]),
        "date": machine.now_iso(),
        "machine": info,
        "build_info": vae_ext.build_info(),
        "vae_ext_version": getattr(vae_ext, "__version__", None),
        "git": machine.git_commit(),
        "settings": {**settings.as_json(), "cpu_allocator": allocator},
        "memory_method": MEMORY_METHOD[device.type] if settings.measure_memory else None,
        "copy_bandwidth": None,
        "benchmarks": {},
        "errors": {},
        "notes": notes,
    }

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(out)

    progress = None if args.no_progress else _progress
    results["copy_bandwidth"] = measure_copy_bandwidth(settings)
    t_start = time.perf_counter()
    for name in only:
        try:
            results["benchmarks"][name] = BENCHMARKS[name].run(settings, progress)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # keep the other benchmarks' figures; report the failure
            results["errors"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()
            print(f"\n{name} benchmark failed:\n{traceback.format_exc()}", file=sys.stderr)
        save()
    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    busy = [r for b in results["benchmarks"].values() for r in b.get("results", [])
            if (r.get("other_cpu_load") or 0) > 0.25]
    if busy:
        worst = max(r["other_cpu_load"] for r in busy)
        notes.append(f"other processes kept up to {worst:.1f} of {os.cpu_count()} CPUs busy while {len(busy)} "
                     "case(s) were timed (other_cpu_load in the JSON): those timings are noisy")
    results["targets"] = check_targets(results)
    save()
    skipped = None
    if chart is not None:
        try:
            from chart import write_chart

            results["chart"] = write_chart(results, chart)
            save()
        except ImportError as e:  # matplotlib is for the chart alone
            skipped = f"chart skipped: {e.name or 'matplotlib'} is not installed"
        except Exception as e:  # a chart is not worth losing the results over
            skipped = f"chart skipped: {type(e).__name__}: {e}"
    print()
    print(report.render_console(results))
    print(f"\nresults: {out}" + (f"\nchart:   {results['chart']}" if results.get("chart") else ""))
    if skipped:
        print(skipped)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    results = run(build_parser().parse_args(argv), argv)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
