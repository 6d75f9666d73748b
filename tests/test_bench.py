"""The benchmark harness in benchmarks/ (not part of the package): the --quick path of every
benchmark at tiny sizes, the JSON it writes, the chart, and the table script of docs/benchmarks.md. No timing
thresholds: speed is the benchmarks' business."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
TABLE_SCRIPT = BENCH_DIR / "make_tables.py"

# Tiny sizes, one timing round of a few milliseconds: this checks the plumbing, not the speed.
# The compiled baselines use the aot_eager backend here (no C++ code generation: seconds saved per
# graph); test_inductor_baseline runs the real torch.compile baseline once.
# In-process runs leave glibc's malloc settings alone (--cpu-allocator glibc: mallopt is process-wide);
# test_cpu_allocator_modes checks the other modes in subprocesses.
FAST = ["--quick", "--device", "cpu", "--rounds", "1", "--min-run-time", "0.002", "--warmup", "0",
        "--no-progress", "--cpu-allocator", "glibc"]
AOT_EAGER = ["--compile-backend", "aot_eager"]
SIZES = {
    "loss": ["--sizes", "loss=8x64:4,4x33:3"],
    "objectives": ["--sizes", "objectives=2x3x4x5,4x33:3"],
    "reparam": ["--sizes", "reparam=16x8,3x5"],
    "dmol": ["--sizes", "dmol=2x3x4x5:2,3x1x7:3"],
    "latent": ["--sizes", "latent=2x3x4x5"],
    "step": ["--sizes", "step=mlp:4"],
}


def _load_table_script():
    spec = importlib.util.spec_from_file_location("_make_tables", TABLE_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _harness(name: str = "run"):
    """A module of benchmarks/ (run.py by default), imported as run.py imports its neighbours."""
    try:
        import vae_ext  # noqa: F401
    except ImportError as e:  # the extension is not built (python setup.py build_ext --inplace)
        pytest.skip(f"vae_ext is not importable: {e}")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One in-process run of every benchmark at tiny sizes (the --quick path with --sizes)."""
    main = _harness().main
    out = tmp_path_factory.mktemp("bench") / "results.json"
    argv = [*FAST, *AOT_EAGER, *(a for sizes in SIZES.values() for a in sizes), "--out", str(out)]
    rc = main(argv)
    data = json.loads(out.read_text())
    assert rc == 0, data.get("errors")
    return out, data


def _is_time(t) -> bool:
    return isinstance(t, dict) and t["median_ms"] > 0 and math.isfinite(t["median_ms"]) and t["blocks"] >= 1


def test_machine_and_settings(results):
    _, r = results
    assert r["schema"] == "vae_ext.bench/1"
    assert r["command"].startswith("python benchmarks/run.py ") and "--quick" in r["command"]
    m = r["machine"]
    for key in ("cpu_model", "cpu_count", "threads", "torch", "device", "python"):
        assert m[key], key
    assert m["device"] == "cpu" and m["threads"] >= 1
    assert r["build_info"]["cpu_capability"]
    assert r["date"][:4].isdigit()
    assert r["settings"]["quick"] is True and r["settings"]["dtypes"] == ["float32"]
    assert r["settings"]["compile_backend"] == "aot_eager" and any("aot_eager" in n for n in r["notes"])
    assert r["copy_bandwidth"]["GBps_peak"] > 0
    assert r["memory_method"]
    assert r["errors"] == {}
    assert set(r["benchmarks"]) == {"loss", "objectives", "reparam", "dmol", "latent", "step"}
    assert len(r["targets"]) >= 12 and all("met" in t for t in r["targets"])


def test_loss_records(results):
    _, r = results
    recs = r["benchmarks"]["loss"]["results"]
    # --sizes replaces the default sizes; both default recon modes run
    assert {(x["recon"], x["N"], x["D"], x["L"]) for x in recs} == {
        (m, n, d, lat) for m in ("bce", "bce_logits") for n, d, lat in ((8, 64, 4), (4, 33, 3))
    }
    for x in recs:
        for impl in ("fused", "eager", "compile", "floor", "floor_alloc"):
            assert _is_time(x["times"][impl]), impl
            assert x["times"][impl]["minflt_per_call"] >= 0, impl
        assert "glibc_process" not in x  # the run itself is under glibc's defaults
        assert x["bytes_fused"] == (3 * x["N"] * x["D"] + 4 * x["N"] * x["L"]) * 4
        t = x["times"]
        assert x["speedup"]["eager"] == pytest.approx(t["eager"]["median_ms"] / t["fused"]["median_ms"])
        assert set(x["speedup"]) == {"eager", "compile"}
        assert set(x["pct_floor"]) == {"fused", "eager", "compile"}
        assert all(isinstance(v, int) and v >= 0 for v in x["peak_mem_bytes"].values())
        assert set(x["peak_mem_bytes"]) == {"fused", "eager", "compile"}
        assert set(x["mem_fused_le"]) == {"eager", "compile"}
        assert x["check"]["loss_rel_err"] < 1e-4 and x["check"]["grad_rel_err"] < 1e-3


