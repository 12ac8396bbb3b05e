"""``disback.load_denoiser``: any model disback reads as one denoiser D(x, sigma, class_labels=None) in EDM's
convention (x and sigma in the network's units, D the denoised estimate; the score is (D - x) / sigma^2)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from disback.errors import DisbackError
from disback.storage.fetch import is_url
from disback.storage.meta import read_meta
from disback.storage.weights import read_metadata

MODEL_FILES = ("teacher.safetensors", "generator.safetensors", "teacher/teacher.safetensors")


class EDMConvention(nn.Module):
    """A disback denoiser D(x, sigma, labels) called as EDM's networks are: ``class_labels`` one-hot (or indices),
    ``sigma`` a number or a tensor of any shape that holds one value per sample."""

    def __init__(self, denoiser: nn.Module, num_classes: int = 0, normaliser: dict | None = None):
        super().__init__()
        self.denoiser, self.num_classes = denoiser, int(num_classes)
        self.normaliser = normaliser or {"mean": 0.5, "scale": 0.5}  # network units -> data units: x * scale + mean

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None):
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
        sigma = sigma.expand(len(x)) if sigma.numel() == 1 else sigma
        labels = class_labels
        if labels is not None and labels.is_floating_point():  # EDM's one-hot rows
            labels = labels.reshape(len(x), -1).argmax(1)
        if self.num_classes and labels is None:
            raise ValueError(f"this denoiser is class-conditional ({self.num_classes} classes): give class_labels")
        return self.denoiser(x, sigma.to(x.dtype), labels)


def load_denoiser(path: str | Path) -> nn.Module:
    """A denoiser from an EDM / EDM2 network snapshot (path or URL: EDM's own network, its preconditioner as
    recorded, fp16 where the snapshot says so on a GPU), a disback model file or run folder (a teacher, a path node or
    a generator's denoiser), or a diffusers UNet2DModel folder (its scheduler beside it). The module is in eval mode
    with gradients off; ``.normaliser`` maps its outputs to data units where disback knows them."""
    from disback.storage.nvlabs import is_snapshot, load_network

    if is_snapshot(path):
        network, _ = load_network(path, use_fp16=None)
        network.normaliser = {"mean": 0.5, "scale": 0.5}
        return network
    if is_url(str(path)):
        raise DisbackError(f"{path}: a URL must name an EDM network snapshot (.pkl)")
    path = Path(path)
    file = next((path / f for f in MODEL_FILES if (path / f).is_file()), path) if path.is_dir() else path
    if file.is_file() and file.suffix == ".safetensors" and read_metadata(file):
        return _disback_file(file)
    if path.is_dir():
        from disback.storage.kinds import import_pretrained

        denoiser, meta = import_pretrained(str(path))
        return EDMConvention(denoiser, meta.num_classes, meta.normaliser).eval().requires_grad_(False)
    raise DisbackError(
        f"{path} is not a model disback reads: give an EDM network snapshot (.pkl or its URL), a disback model file "
        "or run folder, or a diffusers UNet folder"
    )


def _disback_file(file: Path) -> nn.Module:
    from disback.storage.models import load_model

    meta = read_meta(file)
    if meta.adapter_rank:
        raise DisbackError(f"{file} holds LoRA adapters only; load the teacher they adapt, or a whole network")
    model, meta = load_model(file)
    denoiser = model.denoiser if meta.role == "generator" else model
    if meta.kind == "nvlabs":  # already EDM's convention
        denoiser.normaliser = meta.normaliser
        return denoiser.eval().requires_grad_(False)
    return EDMConvention(denoiser, meta.num_classes, meta.normaliser).eval().requires_grad_(False)
