"""Data: built-in 2-D distributions and image sets, or the user's own points or images, ready for training.

Networks see standardised data, ``(x - mean) / scale``; metrics and plots use the data's own units (points in
their coordinates, images in [0, 1]).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disback.config import DataConfig
from disback.data import images as image_io
from disback.data.toy import MODE_STD, TOY
from disback.errors import DisbackError

MIN_ROWS = 50
IMAGE_SETS = {"digits": 8, "fashion": 28}  # name -> native resolution


@dataclass
class Data:
    name: str
    kind: str  # "points" or "images"
    train: np.ndarray  # N x D points, or N x C x H x W images in [0, 1]
    reference: np.ndarray  # held-out samples that every measure compares against
    mean: np.ndarray | float
    scale: float
    labels: np.ndarray | None = None  # class labels of ``train`` (images), used by the feature network
    modes: np.ndarray | None = None
    mode_std: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def measure(self) -> str:
        """The headline measure: sliced Wasserstein for points, a Fréchet distance for images."""
        return "swd" if self.kind == "points" else "fid"

    def to_model(self, x: np.ndarray) -> torch.Tensor:
        """Standardised, in torch's default dtype: float32, or float64 under run.precision=fp64."""
        return torch.as_tensor((x - self.mean) / self.scale, dtype=torch.get_default_dtype())

    def from_model(self, x: torch.Tensor) -> np.ndarray:
        return to_units(x, self.normaliser(), images=self.kind == "images")

    def normaliser(self) -> dict:
        mean = self.mean.tolist() if isinstance(self.mean, np.ndarray) else self.mean
        return {"mean": mean, "scale": self.scale}

    def set_normaliser(self, norm: dict) -> None:
        mean = norm["mean"]
        self.mean = np.asarray(mean, dtype=np.float64) if isinstance(mean, list) else float(mean)
        self.scale = float(norm["scale"])


def to_units(x: torch.Tensor, normaliser: dict, images: bool) -> np.ndarray:
    """Undo the standardisation: points in their own coordinates, images clipped to [0, 1]."""
    out = x.detach().cpu().double().numpy() * normaliser["scale"] + np.asarray(normaliser["mean"])
    return np.clip(out, 0.0, 1.0).astype(np.float32) if images else out


def builtin_names() -> list[str]:
    return sorted(TOY) + sorted(IMAGE_SETS)


def load_data(cfg: DataConfig, seed: int) -> Data:
    """``cfg.name``: a built-in name, a points file (.npy/.csv), or images (a folder, an .npz file, or an EDM dataset
    zip with its labels)."""
    if cfg.name in TOY:
        return _toy(cfg, seed)
    if cfg.name in IMAGE_SETS:
        return _image_set(cfg, seed)
    path = Path(cfg.name)
    if path.suffix.lower() in (".npy", ".csv"):
        return _points(path)
    if path.is_dir() or path.suffix.lower() in (".npz", ".zip"):
        if not path.exists():
            raise DisbackError(f"data file {path} does not exist")
        _need_image_preset(cfg, str(path))
        images, labels = image_io.read_labelled_images(path, cfg.resolution, cfg.channels)
        return _images(str(path), images, labels, seed)
    hint = difflib.get_close_matches(cfg.name, builtin_names(), n=1)
    raise DisbackError(
        f"unknown data '{cfg.name}'"
        + (f"; did you mean '{hint[0]}'?" if hint else "")
        + f" Use one of {', '.join(builtin_names())}, an .npy/.csv file of N x D points, or a folder / .npz / EDM .zip "
        "of images."
    )


def _need_image_preset(cfg: DataConfig, name: str) -> None:
    if cfg.resolution <= 0 or cfg.channels <= 0:
        raise DisbackError(
            f"'{name}' is image data but the preset is for points; use an image preset, e.g. --preset digits"
        )


def _toy(cfg: DataConfig, seed: int) -> Data:
    sampler, modes = TOY[cfg.name]
    train = sampler(cfg.n_train, np.random.default_rng(seed))
    # The reference is drawn from its own stream so that it never overlaps the training points.
    reference = sampler(cfg.n_eval, np.random.default_rng([seed, 1]))
    mean, scale = _standardise(train, cfg.name)
    return Data(
        cfg.name, "points", train, reference, mean, scale, modes=modes, mode_std=MODE_STD if modes is not None else None
    )


def _points(path: Path) -> Data:
    train = read_point_file(path)
    mean, scale = _standardise(train, str(path))
    # A user's file is the whole empirical distribution: the teacher is fitted to it and measured against it.
    return Data(str(path), "points", train, train, mean, scale)


def _standardise(x: np.ndarray, name: str) -> tuple[np.ndarray, float]:
    """One scale for all axes keeps the geometry (and so the modes) isotropic."""
    mean = x.mean(0)
    scale = float(np.sqrt(((x - mean) ** 2).sum(1).mean() / x.shape[1]))
    if scale <= 0:
        raise DisbackError(f"all points of '{name}' are identical; there is no distribution to learn")
    return mean, scale


def _image_set(cfg: DataConfig, seed: int) -> Data:
    _need_image_preset(cfg, cfg.name)
    images, labels = image_io.digits() if cfg.name == "digits" else image_io.fashion(cfg.root)
    if images.shape[1] != cfg.channels:
        images = np.repeat(images, cfg.channels, axis=1) if cfg.channels == 3 else images.mean(1, keepdims=True)
    if images.shape[-1] != cfg.resolution:
        images = np.stack([image_io.resize(im, cfg.resolution, Path(cfg.name)) for im in images])
    return _images(cfg.name, images, labels, seed)


def _images(name: str, images: np.ndarray, labels: np.ndarray | None, seed: int, held_out: float = 0.15) -> Data:
    """Hold out a fixed share of the images as the reference of every Fréchet distance; train on the rest."""
    order = np.random.default_rng([seed, 2]).permutation(len(images))
    n_ref = max(int(held_out * len(images)), 10)
    ref, train = order[:n_ref], order[n_ref:]
    return Data(name, "images", images[train], images[ref], 0.5, 0.5, labels=None if labels is None else labels[train])


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
        raise DisbackError(
            f"{path} holds a 1-D array of shape {arr.shape}; points must be a 2-D array, one row per point (N x D, e.g. N x 2)"
        )
    if arr.ndim != 2:
        raise DisbackError(
            f"{path} holds an array of shape {arr.shape}; points must be a 2-D array, one row per point (N x D, e.g. N x 2)"
        )
    if arr.shape[0] < MIN_ROWS:
        raise DisbackError(f"{path} has {arr.shape[0]} rows; at least {MIN_ROWS} points are needed to fit a teacher")
    bad = ~np.isfinite(arr).all(1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise DisbackError(
            f"{path} has {int(bad.sum())} rows with NaN or infinite values (first rows: {rows}); remove them"
        )
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
