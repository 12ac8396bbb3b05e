"""The losses do what the paper says, on cases with known answers."""

from __future__ import annotations

import torch
from torch import nn

from disback.losses import dmd_generator_loss, dsm_loss, karras_sigma, lognormal_sigma
from disback.models import build_denoiser

from conftest import tiny_config


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(mean, s^2 I): D(x; sigma) = (s^2 x + sigma^2 mean) / (s^2 + sigma^2)."""

    def __init__(self, mean, s: float):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.s = s

    def forward(self, x, sigma, labels=None):
        sig2 = sigma.reshape(-1, 1) ** 2
        return (self.s**2 * x + sig2 * self.mean) / (self.s**2 + sig2)


def test_dsm_loss_of_a_fake_score_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_denoiser(cfg.network, (2,), 1.0)
    x0 = torch.randn(256, 2) * 0.3 + torch.tensor([1.0, -1.0])
    sigma = lognormal_sigma(256, -1.2, 1.2)
    noise = torch.randn_like(x0)
    before = dsm_loss(model, x0, sigma, noise, 1.0).item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = dsm_loss(model, x0, sigma, noise, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dsm_loss(model, x0, sigma, noise, 1.0).item()
    assert after < 0.5 * before, (before, after)


def test_dsm_loss_is_smallest_for_the_exact_denoiser():
    torch.manual_seed(0)
    x0 = torch.randn(4096, 2) * 0.5 + 2.0
    sigma, noise = lognormal_sigma(4096, -1.2, 1.2), torch.randn(4096, 2)
    exact = dsm_loss(GaussianDenoiser([2.0, 2.0], 0.5), x0, sigma, noise, 1.0)
    wrong = dsm_loss(GaussianDenoiser([1.5, 2.0], 0.5), x0, sigma, noise, 1.0)
    assert exact < wrong


def test_dmd_gradient_points_from_target_to_fake():
    """dL/dx0 = w (D_fake - D_target) / numel: descending it moves samples from the fake's mode to the target's."""
    x0 = torch.zeros(8, 2, requires_grad=True)
    d_fake, d_target = torch.zeros(8, 2), torch.tensor([[1.0, 0.0]]).expand(8, 2)
    dmd_generator_loss(x0, d_fake, d_target).backward()
    assert (x0.grad[:, 0] < 0).all() and torch.allclose(x0.grad[:, 1], torch.zeros(8))
    # DMD's weight makes the step size independent of how far the target is.
    x1 = torch.zeros(8, 2, requires_grad=True)
    dmd_generator_loss(x1, d_fake, 10 * d_target).backward()
    assert torch.allclose(x0.grad, x1.grad)


def test_generator_steps_move_samples_toward_the_target():
    """Gaussian target and generator, exact scores: the generator's mean walks to the target's mean."""
    torch.manual_seed(0)
    s, goal = 0.5, torch.tensor([2.0, -1.0])
    shift = nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([shift], lr=0.05)
    target = GaussianDenoiser(goal, s)
    start = (shift.detach() - goal).norm().item()
    for _ in range(100):
        x0 = torch.randn(256, 2) * s + shift
        sigma = karras_sigma(256, 0.02, 10.0)
        x_sigma = x0.detach() + sigma[:, None] * torch.randn_like(x0)
        fake = GaussianDenoiser(shift.detach().clone(), s)  # the fake score tracks the generator exactly
        with torch.no_grad():
            d_fake, d_target = fake(x_sigma, sigma), target(x_sigma, sigma)
        loss = dmd_generator_loss(x0, d_fake, d_target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = (shift.detach() - goal).norm().item()
    assert end < 0.1 * start, (start, end)
