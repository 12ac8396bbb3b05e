"""The losses do what the paper says, on cases with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_config
from disback.diffusion.denoisers import build_denoiser
from disback.diffusion.losses import (
    dmd_generator_loss,
    dsm_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    karras_sigma,
    lognormal_sigma,
    sid_generator_loss,
    vsd_generator_loss,
)
from disback.method.gan import bottleneck, head_for


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


GENERATOR_LOSSES = {
    "vsd": (vsd_generator_loss, False),
    "dmd": (dmd_generator_loss, False),
    "sid": (sid_generator_loss, True),
}


def _mean_gradient(
    method: str, shift: torch.Tensor, goal: torch.Tensor, s: float = 0.5, n: int = 20000
) -> torch.Tensor:
    """dL/d(shift) for a generator x0 = shift + s z against the target N(goal, s^2), both scores exact."""
    loss_fn, through = GENERATOR_LOSSES[method]
    shift = shift.clone().requires_grad_(True)
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(1)) * s + shift
    sigma = karras_sigma(n, 0.02, 10.0, generator=torch.Generator().manual_seed(2))
    x_sigma = (x0 if through else x0.detach()) + sigma[:, None] * torch.randn(
        n, 2, generator=torch.Generator().manual_seed(3)
    )
    with torch.set_grad_enabled(through):
        d_fake = GaussianDenoiser(shift.detach(), s)(x_sigma, sigma)
        d_target = GaussianDenoiser(goal, s)(x_sigma, sigma)
    loss_fn(x0, d_fake, d_target, alpha=1.2).backward()
    return shift.grad


@pytest.mark.parametrize("method", list(GENERATOR_LOSSES))
def test_each_generator_loss_descends_the_divergence_on_gaussians(method):
    """With a Gaussian generator N(shift, s^2) and target N(goal, s^2) every divergence these methods minimise (KL for
    VSD/DMD, a Fisher divergence for SiD) has its gradient along shift - goal: the loss's gradient must point there."""
    goal = torch.tensor([2.0, -1.0])
    for shift in (torch.zeros(2), torch.tensor([3.0, 1.0]), torch.tensor([1.5, -1.5])):
        grad = _mean_gradient(method, shift, goal)
        cos = torch.nn.functional.cosine_similarity(grad, shift - goal, dim=0)
        assert cos > 0.98, (method, shift, grad)
    # At the target the gradient vanishes (on average): the generator has nothing left to learn.
    assert _mean_gradient(method, goal, goal).norm() < 1e-6


def test_vsd_gradient_is_the_plain_score_difference():
    x0 = torch.zeros(4, 2, requires_grad=True)
    d_fake, d_target = torch.zeros(4, 2), torch.tensor([[1.0, -2.0]]).expand(4, 2)
    vsd_generator_loss(x0, d_fake, d_target).backward()
    assert torch.allclose(x0.grad, (d_fake - d_target) / x0.numel())


def test_sid_loss_matches_its_fisher_form():
    """SiD's code form equals (1 - alpha)||D_t - D_f||^2 + (D_t - D_f).(D_f - x0), per sample weighted."""
    torch.manual_seed(0)
    x0, d_fake, d_target = torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 3)
    alpha = 1.2
    w = 1.0 / (x0 - d_target).abs().mean(1, keepdim=True)
    fisher = (w * ((1 - alpha) * (d_target - d_fake) ** 2 + (d_target - d_fake) * (d_fake - x0))).mean()
    assert torch.allclose(sid_generator_loss(x0, d_fake, d_target, alpha=alpha), fisher, atol=1e-6)


def test_gan_head_learns_to_tell_real_from_generated_and_pushes_samples_toward_real():
    torch.manual_seed(0)
    fake = build_denoiser(tiny_config().network, (2,), 1.0)
    head, tap = head_for(fake, torch.zeros(2, 2), 1.0)
    real, generated = torch.randn(256, 2) * 0.3 + 2.0, torch.randn(256, 2) * 0.3 - 2.0
    sigma = torch.full((256,), 0.1)

    def logits(x):
        fake(x, sigma)
        return head(tap.take())

    opt = torch.optim.Adam(list(head.parameters()) + list(fake.parameters()), lr=3e-3)
    before = gan_discriminator_loss(logits(real), logits(generated)).item()
    for _ in range(100):
        loss = gan_discriminator_loss(logits(real), logits(generated))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before > 1.0 and loss.item() < 0.1, (before, loss.item())  # log 4 = 1.39 at chance
    # The generator's side: descending its loss moves generated samples toward the real ones (+x here).
    x = generated.clone().requires_grad_(True)
    gan_generator_loss(logits(x)).backward()
    assert (-x.grad.sum(1) > 0).float().mean() > 0.9


def test_bottleneck_is_found_for_both_backbones():
    mlp = build_denoiser(tiny_config().network, (2,), 1.0)
    assert bottleneck(mlp) == (mlp.backbone.out, True)  # the last hidden state, the output layer's input
    unet = build_denoiser(
        tiny_config(
            network={"kind": "unet", "channels": [8, 16], "attention": [False, False]},
            data={"name": "digits", "resolution": 8, "channels": 1},
        ).network,
        (1, 8, 8),
        0.5,
    )
    head, _ = head_for(unet, torch.zeros(2, 1, 8, 8), 1.0)
    assert bottleneck(unet) == (unet.backbone.unet.mid_block, False) and head(torch.zeros(3, 16, 4, 4)).shape == (3,)


@pytest.mark.parametrize("method", list(GENERATOR_LOSSES))
def test_generator_steps_move_samples_toward_the_target(method):
    """Gaussian target and generator, exact scores: the generator's mean walks to the target's mean."""
    loss_fn, through = GENERATOR_LOSSES[method]
    torch.manual_seed(0)
    s, goal = 0.5, torch.tensor([2.0, -1.0])
    shift = nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([shift], lr=0.05)
    target = GaussianDenoiser(goal, s)
    start = (shift.detach() - goal).norm().item()
    for _ in range(100):
        x0 = torch.randn(256, 2) * s + shift
        sigma = karras_sigma(256, 0.02, 10.0)
        x_sigma = (x0 if through else x0.detach()) + sigma[:, None] * torch.randn_like(x0)
        fake = GaussianDenoiser(shift.detach().clone(), s)  # the fake score tracks the generator exactly
        with torch.set_grad_enabled(through):
            d_fake, d_target = fake(x_sigma, sigma), target(x_sigma, sigma)
        loss = loss_fn(x0, d_fake, d_target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = (shift.detach() - goal).norm().item()
    assert end < 0.1 * start, (start, end)
