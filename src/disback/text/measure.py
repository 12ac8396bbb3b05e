"""A text run's measure at each evaluation (``eval.clip``): its latents decoded by the pipeline's VAE and scored with
CLIP against their prompts. Evaluation sample i has prompt i modulo the table's rows (the balanced labels of
stages.common.eval_noise), so the n_eval samples cover a fixed subset of the prompts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from disback.metrics.clip import ClipScore
from disback.text.prompts import load_component


class LatentClip:
    def __init__(self, pipeline: str, clip: str, prompts: list[str], batch: int = 8):
        from diffusers import AutoencoderKL

        self.vae = load_component(AutoencoderKL, pipeline, "vae").eval().requires_grad_(False)
        self.score, self.prompts, self.batch = ClipScore(clip), prompts, batch
        self.vae.to(self.score.device)

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the network's units ((VAE latent - shift) x scale: SD3's and FLUX's VAEs have a shift) -> images
        N x 3 x H x W in [0, 1]."""
        out = []
        scale, shift = self.vae.config.scaling_factor, self.vae.config.get("shift_factor") or 0.0
        for i in range(0, len(latents), self.batch):
            x = latents[i : i + self.batch].to(self.score.device, self.vae.dtype) / scale + shift
            out.append((self.vae.decode(x).sample.float() / 2 + 0.5).clamp(0, 1).cpu())
        return torch.cat(out)

    def __call__(self, samples: np.ndarray) -> dict[str, float]:
        if not np.isfinite(samples).all():
            return {"clip_score": float("nan")}
        images = self.images(torch.as_tensor(samples, dtype=torch.float32))
        return {"clip_score": self.score(images, [self.prompts[i % len(self.prompts)] for i in range(len(images))])}

    @property
    def info(self) -> dict[str, Any]:
        return self.score.info
