"""EDM's Heun sampler, deterministic and with churn, on a distribution whose exact denoiser is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disback.diffusion.sampling import heun_sample, karras_schedule


class Gaussian(nn.Module):
    """The exact denoiser of N(0, s^2 I): D(x; sigma) = x s^2 / (s^2 + sigma^2)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = nn.Parameter(torch.tensor(std), requires_grad=False)  # the sampler reads the dtype off a parameter

    def forward(self, x, sigma, labels=None):
        s2 = self.std**2
        return x * s2 / (s2 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2)


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_heun_sampler_with_and_without_churn_draws_the_right_distribution(churn):
    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    sigmas = karras_schedule(128, 0.002, 80.0)  # Heun's error is second order: 1.6% at 32 steps, 0.09% at 128
    x = heun_sample(Gaussian(0.5), z, sigmas, churn=churn, s_min=0.05, s_max=50, s_noise=1.0, seed=3)
    assert float(x.std()) == pytest.approx(0.5, rel=0.03)
    if churn == 0:  # the ODE maps each noise to its own sample: x = 0.5 z up to the discretisation
        torch.testing.assert_close(x, 0.5 * z * 80 / (80**2 + 0.25) ** 0.5, atol=2e-3, rtol=2e-3)
    else:  # the added noise makes samples depend on more than their starting noise, reproducibly by seed
        assert float((x - 0.5 * z).abs().mean()) > 0.05
        again = heun_sample(Gaussian(0.5), z, sigmas, churn=churn, s_min=0.05, s_max=50, seed=3)
        torch.testing.assert_close(x, again, atol=0, rtol=0)
