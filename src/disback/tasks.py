"""What one iteration does, for each kind of stage. The loop in disback.train runs any of them.

ScoreFitting  denoising score matching of one denoiser on samples of a source:
              the teacher (source = data) and Degradation Recording (source = the frozen initial generator).
Distillation  one generator step plus its fake-score updates, against a target chosen by a TargetSchedule:
              Distribution Backtracking (the reversed path) and the baseline (a one-node path, the teacher).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn

from disback.config import DistillConfig, EDMConfig
from disback.losses import dmd_generator_loss, dsm_loss, karras_sigma, lognormal_sigma
from disback.path import DegradationPath, TargetSchedule

Source = Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]  # n -> (x0, class labels or None)


class ScoreFitting:
    def __init__(
        self,
        denoiser: nn.Module,
        source: Source,
        *,
        batch: int,
        lr: float,
        edm: EDMConfig,
        accelerator: Accelerator,
        stage: str,
        ema_decay: float | None = None,
    ):
        self.stage = stage
        self.source, self.batch, self.edm, self.accelerator = source, batch, edm, accelerator
        optimiser = torch.optim.Adam(denoiser.parameters(), lr=lr)
        self.model, self.optimiser = accelerator.prepare(denoiser, optimiser)
        self.denoiser = accelerator.unwrap_model(self.model)
        # The EMA is copied after prepare() so that it lives on the same device as the model.
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False) if ema_decay is not None else None
        self.ema_decay = ema_decay

    def target_node(self) -> int | None:
        return None

    def train_step(self) -> dict[str, float]:
        x0, labels = self.source(self.batch)
        sigma = lognormal_sigma(len(x0), self.edm.p_mean, self.edm.p_std, device=x0.device)
        loss = dsm_loss(self.model, x0, sigma, torch.randn_like(x0), self.edm.sigma_data, labels)
        self.optimiser.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimiser.step()
        if self.ema is not None:
            with torch.no_grad():  # one fused update for all tensors: many small kernels dominate on a GPU
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.denoiser.parameters()), 1.0 - self.ema_decay)
        return {"loss": loss.item()}


class Distillation:
    """Score distillation with a target schedule (paper Eq. 8 for the generator, Eq. 5 for the fake score).

    The fake score D_phi starts at the path's last node; the target starts at the schedule's first node and is
    reloaded from its node file (sha256 and keys checked) every time the schedule moves.
    """

    def __init__(
        self,
        generator: nn.Module,
        fake: nn.Module,
        target: nn.Module,
        path: DegradationPath,
        schedule: TargetSchedule,
        *,
        cfg: DistillConfig,
        edm: EDMConfig,
        shape: tuple[int, ...],
        accelerator: Accelerator,
        stage: str,
        num_classes: int = 0,
    ):
        self.stage, self.cfg, self.edm, self.shape, self.accelerator = stage, cfg, edm, tuple(shape), accelerator
        self.num_classes = num_classes
        self.path, self.schedule = path, schedule
        path.load_node(path.last, fake)
        path.load_node(schedule.current, target)
        self.target = target.requires_grad_(False).eval().to(accelerator.device)
        self.generator_module, self.fake_module = generator, fake
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_generator)
        opt_f = torch.optim.Adam(fake.parameters(), lr=cfg.lr_fake)
        self.generator, self.fake, self.opt_g, self.opt_f = accelerator.prepare(generator, fake, opt_g, opt_f)
        self.switches: list[int] = []  # generator steps at which the target moved
        self.steps_done = 0

    def target_node(self) -> int:
        return self.schedule.current

    def noise(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent noise, and uniformly drawn class labels when the networks are class-conditional."""
        device = self.accelerator.device
        z = torch.randn(self.cfg.batch, *self.shape, device=device)
        return z, torch.randint(self.num_classes, (self.cfg.batch,), device=device) if self.num_classes else None

    def fake_step(self) -> float:
        """Fit the fake score to the generator's current samples (L_dsm on stopgrad(G(z)))."""
        z, labels = self.noise()
        with torch.no_grad():
            x0 = self.generator(z, labels)
        sigma = lognormal_sigma(len(x0), self.edm.p_mean, self.edm.p_std, device=x0.device)
        loss = dsm_loss(self.fake, x0, sigma, torch.randn_like(x0), self.edm.sigma_data, labels)
        self.opt_f.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.opt_f.step()
        return loss.item()

    def generator_step(self) -> float:
        z, labels = self.noise()
        x0 = self.generator(z, labels)
        sigma = karras_sigma(len(x0), self.cfg.sigma_min, self.cfg.sigma_max, self.edm.rho, device=x0.device)
        x_sigma = x0.detach() + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * torch.randn_like(x0)
        with torch.no_grad():
            d_fake = self.fake(x_sigma, sigma, labels)
            d_target = self.target(x_sigma, sigma, labels)
        loss = dmd_generator_loss(x0, d_fake, d_target)
        self.opt_g.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.opt_g.step()
        return loss.item()

    def train_step(self) -> dict[str, float]:
        fake_losses = [self.fake_step() for _ in range(self.cfg.fake_updates)]
        loss_g = self.generator_step()
        self.steps_done += 1
        if self.schedule.step():
            self.path.load_node(self.schedule.current, self.target)
            self.switches.append(self.steps_done)
        out = {"generator": loss_g}
        if fake_losses:
            out["fake"] = sum(fake_losses) / len(fake_losses)
        return out
