"""vae_ext.elbo_loss on CUDA: device checks, validate=True, CUDA-graph capture and 64-bit
indexing (CUDA only); and, on both devices, the CUDA kernel's paths that the device-parametrized
reference tests elsewhere do not reach. (Those tests' CUDA parametrizations run there too.)
"""
from __future__ import annotations

import pytest
import torch

import vae_ext
from vae_ext import reference

from helpers import (
    BF16,
    DEVICES,
    F32,
    F64,
    RECON_MODES,
    arg_re,
    assert_close,
    capture_cuda_graph,
    check_objective,
    dtype_id,
    make_elbo_inputs,
    make_objective_inputs,
    requires_cuda,
    skip_unless_cuda_free,
    upstream_for,
)


@pytest.mark.cuda
@requires_cuda
def test_bce_validate_on_cuda():
    r, x, mu, lv = (t.cuda() for t in make_elbo_inputs("bce", (5, 37), 3, F32, seed=81))
    r = r.clone()
    r[4, 36] = 1.5
    with pytest.raises(ValueError) as info:
        vae_ext.elbo_loss(r, x, mu, lv, recon="bce", validate=True)
    assert "recon_x" in str(info.value) and "[0, 1]" in str(info.value)
    out = vae_ext.elbo_loss(r, x, mu, lv, recon="bce", validate=False)
    assert not torch.isfinite(out).item(), "an out-of-range probability without validate must give NaN"


@pytest.mark.cuda
@requires_cuda
def test_bce_target_validate_on_cuda():
    """validate=True checks the targets x too; without it a target outside [0, 1] gives the
    formula's finite value (docs/api.md), which is what the CPU kernels would compute unchecked."""
    r, x, mu, lv = (t.cuda() for t in make_elbo_inputs("bce", (5, 37), 3, F32, seed=81))
    x = x.clone()
    x[4, 36] = 255.0
    with pytest.raises(ValueError) as info:
        vae_ext.elbo_loss(r, x, mu, lv, recon="bce", validate=True)
    assert str(info.value).startswith("x:") and "[0, 1]" in str(info.value)
    out = vae_ext.elbo_loss(r, x, mu, lv, recon="bce", validate=False)
    assert torch.isfinite(out).item()


@pytest.mark.cuda
@requires_cuda
def test_direct_op_cpu_recon_beside_cuda_tensors_names_the_argument():
    """The op's CUDA kernel runs when any tensor is on CUDA. A CPU recon_x beside CUDA x, mu and
    logvar (a direct torch.ops call: vae_ext.elbo_loss checks devices in Python) must get the
    ValueError naming x, not the device guard's error for a CPU device."""
    r, x, mu, lv = make_elbo_inputs("bce", (3, 5), 2, F32, seed=85)
    with pytest.raises(ValueError, match=arg_re("x")):
        torch.ops.vae_ext.elbo_loss(r, x.cuda(), mu.cuda(), lv.cuda(), "bce", "sum", False, False, False)
    with pytest.raises(ValueError, match=arg_re("prior_mu")):  # only an optional tensor on CUDA
        torch.ops.vae_ext.elbo_loss(r, x, mu, lv, "bce", "sum", False, False, False, False, mu.cuda(), lv)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("mode", RECON_MODES)
