"""EDM preconditioning (Karras et al. 2022, Table 1) around any backbone F(x_in, c_noise).

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

The score of the noised distribution is (D(x; sigma) - x) / sigma^2.
"""

from __future__ import annotations

import torch
from torch import nn

from disback.config import NetworkConfig
from disback.diffusion.networks import build_backbone


class EDMDenoiser(nn.Module):
    def __init__(self, backbone: nn.Module, sigma_data: float):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1.0 / (s**2 + sd2).sqrt()
        c_noise = sigma.log() / 4.0
        return c_skip * x + c_out * self.backbone(c_in * x, c_noise, labels)


def build_denoiser(network: NetworkConfig, shape: tuple[int, ...], sigma_data: float) -> EDMDenoiser:
    """Our backbone for ``network`` under EDM preconditioning."""
    return EDMDenoiser(build_backbone(network, tuple(shape)), sigma_data)


class VPDenoiser(nn.Module):
    """A diffusers UNet trained on a discrete VP schedule, seen as a denoiser D(x; sigma), as k-diffusion does.

    With abar_t the schedule's cumulative alphas, sigma_t = sqrt((1 - abar_t) / abar_t); the UNet sees
    x_t = x * sqrt(abar) = x / sqrt(1 + sigma^2) at the (continuous) timestep whose sigma_t is sigma.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type '{prediction_type}'")
        self.unet = unet
        self.prediction_type = prediction_type
        abar = alphas_cumprod.double()
        log_sigmas = ((1 - abar) / abar).sqrt().log()
        self.register_buffer("log_sigmas", log_sigmas.to(torch.get_default_dtype()))  # float64 under fp64

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Linear interpolation of ln(sigma) in the schedule's table, clamped to its range."""
        log_s = sigma.log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_s.contiguous()).clamp(1, len(self.log_sigmas) - 1)
        lo_v, hi_v = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        return (hi - 1).to(sigma.dtype) + (log_s - lo_v) / (hi_v - lo_v)

    def call_unet(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The UNet's raw output at diffusers' input scaling and (continuous) timestep; subclasses add conditions."""
        return self.unet(x_t, t, class_labels=labels).sample

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        out = self.call_unet(x / (s**2 + 1).sqrt(), self.sigma_to_t(sigma), labels)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":  # x0 = abar * x - sqrt(1 - abar) * v, abar = 1 / (1 + sigma^2)
            return x / (s**2 + 1) - s / (s**2 + 1).sqrt() * out
        return out


class FlowDenoiser(nn.Module):
    """A rectified-flow model (SD3, FLUX.1: x_t = (1 - t) x0 + t n, the network predicting the velocity v = n - x0)
    seen as a denoiser D(x; sigma) in EDM's units:

        sigma = t / (1 - t),  x_t = x_sigma / (1 + sigma),  D(x_sigma; sigma) = x_t - t v(x_t, t)

    (x_sigma = x0 + sigma n is x_t / (1 - t)). The network sees the true t; a teacher trained with shifted timesteps
    differs in which t it was trained and sampled at, not in this map. ``call_model`` is the network's raw velocity
    at flow time ``t`` in [0, 1]; subclasses add its conditions (prompts, latent packing)."""

    def call_model(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def flow_x0(self, x_t: torch.Tensor, t: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The denoised estimate at flow time ``t`` (per sample, or one for all), in the flow's own units: x_t - t v;
        defined at t = 1 (pure noise) too, where EDM's sigma is infinite."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        return x_t - t.reshape(-1, *([1] * (x_t.ndim - 1))) * self.call_model(x_t, t, labels)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return self.flow_x0(x / (1 + s), sigma / (1 + sigma), labels)
