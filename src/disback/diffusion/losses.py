"""The losses, as small functions in the papers' notation.

dsm_loss            L_dsm: trains every score model (teacher, degradation path, fake score); DisBack Eq. 5 and 7.
Generator losses, one per method; each takes the generator's samples x0 and the fake and target denoisers' outputs
on x_sigma = x0 + sigma n. The score of a denoiser is (D - x) / sigma^2, so D_fake - D_target = sigma^2 (s_fake -
s_target), the direction in which the KL divergence from the target grows.
vsd_generator_loss  Diff-Instruct / VSD: dL/dx0 = D_fake - D_target (the score difference, weight sigma^2).
dmd_generator_loss  DMD (and DisBack Eq. 8): the same, normalised per sample by 1 / mean|x0 - D_target|.
sid_generator_loss  SiD: a Fisher-divergence loss whose gradient flows through the score networks' inputs.
gan_*_loss          DMD2's GAN term: non-saturating logistic losses of a head on the fake score's features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def lognormal_sigma(n: int, p_mean: float, p_std: float, device=None, generator=None) -> torch.Tensor:
    """ln(sigma) ~ N(p_mean, p_std^2), EDM's training distribution of noise levels."""
    return (p_mean + p_std * torch.randn(n, device=device, generator=generator)).exp()


def karras_sigma(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device=None, generator=None
) -> torch.Tensor:
    """Noise levels uniform in the Karras schedule's parameter, as DMD2's EDM trainer draws them."""
    u = torch.rand(n, device=device, generator=generator)
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def weighted_mse(a: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """mean of lambda(sigma) ||a - b||^2 / dim, lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (EDM's weight, which
    makes every noise level count alike). Between two denoisers' outputs it is a distance between their scores."""
    s = sigma.reshape(-1, *([1] * (a.ndim - 1)))
    return ((s**2 + sigma_data**2) / (s * sigma_data) ** 2 * (a - b) ** 2).mean()


def dsm_loss(
    denoiser: nn.Module,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    sigma_data: float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_dsm = lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    return weighted_mse(denoiser(x0 + s * noise, sigma, labels), x0, sigma, sigma_data)


def _along(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient with respect to x0 is ``grad`` / x0.numel() (DMD's way of applying a score gradient)."""
    grad = torch.nan_to_num(grad.detach())
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def _per_sample_mean_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True).clamp_min(1e-5)


def vsd_generator_loss(x0: torch.Tensor, d_fake: torch.Tensor, d_target: torch.Tensor, **_) -> torch.Tensor:
    """Diff-Instruct / VSD: dL/dx0 = D_fake - D_target. d_fake and d_target are computed without gradient."""
    return _along(x0, d_fake - d_target)


def dmd_generator_loss(x0: torch.Tensor, d_fake: torch.Tensor, d_target: torch.Tensor, **_) -> torch.Tensor:
    """DMD: dL/dx0 = w (D_fake - D_target), w = 1 / mean|x0 - D_target| per sample, which evens out the gradient's
    scale across noise levels and samples. d_fake and d_target are computed without gradient."""
    with torch.no_grad():
        weight = 1.0 / _per_sample_mean_abs(x0 - d_target)
    return _along(x0, weight * (d_fake - d_target))


def sid_generator_loss(
    x0: torch.Tensor, d_fake: torch.Tensor, d_target: torch.Tensor, *, alpha: float = 1.2, **_
) -> torch.Tensor:
    """Score identity Distillation (Zhou et al. 2024, Eq. 9-10):

        L = (1 - alpha) ||D_t - D_f||^2 + (D_t - D_f) . (D_f - x0)  =  (D_t - D_f) . ((D_t - x0) - alpha (D_t - D_f)),

    divided per sample by mean|x0 - D_t| (no gradient). Unlike VSD and DMD, d_fake and d_target must be computed
    WITH gradient through x_sigma = x0 + sigma n (the networks' weights frozen): the loss differentiates the scores.
    """
    diff = d_target - d_fake
    with torch.no_grad():
        weight = 1.0 / _per_sample_mean_abs(x0 - d_target)
    return (weight * diff * ((d_target - x0) - alpha * diff)).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic loss of the head: real -> positive logits, generated -> negative."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side: make the head call its samples real."""
    return F.softplus(-logits_fake).mean()


GENERATOR_LOSSES = {
    "vsd": vsd_generator_loss,
    "dmd": dmd_generator_loss,
    "sid": sid_generator_loss,
}  # choices.METHODS' losses