def test_cuda_graph_capture_of_forward_and_backward(mode):
    """Loss + backward captured in a CUDA graph: replays on new input values give the eager results."""
    r, x, mu, lv = (t.cuda() for t in make_elbo_inputs(mode, (37, 1271), 13, F32, seed=83))
    leaves = [t.requires_grad_() for t in (r, mu, lv)]

    def step():
        for t in leaves:
            t.grad = None
        loss = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, beta=0.5)
        loss.backward()
        return loss

    graph, loss = capture_cuda_graph(step, warmups=2)
    grads = [t.grad for t in leaves]
    new = [t.cuda() for t in make_elbo_inputs(mode, (37, 1271), 13, F32, seed=84)]
    with torch.no_grad():
        for dst, src in zip((r, x, mu, lv), new):
            dst.copy_(src)
    loss_cap = torch.full_like(loss, float("nan"))
    for g in grads:
        g.fill_(float("nan"))  # every element must be rewritten by the replay
    graph.replay()
    torch.cuda.synchronize()
    loss_cap.copy_(loss)
    want = [t.detach().clone().requires_grad_() for t in (r, mu, lv)]
    ref = vae_ext.elbo_loss(want[0], x, want[1], want[2], recon=mode, beta=0.5)
    ref.backward()
    assert_close(loss_cap, ref, rtol=1e-6, atol=0, what=f"{mode} loss from a graph replay")
    for g, w, name in zip(grads, want, ("recon_x", "mu", "logvar")):
        assert_close(g, w.grad, rtol=1e-6, atol=0, what=f"{mode} grad {name} from a graph replay")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cuda_more_than_2_31_elements(reduction):
    """64-bit indexing: recon_x and x of 2^31 + 3072 bfloat16 elements (4 GiB each), equal everywhere
    but in the last three elements (past 2^31), so the loss is exactly 12 and the gradient 4 there
    and 0 elsewhere: an index that wrapped at 32 bits would read or write the wrong elements."""
    per_row = 2**30 + 1536
    skip_unless_cuda_free(3 * 2 * per_row * 2 + 4 * 2**30)
    r = torch.ones(2, per_row, dtype=BF16, device="cuda")
    r[1, -3:] = 3.0  # (3 - 1)^2 = 4 each
    x = torch.ones_like(r)
    mu = torch.zeros(2, 1, dtype=BF16, device="cuda", requires_grad=True)
    lv = torch.zeros(2, 1, dtype=BF16, device="cuda", requires_grad=True)  # KL = 0
    r.requires_grad_(True)
    loss = vae_ext.elbo_loss(r, x, mu, lv, recon="mse", reduction=reduction)
    want = torch.tensor(12.0) if reduction == "sum" else torch.tensor([0.0, 12.0])
    assert torch.equal(loss.cpu(), want), loss
    loss.sum().backward()
    g = r.grad
    del r, x
    assert torch.equal(g[1, -3:].float().cpu(), torch.full((3,), 4.0))
    assert g.count_nonzero().item() == 3


# --------------------------------------------------------------------------- paths of the CUDA kernel
# Each test runs on both devices: the CPU run checks the test itself, the CUDA run reaches a path of
# csrc/cuda that no device-parametrized test reaches (none of them has run on a GPU: docs/gpu.md).
@pytest.mark.parametrize("prior", ["shared_L", "shared_1xL", "per_sample"])
@pytest.mark.parametrize("device", DEVICES)
def test_prior_rows_wider_than_a_cuda_chunk(device, prior):
    """Latent rows of 40000 units: the CUDA kernel cuts each into KL units of 16384 (kChunk), and a
    shared prior is read from each unit's first column on, a per-sample one at the element."""
    n, l = 3, 40000
    pshape = {"shared_L": (l,), "shared_1xL": (1, l), "per_sample": (n, l)}[prior]
    inputs = make_objective_inputs("mse", (n, 7), (n, l), F32, device, seed=90, prior_shape=pshape)
    for reduction in ("sum", "none"):
        check_objective(inputs, recon="mse", reduction=reduction, beta=0.6, return_unit_kl=True,
                        combo=lambda o: o[0], upstream=upstream_for(reduction, n, device=device),
                        what=f"{prior}/{reduction}")


def _offset(t, k):
    """t's values in a contiguous tensor whose data starts k elements into its storage."""
    out = torch.empty(t.numel() + k, dtype=t.dtype, device=t.device)[k:].view(t.shape)
    return out.copy_(t)


@pytest.mark.parametrize("rlv_offset", [1, 2], ids=["rlv_like_recon", "rlv_unlike_recon"])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_inputs_starting_inside_their_storage(device, dtype, rlv_offset):
    """recon_x and x contiguous, one element into their storage, with a per-element recon_logvar one
    or two elements in: the CUDA kernel reads 16-byte vectors after a scalar head when every (N, D)
    stream shares recon_x's misalignment (no gradient buffer, which is aligned), and scalars
    otherwise. Rows of 16384 + 37 elements: each row's second chunk starts at another alignment."""
    n, d = 3, 16384 + 37
    base = make_objective_inputs("gaussian", (n, d), (n, 5), dtype, device, seed=92, rlv="pixel")
    inputs = dict(base, recon_x=_offset(base["recon_x"], 1), x=_offset(base["x"], 1),
                  recon_logvar=_offset(base["recon_logvar"], rlv_offset))
    assert inputs["recon_x"].is_contiguous() and inputs["recon_x"].storage_offset() == 1
    for reduction in ("sum", "none"):
        up = upstream_for(reduction, n, device=device)
        what = f"{reduction}/{dtype_id(dtype)}/rlv+{rlv_offset}"
        check_objective(inputs, recon="gaussian", reduction=reduction, beta=0.5, upstream=up,
                        requires=("mu", "logvar"), what=f"{what}, no recon gradient")
        check_objective(inputs, recon="gaussian", reduction=reduction, beta=0.5, upstream=up, what=what)


