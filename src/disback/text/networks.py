"""The text-to-image networks, and the model kind "text" that rebuilds them from their files.

TextDenoiser      the UNet2DConditionModel (SD1.5, SDXL) as a VP denoiser D(x; sigma, prompt); with ``guidance`` > 1
                  it returns the guided D_uncond + w (D_cond - D_uncond). The target has guidance (text.guidance, 8
                  in the original); the fake score and the degrading model have none.
FlowTextDenoiser  an SD3 or FLUX.1 transformer as a rectified-flow denoiser, guided the same way (SD3), or given
                  FLUX.1-dev's embedded guidance value (every network: it is an input of the network, not a mix).
LCMGenerator      G(z, prompt): the UNet at fixed timesteps (text.timestep: 399, or a list for k steps) from z,
                  computed exactly as diffusers' LCMScheduler samples, so the exported pipeline reproduces the
                  generator. A flow teacher's generator is the core's FlowGenerator at t = timestep / 1000.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from disback.diffusion.denoisers import FlowDenoiser, VPDenoiser
from disback.diffusion.generator import FewStepGenerator, FlowGenerator
from disback.errors import DisbackError
from disback.storage.meta import ModelMeta
from disback.text.families import FAMILIES
from disback.text.prompts import Prompts

TIMESTEP_ALPHAS = "timestep_alphas_cumprod"  # a text model's spec: LCMScheduler's abar at each of text.timestep's


class Guided(nn.Module):
    """A text denoiser whose ``labels`` are prompt indices (rows of ``prompts``), classifier-free guided when
    ``guidance`` > 1: D_uncond + w (D_cond - D_uncond), the unconditional input being the table's last row."""

    prompts: Prompts
    guidance: float

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.guidance <= 1:
            return super().forward(x, sigma, labels)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        uncond = torch.full_like(_prompts(labels), len(self.prompts))
        both = super().forward(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, uncond]))
        cond, free = both.chunk(2)
        return free + self.guidance * (cond - free)


class TextDenoiser(Guided, VPDenoiser):
    """A UNet2DConditionModel as a VP denoiser whose ``labels`` are prompt indices."""

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


class FlowTextDenoiser(Guided, FlowDenoiser):
    """An SD3 or FLUX.1 transformer as a rectified-flow denoiser whose ``labels`` are prompt indices. It is called
    as its pipeline calls it: SD3 on the latents with timestep 1000 t; FLUX.1 on the latents packed 2 x 2 into tokens,
    with their position ids, timestep t and, for dev, the embedded guidance value ``embedded_guidance``."""

    def __init__(
        self,
        transformer: nn.Module,
        family: str,
        prompts: Prompts,
        guidance: float = 0.0,
        embedded_guidance: float = 0.0,
    ):
        super().__init__()
        self.transformer, self.family = transformer, family
        self.prompts, self.guidance, self.embedded_guidance = prompts, guidance, embedded_guidance

    def call_model(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        family = FAMILIES[self.family]
        embeds, pooled = self.prompts.rows(_prompts(labels).to(x_t.device), x_t.dtype)
        timestep = t * family.time_scale
        if not family.packed:
            return self.transformer(
                hidden_states=x_t,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=timestep,
                return_dict=False,
            )[0]
        n, _, h, w = x_t.shape
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.embedded_guidance, dtype=x_t.dtype, device=x_t.device)
        out = self.transformer(
            hidden_states=pack(x_t),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=image_ids(h, w, x_t.device, x_t.dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack(out, h, w)


def pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX.1's tokens: latents (N, C, H, W) as (N, H/2 * W/2, 4C), each token a 2 x 2 patch (FluxPipeline's)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``pack``'s inverse: tokens (N, H/2 * W/2, 4C) as latents (N, C, H, W)."""
    n, _, d = tokens.shape
    c = d // 4
    return tokens.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX.1's position ids of the packed tokens of H x W latents: (0, row, column) for each 2 x 2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


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
    """Classifier-free guidance at ``scale`` on every text denoiser inside ``target`` (the target score only), for
    the families guided so; FLUX.1's guidance is embedded in every network at the teacher's import instead."""
    for module in target.modules():
        if isinstance(module, TextDenoiser) or (
            isinstance(module, FlowTextDenoiser) and FAMILIES[module.family].guidance == "cfg"
        ):
            module.guidance = scale
    return target


def rebuild(meta: ModelMeta, folder: Path) -> TextDenoiser | FlowTextDenoiser:
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
    prompts = Prompts.load(table)
    if "family" in spec:  # a flow transformer (SD1.5 and SDXL files predate the key)
        network = FAMILIES[spec["family"]].network_type().from_config(spec["network_config"])
        return FlowTextDenoiser(network, spec["family"], prompts, embedded_guidance=spec["embedded_guidance"])
    unet = UNet2DConditionModel.from_config(spec["unet_config"])
    # the schedule is a buffer, loaded with the weights
    return TextDenoiser(unet, torch.full((spec["num_timesteps"],), 0.5), spec["prediction_type"], prompts)


def generator(denoiser: nn.Module, meta: ModelMeta, sigma_g: float | list[float]) -> FewStepGenerator:
    """A text denoiser's generator runs at the fixed timesteps of its file (text.timestep), not at sigma_g: LCM's
    for a UNet, flow times timestep / 1000 for a transformer."""
    if isinstance(sigma_g, (list, tuple)):
        raise DisbackError(
            f"distill.sigma_g={list(sigma_g)}: a text generator's steps are text.timestep, fixed when its teacher was "
            "imported; leave distill.sigma_g a number and run `disback text` with --set text.timestep=[...]"
        )
    timesteps = meta.spec["timestep"]
    if isinstance(denoiser, FlowTextDenoiser):
        return FlowGenerator(denoiser, [t / 1000 for t in (timesteps if isinstance(timesteps, list) else [timesteps])])
    return LCMGenerator(denoiser, timesteps, meta.spec.get(TIMESTEP_ALPHAS))
