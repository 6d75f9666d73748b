"""The share of a hierarchical VAE's training step spent in its objectives (the latent layers and the
likelihood), measured with ``torch.profiler`` on the CPU.

Eager paths (``fused=True`` or ``False``): while profiling, the objective calls the model makes
(``gaussian_latent``, the reference path's ``reparameterize`` draw and ``reference.gaussian_latent``,
``dmol_nll`` / ``reference.dmol_nll``) run inside ``record_function("objective")`` ranges: the names
are replaced in the model's modules for the profiled steps only, so the timed steps are untouched. The
objectives' time is the ranges' wall time (every op called inside, the Python wrapper included)
plus, in the backward, the autograd nodes those ops created (``autograd::engine::evaluate_function``
events whose sequence number is that of a forward op inside a range, children included).

Compiled paths: dynamo drops ``record_function`` from the graph, and inductor fuses the reference's
objective ops with their neighbours, so the compiled reference's share is not attributable (None).
The compiled fused model keeps the custom ops opaque: its share is the time of the ``vae_ext::``
ops (``gaussian_latent``, ``gaussian_latent_backward``, ``dmol_nll``, whose forward writes the
gradient), outermost events only.

A share is objective time / the step's wall time (zero_grad, loss, backward, Adam), the median over
the profiled steps. The profiler's per-op cost inflates both, most for the reference's many small ops.
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import types
from typing import Callable, Optional

from torch.profiler import ProfilerActivity, profile, record_function

import vae_ext.models.hvae as hvae_mod
import vae_ext.models.hvae_blocks as blocks_mod

RANGE = "objective"
STEP = "hvae_step"
METHOD = ("torch.profiler, median of the profiled steps: eager, record_function ranges around the "
          "model's objective calls plus the backward nodes their ops created; compiled fused, the "
          "vae_ext:: ops; compiled reference, not attributable (inductor fuses across the objectives)")


def _ranged(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(RANGE):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def objective_ranges():
    """Within: the model's objective calls run inside ``record_function(RANGE)``."""
    saved = []

    def patch(mod, name, value):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)

    ref = blocks_mod.reference
    ranged_ref = types.SimpleNamespace(**{k: getattr(ref, k) for k in dir(ref) if not k.startswith("__")})
    ranged_ref.gaussian_latent = _ranged(ref.gaussian_latent)
    ranged_ref.dmol_nll = _ranged(ref.dmol_nll)
    try:
        for mod in (blocks_mod, hvae_mod):
            patch(mod, "reference", ranged_ref)
        for name in ("gaussian_latent", "reparameterize"):
            patch(blocks_mod, name, _ranged(getattr(blocks_mod, name)))
        patch(hvae_mod, "dmol_nll", _ranged(hvae_mod.dmol_nll))
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def _span(e) -> float:
    return e.time_range.end - e.time_range.start


def _within(e, r) -> bool:
    return e.thread == r.thread and r.time_range.start <= e.time_range.start and e.time_range.end <= r.time_range.end


def _ranged_share(events, step) -> float:
    ranges = [e for e in events if e.name == RANGE and _within(e, step)]
    outer = [r for r in ranges if not any(o is not r and _within(r, o) for o in ranges)]
    seqs = {e.sequence_nr for e in events
            if e.sequence_nr >= 0 and e.name != RANGE and any(_within(e, r) for r in outer)}
    backward = [e for e in events if e.name.startswith("autograd::engine::evaluate_function")
                and e.sequence_nr in seqs and _within(e, step)]
    return (sum(map(_span, outer)) + sum(map(_span, backward))) / _span(step)


def _op_share(events, step) -> float:
    ops = [e for e in events if e.name.startswith("vae_ext::") and _within(e, step)]
    outer = [e for e in ops if not any(o is not e and _within(e, o) for o in ops)]
    return sum(map(_span, outer)) / _span(step)


def objective_share(step: Callable[[], None], *, ranged: bool, steps: int = 3) -> Optional[float]:
    """Median share of ``steps`` profiled calls of ``step`` spent in the objectives: by the
    ``objective_ranges`` (``ranged``, eager models) or by the ``vae_ext::`` ops (compiled fused)."""
    shares = []
    for _ in range(steps):
        ctx = objective_ranges() if ranged else contextlib.nullcontext()
        with ctx, profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function(STEP):
                step()
        events = prof.events()
        (outer,) = [e for e in events if e.name == STEP]
        shares.append((_ranged_share if ranged else _op_share)(events, outer))
    return statistics.median(shares)


def op_share(step: Callable[[], None], steps: int = 3) -> float:
    """The ``vae_ext::`` ops' median share of ``step`` (a cross-check of the fused eager figure)."""
    return objective_share(step, ranged=False, steps=steps)

