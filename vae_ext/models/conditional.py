"""What makes a VAE module class-conditional (``num_classes > 0``, a CVAE): the labels' checks, their
one-hot encoding, and the learned prior p(z|y). :class:`~vae_ext.models.base.VAE` takes it in; the
encoder and the decoder of each family see the one-hot label beside x and z."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassConditional", "check_num_classes"]

_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes: expected an int >= 0 (0: not conditional), got {num_classes!r}")
    return num_classes


class ClassConditional:
    """The label side of a VAE module; it needs ``num_classes`` and ``latent_size`` set and the module's
    parameters (it is mixed into ``VAE``, an ``nn.Module``). With ``num_classes == 0`` every method
    refuses labels and the prior is N(0, I)."""

    num_classes: int
    latent_size: int

    def _init_prior(self) -> None:
        if self.conditional:
            # p(z|y): one learned (mu, logvar) row per class; zeros, so training starts from N(0, I)
            self.prior_net = nn.Embedding(self.num_classes, 2 * self.latent_size)
            nn.init.zeros_(self.prior_net.weight)

    @property
    def conditional(self) -> bool:
        """A class-conditional VAE (``num_classes > 0``): every method takes the labels ``y``."""
        return self.num_classes > 0

    def one_hot(self, y) -> torch.Tensor | None:
        """Labels (N,) -> their one-hot (N, num_classes) in the parameters' dtype; None for a model
        that is not conditional (which must get no labels)."""
        if not self.conditional:
            if y is not None:
                raise ValueError("y: this model is not class-conditional (num_classes=0); pass no labels")
            return None
        return torch.nn.functional.one_hot(self._labels(y), self.num_classes).to(next(self.parameters()).dtype)

    def _labels(self, y) -> torch.Tensor:
        """Checked class labels, int64 (N,) on the parameters' device."""
        if y is None:
            raise ValueError(f"y: a class-conditional model needs the class labels (0..{self.num_classes - 1})")
        if not isinstance(y, torch.Tensor) or y.dtype not in _LABEL_DTYPES or y.dim() != 1:
            what = f"a {y.dtype} tensor of shape {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected an integer tensor of class labels of shape (N,), got {what}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"y: class labels must lie in 0..{self.num_classes - 1}, found "
                             f"{int(y.min())}..{int(y.max())}")
        return y.to(next(self.parameters()).device, torch.int64)

    def prior(self, y=None):
        """p(z|y) = N(prior_mu, exp(prior_logvar)), each (N, latent_size); ``(None, None)`` (N(0, I))
        for a model that is not conditional."""
        if not self.conditional:
            self.one_hot(y)  # refuses labels
            return None, None
        prior_mu, prior_logvar = self.prior_net(self._labels(y)).chunk(2, dim=-1)
        return prior_mu, prior_logvar

    def _prior_kwargs(self, y) -> dict:
        prior_mu, prior_logvar = self.prior(y)
        return {} if prior_mu is None else {"prior_mu": prior_mu, "prior_logvar": prior_logvar}
