"""Build denoisers and generators, and read them back from their self-describing safetensors files."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from disback.config import EDMConfig, NetworkConfig
from disback.denoiser import EDMDenoiser
from disback.errors import DisbackError
from disback.generator import OneStepGenerator
from disback.networks import build_backbone
from disback.weights import load_weights, read_metadata


def build_denoiser(network: NetworkConfig, dim: int, sigma_data: float) -> EDMDenoiser:
    return EDMDenoiser(build_backbone(network, dim), sigma_data)


def denoiser_metadata(network: NetworkConfig, dim: int, edm: EDMConfig, normaliser: dict, data: str) -> dict[str, Any]:
    """Everything needed to rebuild the network, sample it, and map its outputs back to the data's units."""
    return {"kind": "denoiser", "network": asdict(network), "dim": dim, "sigma_data": edm.sigma_data, "edm": asdict(edm),
            "normaliser": normaliser, "data": data}


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A denoiser or a one-step generator from its file; the architecture comes from the file's metadata."""
    meta = read_metadata(path)
    if meta.get("kind") not in ("denoiser", "generator"):
        raise DisbackError(f"{path} was not written by disback (no model description in its metadata)")
    net = NetworkConfig(**meta["network"])
    model: nn.Module = build_denoiser(net, meta["dim"], meta["sigma_data"])
    if meta["kind"] == "generator":
        model = OneStepGenerator(model, meta["sigma_g"])
    load_weights(model, path)
    return model, meta


def generator_from_teacher(teacher: EDMDenoiser, sigma_g: float) -> OneStepGenerator:
    """G_eta0: a copy of the teacher evaluated at sigma_g."""
    return OneStepGenerator(copy.deepcopy(teacher).requires_grad_(True), sigma_g)
