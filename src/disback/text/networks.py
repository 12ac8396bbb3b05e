"""The text-to-image networks, and the model kind "text" that rebuilds them from their files.

TextDenoiser  the UNet2DConditionModel as a VP denoiser D(x; sigma, prompt); with ``guidance`` > 1 it returns the
              guided D_uncond + w (D_cond - D_uncond). The target has guidance (text.guidance, 8 in the original);
              the fake score and the degrading model have none.
LCMGenerator  G(z, prompt): the UNet at fixed timesteps (text.timestep: 399, or a list for k steps) from z, computed
              exactly as diffusers' LCMScheduler samples, so the exported pipeline reproduces the generator.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from disback.diffusion.denoisers import VPDenoiser
from disback.diffusion.generator import FewStepGenerator
from disback.errors import DisbackError
from disback.storage.meta import ModelMeta
from disback.text.prompts import Prompts

TIMESTEP_ALPHAS = "timestep_alphas_cumprod"  # a text model's spec: LCMScheduler's abar at each of text.timestep's


class TextDenoiser(VPDenoiser):
    """A UNet2DConditionModel as a VP denoiser whose ``labels`` are prompt indices; classifier-free guided when
    ``guidance`` > 1."""

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        prompts: Prompts,
        guidance: float = 0.0,
    ):
        super().__init__(unet, alphas_cumprod, prediction_type)
        self.prompts, self.guidance = prompts, guidance

    def call_unet(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.unet(x_t, t, **self.prompts.conditions(_prompts(labels).to(x_t.device), x_t.dtype)).sample

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.guidance <= 1:
            return super().forward(x, sigma, labels)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        uncond = torch.full_like(_prompts(labels), len(self.prompts))
        both = super().forward(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, uncond]))
        cond, free = both.chunk(2)
        return free + self.guidance * (cond - free)


def _prompts(labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        raise ValueError("a text-conditional network needs prompt indices as its labels")
    return labels


class LCMGenerator(FewStepGenerator):
    """G(z, prompt): the UNet at fixed timesteps (text.timestep: one, e.g. 399, or a descending list such as DMD2's
    [999, 749, 499, 249]), each step computed exactly as diffusers' LCMScheduler.step does it, so that
    ``pipe(prompt, num_inference_steps=len(ts), guidance_scale=0, timesteps=ts)`` samples this generator:
    x0 from the UNet's prediction, then c_skip x + c_out x0, then (except after the last step) re-noised with fresh
    noise to the next timestep, sqrt(abar) x0 + sqrt(1 - abar) n.

    ``alphas_cumprod``: LCMScheduler's abar at each timestep (float32, as the teacher's import recorded them). The
    scalars are the scheduler's own float32 CPU tensors, operation for operation, so that a float32 rollout equals
    the pipeline's bit for bit: a 4-step rollout amplifies a last-bit difference in abar (1/sqrt(abar) is 14.6 at
    t = 999) to about 1e-5. Without them (a teacher imported before they were recorded) abar comes from the
    denoiser's schedule, which agrees to about 1e-7."""

    def __init__(
        self,
        denoiser: TextDenoiser,
        timestep: int | list[int],
        alphas_cumprod: list[float] | None = None,
        timestep_scaling: float = 10.0,
    ):
        timesteps = [int(t) for t in (timestep if isinstance(timestep, (list, tuple)) else [timestep])]
        super().__init__(denoiser, [float(t) for t in timesteps])  # the levels: LCM's timesteps
        if alphas_cumprod is not None and len(alphas_cumprod) != len(timesteps):
            raise ValueError(f"{len(alphas_cumprod)} values of alphas_cumprod for the timesteps {timesteps}")
        self.timesteps, self.alphas_cumprod, self.timestep_scaling = timesteps, alphas_cumprod, timestep_scaling

    @property
    def timestep(self) -> int | list[int]:
        return self.timesteps[0] if len(self.timesteps) == 1 else list(self.timesteps)

    def start(self, z: torch.Tensor) -> torch.Tensor:
        return z  # LCMScheduler.init_noise_sigma is 1

    def _abar(self, step: int) -> torch.Tensor:
        """abar at step ``step``'s timestep as LCMScheduler holds it: a float32 tensor on the CPU."""
        if self.alphas_cumprod is not None:
            return torch.tensor(self.alphas_cumprod[step], dtype=torch.float32)
        # from the denoiser's schedule (a buffer, loaded with the weights): sigma^2 = (1 - abar) / abar
        log_sigma = self.denoiser.log_sigmas[self.timesteps[step]].detach().cpu().double()
        return (1 / (1 + torch.exp(2 * log_sigma))).float()

    def _boundary(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LCM's c_skip and c_out at timestep ``t`` (sigma_data 0.5), in float32 as the scheduler computes them."""
        scaled = torch.tensor(float(t), dtype=torch.float32) * self.timestep_scaling
        return 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5

    def denoise(self, x: torch.Tensor, step: int, labels: torch.Tensor | None) -> torch.Tensor:
        t = self.timesteps[step]
        out = self.denoiser.call_unet(x, torch.full((len(x),), t, device=x.device), labels)
        alpha_prod, kind = self._abar(step), self.denoiser.prediction_type
        beta_prod = 1 - alpha_prod
        if kind == "epsilon":
            x0 = (x - beta_prod.sqrt() * out) / alpha_prod.sqrt()
        elif kind == "v_prediction":
            x0 = alpha_prod.sqrt() * x - beta_prod.sqrt() * out
        else:
            x0 = out
        c_skip, c_out = self._boundary(t)
        return c_out * x0 + c_skip * x

    def renoise(self, x0: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
        alpha_prod = self._abar(step)
        return alpha_prod.sqrt() * x0 + (1 - alpha_prod).sqrt() * noise


def guide(target: nn.Module, scale: float) -> nn.Module:
    """Classifier-free guidance at ``scale`` on every text denoiser inside ``target`` (the target score only)."""
    for module in target.modules():
        if isinstance(module, TextDenoiser):
            module.guidance = scale
    return target


def rebuild(meta: ModelMeta, folder: Path) -> TextDenoiser:
    """The network a text-to-image model file describes; its prompt table is the file beside the teacher's."""
    from diffusers import UNet2DConditionModel

    spec = meta.spec
    # beside the model file (the teacher's folder), else where the teacher's import wrote it
    table = next((t for t in (Path(folder) / spec["prompts"], Path(spec["prompts_path"])) if t.is_file()), None)
    if table is None:
        raise DisbackError(
            f"{spec['prompts_path']} is missing: a text-to-image model needs the prompt table that "
            "`disback text` wrote beside its teacher"
        )
    unet = UNet2DConditionModel.from_config(spec["unet_config"])
    # the schedule is a buffer, loaded with the weights
    return TextDenoiser(unet, torch.full((spec["num_timesteps"],), 0.5), spec["prediction_type"], Prompts.load(table))


def generator(denoiser: TextDenoiser, meta: ModelMeta, sigma_g: float | list[float]) -> LCMGenerator:
    """A text denoiser's generator runs at the fixed timesteps of its file (text.timestep), not at sigma_g."""
    return LCMGenerator(denoiser, meta.spec["timestep"], meta.spec.get(TIMESTEP_ALPHAS))