def test_objectives_records(results):
    _, r = results
    bench = r["benchmarks"]["objectives"]
    recs = bench["results"]
    # the KL latent shape runs the learned-prior KL, the N x D:L size every ELBO case
    assert [(x["case"], x["shape"]) for x in recs] == [
        ("kl_prior", [2, 3, 4, 5]), ("l1", [4, 33, 3]), ("gaussian", [4, 33, 3]), ("gaussian_pixel", [4, 33, 3])]
    assert set(bench["bytes_formula"]) == {x["case"] for x in recs}
    for x in recs:
        for impl in ("fused", "eager", "compile", "floor", "floor_alloc"):
            assert _is_time(x["times"][impl]), impl
        n = x["N"]
        if x["case"] == "kl_prior":
            assert (x["op"], x["recon"], x["L"], x["elements"]) == ("gaussian_kl", None, 60, 120)
            # read mu, logvar, prior_mu, prior_logvar; write their four gradients
            assert x["bytes_fused"] == 8 * 120 * 4
        else:
            d, lat = x["D"], x["L"]
            assert x["op"] == "elbo_loss" and x["elements"] == n * d
            # recon_logvar: read it and write its gradient (one element each when 0-d)
            extra = {"l1": 0, "gaussian": 2, "gaussian_pixel": 2 * n * d}[x["case"]]
            assert x["bytes_fused"] == (3 * n * d + 4 * n * lat + extra) * 4
            assert x["recon"] == ("l1" if x["case"] == "l1" else "gaussian")
            assert x["recon_logvar"] == {"l1": None, "gaussian": "scalar", "gaussian_pixel": "per_pixel"}[x["case"]]
        assert set(x["speedup"]) == {"eager", "compile"} and set(x["pct_floor"]) == {"fused", "eager", "compile"}
        assert set(x["peak_mem_bytes"]) == {"fused", "eager", "compile"}
        # every gradient checked: the prior's and recon_logvar's included
        assert x["check"]["loss_rel_err"] < 1e-4 and x["check"]["grad_rel_err"] < 1e-3
    targets = [t for t in r["targets"] if t["target"].startswith(("gaussian_kl", "elbo_loss", "objectives"))]
    assert len(targets) == 5 and all(t["cases"] == 0 for t in targets)  # every case here is under 64K elements


def test_objectives_sizes():
    objectives = _harness("objectives")
    assert objectives.parse_size("256x4x32x32") == ("kl", (256, 4, 32, 32))
    assert objectives.parse_size(" 64 x 16 ") == ("kl", (64, 16))
    assert objectives.parse_size("1024x784:32") == ("elbo", (1024, 784, 32))
    for bad in ("256", "8x", "8x4:2:1", "8x4x2:1", "ax4"):
        with pytest.raises(ValueError, match="objectives size"):
            objectives.parse_size(bad)
    # the cases by default; --quick one smaller size of each
    import torch

    settings = _harness("settings").Settings(device=torch.device("cpu"), dtypes=[torch.float32])
    full = [(c["case"], c["shape"]) for c in objectives.cases(settings)]
    elbo_sizes = ((1024, 784, 32), (256, 12288, 128))
    assert full == [("kl_prior", (256, 4, 32, 32)), ("kl_prior", (64, 16, 64, 64)),
                    *((k, s) for k in ("l1", "gaussian", "gaussian_pixel") for s in elbo_sizes)]
    settings.quick = True
    assert len(objectives.cases(settings)) == 4


def test_reparam_records(results):
    _, r = results
    recs = r["benchmarks"]["reparam"]["results"]
    assert [(x["N"], x["L"]) for x in recs] == [(16, 8), (3, 5)]
    for x in recs:
        for impl in ("fused", "eager", "compile", "floor"):
            assert _is_time(x["times"][impl]), impl
        assert x["bytes_fused"] == 6 * x["N"] * x["L"] * 4
        assert set(x["speedup"]) == {"eager", "compile"}
        assert set(x["peak_mem_bytes"]) == {"fused", "eager", "compile"}
        assert x["check"]["grad_mu_rel_err"] < 1e-6 and x["check"]["grad_logvar_rel_err"] < 1e-4


