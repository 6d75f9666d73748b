"""Plain-PyTorch discretized mixture of logistics (DMoL): the oracle of the fused ``vae_ext.dmol_nll``
and ``vae_ext.dmol_sample``, re-exported from :mod:`vae_ext.reference`.

Its own module because it is one job (the likelihood of PixelCNN++, VDVAE, NVAE and WaveNet vocoders)
that would double the size of ``reference.py``.

Layout of ``params`` (N, P, *S), channel-major, the layout of PixelCNN++ (openai/pixel-cnn
``pixel_cnn_pp/nn.py``), VDVAE (openai/vdvae ``vae_helpers.py``) and NVAE (NVlabs/NVAE
``distributions.py`` ``DiscMixLogistic``), read from their ``reshape(l[..., M:], xs + [3M])`` /
``view(B, 3, 3M, H, W)``. With M components and index ``p`` along dim 1:

- C = 3, P = 10 M::

      p in [0, M)                       logits, component m at p = m
      block c = 0 (R), 1 (G), 2 (B), each 3 M wide, starting at M + 3 M c:
        M + 3 M c +     m               mean of channel c, component m
        M + 3 M c + M + m               log-scale of channel c, component m
        M + 3 M c + 2 M + m             coupling coefficient alpha_c, component m

  The coefficient stored in channel c's block is ``alpha_c``, wherever it is used: ``alpha_0`` (in R's
  block) couples G to R, ``alpha_1`` (in G's block) couples B to R, ``alpha_2`` (in B's block) couples B
  to G: ``mu_G + alpha_0 x_R``, ``mu_B + alpha_1 x_R + alpha_2 x_G``. (Their ``coeffs[..., 0, :]``,
  ``coeffs[..., 1, :]``, ``coeffs[..., 2, :]``.)
- C = 1, P = 3 M: logits ``[0, M)``, means ``[M, 2M)``, log-scales ``[2M, 3M)`` (no coefficients; the
  layout of r9y9/wavenet_vocoder ``mixture.py`` after its ``transpose(1, 2)``).

VDVAE's and PixelCNN++'s channels-last (N, H, W, P) decoder output is this layout after
``permute(0, 3, 1, 2)``; NVAE's (N, P, H, W) is it as it is.

The math (per channel c, component m): ``s = clamp(s_raw, min=log_scale_min)`` (clamp's gradient:
1 where ``s_raw >= log_scale_min``, ties included, else 0), ``alpha = tanh(alpha_raw)``, the coupled
means above (on the true, observed lower channels), ``h = 1 / (2^num_bits - 1)``, ``i = exp(-s)``,
``u = x - mu``, ``A = i (u + h)``, ``B = i (u - h)``, and

- ``x < -0.999``: ``log sigmoid(A) = -softplus(-A)``;
- else ``x > 0.999``: ``log(1 - sigmoid(B)) = -softplus(B)``;
- else, if the bin's mass ``D = sigmoid(A) - sigmoid(B)`` is above 1e-5: ``log D``, computed without
  the difference's cancellation as ``-softplus(-A) - softplus(B) + log(-expm1(-d))`` with
  ``d = 2 h i`` (which is ``A - B`` exactly, and not rounded through A and B);
- else the bin-centre density ``t - s - 2 softplus(t) - log((2^num_bits - 1) / 2)``, ``t = i u``.

Every ``-softplus(y)`` is evaluated as ``F.logsigmoid(-y)`` (``t - 2 softplus(t)`` as
``logsigmoid(t) + logsigmoid(-t)``): ``F.softplus`` returns ``y`` itself above 20, whose gradient is
then 1 instead of ``sigmoid(y)``, an error of up to 2e-9 that a float64 oracle should not have (the
originals have it: their ``log sigmoid(A)`` is ``A - softplus(A)``, whose gradient is exactly 0 for A > 20).

**The branch test** ``D > 1e-5`` is evaluated as ``log D > log(1e-5)``, ``log D`` being the value just
above, in the compute dtype (the threshold ``math.log(1e-5)`` rounded to that dtype by the comparison).
The same test as the originals' ``cdf_delta > 1e-5``, without the rounding of a plain difference of
two numbers near 1 (float32's ``sigmoid(A) - sigmoid(B)`` is off by up to ~6e-8, 0.6 % of the
threshold); the two disagree only on a near-tie, which no test should depend on.

Then ``log p(pixel) = logsumexp_m(log_softmax(logits)_m + sum_c l_cm)``, the NLL summed per sample over
every pixel. Unselected branches get safe inputs (``d = 1``) so that none of them leaks NaN or inf
into the gradient; NaN in the inputs gives NaN out (a NaN fails every branch test and falls through
to the bin-centre formula, which propagates it).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["dmol_nll", "dmol_sample", "dmol_num_mixtures"]

_HALF = (torch.float16, torch.bfloat16)
_FLOAT = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LOG_MID_THRESHOLD = math.log(1e-5)
_SAMPLE_LOG_SCALE_MIN = -7.0  # the sampler's clamp: VDVAE's, PixelCNN++'s, NVAE's and r9y9's value


def _check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise TypeError(f"{name}: expected a float32, float64, float16 or bfloat16 tensor, got dtype {t.dtype}")


def dmol_num_mixtures(params_channels: int, num_channels: int) -> int:
    """M from P = dim 1 of ``params``: P = 10 M for 3 channels, 3 M for 1; anything else a ValueError."""
    if isinstance(num_channels, bool) or num_channels not in (1, 3):
        raise ValueError(f"num_channels: expected 1 (grayscale, audio) or 3 (RGB), got {num_channels!r}")
    per = 10 if num_channels == 3 else 3
    if params_channels < per or params_channels % per:
        raise ValueError(
            f"params: expected dim 1 to be {per} * M (M >= 1 mixture components) for {num_channels} "
            f"channel(s), got {params_channels}")
    return params_channels // per


def _split(params: torch.Tensor, num_channels: int):
    """(logits (N, M, *S), means, log-scales, coefficients (N, C, M, *S) each; coefficients None for C = 1)."""
    n, p, *spatial = params.shape
    m = dmol_num_mixtures(p, num_channels)
    logits = params[:, :m]
    kinds = 3 if num_channels == 3 else 2
    rest = params[:, m:].reshape(n, num_channels, kinds, m, *spatial)
    coeffs = rest[:, :, 2] if num_channels == 3 else None
    return logits, rest[:, :, 0], rest[:, :, 1], coeffs


def _check_bits(num_bits) -> None:
    if isinstance(num_bits, bool) or not isinstance(num_bits, numbers.Integral):
        raise TypeError(f"num_bits: expected a Python int in 1..16, got {type(num_bits).__name__}")
    if not 1 <= num_bits <= 16:
        raise ValueError(f"num_bits: expected an int in 1..16, got {num_bits}")


def _check_args(params, x, num_bits, reduction, log_scale_min) -> None:
    _check_float_tensor("params", params)
    _check_float_tensor("x", x)
    if x.dim() < 2 or x.shape[1] not in (1, 3):
        raise ValueError(f"x: expected shape (N, C, *S) with C = 1 or 3, got {tuple(x.shape)}")
    if params.dim() != x.dim() or params.shape[0] != x.shape[0] or params.shape[2:] != x.shape[2:]:
        raise ValueError(f"params: expected shape (N, P, *S) matching x {tuple(x.shape)} in N and *S, "
                         f"got {tuple(params.shape)}")
    _check_bits(num_bits)
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction: expected 'sum', 'mean' or 'none', got {reduction!r}")
    if isinstance(log_scale_min, bool) or not isinstance(log_scale_min, numbers.Real) \
            or not math.isfinite(log_scale_min):
        raise ValueError(f"log_scale_min: expected a finite float, got {log_scale_min!r}")


def _coupled_means(means, coeffs, x):
    """mu_c + the coupling on the true lower channels; x (N, C, 1, *S) broadcasts over M."""
    if coeffs is None:
        return means
    alpha = torch.tanh(coeffs)
    mu_g = means[:, 1] + alpha[:, 0] * x[:, 0]
    mu_b = means[:, 2] + alpha[:, 1] * x[:, 0] + alpha[:, 2] * x[:, 1]
    return torch.stack((means[:, 0], mu_g, mu_b), dim=1)


def dmol_log_prob_channels(params: torch.Tensor, x: torch.Tensor, *, num_bits: int = 8,
                           log_scale_min: float = -7.0) -> torch.Tensor:
    """l_cm of the module docstring, shape (N, C, M, *S), in the compute dtype (arguments unchecked)."""
    dt = torch.float32 if params.dtype in _HALF else params.dtype
    params, x = params.to(dt), x.to(dt)
    _, means, log_scales, coeffs = _split(params, x.shape[1])
    x = x.unsqueeze(2)                                   # (N, C, 1, *S)
    mu = _coupled_means(means, coeffs, x)
    s = torch.clamp(log_scales, min=log_scale_min)
    levels = 2.0 ** num_bits - 1.0
    h = 1.0 / levels
    inv = torch.exp(-s)
    u = x - mu
    a = inv * (u + h)
    b = inv * (u - h)
    left = (x < -0.999).expand_as(u)
    right = (x > 0.999).expand_as(u) & ~left
    log_left, log_right = F.logsigmoid(a), F.logsigmoid(-b)
    log_edges = log_left + log_right                      # log sigmoid(A) + log(1 - sigmoid(B))
    d = (2.0 * h) * inv                                   # A - B, > 0
    with torch.no_grad():
        mid = (log_edges + torch.log(-torch.expm1(-d))) > _LOG_MID_THRESHOLD
    mid = mid & ~left & ~right
    d_safe = torch.where(mid, d, torch.ones_like(d))      # the unselected mid branch sees log(1 - e^-1)
    log_mid = log_edges + torch.log(-torch.expm1(-d_safe))
    t = inv * u
    log_centre = F.logsigmoid(t) + F.logsigmoid(-t) - s - math.log(levels / 2.0)
    return torch.where(left, log_left, torch.where(right, log_right, torch.where(mid, log_mid, log_centre)))


def dmol_nll(params: torch.Tensor, x: torch.Tensor, *, num_bits: int = 8, reduction: str = "sum",
             log_scale_min: float = -7.0) -> torch.Tensor:
    """Negative log-likelihood of ``x`` (N, C, *S), C = 1 or 3, values on the ``num_bits``-bit grid
    scaled to [-1, 1], under the DMoL ``params`` (N, P, *S) (layout and math: the module docstring).

    Summed per sample over every pixel and channel; ``reduction`` "sum" (over the batch), "mean" (the
    per-sample sums averaged over the batch) or "none" (shape (N,)). VDVAE's per-dimension loss is the
    "none" result divided by ``x[0].numel()``. Half inputs are computed, and returned, in float32. The
    gradient flows to ``params`` (and to ``x`` if it asks: the fused op refuses that). ``x`` outside
    [-1, 1] is not checked here (the fused op checks it).
    """
    _check_args(params, x, num_bits, reduction, log_scale_min)
    lp = dmol_log_prob_channels(params, x, num_bits=num_bits, log_scale_min=log_scale_min)
    m = lp.shape[2]
    logits = params[:, :m].to(lp.dtype)
    per_pixel = torch.logsumexp(F.log_softmax(logits, dim=1) + lp.sum(dim=1), dim=1)   # (N, *S)
    per_sample = -per_pixel.reshape(per_pixel.shape[0], math.prod(per_pixel.shape[1:])).sum(dim=1)
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    return per_sample


def dmol_sample(params: torch.Tensor, *, num_channels: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample per pixel, shape (N, num_channels, *S), drawn as VDVAE and PixelCNN++ draw it.

    The component by Gumbel-max (``argmax(logits - log(-log(u)))``), a logistic draw from it
    (``mu + exp(s) (log u - log(1 - u))``, ``s`` clamped below at -7 as the originals do), each ``u``
    uniform on [1e-5, 1 - 1e-5]; the RGB coupling on the *sampled*, clamped lower channels; every
    channel clamped to [-1, 1] (not rounded to the grid). The draws come from torch's generator, so the
    values differ from the fused op's Philox stream; the distribution is the same. Half ``params`` are
    computed in float32; the sample has ``params``' dtype. No gradient.
    """
    _check_float_tensor("params", params)
    if params.dim() < 2:
        raise ValueError(f"params: expected shape (N, P, *S), got {tuple(params.shape)}")
    dmol_num_mixtures(params.shape[1], num_channels)
    dt = torch.float32 if params.dtype in _HALF else params.dtype
    with torch.no_grad():
        p = params.detach().to(dt)
        logits, means, log_scales, coeffs = _split(p, num_channels)
        lo, hi = 1e-5, 1.0 - 1e-5
        g = torch.empty_like(logits).uniform_(lo, hi, generator=generator)
        k = torch.argmax(logits - torch.log(-torch.log(g)), dim=1, keepdim=True)     # (N, 1, *S)
        idx = k.unsqueeze(1).expand(-1, num_channels, -1, *k.shape[2:])            # (N, C, 1, *S)
        mu = torch.gather(means, 2, idx).squeeze(2)
        s = torch.gather(log_scales, 2, idx).squeeze(2).clamp(min=_SAMPLE_LOG_SCALE_MIN)
        u = torch.empty_like(mu).uniform_(lo, hi, generator=generator)
        y = mu + torch.exp(s) * (torch.log(u) - torch.log1p(-u))
        x0 = y[:, 0].clamp(-1.0, 1.0)
        if num_channels == 1:
            out = x0.unsqueeze(1)
        else:
            alpha = torch.tanh(torch.gather(coeffs, 2, idx).squeeze(2))
            x1 = (y[:, 1] + alpha[:, 0] * x0).clamp(-1.0, 1.0)
            x2 = (y[:, 2] + alpha[:, 1] * x0 + alpha[:, 2] * x1).clamp(-1.0, 1.0)
            out = torch.stack((x0, x1, x2), dim=1)
    return out.to(params.dtype)
