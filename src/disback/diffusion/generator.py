"""The one-step generator G_eta(z) = D_eta(sigma_g z; sigma_g): one denoiser call on pure noise."""

from __future__ import annotations

import torch
from torch import nn


class OneStepGenerator(nn.Module):
    def __init__(self, denoiser: nn.Module, sigma_g: float):
        super().__init__()
        self.denoiser = denoiser  # eta starts as a copy of the teacher's weights
        self.sigma_g = float(sigma_g)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_g, dtype=z.dtype, device=z.device)
        return self.denoiser(self.sigma_g * z, sigma, labels)