def test_dmol_records(results):
    """x (N, C, *S) and M from --sizes; the fused op timed where this build has it, the baselines always."""
    import vae_ext

    _, r = results
    bench = r["benchmarks"]["dmol"]
    recs = bench["results"]
    assert [(x["shape"], x["M"], x["P"], x["num_bits"]) for x in recs] == [([2, 3, 4, 5], 2, 20, 8),
                                                                           ([3, 1, 7], 3, 9, 16)]
    fused = hasattr(vae_ext, "dmol_nll")
    for x in recs:
        assert x["fused_available"] is fused
        impls = ("fused", "eager", "compile") if fused else ("eager", "compile")
        for impl in (*impls, "floor"):
            assert _is_time(x["times"][impl]), impl
        assert ("fused" in x["times"]) is fused
        # read params and x, write the gradient of params
        assert x["elements"] == x["P"] * x["pixels"]
        assert x["bytes_fused"] == (2 * x["elements"] + x["pixels"] * x["C"]) * 4
        assert set(x["peak_mem_bytes"]) == set(impls) and set(x["pct_floor"]) == set(impls)
        assert set(x["speedup"]) == {"eager", "compile"}
        if fused:
            assert x["check"]["loss_rel_err"] < 1e-4 and x["check"]["grad_rel_err"] < 1e-3
        else:
            assert x["speedup"] == {"eager": None, "compile": None} and x["check"] == {}
    targets = [t for t in r["targets"] if t["target"].startswith("dmol")]
    assert len(targets) == 4 and all(t["cases"] == 0 for t in targets)  # every case here is under 500K params


def test_dmol_sizes_and_targets():
    dmol = _harness("dmol")
    assert dmol.parse_size("16x3x32x32:10") == ((16, 3, 32, 32), 10)
    assert dmol.parse_size(" 8 x 1 x 16000 : 10 ") == ((8, 1, 16000), 10)
    assert dmol.parse_size("4x3:2") == ((4, 3), 2)
    for bad in ("16x3x32x32", "16x2x8:3", "16:3", "4x3:0", "ax3:2"):
        with pytest.raises(ValueError, match="dmol size"):
            dmol.parse_size(bad)
    import torch

    settings = _harness("settings").Settings(device=torch.device("cpu"), dtypes=[torch.float32])
    assert [(c["shape"], c["M"]) for c in dmol.cases(settings)] == [
        ((16, 3, 32, 32), 10), ((4, 3, 64, 64), 10), ((64, 1, 28, 28), 5), ((8, 1, 16000), 10)]
    assert [dmol.num_bits(c["shape"]) for c in dmol.cases(settings)] == [8, 8, 8, 16]
    # the memory targets: the baseline's peak over the fused op's, worst case among the sizes
    targets = _harness("targets")
    t = {"median_ms": 1.0, "iqr_ms": 0.1, "min_ms": 0.9, "blocks": 3}
    rec = {"dtype": "float32", "shape": [16, 3, 32, 32], "M": 10, "num_bits": 8, "elements": 1_638_400,
           "times": {"fused": t, "eager": t, "compile": t}, "speedup": {"eager": 12.0, "compile": 2.5},
           "peak_mem_bytes": {"fused": 10, "eager": 50, "compile": 9}}
    small = {**rec, "elements": 1000, "speedup": {"eager": 1.0, "compile": 1.0},
             "peak_mem_bytes": {"fused": 10, "eager": 10, "compile": 1}}
    res = {"machine": {"device": "cpu"}, "benchmarks": {"dmol": {"results": [rec, small]}}}
    got = [x for x in targets.check_targets(res) if x["target"].startswith("dmol")]
    assert [(x["metric"], x["measured_worst"], x["met"], x["cases"]) for x in got] == [
        ("speedup_vs_eager", 12.0, True, 1), ("speedup_vs_compile", 2.5, False, 1),
        ("memory_ratio_vs_eager", 5.0, True, 1), ("memory_ratio_vs_compile", 0.9, False, 1)]


def test_latent_records(results):
    _, r = results
    recs = r["benchmarks"]["latent"]["results"]
    assert [x["shape"] for x in recs] == [[2, 3, 4, 5]]
    for x in recs:
        for impl in ("fused", "two_call", "eager", "compile", "floor"):
            assert _is_time(x["times"][impl]), impl
        assert x["bytes_fused"] == 14 * 120 * 4
        assert set(x["speedup"]) == {"two_call", "eager", "compile"}
        assert set(x["peak_mem_bytes"]) == {"fused", "two_call", "eager", "compile"}
        assert x["check"]["kl_rel_err"] < 1e-5 and x["check"]["z_equal_reparameterize"]
    assert any(t["target"].startswith("gaussian_latent") for t in r["targets"])


def test_step_records(results):
    _, r = results
    recs = r["benchmarks"]["step"]["results"]
    # --quick: the MLP only
    assert [(x["model"], x["recon"], x["batch"]) for x in recs] == [("mlp", "bce", 4), ("mlp", "bce_logits", 4)]
    impls = {"ref_eager", "fused_eager", "ref_compile", "fused_compile"}
    for x in recs:
        assert set(x["times"]) == impls and all(_is_time(t) for t in x["times"].values())
        assert set(x["peak_mem_bytes"]) == impls and set(x["peak_mem_step_bytes"]) == impls
        assert x["speedup"]["eager"] > 0 and x["speedup"]["compile"] > 0
        assert x["parameters"] > 0


