"""Inception features as NVlabs/edm, DMD2, SiD and FastGen compute FID: StyleGAN2-ADA's TorchScript translation of
TensorFlow's Inception (``inception-2015-12-05.pt``), fed uint8 NCHW images with 3 channels, called with
``return_features=True`` for its 2048 pool features. It resizes to 299 x 299 itself, so images go in at the
resolution the reference statistics were computed at.

The network file comes from a local path, or from a URL downloaded once into ``$DISBACK_CACHE``; a ``#sha256=...``
fragment on the URL is checked (without one, a warning says the file is unverified), and either way the file's
sha256 is recorded with every measurement.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from disback.errors import DisbackError
from disback.storage.fetch import fetch as fetch_file

URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
DIMENSION = 2048


def fetch(spec: str, cache: Path) -> tuple[Path, str]:
    """The Inception network file a path or URL names, and its sha256; a URL is downloaded once into ``cache``."""
    hint = f"download it once from {URL} and give its path (eval.features=inception=FILE), or give the URL"
    return fetch_file(spec, cache, what="Inception network file", hint=hint)


class InceptionFeatures:
    """images N x C x H x W in [0, 1] -> 2048-d Inception pool features, as EDM's fid.py computes them."""

    def __init__(self, file: Path, sha256: str, device: torch.device | str = "cpu"):
        self.file, self.sha256, self.device = Path(file), sha256, torch.device(device)
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, and still how this network is published
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(self.file), map_location=self.device).eval()
        except (RuntimeError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DisbackError(
                f"{self.file} is not a TorchScript network that torch.jit.load reads ({first}); give "
                f"StyleGAN2-ADA's inception-2015-12-05.pt ({URL})"
            ) from None
        try:
            probe = self(torch.zeros(2, 3, 32, 32))
        except Exception as exc:  # a scripted network of another calling convention fails in its own way
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DisbackError(
                f"{self.file} cannot be called as Inception is (uint8 images, return_features=True): {first}; "
                f"give StyleGAN2-ADA's inception-2015-12-05.pt ({URL})"
            ) from None
        if not isinstance(probe, torch.Tensor) or probe.ndim != 2 or probe.shape[1] != DIMENSION:
            got = tuple(probe.shape[1:]) if isinstance(probe, torch.Tensor) else type(probe).__name__
            raise DisbackError(
                f"{self.file} returns features of shape {got} with return_features=True, not "
                f"({DIMENSION},): it is not the Inception network FID is computed with"
            )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # the uint8 images EDM's fid.py feeds it
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        out = self.net(x.to(self.device), return_features=True)
        return out.float().cpu() if isinstance(out, torch.Tensor) else out

    @property
    def info(self) -> dict[str, Any]:
        return {"task": "inception", "file": str(self.file), "sha256": self.sha256, "dimension": DIMENSION}
