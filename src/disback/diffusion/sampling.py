"""Samplers. The teacher is sampled with EDM's Heun sampler (Karras et al. 2022): deterministic (Algorithm 1), or with
churn, the stochastic sampler EDM uses for ImageNet-64 (Algorithm 2: S_churn, S_min, S_max, S_noise)."""

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
    denoiser: nn.Module,
    z: torch.Tensor,
    sigmas: torch.Tensor,
    labels: torch.Tensor | None = None,
    churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = float("inf"),
    s_noise: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigmas[0] down to 0. With
    ``churn`` > 0, noise is first added at each level in [s_min, s_max], raising sigma by a factor of 1 + gamma,
    gamma = min(churn / steps, sqrt(2) - 1) (its draws from a generator seeded with ``seed``)."""
    x = z.double() * sigmas[0]
    steps = len(sigmas) - 1
    gamma_max = min(churn / max(steps, 1), 2**0.5 - 1)
    noise = torch.Generator(device=z.device).manual_seed(seed) if churn > 0 else None
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = gamma_max if churn > 0 and s_min <= s_cur <= s_max else 0.0
        s_hat = s_cur * (1 + gamma)
        if gamma > 0:  # back up the ODE by adding noise: from s_cur to s_hat
            eps = torch.randn(x.shape, generator=noise, device=x.device, dtype=x.dtype)
            x = x + (s_hat**2 - s_cur**2).sqrt() * s_noise * eps
        d_cur = (x - _denoise(denoiser, x, s_hat, labels)) / s_hat
        x_next = x + (s_next - s_hat) * d_cur
        if s_next > 0:  # second-order correction, except at the last step
            d_next = (x_next - _denoise(denoiser, x_next, s_next, labels)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(z.dtype)


def churn_of(edm: dict) -> dict:
    """A model file's (or EDMConfig's) stochastic-sampler settings as ``heun_sample`` takes them (none: Algorithm 1)."""
    return {
        "churn": float(edm.get("s_churn", 0.0)),
        "s_min": float(edm.get("s_min", 0.0)),
        "s_max": float(edm.get("s_max", float("inf"))),
        "s_noise": float(edm.get("s_noise", 1.0)),
    }


def _denoise(denoiser: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    dtype = next(denoiser.parameters()).dtype
    s = torch.full((x.shape[0],), float(sigma), dtype=dtype, device=x.device)
    return denoiser(x.to(dtype), s, labels).double()
