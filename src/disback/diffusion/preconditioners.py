"""EDM's and EDM2's preconditioners, under the names and constructor arguments of NVIDIA's checkpoints.

Every preconditioner turns a backbone ``F`` into a denoiser (Karras et al. 2022, Eq. 7 and Table 1):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F((c_in(sigma) x).to(dtype); c_noise(sigma), class_labels)

and differs from the others only in the four coefficients (``coefficients()``):

| class        | c_skip              | c_out                       | c_in               | c_noise                       |
|--------------|---------------------|-----------------------------|--------------------|-------------------------------|
| VPPrecond    | 1                   | -sigma                      | 1/sqrt(sigma^2+1)  | (M-1) sigma_inv(sigma)        |
| VEPrecond    | 1                   | sigma                       | 1                  | ln(sigma/2)                   |
| iDDPMPrecond | 1                   | -sigma                      | 1/sqrt(sigma^2+1)  | M-1-argmin_j abs(sigma-u_j)   |
| EDMPrecond   | sd^2/(sigma^2+sd^2) | sigma sd/sqrt(sigma^2+sd^2) | 1/sqrt(sd^2+sigma^2) | ln(sigma)/4                 |
| Precond      | as EDMPrecond (EDM2)                                                                          |

(sd = sigma_data.) The coefficients and ``D`` are computed in float32 whatever the caller's dtype (float64 inputs
stay float64); the backbone runs
in float16 iff ``use_fp16`` and not ``force_fp32`` and the input is on CUDA, as in EDM. iDDPM's backbone predicts
``2 * img_channels`` channels, of which the first ``img_channels`` are used.

Why these classes rather than disback's own ``EDMDenoiser``: NVIDIA's snapshots name their preconditioner by class
(``EDMPrecond``, ``VPPrecond``, ..., EDM2's ``Precond``), give its constructor arguments (``_init_kwargs``), and key
their weights under its attributes (``model.*`` for EDM, ``unet.*`` / ``logvar_*`` for EDM2, iDDPM's buffer ``u``).
``build_precond(class_name, init_kwargs)`` rebuilds exactly that module, so ``load_state_dict(strict=True)`` holds.
The backbones live elsewhere: EDM's ``SongUNet`` / ``DhariwalUNet`` in ``disback.diffusion.networks.edm`` (looked
up by ``model_type`` when first needed), EDM2's ``UNet`` in ``disback.diffusion.networks.edm2``.

disback's conventions on top of EDM's interface: ``sigma`` may be a float, a 0-dim tensor or a tensor of shape
``[N]`` or ``[N, 1, 1, 1]`` (one sigma broadcasts over the batch, as in EDM); ``class_labels`` may be one-hot /
soft ``[N, label_dim]`` floats, as EDM takes them, or ``[N]`` integer class indices, made one-hot here. Unlike EDM the
backbone's output dtype is not asserted, so that the networks also run under autocast (bfloat16).

Sources: the formulas in the team's reference notes on EDM/EDM2 checkpoints, checked against the stored copies of
NVlabs/edm ``training/networks.py`` and NVlabs/edm2 ``training/networks_edm2.py``. The code is disback's own.

This module and the two network modules import nothing else of disback: ``disback export`` copies them into a folder
that samples without disback (disback.jobs.export_edm), so errors here are Python's own (ValueError, TypeError).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from disback.diffusion.networks.edm2 import MPConv, MPFourier, UNet

__all__ = [
    "PRECONDITIONERS",
    "EDMPrecond",
    "Precond",
    "VEPrecond",
    "VPPrecond",
    "build_precond",
    "iDDPMPrecond",
]

Coefficient = torch.Tensor | float
Coefficients = tuple[Coefficient, Coefficient, Coefficient, torch.Tensor]  # c_skip, c_out, c_in, c_noise


def _edm_network(model_type: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """EDM's backbone class by name (``SongUNet``, ``DhariwalUNet``), or ``model_type`` itself if it is a class or
    factory (any module with EDM's ``forward(x, noise_labels, class_labels, ...)``)."""
    if not isinstance(model_type, str):
        return model_type
    from disback.diffusion.networks.edm import NETWORKS  # the EDM backbones are large modules: only when needed

    if model_type not in NETWORKS:
        raise ValueError(f"unknown EDM network '{model_type}'; available: {', '.join(sorted(NETWORKS))}")
    return NETWORKS[model_type]


class _Preconditioner(nn.Module):
    """The forward pass and the input conventions shared by every preconditioner; subclasses give the coefficients
    and hold their backbone in ``self.model`` (EDM) or ``self.unet`` (EDM2)."""

    img_resolution: int
    img_channels: int
    label_dim: int
    use_fp16: bool

    def _set_interface(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool) -> None:
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16

    def backbone(self) -> nn.Module:
        return self.model

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        """``c_skip, c_out, c_in, c_noise`` for float32 ``sigma`` of shape ``[N, 1, 1, 1]``."""
        raise NotImplementedError

    def round_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """The noise level the network was trained at nearest to ``sigma`` (identity unless the schedule is
        discrete)."""
        return torch.as_tensor(sigma)

    def model_dtype(self, x: torch.Tensor, force_fp32: bool = False) -> torch.dtype:
        """float16 iff ``use_fp16`` and not ``force_fp32`` and ``x`` is on CUDA, as EDM decides; else float32 (float64
        for float64 inputs: disback's run.precision=fp64)."""
        return torch.float16 if (self.use_fp16 and not force_fp32 and x.is_cuda) else full(x)

    def prepare_sigma(self, sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``sigma`` as float32 ``[N, 1, 1, 1]`` (or ``[1, 1, 1, 1]``, which broadcasts) on ``x``'s device."""
        sigma = torch.as_tensor(sigma, device=x.device).to(full(x)).reshape(-1, 1, 1, 1)
        if sigma.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"sigma has {sigma.shape[0]} values for a batch of {x.shape[0]}")
        return sigma

    def prepare_labels(self, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """EDM's class-label input: None when unconditional; zeros ``[1, label_dim]`` when none are given; else float32
        ``[N, label_dim]``, with integer class indices ``[N]`` turned one-hot."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=x.device, dtype=full(x))
        if not (class_labels.is_floating_point() or class_labels.dtype == torch.bool) and class_labels.ndim == 1:
            return _one_hot(class_labels, self.label_dim).to(full(x))
        return class_labels.to(full(x)).reshape(-1, self.label_dim)

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        x = x.to(full(x))
        sigma = self.prepare_sigma(sigma, x)
        class_labels = self.prepare_labels(class_labels, x)
        dtype = self.model_dtype(x, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.backbone()((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        F_x = F_x[:, : self.img_channels]  # iDDPM's backbone also predicts a variance: its second half of channels
        return c_skip * x + c_out * F_x.to(x.dtype)


def full(x: torch.Tensor) -> torch.dtype:
    """The dtype the preconditioning is computed in: float32, as EDM computes it, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _one_hot(indices: torch.Tensor, label_dim: int) -> torch.Tensor:
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= label_dim):
        raise ValueError(f"class indices must lie in [0, {label_dim}); got {indices.min()}..{indices.max()}")
    return F.one_hot(indices.long(), label_dim).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022), Table 1.


