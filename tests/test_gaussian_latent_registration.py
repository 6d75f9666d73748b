"""gaussian_latent's registration: opcheck of both ops (schema, autograd registration, fake kernels,
AOT dispatch), fake kernels that give the real layouts, torch.compile(fullgraph=True), and the
errors of what C++ autograd cannot do (torch.func, create_graph)."""
from __future__ import annotations

import pytest
import torch

import vae_ext

from helpers import BF16, F32, F64, assert_close, dtype_id, rng_state_kept

OP = torch.ops.vae_ext.gaussian_latent.default
BWD = torch.ops.vae_ext.gaussian_latent_backward.default


def _inputs(dtype=F32, prior="same", layout="contiguous", shape=(3, 4, 5, 2), requires_grad=True):
    g = torch.Generator().manual_seed(4)
    n, c = shape[0], shape[1]
    out = torch.randn(n, 4 * c, *shape[2:], generator=g).to(dtype)
    if layout == "slice_nhwc":
        out = out.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last":
        out = out.contiguous(memory_format=torch.channels_last)
    mu, ls, pmu, pls = (t if layout.startswith("slice") else t.contiguous(memory_format=_fmt(layout))
                        for t in out.chunk(4, dim=1))
    if prior is None:
        pmu = pls = None
    elif prior == "shared":
        pmu, pls = pmu[0, :, :1, :1].contiguous(), pls[0, :, :1, :1].contiguous()
    ts = [mu, ls, pmu, pls]
    return [t if t is None else t.detach().requires_grad_(requires_grad) for t in ts]


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


CASES = {
    "plain": dict(prior=None, scale="logvar", kl="analytic", reduction="none", free_bits=0.0, k=0),
    "prior_sample_k": dict(prior="same", scale="logsigma", kl="sample", reduction="sum", free_bits=0.0, k=2),
    "shared_free_bits": dict(prior="shared", scale="logvar", kl="analytic", reduction="mean", free_bits=0.4, k=0),
    "slice_nhwc": dict(prior="same", scale="logsigma", kl="analytic", reduction="none", free_bits=0.0, k=3,
                       layout="slice_nhwc"),
    "slice_nchw": dict(prior="same", scale="logvar", kl="sample", reduction="mean", free_bits=0.0, k=0,
                       layout="slice_nchw"),
    "channels_last": dict(prior="shared", scale="logvar", kl="sample", reduction="none", free_bits=0.0, k=2,
                          layout="channels_last"),
}


def _args(case, dtype=F32, generator=None, requires_grad=True):
    c = CASES[case]
    mu, ls, pmu, pls = _inputs(dtype, c["prior"], c.get("layout", "contiguous"), requires_grad=requires_grad)
    return (mu, ls, pmu, pls, c["scale"], c["kl"], c["reduction"], c["free_bits"], c["k"], generator)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
def test_opcheck_default_generator(case, dtype):
    """Every opcheck utility: the eager vs AOT comparison re-seeds the default generator before each
    run, so both runs draw the same eps."""
    with rng_state_kept():
        torch.library.opcheck(OP, _args(case, dtype))
        torch.library.opcheck(OP, _args(case, dtype, requires_grad=False))


def test_opcheck_explicit_generator():
    """An explicit generator advances between the two AOT runs: the checks that need one call each."""
    torch.library.opcheck(OP, _args("prior_sample_k", generator=torch.Generator().manual_seed(3)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("case", CASES)
def test_opcheck_backward(case):
    args = _args(case, requires_grad=False)
    mu, ls, pmu, pls, scale, kl, red, fb, k, _ = args
    with rng_state_kept():
        torch.manual_seed(0)
        z, _, state, unit_w = OP(*args)
    rows = max(k, 1) * mu.shape[0]
    row_w = torch.rand(rows)
    torch.library.opcheck(BWD, (torch.randn_like(z), row_w, mu, ls, pmu, pls, state, unit_w, scale, kl, k, True))
    torch.library.opcheck(BWD, (None, row_w, mu, ls, pmu, pls, state, unit_w, scale, kl, k, pmu is not None))
    torch.library.opcheck(BWD, (torch.randn_like(z), None, mu, ls, pmu, pls, state, unit_w, scale, kl, k, False))


@pytest.mark.parametrize("case", CASES)
def test_fake_layouts_match(case):
    """The fake kernels' outputs have the real ones' shapes, dtypes and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _args(case, requires_grad=False)
    with rng_state_kept():
        real = OP(*args)
    with FakeTensorMode() as mode:
        fake = OP(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


@pytest.mark.parametrize("case", ["plain", "prior_sample_k", "shared_free_bits", "slice_nhwc"])
def test_torch_compile_fullgraph(case):
    """torch.compile(fullgraph=True) (inductor) of a layer using gaussian_latent: the same z, kl and
    gradients as eager after the same manual_seed."""
    torch._dynamo.reset()
    c = CASES[case]

    def f(mu, ls, pmu, pls):
        z, kl = vae_ext.gaussian_latent(mu, ls, pmu, pls, scale=c["scale"], kl=c["kl"], reduction=c["reduction"],
                                        free_bits=c["free_bits"], num_samples=c["k"] or None)
        return z * 2.0 + 1.0, kl * 3.0

    cf = torch.compile(f, fullgraph=True)
    results = []
    with rng_state_kept():
        for fn in (f, cf):
            torch.manual_seed(1)
            leaves = _inputs(F32, c["prior"], c.get("layout", "contiguous"))
            z, kl = fn(*leaves)
            up = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
            ((z * up).sum() + (kl * torch.linspace(0.5, 1.5, kl.numel()).view(kl.shape)).sum()).backward()
            results.append([z.detach(), kl.detach()] + [t.grad for t in leaves if t is not None])
    for e, cmp in zip(*results):
        assert_close(cmp, e, rtol=1e-6, atol_rel=1e-7, what=case)
    torch._dynamo.reset()


def test_torch_func_names_the_way_out():
    mu, ls, _, _ = _inputs(prior=None, requires_grad=False)
    with pytest.raises(RuntimeError, match="reference.gaussian_latent"):
        torch.func.grad(lambda m: vae_ext.gaussian_latent(m, ls, reduction="sum")[1])(mu)


def test_create_graph_names_the_way_out():
    mu, ls, pmu, pls = _inputs()
    z, kl = vae_ext.gaussian_latent(mu, ls, pmu, pls)
    (g,) = torch.autograd.grad(z.sum() + kl.sum(), mu, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        g.sum().backward()
