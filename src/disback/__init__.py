"""disback: distill a diffusion model into a one-step generator with Distribution Backtracking."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load_denoiser"]

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn


def load_denoiser(path: str | Path) -> nn.Module:
    """A denoiser D(x, sigma, class_labels=None) in EDM's convention from an EDM / EDM2 network snapshot (path or URL,
    read without running anything it carries), a disback model file or run folder, or a diffusers UNet folder
    (disback.storage.load). Imported on first use, so that ``import disback`` stays light."""
    from disback.storage.load import load_denoiser as load

    return load(path)
