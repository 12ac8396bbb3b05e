"""What one iteration does, for each kind of stage. The loop in disback.train runs any of them.

ScoreFitting  denoising score matching of one denoiser on samples of a source:
              the teacher (source = data) and Degradation Recording (source = the frozen initial generator).
Distillation  one generator step plus its fake-score updates, against a target chosen by a TargetSchedule:
              Distribution Backtracking (the reversed path) and the baseline (a one-node path, the teacher).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from disback.config import DistillConfig, EDMConfig
from disback.distributed import (
    everyone,
    full_state,
    load_full_state,
    load_optimiser_state,
    local,
    mean_across,
    optimiser_state,
    shard,
)
from disback.errors import DisbackError
from disback.gan import head_for
from disback.losses import (
    dmd_generator_loss,
    dsm_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    karras_sigma,
    lognormal_sigma,
    sid_generator_loss,
    vsd_generator_loss,
)
from disback.path import DegradationPath, NodeReader, TargetSchedule

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
        fsdp: bool = False,
    ):
        self.stage = stage
        self.source, self.batch, self.edm, self.accelerator = source, batch, edm, accelerator
        if fsdp and ema_decay is not None:
            raise DisbackError("run.fsdp does not train teachers (their EMA is not sharded); train the teacher without it, "
                               "or import a pretrained one (teacher.pretrained)")
        if fsdp:
            shard(denoiser)
        optimiser = adam([p for p in denoiser.parameters() if p.requires_grad], lr, accelerator)  # LoRA: adapters only
        # A sharded network is used as it is (FSDP2 shards in place); otherwise accelerate wraps it (DDP) when needed.
        self.model, self.optimiser = (denoiser, optimiser) if fsdp else accelerator.prepare(denoiser, optimiser)
        self.denoiser = accelerator.unwrap_model(self.model)
        # The EMA is copied after prepare() so that it lives on the same device as the model.
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False) if ema_decay is not None else None
        self.ema_decay = ema_decay

    def target_node(self) -> int | None:
        return None

    def modules(self) -> list[nn.Module]:
        return [self.denoiser]

    def state_dict(self) -> dict[str, Any]:
        return {"model": full_state(self.denoiser), "optimiser": optimiser_state(self.denoiser, self.optimiser),
                "ema": None if self.ema is None else self.ema.state_dict(), "source": _state_of(self.source)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_full_state(self.denoiser, state["model"])
        load_optimiser_state(self.denoiser, self.optimiser, state["optimiser"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        _load_state_of(self.source, state["source"])

    def train_step(self) -> dict[str, float]:
        x0, labels = self.source(self.batch)  # this process's share of the batch (disback.distributed)
        sigma, noise = shares(lognormal_sigma(self.batch, self.edm.p_mean, self.edm.p_std, device=x0.device), x0)
        with self.accelerator.autocast():
            loss = dsm_loss(self.model, x0, sigma, noise, self.edm.sigma_data, labels)
        if update(self.accelerator, self.optimiser, loss) and self.ema is not None:
            with torch.no_grad():  # one fused update for all tensors: many small kernels dominate on a GPU
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.denoiser.parameters()), 1.0 - self.ema_decay)
        return mean_across({"loss": loss.item()})


def shares(sigma: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of a global batch's noise levels ``sigma`` and of noise drawn for the whole batch (every
    process draws all of it, so that the random streams stay in step); x0 is this process's share of the data."""
    return local(sigma), local(torch.randn(len(sigma), *x0.shape[1:], device=x0.device))


def adam(params, lr: float, accelerator: Accelerator) -> torch.optim.Optimizer:
    """Adam, fused into one kernel per step on a GPU."""
    return torch.optim.Adam(params, lr=lr, fused=accelerator.device.type == "cuda")