@pytest.mark.slow
def test_step_conv(tmp_path, request):
    """The conv VAE (64x64x3) step; slow on a small CPU (Adam over its 8M parameters): runs with -m slow."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow: select with -m slow")
    main = _harness().main
    out = tmp_path / "r.json"
    assert main([*FAST, *AOT_EAGER, "--only", "step", "--models", "conv", "--sizes", "step=2", "--adam", "fused",
                 "--no-chart", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    (rec,) = r["benchmarks"]["step"]["results"]
    assert (rec["model"], rec["batch"]) == ("conv", 2) and rec["model_config"]["input_shape"] == [3, 64, 64]
    assert "fused=True" in r["benchmarks"]["step"]["optimizer"]
    assert all(_is_time(t) for t in rec["times"].values())


def test_step_hvae(tmp_path):
    """The hierarchical VAE's step, eager pair only (the compiled pair: test_step_hvae_compiled): its
    record, the objectives' share by the profiler, and the module names the profiling replaced restored."""
    import vae_ext.models.hvae as hvae_mod
    import vae_ext.models.hvae_blocks as blocks_mod

    names = {(m, n): getattr(m, n) for m, n in ((blocks_mod, "gaussian_latent"), (blocks_mod, "reparameterize"),
                                                (blocks_mod, "reference"), (hvae_mod, "dmol_nll"),
                                                (hvae_mod, "reference"))}
    main = _harness().main
    out = tmp_path / "r.json"
    assert main([*FAST, "--only", "step", "--models", "hvae", "--sizes", "step=hvae:2:4x1:eager", "--no-chart",
                 "--out", str(out)]) == 0
    assert all(getattr(m, n) is v for (m, n), v in names.items())
    r = json.loads(out.read_text())
    bench = r["benchmarks"]["step"]
    (rec,) = bench["results"]
    assert (rec["model"], rec["recon"], rec["batch"]) == ("hvae", "dmol", 2)
    assert rec["model_config"] == {"input_shape": [1, 32, 32], "width": 4, "layers": 1}
    assert set(rec["times"]) == {"ref_eager", "fused_eager"} and all(_is_time(t) for t in rec["times"].values())
    assert rec["speedup"]["eager"] > 0 and rec["speedup"]["compile"] is None
    assert set(rec["mem_fused_le_step"]) == {"eager"}
    shares = rec["objective_share"]
    assert set(shares) == {"ref_eager", "fused_eager"} and all(0 < v < 1 for v in shares.values())
    assert 0 < rec["objective_share_ops"]["fused_eager"] < 1 and "record_function" in bench["objective_method"]
    t = {x["target"]: x for x in r["targets"] if x["target"].startswith("hvae")}
    share = t["hvae train step: latent layers + likelihood <= 10% of the fused step"]
    assert share["cases"] == 1 and share["measured_worst"] == pytest.approx(100 * shares["fused_eager"])
    assert t["hvae train step: fused peak memory <= the reference's"]["cases"] == 1
    md = _harness("report").markdown_section(r)
    assert "| hvae 4x1 | dmol | 2 |" in md and "objectives % of step" in md


