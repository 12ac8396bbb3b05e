"""diffusers' UNet2DModel as an EDM backbone F(x_in, c_noise)."""

from __future__ import annotations

import torch
from torch import nn

from disback.config import NetworkConfig

# c_noise = ln(sigma)/4 lies in about [-1.6, 1.1]; the UNet's sinusoidal timestep embedding is built for values in the
# hundreds (DDPM's t), so c_noise is stretched before it goes in.
NOISE_SCALE = 250.0


def make_unet(cfg: NetworkConfig, shape: tuple[int, ...]):
    from diffusers import UNet2DModel

    channels, size = shape[0], shape[-1]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=cfg.norm_groups,
        attention_head_dim=8,
        add_attention=any(cfg.attention),  # the mid-block's attention follows the levels'
        num_class_embeds=cfg.num_classes or None,
    )


class UNetBackbone(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, c_noise * NOISE_SCALE, class_labels=labels).sample
