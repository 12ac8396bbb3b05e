"""EDM preconditioning (Karras et al. 2022, Table 1) around any backbone F(x_in, c_noise).

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

The score of the noised distribution is (D(x; sigma) - x) / sigma^2.
"""

from __future__ import annotations

import torch
from torch import nn


class EDMDenoiser(nn.Module):
    def __init__(self, backbone: nn.Module, sigma_data: float):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1.0 / (s**2 + sd2).sqrt()
        c_noise = sigma.log() / 4.0
        return c_skip * x + c_out * self.backbone(c_in * x, c_noise)


def score(denoiser: nn.Module, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """grad_x log p_sigma(x) = (D(x; sigma) - x) / sigma^2."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return (denoiser(x, sigma) - x) / s**2