@pytest.mark.slow
def test_step_hvae_compiled(tmp_path, request):
    """The hvae step's compiled pair (aot_eager): compiling the model takes minutes: runs with -m slow."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow: select with -m slow")
    main = _harness().main
    out = tmp_path / "r.json"
    assert main([*FAST, *AOT_EAGER, "--only", "step", "--models", "hvae", "--sizes", "step=hvae:2:4x1",
                 "--no-chart", "--out", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["benchmarks"]["step"]["results"]
    assert set(rec["times"]) == {"ref_eager", "fused_eager", "ref_compile", "fused_compile"}
    assert rec["objective_share"]["ref_compile"] is None and 0 < rec["objective_share"]["fused_compile"] < 1


def test_step_sizes_and_hvae_targets():
    step = _harness("step")
    assert step.parse_size("128") == (None, 128, None, True)
    assert step.parse_size("conv:16") == ("conv", 16, None, True)
    assert step.parse_size("hvae:16") == ("hvae", 16, (16, 1), True)
    assert step.parse_size(" hvae : 16 : 64x3 : eager ") == ("hvae", 16, (64, 3), False)
    for bad in ("mlp:16:64x3", "conv:8:eager", "hvae:16:64", "hvae", "x"):
        with pytest.raises(ValueError, match="step size"):
            step.parse_size(bad)
    targets = _harness("targets")
    rec = {"model": "hvae", "dtype": "float32", "objective_share": {"ref_eager": 0.3, "fused_eager": 0.08},
           "peak_mem_step_bytes": {"ref_eager": 30, "fused_eager": 20}, "speedup": {}}
    big = {**rec, "objective_share": {"fused_eager": 0.12}, "peak_mem_step_bytes": {"ref_eager": 30, "fused_eager": 40}}
    got = {x["target"]: x for x in targets.check_targets(
        {"machine": {"device": "cpu"}, "benchmarks": {"step": {"results": [rec, big]}}})}
    share = got["hvae train step: latent layers + likelihood <= 10% of the fused step"]
    mem = got["hvae train step: fused peak memory <= the reference's"]
    assert (share["measured_worst"], share["maximum"], share["met"]) == (pytest.approx(12.0), 10.0, False)
    assert (mem["measured_worst"], mem["met"], mem["cases"]) == (0.75, False, 2)
    got = targets.check_targets({"machine": {"device": "cpu"}, "benchmarks": {"step": {"results": [rec]}}})
    assert all(x["met"] for x in got if x["target"].startswith("hvae"))


def test_inductor_baseline(tmp_path):
    """The default torch.compile (inductor) baseline, one tiny loss case."""
    main = _harness().main
    out = tmp_path / "r.json"
    assert main([*FAST, "--only", "loss", "--recon", "bce", "--sizes", "loss=8x64:4", "--no-chart",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["compile_backend"] == "inductor" and not r["notes"] or "busy" in " ".join(r["notes"])
    (rec,) = r["benchmarks"]["loss"]["results"]
    assert _is_time(rec["times"]["compile"]) and rec["first_call_s"]["compile"] > 0
    assert "chart" not in r and not out.with_suffix(".png").exists()


def test_chart_written(results):
    path, r = results
    chart = Path(r["chart"])
    assert chart == path.with_suffix(".png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_doc_tables(results, tmp_path):
    path, r = results
    script = _load_table_script()
    readme = tmp_path / "benchmarks.md"
    stale = "STALE-TABLE"  # a word no rendered table holds ("old" was inside "thresholds")
    readme.write_text(f"# vae_ext\n\n## Performance\n\n<!-- bench:begin -->\n{stale}\n<!-- bench:end -->\n\n"
                      "## License\n")
    assert script.main(["--json", str(path), "--write", str(readme)]) == 0
    text = readme.read_text()
    section = text.split("<!-- bench:begin -->")[1].split("<!-- bench:end -->")[0]
    assert stale not in section and text.endswith("## License\n")
    assert r["machine"]["cpu_model"] in section and r["command"] in section
    for title in ("ELBO loss", "Learned-prior KL and ELBO objectives", "Reparameterize", "Training step", "Targets"):
        assert title in section
    # two loss rows (--quick sizes) and one MLP step row per recon mode
    assert section.count("| bce |") == 3 and section.count("| bce_logits |") == 3
    # idempotent
    assert script.main(["--json", str(path), "--write", str(readme)]) == 0
    assert readme.read_text() == text


def test_doc_tables_cli_without_markers(results, tmp_path):
    path, _ = results
    readme = tmp_path / "benchmarks.md"
    readme.write_text("# no markers\n")
    p = subprocess.run([sys.executable, str(TABLE_SCRIPT), "--json", str(path), "--write", str(readme)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "markers" in p.stderr
    p = subprocess.run([sys.executable, str(TABLE_SCRIPT), "--json", str(path)], capture_output=True, text=True)
    assert p.returncode == 0 and "#### ELBO loss" in p.stdout
    # a file that is not a results JSON: one line naming it, no traceback
    for text in ("{", "[]"):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        p = subprocess.run([sys.executable, str(TABLE_SCRIPT), "--json", str(bad)], capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and str(bad) in p.stderr, p.stderr


def test_doc_table_script_needs_no_torch(results):
    """make_tables.py renders a results JSON where torch cannot be imported."""
    path, _ = results
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            "sys.argv = ['make_tables.py', '--json', sys.argv[1]]; "
            "runpy.run_path(%r, run_name='__main__')" % str(TABLE_SCRIPT))
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "#### ELBO loss" in p.stdout and "#### Targets" in p.stdout


@pytest.mark.parametrize("section,json_name", [("", "cpu"), ("cpu-dmol", "cpu-dmol"), ("cpu-latent", "cpu-latent"),
                                               ("cpu-hvae", "cpu-hvae"), ("cpu-fresh-process", "cpu-fresh-process"),
                                               ("cpu-half", "cpu-half"),
                                               ("cpu-huge-pages-off", "cpu-huge-pages-off"),
                                               ("cpu-huge-pages-on", "cpu-huge-pages-on"),
                                               ("h100", "h100"), ("h100-graph", "h100-graph")])
def test_docs_benchmarks_tables_are_current(section, json_name):
    """docs/benchmarks.md holds what make_tables.py renders from benchmarks/results/: a change to the
    renderer or to a results file is followed by `make_tables.py --json ... --write`."""
    script = _load_table_script()
    doc = script.DOC.read_text()
    results = json.loads((BENCH_DIR / "results" / f"{json_name}.json").read_text())
    assert script.update_markers(doc, script.report.markdown_section(results), section) == doc, \
        f"rerun: python benchmarks/make_tables.py --json benchmarks/results/{json_name}.json --write" + \
        (f" --section {section}" if section else "")


def test_not_part_of_the_package():
    """The harness lives in benchmarks/, beside the package: an installed vae_ext has no bench module."""
    _harness()
    assert importlib.util.find_spec("vae_ext.bench") is None
    assert Path(sys.modules["run"].__file__).resolve().parent == BENCH_DIR


@pytest.mark.parametrize("script", ["run.py", "sanitize_kernels.py"])
def test_scripts_import_the_built_checkout(script, tmp_path):
    """Run from a checkout built in place, the scripts import its vae_ext, not an installed one."""
    if not any((ROOT / "vae_ext").glob("_C*")):
        pytest.skip("this checkout is not built in place")
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); sys.argv = [sys.argv[2], '--help']\n"
            "try: runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print(sys.modules['vae_ext'].__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code, str(BENCH_DIR), str(BENCH_DIR / script)], capture_output=True,
                       text=True, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.splitlines()[-1]).resolve() == ROOT / "vae_ext" / "__init__.py", p.stdout


def test_runs_without_matplotlib_and_tqdm(tmp_path, monkeypatch, capsys):
    """matplotlib draws the chart and nothing else; tqdm is not used: without either the run completes."""
    main = _harness().main
    for name in ("matplotlib", "tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    out = tmp_path / "r.json"
    argv = [a for a in FAST if a != "--no-progress"]
    assert main([*argv, *AOT_EAGER, "--only", "reparam", "--sizes", "reparam=16x8", "--no-memory",
                 "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout.count("chart skipped") == 1 and "chart skipped: matplotlib is not installed" in stdout
    assert "reparam 1/1: float32 16x8" in stderr  # progress: one line per case
    r = json.loads(out.read_text())
    assert "chart" not in r and not out.with_suffix(".png").exists()
    assert r["benchmarks"]["reparam"]["results"] and not any("chart" in n for n in r["notes"])


def test_only_and_sizes_parsing(tmp_path):
    run = _harness()
    build_parser, main = run.build_parser, run.main
    with pytest.raises(SystemExit):
        main(["--only", "nope", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        main(["--sizes", "loss=8x64", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--cuda-graph: needs --device cuda"):
        main(["--device", "cpu", "--cuda-graph", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--device: expected cpu, cuda or cuda:N, got 'gpu0'"):
        main(["--device", "gpu0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
    args = build_parser().parse_args(["--only", "loss,reparam", "--quick"])
    assert args.only == ["loss,reparam"] and args.quick and not args.cuda_graph


@pytest.mark.parametrize("mode", ["retain", "fresh"])
def test_cpu_allocator_modes(mode, tmp_path):
    report = _harness("report")
    out = tmp_path / "r.json"
    argv = [a for a in FAST if a not in ("--cpu-allocator", "glibc")]
    p = subprocess.run([sys.executable, str(BENCH_DIR / "run.py"), *argv, *AOT_EAGER, "--only", "reparam",
                        "--sizes", "reparam=16x8", "--no-chart", "--no-memory", "--cpu-allocator", mode,
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    alloc = r["settings"]["cpu_allocator"]
    assert alloc["mode"] == mode and alloc["applied"] is True
    rec = r["benchmarks"]["reparam"]["results"][0]
    assert rec["peak_mem_bytes"] == {}
    # a copy into a fresh buffer is timed only where it can cost more than the copy
    assert ("floor_alloc" in rec["times"]) == (mode == "fresh")
    md = report.markdown_section(r)
    assert "CPU allocator" in md
    # the case again in a fresh process under glibc's defaults, with its page faults, in the tables
    # and held to the targets
    g = rec["glibc_process"]
    assert r["settings"]["glibc_process"] is True and "error" not in g, g
    for impl in ("fused", "eager", "compile"):
        assert _is_time(g["times"][impl]) and g["times"][impl]["minflt_per_call"] >= 0, impl
        assert rec["times"][impl]["minflt_per_call"] >= 0, impl
    t = g["times"]
    assert g["speedup"]["compile"] == pytest.approx(t["compile"]["median_ms"] / t["fused"]["median_ms"])
    assert "glibc's malloc defaults, a fresh process per case" in md and "faults/call" in md
    glibc_targets = [t for t in r["targets"] if t["glibc_process"]]
    assert len(glibc_targets) == 2  # reparam's two speedup targets (this size is below their 64K elements)
    assert all(t["benchmark"] == "reparam" and t["target"].endswith("(glibc defaults, fresh process)")
               for t in glibc_targets)


@pytest.mark.parametrize("bench, sizes, impls", [
    ("latent", ["--sizes", "latent=2x3x4x4"], ("fused", "two_call", "eager", "compile")),
    ("step", ["--models", "mlp", "--sizes", "step=4"], ("ref_eager", "fused_eager", "ref_compile", "fused_compile")),
])
def test_latent_and_step_cases_in_a_fresh_process(bench, sizes, impls, tmp_path):
    """The latent layer and the training step are measured as a user's process gets them too
    (issue 28): each case again in a fresh process under glibc's defaults, with its page faults per
    call, in the JSON and in a second table."""
    out = tmp_path / "r.json"
    argv = [a for a in FAST if a not in ("--cpu-allocator", "glibc")]
    p = subprocess.run([sys.executable, str(BENCH_DIR / "run.py"), *argv, *AOT_EAGER, "--only", bench, *sizes,
                        "--no-chart", "--no-memory", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    g = r["benchmarks"][bench]["results"][0]["glibc_process"]
    assert "error" not in g, g
    for impl in impls:
        assert _is_time(g["times"][impl]) and g["times"][impl]["minflt_per_call"] >= 0, impl
    key, base, fused = ("two_call", "two_call", "fused") if bench == "latent" else ("eager", "ref_eager", "fused_eager")
    t = g["times"]
    assert g["speedup"][key] == pytest.approx(t[base]["median_ms"] / t[fused]["median_ms"])
    md = _harness("report").markdown_section(r)
    assert "glibc's malloc defaults, a fresh process per case" in md and "faults/call" in md
    assert f"each {bench} case also in a fresh process" in md


def test_run_script_help():
    _harness()
    p = subprocess.run([sys.executable, str(BENCH_DIR / "run.py"), "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: python benchmarks/run.py")
    for option in ("--only", "--quick", "--device", "--cuda-graph", "--sizes", "--out", "--chart", "--no-chart"):
        assert option in p.stdout, option


def test_report_without_torch_results():
    """The renderer works on a minimal hand-written results dict (no extension needed)."""
    script = _load_table_script()  # it puts benchmarks/ on sys.path: report and targets import without torch
    report, targets = importlib.import_module("report"), importlib.import_module("targets")
    t = {"median_ms": 2.0, "iqr_ms": 0.1, "min_ms": 1.9, "blocks": 3}
    rec = {"recon": "bce", "dtype": "float32", "N": 1024, "D": 784, "L": 32, "elements": 802816,
           "times": {"fused": t, "eager": {**t, "median_ms": 30.0}, "compile": {**t, "median_ms": 5.0},
                     "floor": {**t, "median_ms": 1.0}},
           "speedup": {"eager": 15.0, "compile": 2.5}, "pct_floor": {"fused": 50.0},
           "peak_mem_bytes": {"fused": 3 << 20, "eager": 6 << 20, "compile": 3 << 20},
           "mem_fused_le": {"eager": True, "compile": True}}
    res = {"machine": {"device": "cpu", "cpu_model": "Test CPU", "cpu_count": 2, "threads": 2, "torch": "x"},
           "command": "python benchmarks/run.py", "benchmarks": {"loss": {"title": "ELBO loss", "results": [rec]}}}
    md = report.markdown_section(res)
    assert "Test CPU" in md and "15.0x" in md and "2.50x" in md and "50%" in md
    cpu = {t["target"]: t for t in targets.check_targets(res)}
    met = [t for t in cpu.values() if t["met"]]
    assert len(met) == 2  # >= 10x eager and >= 2x compile at >= 0.8M elements
    assert all("16M" not in t for t in cpu), "a CPU run is held to the CPU targets only"
    # A CUDA run is held to the H100 targets: percent of the copy floor and speed-up at >= 16M elements.
    big = {**rec, "N": 4096, "D": 4096, "elements": 4096 * 4096, "pct_floor": {"fused": 90.0},
           "speedup": {"eager": 3.0, "compile": 1.4}}
    res_gpu = {**res, "machine": {"device": "cuda", "gpu_name": "Test GPU", "cuda": "13.0", "torch": "x"},
               "benchmarks": {"loss": {"title": "ELBO loss", "results": [rec, big]}}}
    gpu = {t["target"]: t for t in targets.check_targets(res_gpu)}
    assert all("16M" in t for t in gpu) and len(gpu) == 3
    floor_t = next(t for k, t in gpu.items() if k.startswith("loss") and "floor" in k)
    comp_t = next(t for k, t in gpu.items() if k.startswith("loss") and "compile" in k)
    assert floor_t["met"] and floor_t["measured_worst"] == 90.0 and floor_t["cases"] == 1
    assert comp_t["met"] is False and comp_t["measured_worst"] == 1.4
    assert "90%" in report.markdown_section(res_gpu)
    assert script.update_markers("a <!-- bench:begin -->x<!-- bench:end --> b", "NEW") == \
        "a <!-- bench:begin -->\nNEW\n<!-- bench:end --> b"
    two = "<!-- bench:begin -->x<!-- bench:end --> <!-- bench:h100:begin -->y<!-- bench:h100:end -->"
    assert script.update_markers(two, "G", "h100") == \
        "<!-- bench:begin -->x<!-- bench:end --> <!-- bench:h100:begin -->\nG\n<!-- bench:h100:end -->"


def test_objectives_targets():
    """The issue's CPU targets for the objectives: speed-ups at >= 64K elements per op, the floor at >= 4M."""
    _load_table_script()
    report, targets = importlib.import_module("report"), importlib.import_module("targets")
    t = {"median_ms": 1.0, "iqr_ms": 0.1, "min_ms": 0.9, "blocks": 3}
    kl = {"case": "kl_prior", "op": "gaussian_kl", "recon": None, "dtype": "float32", "shape": [64, 16, 64, 64],
          "N": 64, "L": 65536, "elements": 4 << 20, "times": {"fused": t, "eager": t, "compile": t, "floor": t},
          "speedup": {"eager": 5.0, "compile": 1.2}, "pct_floor": {"fused": 85.0}}
    small_kl = {**kl, "shape": [1, 16, 64, 16], "N": 1, "L": 16384, "elements": 16384,
                "speedup": {"eager": 1.0, "compile": 0.5}, "pct_floor": {"fused": 10.0}}
    elbo = {**kl, "case": "gaussian_pixel", "op": "elbo_loss", "recon": "gaussian", "shape": [1024, 784, 32],
            "N": 1024, "D": 784, "L": 32, "elements": 802816, "speedup": {"eager": 2.5, "compile": 1.5},
            "pct_floor": {"fused": 50.0}}
    res = {"machine": {"device": "cpu"}, "benchmarks": {"objectives": {"title": "objectives",
                                                                       "results": [kl, small_kl, elbo]}}}
    got = {t["target"]: t for t in targets.check_targets(res) if "objectives" in t["target"]
           or t["target"].startswith(("gaussian_kl", "elbo_loss"))}
    kl_eager, kl_compile, elbo_eager, elbo_compile, floor = got.values()
    assert (kl_eager["met"], kl_eager["cases"]) == (True, 1)  # the 16K-element case is not held to it
    assert (kl_compile["met"], kl_compile["measured_worst"]) == (False, 1.2)
    assert (elbo_eager["met"], elbo_eager["measured_worst"], elbo_compile["met"]) == (False, 2.5, True)
    assert floor["cases"] == 1 and floor["measured_worst"] == 85.0 and floor["met"]
    md = report.markdown_section(res)
    assert "| gaussian_kl, prior | 64x16x64x64 | 4Mi |" in md
    assert "| elbo gaussian, per-pixel rlv | 1024x784, 32 |" in md


