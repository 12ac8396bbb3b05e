"""The Fréchet distance of generated images to reference images, in a feature network's space.

``eval.features`` picks the network (``image_features``):
- "classifier" (the offline default): a small CNN trained on the data set itself and cached. This is NOT Inception
  FID: its numbers compare only with numbers from the same feature network (same data, same cache).
- "inception=FILE" (or a URL): the field's Inception FID, as NVlabs/edm computes it (disback.metrics.inception).
- "package.module:function": any feature function of the user's.
Reference statistics (mu, sigma) can come from an .npz as EDM's ``fid.py ref`` writes them (``reference_stats``).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from disback.errors import DisbackError
from disback.storage.fetch import cache_dir
from disback.storage.weights import load_weights, read_metadata, save_weights

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # images N x C x H x W in [0, 1] -> features N x F
CACHE_VERSION = 1


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)).

    Tr((C1 C2)^(1/2)) is computed as the sum of square roots of the eigenvalues of C1^(1/2) C2 C1^(1/2), which is
    symmetric positive semi-definite, so no complex matrix square root is needed.
    """
    w1, v1 = np.linalg.eigh(cov1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    middle = root1 @ cov2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = features.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


class RunningStatistics:
    """(mu, sigma) of features that arrive a batch at a time, as EDM's fid.py accumulates them: the sum and the sum of
    outer products in float64, so that 50,000 samples never have to be held at once."""

    def __init__(self) -> None:
        self.n, self.total, self.outer = 0, None, None

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if self.total is None:
            self.total, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f

    def value(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise DisbackError(f"statistics need at least 2 samples, got {self.n}")
        mu = self.total / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


class SmallCNN(nn.Module):
    """Three convolutions and a global average: 128 features, for images from 8x8 up. Always float32, also under
    run.precision=fp64: a measure, cached and shared by runs of every precision, whose numbers stay comparable."""

    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.head = nn.Linear(128, n_classes)
        self.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(2 * x - 1).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _rotations(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Without class labels the network learns to tell the four rotations of an image apart (self-supervised)."""
    rotated = np.concatenate([np.rot90(images, k, axes=(2, 3)) for k in range(4)])
    return np.ascontiguousarray(rotated), np.repeat(np.arange(4), len(images))


def train_classifier(
    images: np.ndarray, labels: np.ndarray | None, steps: int = 1500, seed: int = 0
) -> tuple[SmallCNN, dict[str, Any]]:
    task = "classes" if labels is not None else "rotation"
    if labels is None:
        images, labels = _rotations(images)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    n_val = min(max(len(images) // 10, 1), 5000)
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    val, train = order[:n_val], order[n_val:]
    net = SmallCNN(images.shape[1], int(labels.max()) + 1).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = train[torch.randint(len(train), (128,), generator=gen)]
        loss = F.cross_entropy(net(x[idx].to(device)), y[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net = net.cpu().eval()
    with torch.no_grad():
        accuracy = float((net(x[val]).argmax(1) == y[val]).float().mean())
    return net, {"task": task, "accuracy": accuracy, "n_classes": int(labels.max()) + 1, "channels": images.shape[1]}


def classifier_features(
    images: np.ndarray, labels: np.ndarray | None, steps: int = 1500
) -> tuple[FeatureFn, dict[str, Any]]:
    """The classifier for these images, trained once and cached under a fingerprint of the data and its budget."""
    digest = hashlib.sha256(f"{steps}".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels).tobytes())
    file = cache_dir() / f"features-v{CACHE_VERSION}-{digest.hexdigest()[:16]}.safetensors"
    if file.is_file():
        info = read_metadata(file)
        net = SmallCNN(info["channels"], info["n_classes"])
        load_weights(net, file)
        info["cached"] = True
    else:
        net, info = train_classifier(images, labels, steps)
        save_weights(net, file, info)
        info["cached"] = False
    net.eval().requires_grad_(False)
    return net.features, {**info, "file": str(file)}


def plugged_features(spec: str) -> tuple[FeatureFn, dict[str, Any]]:
    """``package.module:function``; the function takes no argument and returns images -> features."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError, ValueError) as exc:
        raise DisbackError(
            f"eval.features '{spec}' must be 'package.module:function' returning a feature function ({exc})"
        ) from None
    return fn, {"task": "plugged", "spec": spec}


def image_features(
    spec: str, data_images: np.ndarray | None = None, labels: np.ndarray | None = None, classifier_steps: int = 1500
) -> tuple[FeatureFn, dict[str, Any]]:
    """The feature network ``spec`` names (see the module's docstring), and what to record about it."""
    if spec == "classifier":
        if data_images is None:
            raise DisbackError(
                "the classifier features are trained on the data set; give the data, or choose "
                "--features inception=FILE"
            )
        return classifier_features(data_images, labels, classifier_steps)
    if spec.startswith("inception="):
        from disback.metrics.inception import InceptionFeatures, fetch

        net = InceptionFeatures(
            *fetch(spec.split("=", 1)[1], cache_dir()), device="cuda" if torch.cuda.is_available() else "cpu"
        )
        return net, net.info
    if ":" in spec:
        return plugged_features(spec)
    raise DisbackError(
        f"unknown features '{spec}': give classifier, inception=FILE (or a URL), or package.module:function"
    )


def reference_stats(file: Path, dimension: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz (EDM's fid.py ref writes them so), checked against the feature dimension."""
    try:
        with np.load(file, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise DisbackError(
                    f"{file} holds {', '.join(z.files) or 'nothing'}, not the reference statistics 'mu' and "
                    "'sigma' (as EDM's fid.py ref writes them); give those, or a folder or .npz of images"
                )
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    except (OSError, ValueError) as exc:
        raise DisbackError(f"cannot read the reference statistics {file} ({exc})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DisbackError(f"{file}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    if dimension is not None and len(mu) != dimension:
        raise DisbackError(
            f"{file} holds statistics of {len(mu)}-d features, and the feature network gives {dimension}: "
            "they were computed with another network"
        )
    return mu, sigma


class ImageMetrics:
    """Fréchet distance of generator samples to the reference (held-out images, or given statistics), in the feature
    network's space."""

    def __init__(
        self,
        reference: np.ndarray | tuple[np.ndarray, np.ndarray],
        features: FeatureFn,
        info: dict[str, Any],
        batch: int = 500,
    ):
        self.features, self.info, self.batch = features, info, batch
        self.ref_stats = reference if isinstance(reference, tuple) else statistics(self.embed(reference))

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(images, dtype=torch.float32)
        return torch.cat([self.features(x[i : i + self.batch]) for i in range(0, len(x), self.batch)]).double().numpy()

    def __call__(self, samples: np.ndarray) -> dict[str, float]:
        if not np.isfinite(samples).all():
            return {"fid": float("nan")}
        return {"fid": frechet_distance(*statistics(self.embed(samples)), *self.ref_stats)}
