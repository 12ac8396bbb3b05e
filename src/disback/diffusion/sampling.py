"""Samplers. The teacher is sampled with EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1)."""

from __future__ import annotations

import torch
from torch import nn


def karras_schedule(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_0 = sigma_max > ... > sigma_{steps-1} = sigma_min, followed by 0."""
    i = torch.arange(steps, dtype=torch.float64)
    sig = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(
    denoiser: nn.Module, z: torch.Tensor, sigmas: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigmas[0] down to 0."""
    x = z.double() * sigmas[0]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - _denoise(denoiser, x, s_cur, labels)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:  # second-order correction, except at the last step
            d_next = (x_next - _denoise(denoiser, x_next, s_next, labels)) / s_next
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(z.dtype)


def _denoise(denoiser: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    dtype = next(denoiser.parameters()).dtype
    s = torch.full((x.shape[0],), float(sigma), dtype=dtype, device=x.device)
    return denoiser(x.to(dtype), s, labels).double()
