"""vae_ext.dmol_nll / dmol_sample refuse every bad argument with a ValueError or TypeError that
names it, before any kernel runs."""
from __future__ import annotations

import math

import pytest
import torch

import vae_ext

from helpers import arg_re


def _ok(c=3, m=2, n=2, spatial=(3, 4), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    per = 10 if c == 3 else 3
    params = torch.randn((n, per * m, *spatial), generator=g).to(dtype)
    x = (torch.randint(0, 256, (n, c, *spatial), generator=g).to(dtype) / 255) * 2 - 1
    return params, x


@pytest.mark.parametrize("case", [
    ("params", TypeError, lambda p, x: vae_ext.dmol_nll(p.numpy(), x)),
    ("x", TypeError, lambda p, x: vae_ext.dmol_nll(p, [1.0])),
    ("params", TypeError, lambda p, x: vae_ext.dmol_nll(p.int(), x.int())),
    ("x", TypeError, lambda p, x: vae_ext.dmol_nll(p, x.double())),
    ("params", ValueError, lambda p, x: vae_ext.dmol_nll(p[:, :-1], x)),          # P not 10 M
    ("params", ValueError, lambda p, x: vae_ext.dmol_nll(p[:, :0], x)),           # P = 0
    ("x", ValueError, lambda p, x: vae_ext.dmol_nll(p, x[:, :2])),                # C = 2
    ("x", ValueError, lambda p, x: vae_ext.dmol_nll(p, x[:1])),                   # batch
    ("x", ValueError, lambda p, x: vae_ext.dmol_nll(p, x[..., :3])),              # spatial
    ("x", ValueError, lambda p, x: vae_ext.dmol_nll(p, x[:, :, 0])),              # dims
    ("x", ValueError, lambda p, x: vae_ext.dmol_nll(p, x * 1.5)),                 # outside [-1, 1]
    ("x", ValueError, lambda p, x: vae_ext.dmol_nll(p, x.clone().requires_grad_(True))),
    ("num_bits", ValueError, lambda p, x: vae_ext.dmol_nll(p, x, num_bits=0)),
    ("num_bits", ValueError, lambda p, x: vae_ext.dmol_nll(p, x, num_bits=17)),
    ("num_bits", TypeError, lambda p, x: vae_ext.dmol_nll(p, x, num_bits=8.0)),
    ("log_scale_min", ValueError, lambda p, x: vae_ext.dmol_nll(p, x, log_scale_min=math.inf)),
    ("log_scale_min", ValueError, lambda p, x: vae_ext.dmol_nll(p, x, log_scale_min=math.nan)),
    ("log_scale_min", TypeError, lambda p, x: vae_ext.dmol_nll(p, x, log_scale_min="-7")),
    ("reduction", ValueError, lambda p, x: vae_ext.dmol_nll(p, x, reduction="pixel_mean")),
    ("x", ValueError, lambda p, x: vae_ext.dmol_nll(p, x.to("meta"))),
    ("params", ValueError, lambda p, x: vae_ext.dmol_nll(p.reshape(-1), x)),
], ids=lambda c: c[0])
def test_bad_dmol_nll(case):
    name, err, call = case
    params, x = _ok()
    with pytest.raises(err, match=arg_re(name)):
        call(params, x)


def test_p_of_the_other_channel_count():
    """P = 20 is 10 M for RGB (M = 2), and not 3 M for one channel."""
    params, x = _ok(c=3, m=2)
    with pytest.raises(ValueError, match=arg_re("params")):
        vae_ext.dmol_nll(params, x[:, :1])


def test_x_out_of_range_checked_in_the_pass():
    params, x = _ok()
    x = x.clone()
    x[1, 2, 2, 3] = 1.0 + 1e-6
    with pytest.raises(ValueError, match=arg_re("x")):
        vae_ext.dmol_nll(params, x)
    x[1, 2, 2, 3] = float("nan")  # NaN is no range error: it gives NaN
    assert torch.isnan(vae_ext.dmol_nll(params, x))


@pytest.mark.parametrize("case", [
    ("params", TypeError, lambda p: vae_ext.dmol_sample(p.numpy(), num_channels=3)),
    ("params", ValueError, lambda p: vae_ext.dmol_sample(p[:, :-1], num_channels=3)),
    ("num_channels", ValueError, lambda p: vae_ext.dmol_sample(p, num_channels=2)),
    ("num_channels", TypeError, lambda p: vae_ext.dmol_sample(p, num_channels=3.0)),
    ("generator", TypeError, lambda p: vae_ext.dmol_sample(p, num_channels=3, generator=1)),
    ("log_scale_min", ValueError, lambda p: vae_ext.dmol_sample(p, num_channels=3, log_scale_min=-math.inf)),
], ids=lambda c: c[0])
def test_bad_dmol_sample(case):
    name, err, call = case
    params, _ = _ok()
    with pytest.raises(err, match=arg_re(name)):
        call(params)