def test_glibc_process_targets_and_tables():
    """A record's fresh-process figures (glibc defaults) are held to the same speedup targets, in rows
    of their own, and shown in a second table with the page faults per call."""
    _load_table_script()
    report, targets = importlib.import_module("report"), importlib.import_module("targets")
    t = {"median_ms": 1.0, "iqr_ms": 0.1, "min_ms": 0.9, "blocks": 3, "minflt_per_call": 0.0}
    slow = {**t, "median_ms": 2.0, "minflt_per_call": 1024.0}
    rec = {"dtype": "float32", "N": 4096, "L": 256, "elements": 4096 * 256,
           "times": {"fused": t, "eager": t, "compile": t, "floor": t}, "speedup": {"eager": 6.0, "compile": 6.0},
           "glibc_process": {"times": {"fused": slow, "eager": t, "compile": t}, "rounds": 2,
                             "speedup": {"eager": 0.5, "compile": 0.5}}}
    res = {"machine": {"device": "cpu"}, "benchmarks": {"reparam": {"title": "Reparameterize", "results": [rec]}}}
    got = [x for x in targets.check_targets(res) if x["benchmark"] == "reparam"]
    assert [(x["glibc_process"], x["measured_worst"], x["met"]) for x in got] == [
        (False, 6.0, True), (False, 6.0, True), (True, 0.5, False), (True, 0.5, False)]
    md = report.markdown_section(res)
    assert "#### Reparameterize, float32: glibc's malloc defaults, a fresh process per case" in md
    assert "| 4096x256 | 1Mi | 2.00 | 1.00 | 1.00 | 0.50x | 0.50x | 1024 / 0 / 0 |" in md
    assert "fresh process) | 0.50x | 1 | NOT MET |" in md
    # without the fresh-process figures, the table and the targets are as before
    del rec["glibc_process"]
    assert not any(x["glibc_process"] for x in targets.check_targets(res))
    assert "fresh process per case" not in report.markdown_section(res)


def test_page_faults_latent_case(tmp_path):
    """benchmarks/page_faults.py counts the latent layer's faults per call, fused and two-call, each in a
    process of its own (the script's parent path, one tiny case)."""
    p = subprocess.run([sys.executable, str(BENCH_DIR / "page_faults.py"), "--case", "latent:2x3x4x4", "--impls",
                        "fused,two_call", "--repeat", "1", "--calls", "2", "--loop", "2"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr + p.stdout
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith("latent:2x3x4x4"), line
    for phase in ("fresh", "steady"):
        for impl in ("fused", "two_call"):
            assert f"{phase} {impl} " in line, line
