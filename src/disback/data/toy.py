"""Built-in 2-D distributions. Each returns points in its own units and, where it has them, its modes."""

from __future__ import annotations

from typing import Callable

import numpy as np

Sampler = Callable[[int, np.random.Generator], np.ndarray]


def _mixture(centres: np.ndarray, std: float) -> Sampler:
    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        which = rng.integers(len(centres), size=n)
        return centres[which] + std * rng.standard_normal((n, 2))

    return sample


RING8_MODES = np.stack([2.0 * np.array([np.cos(a), np.sin(a)]) for a in np.arange(8) * (2 * np.pi / 8)])
GRID25_MODES = np.array([[x, y] for x in range(-2, 3) for y in range(-2, 3)], dtype=np.float64)
MODE_STD = 0.05


def moons(n: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    upper = rng.random(n) < 0.5
    t = rng.random(n) * np.pi
    x = np.where(upper, np.cos(t), 1.0 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return np.stack([x, y], 1) + noise * rng.standard_normal((n, 2))


def swissroll(n: int, rng: np.random.Generator, noise: float = 0.1) -> np.ndarray:
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    return np.stack([t * np.cos(t), t * np.sin(t)], 1) / 5.0 + noise * rng.standard_normal((n, 2))


def checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    # 8 filled unit squares of a 4x4 board on [-2, 2]^2, as in FFJORD's toy data.
    x = rng.random(n) * 4.0 - 2.0
    col = np.floor(x) + 2  # 0..3
    y = rng.random(n) + rng.integers(0, 2, size=n) * 2.0 - 2.0  # lower square of a pair: [-2,-1) or [0,1)
    y = y + (col % 2)  # odd columns shift up by one, so the filled squares alternate
    return np.stack([x, y], 1)


# name -> (sampler, modes or None)
TOY: dict[str, tuple[Sampler, np.ndarray | None]] = {
    "ring8": (_mixture(RING8_MODES, MODE_STD), RING8_MODES),
    "grid25": (_mixture(GRID25_MODES, MODE_STD), GRID25_MODES),
    "moons": (moons, None),
    "swissroll": (swissroll, None),
    "checkerboard": (checkerboard, None),
}
