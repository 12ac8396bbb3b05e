"""Backbones F(x_in, c_noise). Preconditioning lives in disback.denoiser, never here."""

from __future__ import annotations

from torch import nn

from disback.config import NetworkConfig
from disback.errors import DisbackError
from disback.networks.mlp import MLP


def build_backbone(cfg: NetworkConfig, dim: int) -> nn.Module:
    if cfg.kind == "mlp":
        return MLP(dim, hidden=cfg.hidden, depth=cfg.depth, emb_dim=cfg.emb_dim)
    raise DisbackError(f"unknown network kind '{cfg.kind}'; available: mlp")
