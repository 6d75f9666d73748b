"""``FusedELBOLoss``: the classic VAE ``loss_function`` as a module, on the fused kernel."""
from __future__ import annotations

import torch
from torch import nn

from .functional import RECON_MODES, REDUCTIONS, _check_beta, _check_choice, elbo_loss

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
    See :func:`vae_ext.elbo_loss` for the arguments.
    """

    def __init__(self, recon: str = "bce", beta: float = 1.0, reduction: str = "sum", validate: bool = False):
        super().__init__()
        _check_choice("recon", recon, RECON_MODES)
        _check_choice("reduction", reduction, REDUCTIONS)
        self.recon = recon
        self.beta = float(_check_beta(beta))
        self.reduction = reduction
        self.validate = validate

    def forward(self, recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                return_terms: bool = False):
        return elbo_loss(recon_x, x, mu, logvar, recon=self.recon, beta=self.beta,
                         reduction=self.reduction, return_terms=return_terms, validate=self.validate)

    def extra_repr(self) -> str:
        return f"recon={self.recon!r}, beta={self.beta}, reduction={self.reduction!r}"
