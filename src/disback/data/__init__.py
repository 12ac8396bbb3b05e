"""Point data: a built-in distribution or the user's own N x D file, standardised for training."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disback.config import DataConfig
from disback.data.toy import MODE_STD, TOY
from disback.errors import DisbackError

MIN_ROWS = 50


@dataclass
class PointData:
    """Training points and evaluation reference, both in the data's own units.

    Networks see standardised points ``(x - mean) / scale``; a single scalar scale keeps the geometry (and so the
    modes) isotropic. Metrics and plots use the data's own units.
    """

    name: str
    train: np.ndarray
    reference: np.ndarray
    modes: np.ndarray | None
    mode_std: float | None
    mean: np.ndarray
    scale: float

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    def to_model(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((x - self.mean) / self.scale, dtype=torch.float32)

    def from_model(self, x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().double().numpy() * self.scale + self.mean

    def normaliser(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale}


def builtin_names() -> list[str]:
    return sorted(TOY)


def load_points(cfg: DataConfig, seed: int) -> PointData:
    """``cfg.name`` is a built-in name or a path to an .npy / .csv file of shape N x D."""
    if cfg.name in TOY:
        sampler, modes = TOY[cfg.name]
        rng = np.random.default_rng(seed)
        train = sampler(cfg.n_train, rng)
        # The reference is drawn from its own stream so that it never overlaps the training points.
        reference = sampler(cfg.n_eval, np.random.default_rng([seed, 1]))
        mode_std = MODE_STD if modes is not None else None
        name = cfg.name
    else:
        path = Path(cfg.name)
        if path.suffix.lower() not in (".npy", ".csv") and not path.exists():
            hint = difflib.get_close_matches(cfg.name, builtin_names(), n=1)
            raise DisbackError(
                f"unknown data '{cfg.name}'"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f" Use one of {', '.join(builtin_names())}, or a path to an .npy or .csv file of N x 2 points."
            )
        train = read_point_file(path)
        # A user's file is the whole empirical distribution: the teacher is fitted to it and measured against it.
        reference = train
        modes, mode_std, name = None, None, str(path)
    mean = train.mean(0)
    scale = float(np.sqrt(((train - mean) ** 2).sum(1).mean() / train.shape[1]))
    if scale <= 0:
        raise DisbackError(f"all points of '{name}' are identical; there is no distribution to learn")
    return PointData(name, train, reference, modes, mode_std, mean, scale)


def read_point_file(path: Path) -> np.ndarray:
    """Read N x D points (D >= 1 columns, N >= MIN_ROWS rows, all finite) from .npy or .csv."""
    if not path.is_file():
        raise DisbackError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            arr = _read_csv(path)
        else:
            raise DisbackError(f"data file {path} must be .npy or .csv, not '{suffix}'")
    except DisbackError:
        raise
    except Exception as exc:  # numpy raises several types for a damaged file
        raise DisbackError(f"cannot read {path}: {exc}") from None
    if arr.dtype.kind not in "fiu":
        raise DisbackError(f"{path} holds {arr.dtype} values; points must be numbers")
    if arr.ndim == 1:
        raise DisbackError(f"{path} holds a 1-D array of shape {arr.shape}; points must be a 2-D array, one row per point (N x D, e.g. N x 2)")
    if arr.ndim != 2:
        raise DisbackError(f"{path} holds an array of shape {arr.shape}; points must be a 2-D array, one row per point (N x D, e.g. N x 2)")
    if arr.shape[0] < MIN_ROWS:
        raise DisbackError(f"{path} has {arr.shape[0]} rows; at least {MIN_ROWS} points are needed to fit a teacher")
    bad = ~np.isfinite(arr).all(1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise DisbackError(f"{path} has {int(bad.sum())} rows with NaN or infinite values (first rows: {rows}); remove them")
    return arr.astype(np.float64)


def _read_csv(path: Path) -> np.ndarray:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise DisbackError(f"{path} is empty")
    try:
        [float(v) for v in lines[0].split(",")]
    except ValueError:
        lines = lines[1:]  # a header row
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append([float(v) for v in line.split(",")])
        except ValueError:
            raise DisbackError(f"{path}: row {number} is not numeric: '{line[:60]}'") from None
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise DisbackError(f"{path}: rows have different numbers of columns ({sorted(widths)})")
    return np.array(rows, dtype=np.float64)
