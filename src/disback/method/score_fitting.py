"""Denoising score matching of one denoiser on samples of a source: the teacher (source = the data, with an EMA)
and Degradation Recording (source = the frozen initial generator)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from disback.config import EDMConfig
from disback.diffusion.losses import dsm_loss, lognormal_sigma
from disback.distributed import full_state, load_full_state, load_optimiser_state, mean_across, optimiser_state, shard
from disback.method.steps import Source, adam, load_state_of, shares, state_of, update


class ScoreFitting:
    """One L_dsm step per iteration. ``self.denoiser`` is the network; ``self.wrapped`` the same network as it is
    trained (DDP-wrapped by accelerate under several processes, itself otherwise)."""

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
        if fsdp and ema_decay is not None:
            raise ValueError("a sharded network has no EMA here")
        self.stage = stage
        self.source, self.batch, self.edm, self.accelerator = source, batch, edm, accelerator
        if fsdp:
            shard(denoiser)
        optimiser = adam([p for p in denoiser.parameters() if p.requires_grad], lr, accelerator)  # LoRA: adapters only
        # A sharded network is used as it is (FSDP2 shards in place); otherwise accelerate wraps it (DDP) when needed.
        self.wrapped, self.optimiser = (denoiser, optimiser) if fsdp else accelerator.prepare(denoiser, optimiser)
        self.denoiser = accelerator.unwrap_model(self.wrapped)
        # The EMA is copied after prepare() so that it lives on the same device as the model.
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False) if ema_decay is not None else None
        self.ema_decay = ema_decay

    def target_node(self) -> int | None:
        return None

    def modules(self) -> list[nn.Module]:
        return [self.denoiser]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": full_state(self.denoiser),
            "optimiser": optimiser_state(self.denoiser, self.optimiser),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "source": state_of(self.source),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_full_state(self.denoiser, state["model"])
        load_optimiser_state(self.denoiser, self.optimiser, state["optimiser"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        load_state_of(self.source, state["source"])

    def train_step(self) -> dict[str, float]:
        x0, labels = self.source(self.batch)  # this process's share of the batch (disback.distributed)
        sigma, noise = shares(lognormal_sigma(self.batch, self.edm.p_mean, self.edm.p_std, device=x0.device), x0)
        with self.accelerator.autocast():
            loss = dsm_loss(self.wrapped, x0, sigma, noise, self.edm.sigma_data, labels)
        if update(self.accelerator, self.optimiser, loss) and self.ema is not None:
            with torch.no_grad():  # one fused update for all tensors: many small kernels dominate on a GPU
                torch._foreach_lerp_(
                    list(self.ema.parameters()), list(self.denoiser.parameters()), 1.0 - self.ema_decay
                )
        return mean_across({"dsm": loss.item()})
