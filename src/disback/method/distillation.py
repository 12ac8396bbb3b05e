"""Score distillation with a target schedule: one generator step and its fake-score updates per iteration, against a
target that walks the degradation path back (Distribution Backtracking), or is the teacher throughout (the baseline,
whose path is the teacher alone)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from disback.config import DistillConfig, EDMConfig
from disback.config.choices import METHODS
from disback.diffusion.losses import (
    GENERATOR_LOSSES,
    dsm_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    karras_sigma,
    lognormal_sigma,
)
from disback.distributed import (
    full_state,
    load_full_state,
    load_optimiser_state,
    local,
    mean_across,
    optimiser_state,
    shard,
)
from disback.method.gan import head_for
from disback.method.path import DegradationPath, NodeReader
from disback.method.schedules import TargetSchedule
from disback.method.steps import Source, adam, load_state_of, shares, state_of, update


@dataclass
class Wrapped:
    """The trained networks as they are trained: DDP-wrapped by accelerate under several processes, the networks
    themselves in one process or when sharded (FSDP2 shards in place)."""

    generator: nn.Module
    fake: nn.Module
    head: nn.Module | None


class Distillation:
    """DisBack's Eq. 8 for the generator (with the loss of ``cfg.method``) and Eq. 5 for the fake score.

    The fake score D_phi starts at the path's last node (the teacher for the baseline); the target starts at the
    schedule's first node and is reloaded from its node file (sha256 and keys checked) every time the schedule moves.
    With ``fake_from_path=False`` the fake score starts as it is given (a critic trained before).
    ``real`` draws data for dmd2's GAN term. ``self.generator``, ``self.fake`` and ``self.head`` are the networks;
    ``self.wrapped`` holds them as trained. The generator step runs the frozen fake score and head unwrapped, since
    DDP expects gradients for every parameter of a wrapped network that runs with gradients enabled.
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
        real: Source | None = None,
        fsdp: bool = False,
        fake_from_path: bool = True,
    ):
        self.stage, self.cfg, self.edm, self.shape, self.accelerator = stage, cfg, edm, tuple(shape), accelerator
        self.num_classes, self.method, self.real = num_classes, METHODS[cfg.method], real
        self.generator_loss = GENERATOR_LOSSES[self.method.loss]
        if self.method.gan and real is None:
            raise ValueError(f"method '{cfg.method}' needs real data for its GAN term")
        self.steps = getattr(generator, "steps", 1)  # a k-step generator trains one of its steps per iteration
        self.from_data = self.steps > 1 and cfg.step_input == "data"
        if self.from_data and real is None:
            raise ValueError("distill.step_input 'data' needs real data: the steps' inputs are noised data")
        self.step = 0  # the step trained in this iteration, drawn at its start
        self.path, self.schedule, self.nodes = path, schedule, NodeReader(path)
        if len(path) > 1:  # a one-node path is the teacher, which fake and target already are (copies or views of it)
            if fake_from_path:  # else the caller has loaded the fake score it starts from (--fake)
                self.nodes.load(path.last, fake)
            self.nodes.load(schedule.current, target)
            self.nodes.prefetch(schedule.upcoming)
        device = accelerator.device
        # The frozen target only runs forward: under bf16 it is held in bf16 (half the memory, no casts). With LoRA its
        # base is the teacher that the fake score shares, which so becomes bf16 too: frozen, it only runs forward.
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
        self.target = target.requires_grad_(False).eval().to(device, dtype=dtype)
        self.generator, self.fake = generator.to(device), fake.to(device)
        self.head = self.tap = None
        if self.method.gan:
            labels = torch.zeros(2, dtype=torch.long, device=device) if num_classes else None
            self.head, self.tap = head_for(fake, torch.zeros(2, *shape, device=device), 1.0, labels)
        trained = [m for m in (self.generator, self.fake, self.head) if m is not None]
        if fsdp:  # sharded in place, before the optimisers are built on the shards
            for module in trained:
                shard(module)
        # the fake score's optimiser also trains the head; a container names their parameters for sharded state dicts
        self.fake_and_head = nn.ModuleDict({"fake": fake, **({"head": self.head} if self.head is not None else {})})
        self.trained_names = {n for n, p in self.fake_and_head.named_parameters() if p.requires_grad}  # LoRA: adapters
        fake_params = [p for n, p in self.fake_and_head.named_parameters() if n in self.trained_names]
        opt_g = adam(generator.parameters(), cfg.lr_generator, accelerator)
        opt_f = adam(fake_params, cfg.lr_fake, accelerator)
        prepared = trained + [opt_g, opt_f] if fsdp else accelerator.prepare(*trained, opt_g, opt_f)
        self.wrapped = Wrapped(prepared[0], prepared[1], prepared[2] if self.head is not None else None)
        self.opt_g, self.opt_f = prepared[-2], prepared[-1]
        self.switches: list[int] = []  # generator steps at which the target moved
        self.switch_seconds: list[float] = []  # how long the loop waited at each switch of this process (timing only)
        self.steps_done = 0

    def target_node(self) -> int:
        return self.schedule.current

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.generator, self.fake, self.head) if m is not None]

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": full_state(self.generator),
            "fake": full_state(self.fake),
            "head": None if self.head is None else full_state(self.head),
            "opt_g": optimiser_state(self.generator, self.opt_g),
            "opt_f": optimiser_state(self.fake_and_head, self.opt_f),
            "schedule": self.schedule.state_dict(),
            "switches": list(self.switches),
            "steps_done": self.steps_done,
            "real": state_of(self.real),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_full_state(self.generator, state["generator"])
        load_full_state(self.fake, state["fake"])
        if self.head is not None:
            load_full_state(self.head, state["head"])
        load_optimiser_state(self.generator, self.opt_g, state["opt_g"])
        load_optimiser_state(self.fake_and_head, self.opt_f, state["opt_f"])
        self.schedule.load_state_dict(state["schedule"])
        self.switches, self.steps_done = list(state["switches"]), state["steps_done"]
        load_state_of(self.real, state["real"])
        if len(self.path) > 1:
            self.nodes.load(self.schedule.current, self.target)  # the target the schedule had reached
            self.nodes.prefetch(self.schedule.upcoming)

    def noise(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent noise, and uniformly drawn class labels when the networks are class-conditional (this process's share).
        A k-step generator gets its start and every step's fresh noise (batch x steps x ...)."""
        device = self.accelerator.device
        size = (self.cfg.batch, *self.shape) if self.steps == 1 else (self.cfg.batch, self.steps, *self.shape)
        z = torch.randn(*size, device=device)
        labels = torch.randint(self.num_classes, (self.cfg.batch,), device=device) if self.num_classes else None
        return local(z), local(labels)

    def sample(self, z: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the losses see as the generator's sample, with gradients (callers add no_grad where they want none):
        G(z) for one step; for k steps the denoised estimate of this iteration's step, its input simulated from pure
        noise by the steps before it (DMD2), or real data noised to its level (distill.step_input 'data'), whose
        labels then replace the drawn ones."""
        net = self.wrapped.generator
        if self.steps == 1:
            return net(z, labels), labels
        if self.from_data and self.step > 0:
            x, labels = self.real(self.cfg.batch)
            return net(
                self.generator.renoise(x, self.step, z[:, self.step]), labels, step=self.step, step_input=True
            ), labels
        return net(z[:, 0], labels, z[:, 1:], step=self.step), labels

    def noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 + sigma n with sigma drawn in the generator loss's range (distill.noise)."""
        n, c = self.cfg.batch, self.cfg  # x0 is this process's share of a batch of n
        if c.noise == "lognormal":
            drawn = lognormal_sigma(n, self.edm.p_mean, self.edm.p_std, device=x0.device)
            drawn = drawn.clamp(c.sigma_min, c.sigma_max)
        else:
            drawn = karras_sigma(n, c.sigma_min, c.sigma_max, self.edm.rho, device=x0.device)
        sigma, noise = shares(drawn, x0)
        return x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * noise, sigma

    def logits(self, x0: torch.Tensor, labels: torch.Tensor | None, trained: bool) -> torch.Tensor:
        """The GAN head's logits for noised x0, from the fake score's bottleneck features (through the wrapped
        networks when ``trained``, the plain ones when frozen)."""
        x_sigma, sigma = self.noised(x0)
        (self.wrapped.fake if trained else self.fake)(x_sigma, sigma, labels)
        return (self.wrapped.head if trained else self.head)(self.tap.take())

    def fake_step(self, samples: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> dict[str, float]:
        """Fit the fake score to the generator's current samples (L_dsm on stopgrad(G(z))), or to ``samples`` (x0,
        labels) that the generator step just drew; for dmd2 also train the GAN head (and through it the fake score's
        encoder) to tell real data from generated samples."""
        with self.accelerator.autocast():  # bf16 when run.precision is bf16; a no-op otherwise
            if samples is None:
                with torch.no_grad():
                    x0, labels = self.sample(*self.noise())
            else:
                x0, labels = samples
            n = self.cfg.batch
            sigma, noise = shares(lognormal_sigma(n, self.edm.p_mean, self.edm.p_std, device=x0.device), x0)
            loss = dsm_loss(self.wrapped.fake, x0, sigma, noise, self.edm.sigma_data, labels)
            out = {"fake": loss.item()}
            if self.head is not None:
                real, real_labels = self.real(n)
                gan = gan_discriminator_loss(self.logits(real, real_labels, True), self.logits(x0, labels, True))
                loss = loss + self.cfg.gan_head_weight * gan
                out["head"] = gan.item()
        update(self.accelerator, self.opt_f, loss)
        return out

    def generator_step(self) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor | None]]:
        """One generator update; returns its loss and the fake-target gap (the adaptive schedule's signal), and the
        samples (x0 detached, labels) it drew."""
        z, labels = self.noise()
        through = self.method.through_scores
        self._freeze_fake(True)  # gradients reach the generator only, whatever the method
        try:
            with self.accelerator.autocast():
                x0, labels = self.sample(z, labels)
                x_sigma, sigma = self.noised(x0 if through else x0.detach())
                with torch.set_grad_enabled(through):
                    d_fake = self.fake(x_sigma, sigma, labels)
                    d_target = self.target(x_sigma, sigma, labels)
                loss = self.generator_loss(x0, d_fake, d_target, alpha=self.cfg.sid_alpha)
                out = {"generator": loss.item()}
                if self.head is not None:
                    gan = gan_generator_loss(self.logits(x0, labels, False))
                    loss = loss + self.cfg.gan_weight * gan
                    out["generator_gan"] = gan.item()
            update(self.accelerator, self.opt_g, loss)
        finally:
            self._freeze_fake(False)
        # The gap is unweighted: EDM's weight would let the small noise levels, where both scores differ by fitting noise
        # alone, drown the large ones, where the distributions' differences show.
        full = torch.get_default_dtype()  # bf16 outputs in fp32; fp64 (run.precision=fp64) kept in fp64
        out["gap"] = F.mse_loss(d_fake.detach().to(full), d_target.detach().to(full)).item()
        return out, (x0.detach(), labels)

    def _freeze_fake(self, frozen: bool) -> None:
        """Turn gradients of the fake score's trained parameters (and the head's) off or on. Both the optimiser's
        parameters and the ones registered now: under FSDP2 these differ while a root stays gathered after its forward
        (the gathered ones take their flag from the shards only when gathered again)."""
        registered = [p for name, p in self.fake_and_head.named_parameters() if name in self.trained_names]
        for p in [*self.opt_f.param_groups[0]["params"], *registered]:
            p.requires_grad_(not frozen)

    def train_step(self) -> dict[str, float]:
        if self.steps > 1:  # one step per iteration, the same in every process: the global generator draws it alike
            self.step = int(torch.randint(self.steps, ()))
        if self.cfg.reuse_samples:  # DMD2's order: the fake score's first update reuses the generator step's samples
            out, samples = self.generator_step()
            fake = [self.fake_step(samples if i == 0 else None) for i in range(self.cfg.fake_updates)]
        else:
            fake = [self.fake_step() for _ in range(self.cfg.fake_updates)]
            out, _ = self.generator_step()
        for key in fake[0] if fake else ():
            out[key] = sum(f[key] for f in fake) / len(fake)
        out = mean_across(out)  # the gap steers the schedule: every process must see the same value
        self.steps_done += 1
        if self.schedule.step(out["gap"]):
            started = time.perf_counter()
            self.nodes.load(self.schedule.current, self.target)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the copy into the target has landed
            self.switch_seconds.append(round(time.perf_counter() - started, 4))
            self.nodes.prefetch(self.schedule.upcoming)
            self.switches.append(self.steps_done)
        return out
