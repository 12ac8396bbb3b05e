"""The losses, as small functions in the paper's notation.

dsm_loss            L_dsm: trains every score model (teacher, degradation path, fake score); paper Eq. 5 and 7.
dmd_generator_loss  L_G: moves the generator along D_fake - D_target, DMD-normalised; paper Eq. 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def lognormal_sigma(n: int, p_mean: float, p_std: float, device=None, generator=None) -> torch.Tensor:
    """ln(sigma) ~ N(p_mean, p_std^2), EDM's training distribution of noise levels."""
    return (p_mean + p_std * torch.randn(n, device=device, generator=generator)).exp()


def karras_sigma(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device=None, generator=None) -> torch.Tensor:
    """Noise levels uniform in the Karras schedule's parameter, as DMD2's EDM trainer draws them."""
    u = torch.rand(n, device=device, generator=generator)
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def dsm_loss(denoiser: nn.Module, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, sigma_data: float,
             labels: torch.Tensor | None = None) -> torch.Tensor:
    """lambda(sigma) * ||D(x0 + sigma n; sigma) - x0||^2 with lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    return (weight * (denoiser(x0 + s * noise, sigma, labels) - x0) ** 2).mean()


def dmd_generator_loss(x0: torch.Tensor, d_fake: torch.Tensor, d_target: torch.Tensor) -> torch.Tensor:
    """DMD's loss: dL/dx0 is proportional to w (D_fake - D_target), w = 1 / mean|x0 - D_target| per sample.

    d_fake and d_target must be computed without gradient; only x0 carries it back to the generator.
    """
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = 1.0 / (x0 - d_target).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
        grad = torch.nan_to_num(weight * (d_fake - d_target))
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())
