"""``FusedELBOLoss``: the classic VAE ``loss_function`` as a module, on the fused kernel."""
from __future__ import annotations

import torch
from torch import nn

from .dmol import check_dmol_options
from .functional import RECON_MODES, REDUCTIONS, _check_beta, _check_choice, _check_free_bits, elbo_loss

__all__ = ["FusedELBOLoss"]


class FusedELBOLoss(nn.Module):
    """Negative ELBO, reconstruction + beta * KL, computed by one fused kernel.

    A drop-in for the classic pytorch/examples loss::

        def loss_function(recon_x, x, mu, logvar):
            BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
            KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            return BCE + KLD

        loss_function = vae_ext.FusedELBOLoss()   # same value, same gradients

    ``beta`` is a plain attribute: set ``loss_fn.beta = w`` every step for a KL warm-up.
    ``free_bits`` (nats per latent unit) is one too. A learned prior and a Gaussian decoder's
    log-variance are passed per call: ``loss_fn(recon_x, x, mu, logvar, prior_mu=pm,
    prior_logvar=pl)``, ``FusedELBOLoss("gaussian")(recon_x, x, mu, logvar, recon_logvar=rlv)``.
    ``FusedELBOLoss("dmol", num_bits=8)`` is the discretized mixture of logistics (VDVAE, NVAE), called
    with the mixture's params in recon_x's place: ``loss_fn(params, x, mu, logvar)``.
    See :func:`vae_ext.elbo_loss` for the arguments.
    """

    def __init__(self, recon: str = "bce", beta: float = 1.0, reduction: str = "sum", validate: bool = False,
                 free_bits: float = 0.0, num_bits: int | None = None, log_scale_min: float | None = None):
        super().__init__()
        _check_choice("recon", recon, RECON_MODES)
        _check_choice("reduction", reduction, REDUCTIONS)
        self.num_bits, self.log_scale_min = check_dmol_options(recon, reduction, num_bits, log_scale_min)
        self.recon = recon
        self.beta = float(_check_beta(beta))
        self.reduction = reduction
        self.validate = validate
        self.free_bits = _check_free_bits(free_bits)
        if not (self.free_bits >= 0.0 and self.free_bits < float("inf")):
            raise ValueError(f"free_bits: expected a finite float >= 0 (nats per latent unit), got {free_bits}")
        if self.free_bits > 0.0 and reduction == "none":
            raise ValueError("free_bits: the floor applies to each unit's KL averaged over the batch, so it needs "
                             "reduction 'sum' or 'mean', not 'none'")

    def forward(self, recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                return_terms: bool = False, *, prior_mu: torch.Tensor | None = None,
                prior_logvar: torch.Tensor | None = None, recon_logvar: torch.Tensor | None = None,
                return_unit_kl: bool = False):
        return elbo_loss(recon_x, x, mu, logvar, recon=self.recon, beta=self.beta,
                         reduction=self.reduction, return_terms=return_terms, validate=self.validate,
                         prior_mu=prior_mu, prior_logvar=prior_logvar, recon_logvar=recon_logvar,
                         free_bits=self.free_bits, return_unit_kl=return_unit_kl, num_bits=self.num_bits,
                         log_scale_min=self.log_scale_min)

    def extra_repr(self) -> str:
        fb = f", free_bits={self.free_bits}" if self.free_bits else ""
        dmol = f", num_bits={self.num_bits}, log_scale_min={self.log_scale_min}" if self.recon == "dmol" else ""
        return f"recon={self.recon!r}, beta={self.beta}, reduction={self.reduction!r}{fb}{dmol}"
