"""On the meta device (shapes only, as a model is checked before real data) the ops refuse what they
refuse on the CPU, with the same error, and give the CPU's output shapes for what they accept: the
fake kernels run vae_ext/_shape_checks.py, which repeats the C++ shape checks."""
from __future__ import annotations

import pytest
import torch

import vae_ext


def _ops(dev):
    def t(*shape):
        return torch.zeros(*shape, device=dev)

    return {
        "elbo_batch": lambda: vae_ext.elbo_loss(t(4, 6).sigmoid(), t(4, 6), t(5, 3), t(5, 3), reduction="none"),
        "elbo_prior": lambda: vae_ext.elbo_loss(t(4, 6), t(4, 6), t(4, 3), t(4, 3), prior_mu=t(2, 3),
                                                prior_logvar=t(4, 3)),
        "elbo_recon_logvar": lambda: vae_ext.elbo_loss(t(4, 6), t(4, 6), t(4, 3), t(4, 3), recon="gaussian",
                                                       recon_logvar=t(4, 5)),
        "kl_prior": lambda: vae_ext.gaussian_kl(t(4, 3), t(4, 3), t(5), t(5)),
        "reparameterize": lambda: vae_ext.reparameterize(t(4, 3), t(4, 2)),
        "latent_logscale": lambda: vae_ext.gaussian_latent(t(2, 3, 4), t(2, 3, 5)),
        "latent_prior": lambda: vae_ext.gaussian_latent(t(2, 3, 4), t(2, 3, 4), t(3, 4), t(2, 4)),
        "dmol_p": lambda: vae_ext.dmol_nll(t(2, 7, 4), t(2, 1, 4)),
        "dmol_channels": lambda: vae_ext.dmol_nll(t(2, 9, 4), t(2, 2, 4)),
        "dmol_batch": lambda: vae_ext.dmol_nll(t(2, 9, 4), t(3, 1, 4)),
        "dmol_spatial": lambda: vae_ext.dmol_nll(t(2, 9, 4), t(2, 1, 5)),
        "dmol_sample_p": lambda: vae_ext.dmol_sample(t(2, 7, 4), num_channels=1),
    }


def _error(call):
    with pytest.raises(Exception) as info:
        call()
    return type(info.value), str(info.value).splitlines()[0]


@pytest.mark.parametrize("case", _ops("cpu"))
def test_meta_refuses_what_the_cpu_refuses(case):
    cpu = _error(_ops("cpu")[case])
    assert cpu[0] is ValueError, cpu
    assert _error(_ops("meta")[case]) == cpu


def _valid(dev):
    def t(*shape):
        return torch.zeros(*shape, device=dev)

    return [
        lambda: vae_ext.elbo_loss(t(4, 6), t(4, 6), t(4, 3), t(4, 3), prior_mu=t(3), prior_logvar=t(4, 3),
                                  reduction="none"),
        lambda: vae_ext.elbo_loss(t(4, 6), t(4, 6), t(4, 3), t(4, 3), recon="gaussian", recon_logvar=t(())),
        lambda: vae_ext.gaussian_kl(t(4, 3), t(4, 3), t(1, 3), t(3), reduction="none"),
        lambda: vae_ext.reparameterize(t(4, 3), t(4, 3), num_samples=2),
        lambda: vae_ext.gaussian_latent(t(2, 3, 4), t(2, 3, 4), t(3, 1), t(2, 3, 4)),
        lambda: vae_ext.dmol_nll(t(2, 20, 4, 4), t(2, 3, 4, 4), reduction="none"),
        lambda: vae_ext.dmol_sample(t(2, 9, 4), num_channels=1),
    ]


@pytest.mark.parametrize("i", range(len(_valid("cpu"))))
def test_meta_gives_the_cpu_shapes(i):
    def shapes(out):
        return [o.shape for o in out] if isinstance(out, tuple) else out.shape

    assert shapes(_valid("meta")[i]()) == shapes(_valid("cpu")[i]())