def update(accelerator: Accelerator, optimiser: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
    """Backward and step, unless the loss is not finite in any process: then nothing changes (the loop decides to stop
    or go on)."""
    optimiser.zero_grad(set_to_none=True)
    if not everyone(bool(torch.isfinite(loss))):
        return False
    accelerator.backward(loss)
    optimiser.step()
    return True


def _state_of(source: Any) -> Any:
    """A data source's random state (the order of the data), if it has one."""
    return source.state_dict() if hasattr(source, "state_dict") else None


def _load_state_of(source: Any, state: Any) -> None:
    if state is not None:
        source.load_state_dict(state)


@dataclass(frozen=True)
class Method:
    """A score-distillation method: its generator loss, whether that loss differentiates through the score
    networks (SiD) or only through x0 (VSD, DMD), and whether it adds DMD2's GAN term."""

    loss: Callable[..., torch.Tensor]
    through_scores: bool = False
    gan: bool = False


METHODS = {
    "vsd": Method(vsd_generator_loss),
    "dmd": Method(dmd_generator_loss),
    "dmd2": Method(dmd_generator_loss, gan=True),  # plus two time-scales: distill.fake_updates > 1
    "sid": Method(sid_generator_loss, through_scores=True),
}


class Distillation:
    """Score distillation with a target schedule (DisBack Eq. 8 for the generator, Eq. 5 for the fake score), with the
    generator loss of ``cfg.method``.

    The fake score D_phi starts at the path's last node (the teacher for the baseline, whose path is the teacher
    alone); the target starts at the schedule's first node and is reloaded from its node file (sha256 and keys
    checked) every time the schedule moves. ``real`` draws data for the GAN term of dmd2.
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
    ):
        self.stage, self.cfg, self.edm, self.shape, self.accelerator = stage, cfg, edm, tuple(shape), accelerator
        self.num_classes, self.method, self.real = num_classes, METHODS[cfg.method], real
        if self.method.gan and real is None:
            raise ValueError(f"method '{cfg.method}' needs real data for its GAN term")
        self.path, self.schedule, self.nodes = path, schedule, NodeReader(path)
        if len(path) > 1:  # a one-node path is the teacher, which fake and target already are (copies or views of it)
            self.nodes.load(path.last, fake)
            self.nodes.load(schedule.current, target)
            self.nodes.prefetch(schedule.upcoming)
        device = accelerator.device
        # The frozen target only runs forward: under bf16 it is held in bf16 (half the memory, no casts). With LoRA its
        # base is the teacher that the fake score shares, which so becomes bf16 too: frozen, it only runs forward.
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
        self.target = target.requires_grad_(False).eval().to(device, dtype=dtype)
        self.generator_module, self.fake_module = generator.to(device), fake.to(device)
        self.head = self.tap = None
        if self.method.gan:
            self.head, self.tap = head_for(fake, torch.zeros(2, *shape, device=device), 1.0,
                                           torch.zeros(2, dtype=torch.long, device=device) if num_classes else None)
        trained = [m for m in (generator, fake, self.head) if m is not None]
        if fsdp:  # sharded in place, before the optimisers are built on the shards
            for module in trained:
                shard(module)
        # the fake score's optimiser also trains the head; a container names their parameters for sharded state dicts
        self.fake_and_head = nn.ModuleDict({"fake": fake, **({"head": self.head} if self.head is not None else {})})
        fake_params = [p for p in self.fake_and_head.parameters() if p.requires_grad]  # LoRA: adapters, not the teacher
        opt_g = adam(generator.parameters(), cfg.lr_generator, accelerator)
        opt_f = adam(fake_params, cfg.lr_fake, accelerator)
        # self.generator, self.fake and self.head_trained are the prepared (under several processes, DDP-wrapped)
        # networks: used where they are trained. The generator step runs the frozen fake score and head unwrapped,
        # since DDP expects gradients for every parameter of a wrapped network that runs with gradients enabled.
        # Sharded networks are used as they are (FSDP2 shards in place, and a frozen one may run with gradients).
        prepared = trained + [opt_g, opt_f] if fsdp else accelerator.prepare(*trained, opt_g, opt_f)
        self.generator, self.fake, self.opt_g, self.opt_f = prepared[0], prepared[1], prepared[-2], prepared[-1]
        self.head_trained = prepared[2] if self.head is not None else None
        self.switches: list[int] = []  # generator steps at which the target moved
        self.steps_done = 0

    def target_node(self) -> int:
        return self.schedule.current

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.generator_module, self.fake_module, self.head) if m is not None]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": full_state(self.generator_module), "fake": full_state(self.fake_module),
                "head": None if self.head is None else full_state(self.head),
                "opt_g": optimiser_state(self.generator_module, self.opt_g), "opt_f": optimiser_state(self.fake_and_head, self.opt_f),
                "schedule": self.schedule.state_dict(),
                "switches": list(self.switches), "steps_done": self.steps_done, "real": _state_of(self.real)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_full_state(self.generator_module, state["generator"])
        load_full_state(self.fake_module, state["fake"])
        if self.head is not None:
            load_full_state(self.head, state["head"])
        load_optimiser_state(self.generator_module, self.opt_g, state["opt_g"])
        load_optimiser_state(self.fake_and_head, self.opt_f, state["opt_f"])
        self.schedule.load_state_dict(state["schedule"])
        self.switches, self.steps_done = list(state["switches"]), state["steps_done"]
        _load_state_of(self.real, state["real"])
        if len(self.path) > 1:
            self.nodes.load(self.schedule.current, self.target)  # the target the schedule had reached
            self.nodes.prefetch(self.schedule.upcoming)

    def noise(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent noise, and uniformly drawn class labels when the networks are class-conditional (this process's share)."""
        device = self.accelerator.device
        z = torch.randn(self.cfg.batch, *self.shape, device=device)
        labels = torch.randint(self.num_classes, (self.cfg.batch,), device=device) if self.num_classes else None
        return local(z), local(labels)

    def noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 + sigma n with sigma spread over the generator loss's Karras range."""
        n = self.cfg.batch  # x0 is this process's share of a batch of n
        sigma, noise = shares(karras_sigma(n, self.cfg.sigma_min, self.cfg.sigma_max, self.edm.rho, device=x0.device), x0)
        return x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * noise, sigma

    def logits(self, x0: torch.Tensor, labels: torch.Tensor | None, trained: bool) -> torch.Tensor:
        """The GAN head's logits for noised x0, from the fake score's bottleneck features (through the prepared
        networks when ``trained``, the plain ones when frozen)."""
        x_sigma, sigma = self.noised(x0)
        (self.fake if trained else self.fake_module)(x_sigma, sigma, labels)
        return (self.head_trained if trained else self.head)(self.tap.take())

    def fake_step(self, samples: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> dict[str, float]:
        """Fit the fake score to the generator's current samples (L_dsm on stopgrad(G(z))), or to ``samples`` (x0,
        labels) that the generator step just drew; for dmd2 also train the GAN head (and through it the fake score's
        encoder) to tell real data from generated samples."""
        with self.accelerator.autocast():  # bf16 when run.precision is bf16; a no-op otherwise
            if samples is None:
                z, labels = self.noise()
                with torch.no_grad():
                    x0 = self.generator(z, labels)
            else:
                x0, labels = samples
            n = self.cfg.batch
            sigma, noise = shares(lognormal_sigma(n, self.edm.p_mean, self.edm.p_std, device=x0.device), x0)
            loss = dsm_loss(self.fake, x0, sigma, noise, self.edm.sigma_data, labels)
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
                x0 = self.generator(z, labels)
                x_sigma, sigma = self.noised(x0 if through else x0.detach())
                with torch.set_grad_enabled(through):
                    d_fake = self.fake_module(x_sigma, sigma, labels)
                    d_target = self.target(x_sigma, sigma, labels)
                loss = self.method.loss(x0, d_fake, d_target, alpha=self.cfg.sid_alpha)
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
        out["gap"] = F.mse_loss(d_fake.detach().float(), d_target.detach().float()).item()
        return out, (x0.detach(), labels)

    def _freeze_fake(self, frozen: bool) -> None:
        for p in self.opt_f.param_groups[0]["params"]:  # the fake score's trained parameters (and the head's)
            p.requires_grad_(not frozen)

    def train_step(self) -> dict[str, float]:
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
            self.nodes.load(self.schedule.current, self.target)
            self.nodes.prefetch(self.schedule.upcoming)
            self.switches.append(self.steps_done)
        return out
