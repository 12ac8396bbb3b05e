"""A one-step generator as a diffusers pipeline: one UNet call on pure noise (or a few, for a k-step generator).

This file is self-contained (torch and diffusers only): `disback export` copies it into the exported folder as
pipeline.py, so that the folder loads without disback installed:

    pipe = DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)
    images = pipe(batch_size=16).images

With disback installed, ``disback.jobs.pipeline_onestep.OneStepPipeline.from_pretrained(DIR)`` does the same.
"""

from __future__ import annotations

import math

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


def _as_list(value: float | list[float]) -> list[float]:
    """A per-step setting as a list: a number is a one-step generator's (all that exports before k steps hold)."""
    return [value] if isinstance(value, (int, float)) else list(value)


class OneStepPipeline(DiffusionPipeline):  # the name exported folders record: k-step generators keep it
    """x0 = D(sigma_g * z; sigma_g), with D the generator's UNet under its preconditioning:

    - "edm": D = c_skip x + c_out UNet(c_in x, timestep)  (EDM, Karras et al. 2022)
    - "vp":  the UNet predicts epsilon, v or x0 on a discrete VP schedule; its input is x / sqrt(1 + sigma^2)
    ``timestep`` is the UNet's time input at sigma_g, fixed at export.

    A k-step generator (DMD2's few-step students) has a descending list of levels in ``sigma_g`` and the UNet's time
    input at each in ``timestep``; it denoises, re-noises with fresh unit noise at the next level, and so on:

        x = sigma_0 z;  x0_j = D(x; sigma_j);  x = x0_j + sigma_{j+1} n_j;  the sample is the last x0_j
    """

    def __init__(
        self,
        unet: UNet2DModel,
        preconditioning: str = "edm",
        sigma_g: float | list[float] = 2.5,
        sigma_data: float = 0.5,
        timestep: float | list[float] = 0.0,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        self.register_modules(unet=unet)
        self.register_to_config(
            preconditioning=preconditioning,
            sigma_g=sigma_g,
            sigma_data=sigma_data,
            timestep=timestep,
            prediction_type=prediction_type,
        )

    @property
    def levels(self) -> list[tuple[float, float]]:
        """(sigma, the UNet's timestep) of each step; a number in the config is a one-step generator's."""
        sigmas, times = _as_list(self.config.sigma_g), _as_list(self.config.timestep)
        if len(sigmas) != len(times):
            raise ValueError(f"the config has {len(sigmas)} noise levels (sigma_g) but {len(times)} timesteps")
        return [(float(s), float(t)) for s, t in zip(sigmas, times)]

    @property
    def steps(self) -> int:
        return len(self.levels)

    def denoise_at(
        self, x: torch.Tensor, sigma: float, timestep: float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """D(x; sigma): the denoised estimate of ``x`` at noise level ``sigma`` (the UNet at ``timestep``)."""
        c, s = self.config, sigma
        t = torch.full((x.shape[0],), timestep, device=x.device, dtype=x.dtype)
        if c.preconditioning == "edm":
            sd2 = c.sigma_data**2
            out = self.unet(x / math.sqrt(s**2 + sd2), t, class_labels=class_labels).sample
            return sd2 / (s**2 + sd2) * x + s * c.sigma_data / math.sqrt(s**2 + sd2) * out
        out = self.unet(x / math.sqrt(s**2 + 1), t, class_labels=class_labels).sample
        if c.prediction_type == "epsilon":
            return x - s * out
        if c.prediction_type == "v_prediction":
            return x / (s**2 + 1) - s / math.sqrt(s**2 + 1) * out
        return out

    def denoise(
        self,
        z: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """The generator's output in model space ([-1, 1] for images) from starting noise ``z``: ``noise`` is the
        fresh noise of steps 1, 2, ... (N x (steps - 1) x C x H x W), drawn from ``generator`` when not given."""
        levels = self.levels
        if noise is None and len(levels) > 1:
            shape = (z.shape[0], len(levels) - 1, *z.shape[1:])
            noise = randn_tensor(shape, generator=generator, device=z.device, dtype=z.dtype)
        x = levels[0][0] * z
        for j, (sigma, timestep) in enumerate(levels):
            x0 = self.denoise_at(x, sigma, timestep, class_labels)
            if j + 1 < len(levels):  # no noise after the last step: its estimate is the sample
                x = x0 + levels[j + 1][0] * noise[:, j].to(x0)
        return x0

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        class_labels: torch.Tensor | list[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """``class_labels`` for a class-conditional UNet: one per image; by default 0, 1, 2, ... in turn.

        ``noise``: the starting noise (N x C x H x W; a k-step generator draws its fresh noise from ``generator``),
        or all of it (N x steps x C x H x W: sample i's starting noise, then its fresh noise of steps 1, 2, ...).
        Without it, all of it is drawn from ``generator`` at once in that layout, as ``torch.randn(N, steps, C, H,
        W, generator=generator)``: the same draws as disback's ``sample`` and the exported EDM ``generate.py``."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        if noise is None:
            every = (batch_size, self.steps, *shape[1:])
            noise = randn_tensor(every, generator=generator, device=self.device, dtype=self.unet.dtype)
        noise = noise.to(self.device, self.unet.dtype)
        z, fresh = (noise[:, 0], noise[:, 1:]) if noise.ndim == len(shape) + 1 else (noise, None)
        classes = self.unet.config.num_class_embeds
        if classes and class_labels is None:
            class_labels = torch.arange(batch_size) % classes
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=self.device)
        images = (self.denoise(z, class_labels, fresh, generator) / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
