"""The generator: one denoiser call on pure noise, or a few (DMD2's k-step students).

    one step:  G(z) = D(sigma_0 z; sigma_0)
    k steps:   x_0 = sigma_0 z;  x0_j = D(x_j; sigma_j);  x_{j+1} = x0_j + sigma_{j+1} n_j (fresh noise);  G(z) = x0_{k-1}

The noise levels are a descending list; a single level is the one-step generator (``sigma_g``). Training sees one
step of the rollout at a time (``forward(..., step=k)``): DMD2's backward simulation runs the steps before it from pure
noise without gradients, and the selected step's denoised estimate is the sample, the only one with gradients.
A subclass changes the three pieces that depend on the units the network works in (``start``, ``denoise``,
``renoise``); the text plugin's LCM generator does so for a UNet on a discrete VP schedule.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def levels(sigma_g: float | Sequence[float]) -> list[float]:
    """A generator's noise levels as a list: a number is the one-step generator's single level."""
    return [float(s) for s in sigma_g] if isinstance(sigma_g, (list, tuple)) else [float(sigma_g)]


class FewStepGenerator(nn.Module):
    def __init__(self, denoiser: nn.Module, sigmas: float | Sequence[float]):
        super().__init__()
        self.denoiser = denoiser  # eta starts as a copy of the teacher's weights
        self.sigmas = levels(sigmas)

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_g(self) -> float | list[float]:
        """The noise level of a one-step generator, or the list of a k-step one (as model files record it)."""
        return self.sigmas[0] if self.steps == 1 else list(self.sigmas)

    def start(self, z: torch.Tensor) -> torch.Tensor:
        """The first step's input from unit noise."""
        return self.sigmas[0] * z

    def denoise(self, x: torch.Tensor, step: int, labels: torch.Tensor | None) -> torch.Tensor:
        """Step ``step``'s denoised estimate of its input ``x``."""
        sigma = torch.full((x.shape[0],), self.sigmas[step], dtype=x.dtype, device=x.device)
        return self.denoiser(x, sigma, labels)

    def renoise(self, x0: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
        """Step ``step``'s input from the previous step's estimate and fresh unit noise."""
        return x0 + self.sigmas[step] * noise

    def input_at(self, noise: torch.Tensor, labels: torch.Tensor | None, step: int) -> torch.Tensor:
        """Step ``step``'s input, simulated from pure noise without gradients (DMD2's backward simulation): ``noise``
        holds the starting noise and every step's fresh noise (N x steps x ...)."""
        x = self.start(noise[:, 0])
        with torch.no_grad():
            for j in range(step):
                x = self.renoise(self.denoise(x, j, labels), j + 1, noise[:, j + 1])
        return x

    def forward(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        step: int | None = None,
        step_input: bool = False,
    ) -> torch.Tensor:
        """A sample: the whole rollout from starting noise ``z``, ``noise`` being the fresh noise of steps 1, 2, ...
        (N x (steps - 1) x ...), drawn here when not given (``with_steps`` passes fixed noise for fixed samples).

        For training (one call, so that data-parallel wrappers see it): with ``step``, only that step's denoised
        estimate, with gradients through that step alone; its input simulated from ``z`` and ``noise`` by the steps
        before it, or, with ``step_input``, ``z`` is that input itself (real data noised to the step's level)."""
        if step is not None:
            x = z if step_input else self.input_at(torch.cat([z[:, None], noise], dim=1), labels, step)
            return self.denoise(x, step, labels)
        x = self.start(z)
        for j in range(self.steps):
            x0 = self.denoise(x, j, labels)
            if j + 1 < self.steps:
                x = self.renoise(x0, j + 1, torch.randn_like(z) if noise is None else noise[:, j])
        return x0


class OneStepGenerator(FewStepGenerator):
    """G_eta(z) = D_eta(sigma_g z; sigma_g): one denoiser call on pure noise (a few with a list of levels)."""


def with_steps(generator: nn.Module) -> Callable[..., torch.Tensor]:
    """``generator`` as a function of all its noise at once (N x steps x ...: the start and each step's fresh noise),
    so that evaluation noise drawn once gives the same samples every time and in every share of a batch."""

    def run(noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return generator(noise[:, 0], labels, noise[:, 1:])

    return run


class FlowGenerator(FewStepGenerator):
    """A generator on a rectified-flow denoiser (``FlowDenoiser``) at flow times ``times`` (descending, in (0, 1]),
    each step as diffusers' FlowMatchEulerDiscreteScheduler takes it: from pure noise, x0 = x_t - t v(x_t, t), and
    (except after the last step) re-noised with fresh noise to the next time, (1 - t) x0 + t n, its stochastic
    sampling. One step at t = 1 is the scheduler's single Euler step from noise to t = 0: x0 = z - v(z, 1)."""

    def start(self, z: torch.Tensor) -> torch.Tensor:
        return z  # the pipelines start every schedule from unit noise

    def denoise(self, x: torch.Tensor, step: int, labels: torch.Tensor | None) -> torch.Tensor:
        return self.denoiser.flow_x0(x, self.sigmas[step], labels)

    def renoise(self, x0: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
        t = self.sigmas[step]
        return (1 - t) * x0 + t * noise
