"""Backbones F(x_in, c_noise): an MLP for points, diffusers' UNet2DModel for images. Preconditioning lives in
disback.diffusion.denoisers, never here."""

from __future__ import annotations

from torch import nn

from disback.config import NetworkConfig
from disback.diffusion.networks.mlp import MLP
from disback.errors import DisbackError


def build_backbone(cfg: NetworkConfig, shape: tuple[int, ...]) -> nn.Module:
    if cfg.kind == "mlp":
        if len(shape) != 1:
            raise DisbackError(
                f"the mlp network takes points (N x D), not data of shape {shape}; use an image preset (--preset digits)"
            )
        return MLP(shape[0], hidden=cfg.hidden, depth=cfg.depth, emb_dim=cfg.emb_dim)
    if cfg.kind == "unet":
        if len(shape) != 3:
            raise DisbackError(
                f"the unet network takes images (C x H x W), not data of shape {shape}; use a point preset (--preset toy2d)"
            )
        from disback.diffusion.networks.unet import UNetBackbone, make_unet

        return UNetBackbone(make_unet(cfg, shape))
    raise DisbackError(f"unknown network kind '{cfg.kind}'; available: mlp, unet")
