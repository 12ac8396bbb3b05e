"""Distances between point sets: sliced Wasserstein, MMD, and mode coverage for mixtures with known modes."""

from __future__ import annotations

import numpy as np
import torch


def directions(dim: int, n: int, seed: int = 0) -> np.ndarray:
    """Unit directions for slicing; evenly spaced on the half circle in 2-D, random (fixed seed) otherwise."""
    if dim == 2:
        angles = np.arange(n) * np.pi / n
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    v = np.random.default_rng(seed).standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, dirs: np.ndarray) -> float:
    """SW_1: the mean over directions of the 1-D Wasserstein-1 distance between the projections.

    W_1 rather than W_2 because W_2 between finite samples of a mixture is dominated by the sampling noise of the
    mode weights (a quantile that crosses the gap between two modes). Sets of different sizes are compared through
    matching quantiles.
    """
    px, py = np.sort(x @ dirs.T, axis=0), np.sort(y @ dirs.T, axis=0)
    n = max(len(px), len(py))
    q = (np.arange(n) + 0.5) / n
    qx = px[np.minimum((q * len(px)).astype(int), len(px) - 1)]
    qy = py[np.minimum((q * len(py)).astype(int), len(py) - 1)]
    return float(np.abs(qx - qy).mean())


def mmd(x: np.ndarray, y: np.ndarray, bandwidths: np.ndarray, max_points: int = 1000) -> float:
    """Biased MMD^2 estimate with a sum of Gaussian kernels of the given bandwidths (on at most max_points each)."""
    a = torch.as_tensor(x[:max_points], dtype=torch.float32)
    b = torch.as_tensor(y[:max_points], dtype=torch.float32)
    scales = torch.as_tensor(-0.5 / np.asarray(bandwidths) ** 2, dtype=torch.float32)

    def k(u: torch.Tensor, v: torch.Tensor) -> float:
        d2 = torch.cdist(u, v).square_()
        return float(sum(torch.exp(d2 * s).mean() for s in scales))

    return max(k(a, a) + k(b, b) - 2 * k(a, b), 0.0)


def default_bandwidths(reference: np.ndarray) -> np.ndarray:
    """Multiples of the reference's per-dimension scale, so that both fine and coarse structure count."""
    scale = float(reference.std(0).mean())
    return scale * np.array([0.05, 0.2, 1.0])


def mode_coverage(x: np.ndarray, modes: np.ndarray, std: float) -> dict[str, float]:
    """Share of samples within 3 std of a mode ("high quality"), and share of modes that hold at least 20% of
    the high-quality samples a balanced mixture would give them."""
    d = np.linalg.norm(x[:, None, :] - modes[None], axis=2)
    nearest, dist = d.argmin(1), d.min(1)
    good = dist <= 3 * std
    counts = np.bincount(nearest[good], minlength=len(modes))
    expected = len(x) / len(modes)
    return {"high_quality": float(good.mean()), "modes": float((counts >= 0.2 * expected).mean())}


class PointMetrics:
    """Everything measured against one fixed reference set; the same directions and bandwidths every call."""

    def __init__(
        self, reference: np.ndarray, projections: int, modes: np.ndarray | None = None, mode_std: float | None = None
    ):
        self.reference = reference
        self.dirs = directions(reference.shape[1], projections)
        self.bandwidths = default_bandwidths(reference)
        self.modes, self.mode_std = modes, mode_std

    def __call__(self, samples: np.ndarray) -> dict[str, float]:
        if not np.isfinite(samples).all():
            return {"swd": float("nan"), "mmd": float("nan")}
        out = {
            "swd": sliced_wasserstein(samples, self.reference, self.dirs),
            "mmd": mmd(samples, self.reference, self.bandwidths),
        }
        if self.modes is not None:
            out.update(mode_coverage(samples, self.modes, self.mode_std))
        return out
