"""Build denoisers and generators, and read them back from their self-describing safetensors files.

A model file's header says how to rebuild the network: ``precond`` "edm" (our backbone from a NetworkConfig) or
"vp" (a diffusers UNet2DModel config plus its noise schedule, for teachers trained elsewhere).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disback.config import EDMConfig, NetworkConfig
from disback.denoiser import EDMDenoiser, VPDenoiser
from disback.errors import DisbackError
from disback.generator import OneStepGenerator
from disback.networks import build_backbone
from disback.weights import load_weights, read_metadata


def build_denoiser(network: NetworkConfig, shape: tuple[int, ...], sigma_data: float) -> EDMDenoiser:
    return EDMDenoiser(build_backbone(network, tuple(shape)), sigma_data)


def denoiser_metadata(network: NetworkConfig, shape: tuple[int, ...], edm: EDMConfig, normaliser: dict, data: str) -> dict[str, Any]:
    """Everything needed to rebuild the network, sample it, and map its outputs back to the data's units."""
    return {"kind": "denoiser", "precond": "edm", "network": asdict(network), "shape": list(shape), "sigma_data": edm.sigma_data,
            "edm": asdict(edm), "normaliser": normaliser, "data": data, "num_classes": network.num_classes}


def _rebuild(meta: dict[str, Any], folder: Path) -> nn.Module:
    if meta.get("precond", "edm") == "edm":
        return build_denoiser(NetworkConfig(**meta["network"]), tuple(meta["shape"]), meta["sigma_data"])
    if meta["precond"] == "vp-text":
        from disback.text import rebuild_text_denoiser

        return rebuild_text_denoiser(meta, folder)
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_config(meta["unet_config"])
    return VPDenoiser(unet, torch.full((meta["num_timesteps"],), 0.5), meta["prediction_type"])  # schedule: loaded with the weights


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A denoiser or a one-step generator from its file; the architecture comes from the file's metadata."""
    meta = read_metadata(path)
    if meta.get("kind") not in ("denoiser", "generator"):
        raise DisbackError(f"{path} was not written by disback (no model description in its metadata)")
    model = _rebuild(meta, Path(path).parent)
    if meta["kind"] == "generator":
        model = as_generator(model, meta.get("sigma_g", 0.0))
    load_weights(model, path)
    return model, meta


def generator_from_teacher(teacher: nn.Module, sigma_g: float) -> nn.Module:
    """G_eta0: a copy of the teacher as a one-step generator."""
    return as_generator(copy.deepcopy(teacher).requires_grad_(True), sigma_g)


def as_generator(denoiser: nn.Module, sigma_g: float) -> nn.Module:
    """``denoiser`` evaluated at sigma_g; a text-to-image denoiser at its fixed timestep instead, as LCM samples."""
    from disback.text import LCMGenerator, TextDenoiser

    if isinstance(denoiser, TextDenoiser):
        return LCMGenerator(denoiser, denoiser.generator_timestep)
    return OneStepGenerator(denoiser, sigma_g)


def import_pretrained(source: str) -> tuple[VPDenoiser, dict[str, Any]]:
    """A diffusers UNet2DModel and its scheduler, from a local folder or a hub id, as a VP denoiser.

    Accepts a pipeline folder (``unet/`` and ``scheduler/`` subfolders) or a model folder (the UNet's config.json and
    scheduler_config.json side by side), as the hub's DDPM models are laid out.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    unet = _from_pretrained(UNet2DModel, source, "unet")
    scheduler = _from_pretrained(DDPMScheduler, source, "scheduler")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    model = VPDenoiser(unet, scheduler.alphas_cumprod, prediction)
    cfg = json.loads(unet.to_json_string())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    meta = {"kind": "denoiser", "precond": "vp", "unet_config": cfg, "num_timesteps": len(scheduler.alphas_cumprod),
            "prediction_type": prediction, "source": str(source), "num_classes": unet.config.num_class_embeds or 0,
            "shape": [unet.config.in_channels, unet.config.sample_size, unet.config.sample_size]}
    return model, meta


def _from_pretrained(cls, source: str, subfolder: str):
    errors = []
    for sub in (subfolder, None):
        try:
            return cls.from_pretrained(source, subfolder=sub) if sub else cls.from_pretrained(source)
        except (OSError, ValueError, EnvironmentError) as exc:
            errors.append(str(exc).splitlines()[0])
    raise DisbackError(f"cannot load a diffusers {cls.__name__} from '{source}' (tried '{subfolder}/' and the top level): {errors[-1]}")
