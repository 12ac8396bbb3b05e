"""DMD2's GAN term: a small classifier head on the fake score's bottleneck features.

The head and the fake score are trained together (the head's loss flows into the fake score's encoder, as in DMD2);
the generator gets the non-saturating loss through the same frozen path. Features are taken with a forward hook on
the backbone's bottleneck, so no backbone needs a special forward.
"""

from __future__ import annotations

import torch
from torch import nn


def bottleneck(denoiser: nn.Module) -> tuple[nn.Module, bool]:
    """The module that carries the backbone's deepest features, and whether they are its input (rather than its
    output): a diffusers UNet's mid-block output; in EDM's and EDM2's UNets the decoder's second block at the lowest
    resolution ("in1", after "in0": their middle, where DMD2 takes its bottleneck); the input of an MLP's output
    layer (its last hidden state); in a diffusion transformer (SD3, FLUX.1) the middle block of its
    ``transformer_blocks``."""
    modules = dict(denoiser.named_modules())
    for name, module in modules.items():
        if name.endswith("mid_block") or (name.split(".")[-1].endswith("_in1") and ".dec." in f".{name}"):
            return module, False
    for name, module in modules.items():
        if name.split(".")[-1] == "transformer_blocks" and isinstance(module, nn.ModuleList) and len(module):
            return module[len(module) // 2], False
    for name, module in modules.items():
        if name.endswith("backbone.out") and isinstance(
            getattr(module, "base_layer", module), nn.Linear
        ):  # LoRA-wrapped too
            return module, True
    raise ValueError(f"no bottleneck found in {type(denoiser).__name__}; the GAN term needs a UNet or the MLP backbone")


class FeatureTap:
    """Keeps the features last seen by a module (a forward hook; a pre-hook when they are its input). A transformer
    block's output (text and image tokens, a tuple) gives its image tokens, averaged over the tokens."""

    def __init__(self, module: nn.Module, inputs: bool = False):
        self.features: torch.Tensor | None = None
        if inputs:
            module.register_forward_pre_hook(lambda mod, args: self._keep(args[0]))
        else:
            module.register_forward_hook(lambda mod, args, output: self._keep(output))

    def _keep(self, features: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        if isinstance(features, tuple):  # diffusers' joint blocks return (text tokens, image tokens)
            features = features[-1]
        self.features = features.mean(dim=1) if features.ndim == 3 else features

    def take(self) -> torch.Tensor:
        features, self.features = self.features, None
        if features is None:
            raise RuntimeError("the fake score has not run since the features were last taken")
        return features


class GANHead(nn.Module):
    """Features (B, C) or (B, C, H, W) -> one logit per sample."""

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        if spatial:
            groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
            self.body = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.GroupNorm(groups, channels),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
        else:
            self.body = nn.Sequential(nn.Linear(channels, channels), nn.SiLU())
        self.logit = nn.Linear(channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit(self.body(features)).squeeze(1)


def head_for(
    denoiser: nn.Module, probe_input: torch.Tensor, sigma: float, labels: torch.Tensor | None = None
) -> tuple[GANHead, FeatureTap]:
    """A head sized by running the denoiser once on ``probe_input``, and the tap that feeds it."""
    tap = FeatureTap(*bottleneck(denoiser))
    with torch.no_grad():
        denoiser(probe_input, torch.full((len(probe_input),), sigma, device=probe_input.device), labels)
    features = tap.take()
    return GANHead(features.shape[1], spatial=features.ndim == 4).to(probe_input.device), tap
