"""``VAE``, the base class of the VAE modules and, called directly, their factory: everything but the
encoder's and the decoder's layers (sampling, the loss, the ELBO and the likelihood estimate)."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .. import functional, reference
from ..dmol import dmol_nll, dmol_sample
from ..functional import _check_beta, _check_choice
from ..losses import FusedELBOLoss
from .conditional import ClassConditional, check_num_classes
from .dmol import DMoLELBOLoss, check_dmol_options, dmol_param_channels, mixture_mean, to_grid

__all__ = ["VAE", "ReferenceELBOLoss", "RECON_MODES", "ARCHS", "MODELS"]

# The reconstruction modes the models score: each needs its decoder mean and its log-likelihood's
# constant below. ("l1" and "gaussian" are loss modes of vae_ext.elbo_loss; "gaussian" needs a
# decoder log-variance these models do not have.) "dmol": a mixture of discretized logistics per
# pixel (models/dmol.py), on data scaled to [-1, 1].
RECON_MODES = ("bce", "bce_logits", "mse", "dmol")

# arch name -> VAE subclass: what ``VAE(arch=...)`` builds. vae_ext/models/__init__.py fills it once
# it has imported every family (they subclass VAE: this module cannot import them).
ARCHS: dict = {}
# The families ``VAE(arch=...)`` also builds that the command offers as a --model, not an --arch
# (the hierarchical VAE, models/hvae.py); filled there too.
MODELS: dict = {}

_LOG_2PI = math.log(2.0 * math.pi)


class ReferenceELBOLoss(FusedELBOLoss):
    """:class:`~vae_ext.FusedELBOLoss` computed by :func:`vae_ext.reference.elbo_loss` (plain PyTorch)."""

    def forward(self, recon_x, x, mu, logvar, return_terms: bool = False, *, prior_mu=None, prior_logvar=None,
                recon_logvar=None, return_unit_kl: bool = False):
        return reference.elbo_loss(recon_x, x, mu, logvar, recon=self.recon, beta=self.beta,
                                   reduction=self.reduction, return_terms=return_terms, prior_mu=prior_mu,
                                   prior_logvar=prior_logvar, recon_logvar=recon_logvar,
                                   free_bits=self.free_bits, return_unit_kl=return_unit_kl)


def _mlp(sizes, last_activation: bool) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _positive_ints(name: str, values) -> tuple:
    """Sizes, each an int >= 1: a float (2.5) is refused, not truncated, and so is a str ("4")."""
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of ints, got {type(values).__name__}") from None
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name}: expected integer sizes, got {v!r} ({type(v).__name__})")
    values = tuple(int(v) for v in values)
    if any(v < 1 for v in values):
        raise ValueError(f"{name}: expected positive sizes, got {values}")
    return values


class VAE(ClassConditional, nn.Module):
    """Base class of the VAE modules; ``VAE(arch="mlp"|"conv", **kwargs)`` builds one.

    Subclasses define ``encoder`` and ``_features`` ((x, one-hot y or None) -> features), ``fc_mu``,
    ``fc_logvar`` and ``_decode`` (z, or z and the one-hot y concatenated -> raw output of shape
    (M, *input_shape)); everything else lives here (the labels and the prior p(z|y) in conditional.py).

    Attributes:
        criterion: the loss module, ``FusedELBOLoss`` (or ``ReferenceELBOLoss`` when ``fused=False``)
            with ``reduction="sum"`` and the ``free_bits`` floor given; set ``model.criterion.beta`` for
            a KL warm-up.
        generator: the ``torch.Generator`` that ``forward`` draws eps from (default None: PyTorch's
            default generator for the device, so ``torch.manual_seed`` makes runs reproducible).
        eps_sampler: None, or a callable ``(mu, num_samples) -> eps`` that supplies the standard-normal
            draws instead; z is then ``mu + exp(0.5 * logvar) * eps`` in plain PyTorch. A test hook: it
            gives a fused and a reference model the same noise so their training can be compared.
    """

    arch: str = ""

    def __new__(cls, *args, arch: str | None = None, **kwargs):
        if cls is VAE:
            arch = "mlp" if arch is None else arch
            families = {**ARCHS, **MODELS}
            if not isinstance(arch, str):
                raise TypeError(f"arch: expected a str (one of {', '.join(map(repr, families))}), got "
                                f"{type(arch).__name__}")
            if arch not in families:
                raise ValueError(f"arch: expected one of {', '.join(map(repr, families))}, got {arch!r}")
            cls = families[arch]
        return super().__new__(cls)

    def __init__(self, input_shape, latent_size: int, recon: str, fused: bool, arch: str | None,
                 num_classes: int = 0, free_bits: float = 0.0, mixtures: int | None = None,
                 num_bits: int | None = None):
        super().__init__()
        if arch is not None and arch != self.arch:
            raise ValueError(f"arch: {type(self).__name__} is arch {self.arch!r}, got {arch!r}")
        _check_choice("recon", recon, RECON_MODES)
        one = isinstance(input_shape, numbers.Integral) and not isinstance(input_shape, bool)
        self.input_shape = _positive_ints("input_shape", (input_shape,) if one else input_shape)
        if not self.input_shape:
            raise ValueError(f"input_shape: expected positive sizes, got {input_shape!r}")
        (self.latent_size,) = _positive_ints("latent_size", (latent_size,))
        self.in_features = math.prod(self.input_shape)
        self.num_classes = check_num_classes(num_classes)
        self.recon = recon
        self.fused = bool(fused)
        self.mixtures, self.num_bits = check_dmol_options(recon, mixtures, num_bits, self.input_shape)
        # what the decoder outputs per image: the mixture's parameters (P channels) for "dmol"
        self.output_shape = self.input_shape if recon != "dmol" else (
            dmol_param_channels(self.input_shape[0], self.mixtures), *self.input_shape[1:])
        # free_bits is part of the training objective, not of the model: not in ``config``
        if recon == "dmol":
            self.criterion = DMoLELBOLoss(self.num_bits, fused=self.fused, free_bits=free_bits)
        else:
            self.criterion = (FusedELBOLoss if self.fused else ReferenceELBOLoss)(recon=recon, reduction="sum",
                                                                                 free_bits=free_bits)
        self._init_prior()
        self.generator: torch.Generator | None = None
        self.eps_sampler = None

    # ------------------------------------------------------------------ configuration

    @property
    def config(self) -> dict:
        """The constructor arguments that rebuild this architecture (``VAE.from_config``)."""
        c = {"arch": self.arch, "input_shape": list(self.input_shape), "latent_size": self.latent_size,
             "recon": self.recon}
        if self.conditional:
            c["num_classes"] = self.num_classes
        if self.recon == "dmol":
            c["mixtures"], c["num_bits"] = self.mixtures, self.num_bits
        return c

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "VAE":
        kwargs = {**config, **overrides}
        return VAE(**kwargs)

    def num_parameters(self, part: str = "all") -> int:
        """Parameter count: ``"all"``, ``"decoder"`` (the generative model p(x|z)) or ``"encoder"``."""
        if part == "all":
            params = self.parameters()
        elif part in ("encoder", "decoder"):
            params = self.encoder_parameters() if part == "encoder" else self.decoder_parameters()
        else:
            raise ValueError(f"part: expected 'all', 'encoder' or 'decoder', got {part!r}")
        return sum(p.numel() for p in params)

    def encoder_parameters(self):
        for m in (self.encoder, self.fc_mu, self.fc_logvar):
            yield from m.parameters()

    def decoder_parameters(self):
        enc = {id(p) for p in self.encoder_parameters()}
        return (p for p in self.parameters() if id(p) not in enc)

    @property
    def log_norm_const(self) -> float:
        """What the summed loss leaves out of -log p(x|z): D/2 * log(pi) for ``"mse"`` (a Gaussian
        with variance 1/2, whose -log density is sum (x - r)^2 + D/2 log pi), 0 for Bernoulli and
        for ``"dmol"`` (a probability of the pixels' bins)."""
        return 0.5 * self.in_features * math.log(math.pi) if self.recon == "mse" else 0.0

    # ------------------------------------------------------------------ the model

    def _as_images(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # raw uint8 pixels, say: PyTorch's own error names no argument
            raise TypeError(f"x: expected floating-point images (the model's {next(self.parameters()).dtype}), got "
                            f"{x.dtype}; for 8-bit pixels, x.float() / 255")
        if x.dim() < 1 or math.prod(x.shape[1:]) != self.in_features:  # x[0] fails an empty batch
            shape = "x".join(map(str, self.input_shape))
            raise ValueError(f"x: expected a batch of {shape} images ({self.in_features} values each), "
                             f"got shape {list(x.shape)}")
        return x.reshape(x.shape[0], *self.input_shape)

    def encode(self, x: torch.Tensor, y=None):
        """q(z|x[, y]) = N(mu, exp(logvar)): returns ``(mu, logvar)``, each (N, latent_size)."""
        x, c = self._as_images(x), self.one_hot(y)
        if c is not None and c.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected {x.shape[0]} labels (one per image of x), got {c.shape[0]}")
        h = self._features(x, c)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor, y=None) -> torch.Tensor:
        """Decoder output (logits for the Bernoulli modes) of shape (*z.shape[:-1], *output_shape):
        ``input_shape``, or for ``"dmol"`` (P, H, W), the mixture's P parameters per pixel.
        For a conditional model, ``y`` (N,) goes with z's last batch dimension (z may be (K, N, L))."""
        lead = z.shape[:-1]
        c = self.one_hot(y)
        if c is not None:
            if lead[-1:] != c.shape[:1]:
                raise ValueError(f"y: expected {lead[-1] if lead else 0} labels for z of shape {list(z.shape)}, "
                                 f"got {c.shape[0]}")
            z = torch.cat([z, c.expand(*lead, self.num_classes)], dim=-1)
        out = self._decode(z.reshape(-1, z.shape[-1]))
        return out.reshape(*lead, *self.output_shape)

    def loss_input(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> what the loss's ``recon`` mode takes (probabilities for ``"bce"``)."""
        return torch.sigmoid(out) if self.recon == "bce" else out

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> the mean of p(x|z): pixel probabilities, the Gaussian mean, or for
        ``"dmol"`` the mixture's mean in [-1, 1] (:func:`vae_ext.models.dmol.mixture_mean`)."""
        if self.recon == "dmol":
            lead = out.shape[:-len(self.output_shape)]
            m = mixture_mean(out.reshape(-1, *self.output_shape), self.input_shape[0])
            return m.reshape(*lead, *self.input_shape)
        return out if self.recon == "mse" else torch.sigmoid(out)

    def reparameterize(self, mu, logvar, *, num_samples=None, generator=None, return_eps=False):
        """z ~ q(z|x): fused kernel, or vae_ext.reference when ``fused=False``, or ``eps_sampler``."""
        if self.eps_sampler is not None:
            eps = self.eps_sampler(mu, num_samples).detach().to(mu.dtype)
            z = reference.reparameterize_with_eps(mu, logvar, eps)
            return (z, eps) if return_eps else z
        fn = functional.reparameterize if self.fused else reference.reparameterize
        return fn(mu, logvar, num_samples=num_samples, generator=generator, return_eps=return_eps)

    def forward(self, x: torch.Tensor, y=None):
        """``(recon, mu, logvar)``, and for a conditional model ``(recon, mu, logvar, prior_mu,
        prior_logvar)``: recon is what ``self.criterion`` takes (see ``loss_input``)."""
        mu, logvar = self.encode(x, y)
        z = self.reparameterize(mu, logvar, generator=self.generator)
        recon = self.loss_input(self.decode(z, y))
        if not self.conditional:
            return recon, mu, logvar
        return (recon, mu, logvar, *self.prior(y))

    def loss(self, x: torch.Tensor, beta: float | None = None, return_terms: bool = False, *, y=None,
             return_unit_kl: bool = False):
        """Summed negative ELBO of a batch (one z per image): ``criterion`` on ``self(x, y)``.

        Under DistributedDataParallel call the wrapper's forward and then ``criterion`` instead.
        """
        if beta is not None:
            self.criterion.beta = _check_beta(beta)
        recon, mu, logvar, *prior = self(x, y)
        kw = {"prior_mu": prior[0], "prior_logvar": prior[1]} if prior else {}
        return self.criterion(recon, x, mu, logvar, return_terms=return_terms, return_unit_kl=return_unit_kl, **kw)

    # ------------------------------------------------------------------ using it

    def _elbo_fn(self):
        return functional.elbo_loss if self.fused else reference.elbo_loss

    def recon_log_prob(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per sample, shape (M,), from decoder outputs ``out`` (M, ...) and targets x (M, ...).

        Uses the loss kernel with ``reduction="none"`` (its reconstruction term; mu and logvar are
        dummies), plus the Gaussian's normalizing constant for ``"mse"``.
        """
        m = out.shape[0]
        if self.recon == "dmol":
            nll = dmol_nll if self.fused else reference.dmol_nll
            return -nll(out, x.reshape(m, *self.input_shape), num_bits=self.num_bits, reduction="none")
        dummy = out.new_zeros(m, 1)
        _, rec, _ = self._elbo_fn()(self.loss_input(out), x.reshape(out.shape), dummy, dummy,
                                    recon=self.recon, reduction="none", return_terms=True)
        return -(rec + self.log_norm_const)

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, generator: torch.Generator | None = None, return_terms: bool = False, *, y=None):
        """The ELBO per image, shape (N,), in nats (a one-sample estimate): log p(x|z) - KL(q(z|x) || p(z)),
        for a conditional model the bound on log p(x|y): log p(x|z,y) - KL(q(z|x,y) || p(z|y)).

        With ``return_terms``: ``(elbo, recon_log_prob, kl)``.
        """
        x = self._as_images(x)
        mu, logvar = self.encode(x, y)
        z = self.reparameterize(mu, logvar, generator=generator)
        out = self.decode(z, y)
        if self.recon == "dmol":
            log_px_z = self.recon_log_prob(out, x)
            kl_fn = functional.gaussian_kl if self.fused else reference.gaussian_kl
            kl = kl_fn(mu, logvar, **self._prior_kwargs(y), reduction="none")
            elbo = log_px_z - kl
            return (elbo, log_px_z, kl) if return_terms else elbo
        _, rec, kl = self._elbo_fn()(self.loss_input(out), x, mu, logvar, recon=self.recon,
                                     reduction="none", return_terms=True, **self._prior_kwargs(y))
        log_px_z = -(rec + self.log_norm_const)
        elbo = log_px_z - kl
        return (elbo, log_px_z, kl) if return_terms else elbo

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, k: int = 5000, *, y=None, generator: torch.Generator | None = None,
                       max_elements: int = 1 << 23) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) per image, shape (N,), in nats (the IWAE bound);
        for a conditional model, of log p(x|y), with p(z|y) the class's prior.

        ``log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)`` with z_1..z_k ~ q(z|x), drawn with
        ``reparameterize(num_samples=...)`` and combined with logsumexp. A lower bound on log p(x)
        that tightens as k grows (k=1 is the ELBO). The k samples are drawn in chunks so that no
        decoder output holds more than ``max_elements`` values.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        x = self._as_images(x)
        n = x.shape[0]
        mu, logvar = self.encode(x, y)
        prior_mu, prior_logvar = self.prior(y)
        chunk = max(1, min(k, max_elements // max(1, n * math.prod(self.output_shape))))
        acc = torch.full((n,), -math.inf, dtype=mu.dtype, device=mu.device)
        done = 0
        while done < k:
            kc = min(chunk, k - done)
            z, eps = self.reparameterize(mu, logvar, num_samples=kc, generator=generator, return_eps=True)
            out = self.decode(z, y)  # (kc, n, *input_shape)
            x_rep = x.unsqueeze(0).expand(kc, *x.shape).reshape(kc * n, *self.input_shape)
            log_px_z = self.recon_log_prob(out.reshape(kc * n, *self.output_shape), x_rep).view(kc, n)
            if prior_mu is None:
                log_pz = -0.5 * (z.pow(2) + _LOG_2PI).sum(-1)
            else:
                log_pz = -0.5 * ((z - prior_mu).pow(2) * torch.exp(-prior_logvar) + prior_logvar + _LOG_2PI).sum(-1)
            log_qz = -0.5 * (eps.pow(2) + logvar + _LOG_2PI).sum(-1)
            acc = torch.logaddexp(acc, torch.logsumexp(log_px_z + log_pz - log_qz, dim=0))
            done += kc
        return acc - math.log(k)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, y=None) -> torch.Tensor:
        """n images from the model: z ~ p(z) (N(0, I), or for a conditional model the prior of each
        label of ``y``, shape (n,)), then the mean of p(x|z[, y]); shape (n, *input_shape). For
        ``"dmol"``, a draw x ~ p(x|z) (:func:`vae_ext.dmol_sample`, from ``generator`` too) rounded to
        the ``num_bits`` grid in [-1, 1], as the data is."""
        p = next(self.parameters())
        if y is not None and isinstance(y, torch.Tensor) and y.dim() == 1 and y.shape[0] != n:
            raise ValueError(f"y: expected {n} labels (one per sample, n={n}), got {y.shape[0]}")
        z = torch.randn(n, self.latent_size, generator=generator, device=p.device, dtype=p.dtype)
        prior_mu, prior_logvar = self.prior(y)
        if prior_mu is not None:
            z = prior_mu + torch.exp(0.5 * prior_logvar) * z
        if self.recon == "dmol":
            draw = dmol_sample if self.fused else reference.dmol_sample
            params = self.decode(z, y).reshape(n, *self.output_shape)
            x = draw(params, num_channels=self.input_shape[0], generator=generator)
            return to_grid(x, self.num_bits)
        return self.mean(self.decode(z, y))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """The mean of p(x|z) at z = the posterior mean mu(x): deterministic; shape (N, *input_shape)."""
        mu, _ = self.encode(x, y)
        return self.mean(self.decode(mu, y))
