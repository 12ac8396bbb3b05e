"""An MLP backbone for point data: F(x_in, c_noise) with a sinusoidal embedding of the noise level."""

from __future__ import annotations

import math

import torch
from torch import nn


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise (= ln(sigma)/4 under EDM), as in transformer positional embeddings."""

    def __init__(self, dim: int, max_period: float = 100.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = 10.0 * c_noise[:, None] * self.freqs[None]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, emb_dim: int = 32):
        super().__init__()
        self.embed = NoiseEmbedding(emb_dim)
        self.noise_proj = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            raise ValueError("the MLP backbone is unconditional")
        h = self.inp(x) + self.noise_proj(self.embed(c_noise))
        for block in self.blocks:
            h = h + block(self.act(h))  # residual blocks keep a deep MLP easy to train from scratch
        return self.out(self.act(h))