def _free_bits_inputs(dtype, device, pshape, n=6, l=12, seed=93):
    """Latents whose units' batch-mean KLs spread out, and a floor in the widest gap near the middle
    (well away from every unit: a unit on the floor would flip with rounding)."""
    inputs = make_objective_inputs("mse", (n, 9), (n, l), dtype, seed=seed, prior_shape=pshape)
    perm = torch.randperm(l, generator=torch.Generator().manual_seed(seed))
    scale = torch.linspace(0.05, 1.6, l, dtype=F64)[perm]
    for k in ("mu", "logvar"):
        inputs[k] = (inputs[k].double() * scale).to(dtype)
    ukl = reference.unit_kl(*(None if inputs[k] is None else inputs[k].double()
                              for k in ("mu", "logvar", "prior_mu", "prior_logvar"))).sort().values
    gaps = ukl[1:] - ukl[:-1]
    i = l // 2 - 3 + int(gaps[l // 2 - 3:l // 2 + 3].argmax())
    lam = float((ukl[i] + ukl[i + 1]) / 2)
    assert gaps[i] > 0.02 * lam, f"units too close to the floor {lam}: {ukl.tolist()}"
    return {k: None if t is None else t.to(device) for k, t in inputs.items()}, lam


@pytest.mark.parametrize("pshape", [None, (12,), (6, 12)], ids=["no_prior", "prior_L", "prior_per_sample"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_free_bits_on_the_device(device, dtype, pshape):
    """Free bits formed after the kernel on the loss's device (csrc/kl_terms.cpp): the floored term,
    the units' gradients masked, the per-unit KL; with beta = 1 and no terms the op adds the floored
    KL to the reconstruction term itself (total=True)."""
    inputs, lam = _free_bits_inputs(dtype, device, pshape)
    for reduction in ("sum", "mean"):
        what = f"{reduction}/{dtype_id(dtype)}"
        check_objective(inputs, recon="mse", reduction=reduction, free_bits=lam,
                        upstream=torch.tensor(-2.3, dtype=F64), what=f"{what} total")
        check_objective(inputs, recon="mse", reduction=reduction, free_bits=lam, what=f"{what} total, grad 1")
        check_objective(inputs, recon="mse", reduction=reduction, beta=0.7, free_bits=lam, return_terms=True,
                        return_unit_kl=True, combo=lambda o: o[0] + 2 * o[1] + 3 * o[2],
                        upstream=torch.tensor(1.7, dtype=F64), what=f"{what} terms")


@pytest.mark.parametrize("case", ["gaussian_scalar", "gaussian_scalar_prior_L", "gaussian_pixel_prior_per_sample",
                                  "l1_prior_1xL"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_beta_one_total_on_the_device(device, dtype, case):
    """beta = 1 without terms: the finalize kernel writes rec + kl, forming a 0-d log-variance's loss
    and gradient from the sums of q first; grad_output != 1 and == 1 (the scale kernel's skip)."""
    mode, pshape, rlv = {"gaussian_scalar": ("gaussian", None, "scalar"),
                         "gaussian_scalar_prior_L": ("gaussian", (6,), "scalar"),
                         "gaussian_pixel_prior_per_sample": ("gaussian", (8, 6), "pixel"),
                         "l1_prior_1xL": ("l1", (1, 6), None)}[case]
    inputs = make_objective_inputs(mode, (8, 3, 5), (8, 6), dtype, device, seed=94, prior_shape=pshape, rlv=rlv)
    for reduction in ("sum", "mean", "none"):
        check_objective(inputs, recon=mode, reduction=reduction, upstream=upstream_for(reduction, 8, device=device),
                        what=f"{case}/{reduction}")
        check_objective(inputs, recon=mode, reduction=reduction, what=f"{case}/{reduction} grad 1")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_objectives_on_the_device(device):
    """N = 0 through the finalize kernel alone: a 0-d log-variance over no elements (0 and 0, its
    gradient 0), free bits and the per-unit KL (batch means: NaN), as the reference."""
    mu = torch.zeros(0, 3, 2, device=device)
    pm = torch.zeros(3, 2, device=device)
    r = torch.zeros(0, 4, device=device)
    rlv = torch.tensor(0.3, device=device)
    for fn, args, kw in ((vae_ext.gaussian_kl, (mu, mu, pm, pm), dict(free_bits=0.5, return_unit_kl=True)),
                         (vae_ext.elbo_loss, (r, r, mu, mu), dict(recon="gaussian", recon_logvar=rlv)),
                         (vae_ext.elbo_loss, (r, r, mu, mu), dict(recon="gaussian", recon_logvar=rlv,
                                                                  reduction="none", return_terms=True)),
                         (vae_ext.elbo_loss, (r, r, mu, mu), dict(recon="l1", free_bits=0.5, reduction="mean",
                                                                  return_terms=True, return_unit_kl=True))):
        got = fn(*args, **kw)
        want = getattr(reference, fn.__name__)(*(t.cpu() for t in args),
                                               **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                  for k, v in kw.items()})
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert a.device == mu.device and a.shape == b.shape, (fn.__name__, kw, a, b)
            a = a.cpu()
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), (kw, a, b)
    leaf = rlv.clone().requires_grad_(True)
    vae_ext.elbo_loss(r, r, mu, mu, recon="gaussian", recon_logvar=leaf).backward()
    assert leaf.grad.item() == 0.0


@pytest.mark.parametrize("layout", ["recon_channels_last", "rlv_channels_last", "both"])
@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_channels_last_on_the_device(device, layout):
    """A per-element recon_logvar and a channels_last recon_x, in either layout, read beside each
    other by logical element (the kernel's copy of the one not in recon_x's layout)."""
    inputs = make_objective_inputs("gaussian", (3, 4, 5, 6), (3, 7), F32, device, seed=95, rlv="pixel")
    cl = torch.channels_last
    if layout in ("recon_channels_last", "both"):
        inputs["recon_x"] = inputs["recon_x"].contiguous(memory_format=cl)
    if layout in ("rlv_channels_last", "both"):
        inputs["recon_logvar"] = inputs["recon_logvar"].contiguous(memory_format=cl)
    for reduction in ("sum", "mean", "none"):
        check_objective(inputs, recon="gaussian", reduction=reduction, beta=0.8,
                        upstream=upstream_for(reduction, 3, device=device), what=f"{layout}/{reduction}")


@pytest.mark.cuda
@requires_cuda
def test_second_cuda_device():
    """Tensors on cuda:1 while cuda:0 is current: the ops' device guards put the kernels, their
    streams and the generator on the tensors' device. The results are those on the CPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    inputs, lam = _free_bits_inputs(F32, dev, (12,))
    check_objective(inputs, recon="mse", reduction="mean", beta=0.5, free_bits=lam, return_terms=True,
                    return_unit_kl=True, combo=lambda o: o[0], what="cuda:1")
    rlv = make_objective_inputs("gaussian", (5, 2, 3, 7), (5, 4), F32, dev, seed=96, prior_shape=(4,), rlv="scalar")
    check_objective(rlv, recon="gaussian", reduction="none", upstream=upstream_for("none", 5, device=dev),
                    what="cuda:1 gaussian")
    mu = torch.randn(6, 3, 4, 4, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    lv = (torch.rand(6, 3, 4, 4, device=dev) - 0.5).requires_grad_(True)
    z, eps = vae_ext.reparameterize(mu, lv, num_samples=2, return_eps=True)
    assert z.device == eps.device == dev
    assert_close(z, mu.detach() + torch.exp(0.5 * lv.detach()) * eps, rtol=1e-6, atol=1e-6, what="z on cuda:1")
    g = torch.randn_like(z)
    z.backward(g)
    assert_close(lv.grad, (0.5 * g * eps * torch.exp(0.5 * lv.detach())).sum(0), rtol=1e-5, atol=1e-6,
                 what="grad logvar on cuda:1")
