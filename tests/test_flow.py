"""Rectified-flow teachers as EDM denoisers, and generators that step as diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import pytest
import torch

from disback.diffusion.denoisers import FlowDenoiser
from disback.diffusion.generator import FlowGenerator


class Velocity(FlowDenoiser):
    """v(x_t, t) = a x_t + b t: a stand-in network with weights, to check the maps around it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(0.3)), torch.nn.Parameter(torch.tensor(-0.7))

    def call_model(self, x_t, t, labels=None):
        return self.a * x_t + self.b * t.reshape(-1, *([1] * (x_t.ndim - 1)))


def test_the_edm_form_of_a_flow_model():
    d = Velocity()
    x0, n = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    sigma = t / (1 - t)
    x_t = (1 - t).reshape(-1, 1, 1, 1) * x0 + t.reshape(-1, 1, 1, 1) * n
    x_sigma = x0 + sigma.reshape(-1, 1, 1, 1) * n
    torch.testing.assert_close(x_sigma / (1 + sigma.reshape(-1, 1, 1, 1)), x_t)  # the two noisings are one
    v = 0.3 * x_t - 0.7 * t.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(d.double()(x_sigma, sigma), x_t - t.reshape(-1, 1, 1, 1) * v)
    # a perfect velocity (n - x0) gives a perfect denoiser
    exact = FlowDenoiser()
    exact.call_model = lambda xt, tt, labels=None: n - x0
    torch.testing.assert_close(exact(x_sigma, sigma), x0)


@pytest.mark.parametrize("times", [[1.0], [1.0, 0.75, 0.5, 0.25], [0.9, 0.4]])
def test_the_generator_steps_as_flow_match_euler_with_stochastic_sampling(times):
    from diffusers import FlowMatchEulerDiscreteScheduler

    d = Velocity()
    g = FlowGenerator(d, times)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)
    scheduler.set_timesteps(sigmas=times)
    torch.testing.assert_close(scheduler.sigmas[:-1], torch.tensor(times), rtol=0, atol=1e-7)  # shift 1: not moved
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, 3, generator=gen)
    z, noises = x.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = d.call_model(x, (t / 1000).expand(len(x)))
            state = gen.get_state()
            x = scheduler.step(v, t, x, generator=gen).prev_sample
            if len(noises) < len(times) - 1:  # the scheduler's fresh noise, drawn again for disback's generator
                after = gen.get_state()
                gen.set_state(state)
                noises.append(torch.randn(z.shape, generator=gen))
                gen.set_state(after)
        ours = g(z, None, torch.stack(noises, 1) if noises else None)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