class VPPrecond(_Preconditioner):
    """Variance-preserving preconditioning (Song et al. 2021): the backbone predicts the noise, ``D = x - sigma F``;
    the noise label is the continuous DDPM timestep ``(M - 1) t`` of ``sigma(t) = sqrt(exp(beta_d t^2 / 2 +
    beta_min t) - 1)``."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        model_type: str | Callable[..., nn.Module] = "SongUNet",
        **model_kwargs: Any,
    ):
        super().__init__()
        self._set_interface(img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        net = _edm_network(model_type)
        self.model = net(
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        """The noise level at time ``t`` in [0, 1]: ``sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t**2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """The time ``t`` of noise level ``sigma``: ``(sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) /
        beta_d``."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(_Preconditioner):
    """Variance-exploding preconditioning (Song et al. 2021): ``D = x + sigma F(x; ln(sigma / 2))``."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.02,
        sigma_max: float = 100,
        model_type: str | Callable[..., nn.Module] = "SongUNet",
        **model_kwargs: Any,
    ):
        super().__init__()
        self._set_interface(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        net = _edm_network(model_type)
        self.model = net(
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


class iDDPMPrecond(_Preconditioner):  # noqa: N801 (EDM's class name, which checkpoints record)
    """Improved DDPM preconditioning (Nichol & Dhariwal 2021): a discrete schedule of ``M`` noise levels ``u``
    (a buffer, saved with the weights), the noise label the index of the nearest one counted from the top; the
    backbone predicts noise (and, in its second half of channels, a variance that is not used)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        C_1: float = 0.001,
        C_2: float = 0.008,
        M: int = 1000,
        model_type: str | Callable[..., nn.Module] = "DhariwalUNet",
        **model_kwargs: Any,
    ):
        super().__init__()
        self._set_interface(img_resolution, img_channels, label_dim, use_fp16)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        net = _edm_network(model_type)
        self.model = net(
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels * 2,
            label_dim=label_dim,
            **model_kwargs,
        )
        self.register_buffer("u", self._noise_levels())
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def alpha_bar(self, j: int | torch.Tensor) -> torch.Tensor:
        """The cosine schedule's ``alpha_bar`` at step ``j`` of ``M``: ``sin(pi/2 * j / M / (C_2 + 1))^2``."""
        j = torch.as_tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def _noise_levels(self) -> torch.Tensor:
        """``u_M = 0`` and, going down, ``u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1)``,
        in float32 (the order EDM computes them in)."""
        u = torch.zeros(self.M + 1)
        for j in range(self.M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=self.C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        return u

    def sigma_index(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """The index ``j`` of the ``u_j`` nearest to each value of ``sigma`` (the first on a tie), in ``sigma``'s
        shape and device."""
        sigma = torch.as_tensor(sigma)
        distance = (sigma.to(self.u.device, torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs()
        return distance.argmin(dim=1).reshape(sigma.shape).to(sigma.device)

    def round_sigma(self, sigma: float | torch.Tensor, return_index: bool = False) -> torch.Tensor:
        """The nearest trained noise level ``u_j`` (or its index ``j``) for each value of ``sigma``."""
        sigma = torch.as_tensor(sigma)
        index = self.sigma_index(sigma)
        if return_index:
            return index
        return self.u[index.to(self.u.device).flatten()].to(sigma.dtype).reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.M - 1 - self.sigma_index(sigma).to(torch.float32)
        return c_skip, c_out, c_in, c_noise


class EDMPrecond(_Preconditioner):
    """EDM's own preconditioning: unit-variance input and training target for data of standard deviation
    ``sigma_data``; ``c_noise = ln(sigma) / 4``."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
        model_type: str | Callable[..., nn.Module] = "DhariwalUNet",
        **model_kwargs: Any,
    ):
        super().__init__()
        self._set_interface(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        net = _edm_network(model_type)
        self.model = net(
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return _edm_coefficients(sigma, self.sigma_data)


def _edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> Coefficients:
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


# ---------------------------------------------------------------------------------------------------------------------
# EDM2 (Karras et al. 2024).


class Precond(_Preconditioner):
    """EDM2's preconditioning: EDM's coefficients around EDM2's ``UNet`` (``self.unet``), plus the learned
    uncertainty ``logvar(sigma) = logvar_linear(logvar_fourier(c_noise))`` (the paper's Eq. 21), returned as
    ``(D, logvar)`` with ``return_logvar=True``. The backbone runs in float16 on CUDA by default (``use_fp16=True``).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        use_fp16: bool = True,
        sigma_data: float = 0.5,
        logvar_channels: int = 128,
        **unet_kwargs: Any,
    ):
        super().__init__()
        self._set_interface(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def backbone(self) -> nn.Module:
        return self.unet

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return _edm_coefficients(sigma, self.sigma_data)

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        return_logvar: bool = False,
        **unet_kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        D_x = super().forward(x, sigma, class_labels, force_fp32, **unet_kwargs)
        if not return_logvar:
            return D_x
        return D_x, self.logvar(sigma, x)

    def logvar(self, sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The uncertainty ``u(sigma)`` as ``[N, 1, 1, 1]`` (``[1, 1, 1, 1]`` for one sigma)."""
        c_noise = self.prepare_sigma(sigma, x).flatten().log() / 4
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Lookup by the class names that checkpoints record.

PRECONDITIONERS: dict[str, type[nn.Module]] = {
    "VPPrecond": VPPrecond,
    "VEPrecond": VEPrecond,
    "iDDPMPrecond": iDDPMPrecond,
    "EDMPrecond": EDMPrecond,
    "Precond": Precond,
}


def build_precond(class_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The preconditioner ``class_name`` (with its backbone) built from a checkpoint's constructor arguments
    (``_init_kwargs``; missing ones take EDM's / EDM2's defaults). An unknown class name is a ``ValueError``; an
    argument the classes do not take is Python's ``TypeError``, for the caller to explain."""
    if class_name not in PRECONDITIONERS:
        raise ValueError(f"unknown preconditioner '{class_name}'; available: {', '.join(PRECONDITIONERS)}")
    return PRECONDITIONERS[class_name](**kwargs)
