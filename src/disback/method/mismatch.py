"""How far the generator starts from the teacher, measured before training: the "score mismatch" that DisBack says
backtracking cures. The teacher's denoising loss (EDM-weighted L_dsm) on the generator's samples, against its loss
on data, per band of noise levels. Where the generator's samples are off the teacher's distribution the ratio moves
away from 1: above 1 where the teacher denoises them worse than data, below 1 where they sit where its density is
high (a collapsed generator is easy to denoise at large noise levels)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from disback.config import EDMConfig
from disback.diffusion.losses import weighted_mse

BANDS = 4  # log-spaced bands of noise levels between edm.sigma_min and edm.sigma_max


def band_edges(edm: EDMConfig, bands: int = BANDS) -> list[float]:
    lo, hi = math.log(edm.sigma_min), math.log(edm.sigma_max)
    return [math.exp(lo + (hi - lo) * k / bands) for k in range(bands + 1)]


@torch.no_grad()
def teacher_loss(
    teacher: nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    low: float,
    high: float,
    sigma_data: float,
    seed: int,
    batch: int = 500,
) -> float:
    """The teacher's EDM-weighted L_dsm on x0, with sigma log-uniform in [low, high) (fixed noise: ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, len(x0), batch):
        x = x0[i : i + batch]
        u = torch.rand(len(x), generator=g).to(x.device)
        sigma = (math.log(low) + u * (math.log(high) - math.log(low))).exp()
        noise = torch.randn(x.shape, generator=g).to(x.device)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        y = None if labels is None else labels[i : i + batch]
        total += weighted_mse(teacher(x + s * noise, sigma, y), x, sigma, sigma_data).item() * len(x)
    return total / len(x0)


def score_mismatch(
    teacher: nn.Module,
    generated: torch.Tensor,
    data: torch.Tensor | None,
    edm: EDMConfig,
    *,
    generated_labels: torch.Tensor | None = None,
    data_labels: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Per band of noise levels: the teacher's loss on the generator's samples, on data (None without data), and
    their ratio (1: the teacher sees the generator's samples as it sees data)."""
    was_training = teacher.training
    teacher.eval()
    edges = band_edges(edm)
    out: dict[str, Any] = {
        "bands": [[round(a, 6), round(b, 6)] for a, b in zip(edges[:-1], edges[1:])],
        "generator": [],
        "data": [] if data is not None else None,
        "ratio": [] if data is not None else None,
    }
    for k, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        on_generated = teacher_loss(teacher, generated, generated_labels, low, high, edm.sigma_data, seed + k)
        out["generator"].append(on_generated)
        if data is not None:
            on_data = teacher_loss(teacher, data, data_labels, low, high, edm.sigma_data, seed + k)
            out["data"].append(on_data)
            out["ratio"].append(on_generated / on_data if on_data > 0 else math.inf)
    teacher.train(was_training)
    return out


def mismatch_summary(diagnostic: dict[str, Any]) -> float | None:
    """One number for plots: exp of the mean |ln ratio| over bands, 1 when the teacher sees the generator's samples as it
    sees data, larger the further they are (a ratio below 1, samples collapsed where the density is high, counts as
    far as its inverse above 1). None without data."""
    ratios = diagnostic.get("ratio")
    if not ratios or not all(r > 0 and math.isfinite(r) for r in ratios):
        return None
    return math.exp(sum(abs(math.log(r)) for r in ratios) / len(ratios))
