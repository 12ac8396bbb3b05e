"""A one-step generator as a diffusers pipeline: one UNet call on pure noise.

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


class OneStepPipeline(DiffusionPipeline):
    """x0 = D(sigma_g * z; sigma_g), with D the generator's UNet under its preconditioning:

    - "edm": D = c_skip x + c_out UNet(c_in x, timestep)  (EDM, Karras et al. 2022)
    - "vp":  the UNet predicts epsilon, v or x0 on a discrete VP schedule; its input is x / sqrt(1 + sigma^2)
    ``timestep`` is the UNet's time input at sigma_g, fixed at export.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        preconditioning: str = "edm",
        sigma_g: float = 2.5,
        sigma_data: float = 0.5,
        timestep: float = 0.0,
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

    def denoise(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The generator's output in model space ([-1, 1] for images)."""
        c, s = self.config, float(self.config.sigma_g)
        x = s * z
        t = torch.full((z.shape[0],), float(c.timestep), device=z.device, dtype=z.dtype)
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

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        class_labels: torch.Tensor | list[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """``class_labels`` for a class-conditional UNet: one per image; by default 0, 1, 2, ... in turn."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        z = (
            noise
            if noise is not None
            else randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        )
        classes = self.unet.config.num_class_embeds
        if classes and class_labels is None:
            class_labels = torch.arange(batch_size) % classes
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=self.device)
        images = (self.denoise(z.to(self.device, self.unet.dtype), class_labels) / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
